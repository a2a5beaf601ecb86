"""Ingest steps that depend on where records came from: the split keeps one input row's records together,
`read` counts rows, and the GC pause around reading always ends."""

from __future__ import annotations

import gc

import pytest

from distillery.core.records import make_record
from distillery.stages.ingest import cyclic_gc_paused, split


def pair(row: int, file: str = "/data/a/1_구어체.xlsx") -> list[dict]:
    meta = {"file": file, "sheet": "Sheet1", "row": row}
    return [make_record("ko-en", "translate_ko_en", [{"role": "user", "content": f"ko {row}"},
                                                      {"role": "assistant", "content": f"en {row}"}], dict(meta)),
            make_record("ko-en", "translate_en_ko", [{"role": "user", "content": f"en {row}"},
                                                      {"role": "assistant", "content": f"ko {row}"}], dict(meta))]


def rows_of(records: list[dict]) -> set[int]:
    return {r["meta"]["row"] for r in records}


def test_both_directions_of_a_row_land_in_the_same_split() -> None:
    records = [r for row in range(2, 202) for r in pair(row)]
    train, evaluation = split(records, 0.2, seed=3)
    assert evaluation and not rows_of(train) & rows_of(evaluation)
    assert len(evaluation) % 2 == 0 and 20 <= len(evaluation) // 2 <= 60


def test_the_split_does_not_change_when_the_data_moves() -> None:
    here = [r for row in range(2, 102) for r in pair(row)]
    moved = [r for row in range(2, 102) for r in pair(row, file="/elsewhere/1_구어체.xlsx")]
    assert rows_of(split(here, 0.2, seed=3)[1]) == rows_of(split(moved, 0.2, seed=3)[1])


def test_one_row_is_never_split_from_itself_even_when_small() -> None:
    train, evaluation = split(pair(2), 0.5, seed=1)
    assert (len(train), len(evaluation)) == (2, 0)  # a lone row stays in train


def test_the_gc_pause_ends_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cyclic_gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("reader failed")
    assert gc.isenabled()


def test_a_tiny_source_keeps_a_train_row() -> None:
    records = pair(2) + pair(3)
    for seed in range(20):
        train, evaluation = split(records, 0.9, seed=seed)
        assert len(train) == 2 and len(evaluation) == 2 and not rows_of(train) & rows_of(evaluation)
