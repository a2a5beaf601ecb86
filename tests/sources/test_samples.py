"""The bundled demo samples: correct, in their layouts, and ingested by configs/demo.yaml without surprises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distillery.config import load_config
from distillery.core.records import read_jsonl
from distillery.runner import run_stage

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "configs" / "samples"
STEP = re.compile(r"(\d+(?: [-+*/] \(?\d+(?: [-+*/] \d+)*\)?)+) = \$?(\d+)")


def test_every_step_of_the_gsm_sample_is_right_and_ends_in_the_answer() -> None:
    rows = list(read_jsonl(SAMPLES / "hf" / "gsm_instructions.jsonl"))
    assert len(rows) == 60 and all(set(r) == {"INSTRUCTION", "RESPONSE", "SOURCE"} for r in rows)
    for row in rows:
        steps = STEP.findall(row["RESPONSE"])
        assert steps, row["RESPONSE"]
        for expression, result in steps:
            assert eval(expression) == int(result), (expression, result)  # our own arithmetic, digits and + - * / only
        assert row["RESPONSE"].endswith(f"#### {steps[-1][1]}")


def test_mathqa_sample_is_the_tail_of_the_test_split(shared_file) -> None:
    test_lines = shared_file("data/mathqa/test.jsonl").read_text(encoding="utf-8").splitlines()
    sample = (SAMPLES / "hf" / "mathqa_train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s) for s in sample] == [json.loads(t) for t in test_lines[-80:]]


def test_demo_config_ingests_every_bundled_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the project root
    # what the readers make of the samples; what decontamination drops from them: test_ingest_decontaminate.py
    run_stage("ingest", load_config(ROOT / "configs" / "demo.yaml", [f"run.root={tmp_path}",
                                                                     "ingest.decontaminate.enabled=false"]))
    report = json.loads((tmp_path / "demo" / "ingest" / "report.json").read_text(encoding="utf-8"))
    by_name = {s["source"]: s for s in report["sources"]}
    assert {n: (s["read"], s["kept"]) for n, s in by_name.items()} == {
        "aihub-ko-en": (106, 212), "gsm-instructions": (60, 60), "mathqa": (80, 80), "codeio": (10, 20)}
    assert all(not s["dropped"] and not s["notes"] for s in by_name.values())
    train = list(read_jsonl(tmp_path / "demo" / "ingest" / "train.jsonl"))
    tasks = {r["task"] for r in train}
    assert {"translate_ko_en", "translate_en_ko", "qa", "math_mc", "code_io_output", "code_io_input"} <= tasks
    evaluation = list(read_jsonl(tmp_path / "demo" / "ingest" / "eval.jsonl"))

    def rows(records: list[dict]) -> set[tuple]:
        return {(r["source"], r["meta"]["file"], r["meta"].get("row"), r["meta"].get("line")) for r in records}

    assert not rows(train) & rows(evaluation)  # both directions of a pair, both prompts of a CodeI/O record, together
    assert {r["task"] for r in evaluation} >= {"translate_ko_en", "translate_en_ko"}
    sheets = {Path(r["meta"]["file"]).name for r in train if r["source"] == "aihub-ko-en"}
    assert sheets == {"1_구어체.xlsx", "2_대화체.xlsx", "3_뉴스.xlsx"}


def test_codeio_sample_is_real_records_of_the_shared_file(shared_file) -> None:
    def canonical(line: str) -> str:
        return json.dumps(json.loads(line), sort_keys=True)

    shared = {canonical(line) for line in
              shared_file("data/codeio/rawcode_1k_parsed.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()}
    sample = (SAMPLES / "codeio" / "raw.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(sample) == 10 and all(canonical(line) in shared for line in sample)
