"""Ingest steps that depend on where records came from: the split keeps one input row's records together,
`read` counts rows, and the GC pause around reading always ends."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from distillery.core.records import make_record
from distillery.sources.shards import cyclic_gc_paused
from distillery.stages.ingest import split
from tests.fixtures.shards import everything, source_rows


def pair(row: int, file: str = "/data/a/1_구어체.xlsx") -> list[dict]:
    meta = {"file": file, "sheet": "Sheet1", "row": row}
    return [make_record("ko-en", "translate_ko_en", [{"role": "user", "content": f"ko {row}"},
                                                      {"role": "assistant", "content": f"en {row}"}], dict(meta)),
            make_record("ko-en", "translate_en_ko", [{"role": "user", "content": f"en {row}"},
                                                      {"role": "assistant", "content": f"ko {row}"}], dict(meta))]


def rows_of(records: list[dict], positions: list[int]) -> set[int]:
    return {records[i]["meta"]["row"] for i in positions}


def split_records(records: list[dict], fraction: float, seed: int, directory: Path) -> tuple[set[int], set[int]]:
    """The input rows of the train and eval records."""
    rows = source_rows(records, directory, seed)
    train, evaluation = split(rows, everything(rows), fraction)
    assert sorted(train + evaluation) == everything(rows)
    return rows_of(records, train), rows_of(records, evaluation)


def test_both_directions_of_a_row_land_in_the_same_split(tmp_path: Path) -> None:
    records = [r for row in range(2, 202) for r in pair(row)]
    rows = source_rows(records, tmp_path, seed=3)
    train, evaluation = split(rows, everything(rows), 0.2)
    assert evaluation and not rows_of(records, train) & rows_of(records, evaluation)
    assert len(evaluation) % 2 == 0 and 20 <= len(evaluation) // 2 <= 60


def test_the_split_does_not_change_when_the_data_moves(tmp_path: Path) -> None:
    here = [r for row in range(2, 102) for r in pair(row)]
    moved = [r for row in range(2, 102) for r in pair(row, file="/elsewhere/1_구어체.xlsx")]
    assert split_records(here, 0.2, 3, tmp_path)[1] == split_records(moved, 0.2, 3, tmp_path)[1]


def test_one_row_is_never_split_from_itself_even_when_small(tmp_path: Path) -> None:
    assert split_records(pair(2), 0.5, 1, tmp_path) == ({2}, set())  # a lone row stays in train


def test_the_gc_pause_ends_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cyclic_gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("reader failed")
    assert gc.isenabled()


def test_a_tiny_source_keeps_a_train_row(tmp_path: Path) -> None:
    records = pair(2) + pair(3)
    for seed in range(20):
        train, evaluation = split_records(records, 0.9, seed, tmp_path)
        assert len(train) == 1 and len(evaluation) == 1 and not train & evaluation


def test_a_source_of_more_than_65535_files_keeps_few_open(tmp_path) -> None:
    """A source of that many workbooks overflowed the 16-bit shard numbers (OverflowError), and every shard file
    read stayed open (past the open-files limit long before)."""
    from array import array

    from distillery.sources import SourceReport
    from distillery.sources.shards import OPEN_SHARDS, Shard, SourceRows

    lines = [b'{"n": %d}\n' % k for k in range(100)]
    for k, line in enumerate(lines):
        (tmp_path / f"{k}.jsonl").write_bytes(line)
    shards = [Shard(tmp_path / f"{k % 100}.jsonl", SourceReport("s"), [f"id{k}"], [b"k"], array("d", [0.0]),
                    array("q", [0]), array("l", [len(lines[k % 100])])) for k in range(70_000)]
    rows = SourceRows(shards)
    try:
        assert rows.line(69_999) == b'{"n": 99}\n' and rows.line(65_536) == b'{"n": 36}\n'
        for k in range(100):
            assert rows.line(k) == b'{"n": %d}\n' % k
            assert len(rows.handles) <= OPEN_SHARDS
    finally:
        rows.close()
