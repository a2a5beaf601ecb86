"""Ingest drops training records that overlap the run's evaluation sets: evaluate's MathQA items, the `against`
files and the held-out split; it says which set and what overlapped, and counts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.records import read_jsonl
from distillery.core.rundir import RunDir
from distillery.runner import fingerprint, run_stage
from distillery.stage import load_stage

ROOT = Path(__file__).resolve().parents[2]
MATHQA_TEST = ROOT / "configs" / "samples" / "mathqa" / "test.jsonl"
GSM = ROOT / "configs" / "samples" / "hf" / "gsm_instructions.jsonl"
MATHQA_TRAIN = ROOT / "configs" / "samples" / "hf" / "mathqa_train.jsonl"
ARTICLE = ("서울시는 내년부터 한강 공원 전 구간에서 자전거 대여 서비스를 무료로 제공하고 야간 조명을 두 배로 늘리기로 "
           "했다고 밝혔다.")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def mathqa_test_items(*numbers: int) -> list[dict]:
    rows = list(read_jsonl(MATHQA_TEST))
    return [rows[n] for n in numbers]


def write_config(path: Path, sources: list[dict], eval_fraction: float = 0.0, **decontaminate) -> Path:
    path.write_text(yaml.safe_dump({"evaluate": {"data": str(MATHQA_TEST)}, "ingest": {
        "eval_fraction": eval_fraction, "decontaminate": decontaminate, "sources": sources}}), encoding="utf-8")
    return path


def dropped_reasons() -> dict[int, str]:
    """line of the training file -> reason, for the records dropped as contaminated."""
    return {row["line"]: row["reason"] for row in read_jsonl(Path("runs/demo/ingest/dropped.jsonl"))
            if row["reason"].startswith("contaminated")}


def test_planted_mathqa_test_items_are_dropped_verbatim_or_lightly_edited(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    verbatim, number, start, case = mathqa_test_items(0, 2, 3, 7)
    planted = [verbatim,
               {**number, "Problem": number["Problem"].replace("28 stations", "29 stations")},
               {**start, "Problem": "suppose the " + " ".join(start["Problem"].split()[2:])},
               {**case, "Problem": "  ".join(case["Problem"].upper().split(" ")) + "\n\n"}]
    unrelated = list(read_jsonl(GSM))[:30]
    write_jsonl(Path("mathqa.jsonl"), planted[:2] + list(read_jsonl(MATHQA_TRAIN))[:20] + planted[2:])
    as_question = {"INSTRUCTION": mathqa_test_items(6)[0]["Problem"], "RESPONSE": "It takes 5 hours.\n#### 5"}
    write_jsonl(Path("gsm.jsonl"), unrelated[:15] + [as_question] + unrelated[15:])
    run_stage("ingest", load_config(write_config(Path("c.yaml"), [
        {"name": "mathqa", "kind": "hf", "files": "mathqa.jsonl", "format": "mathqa"},
        {"name": "gsm", "kind": "hf", "files": "gsm.jsonl"}])))

    reasons = dropped_reasons()
    assert sorted(reasons) == [1, 2, 16, 23, 24]  # the four planted MathQA rows and the planted question
    test_line = {1: 1, 2: 3, 23: 4, 24: 8, 16: 7}  # where each came from in test.jsonl
    whole = {1, 16, 24}  # copied whole, case and spacing aside; the others edited, found by a 13-gram they keep
    for line, reason in reasons.items():
        found_by = "the whole text" if line in whole else '13-gram "'
        assert reason.startswith(f"contaminated: evaluate.data test.jsonl, {found_by}"), reason
        assert reason.endswith(f" of test.jsonl:{test_line[line]}"), reason
    report = json.loads(Path("runs/demo/ingest/report.json").read_text())
    mathqa, gsm = report["sources"]
    assert mathqa["dropped"] == {"contaminated: evaluate.data test.jsonl": 4} and mathqa["train"] == 20
    assert gsm["dropped"] == {"contaminated: evaluate.data test.jsonl": 1} and gsm["train"] == 30
    assert report["decontamination"]["contaminated"] == {"evaluate.data test.jsonl": 5}
    assert report["decontamination"]["sets"][0] == {"set": "evaluate.data test.jsonl", "items": 100,
                                                    "ngrams": report["decontamination"]["sets"][0]["ngrams"],
                                                    "too_short": 2}
    assert "| mathqa | hf | 24 | 20 | 4 contaminated: evaluate.data test.jsonl | 20 | 0 |" in \
        Path("runs/demo/ingest/report.md").read_text()
    train = Path("runs/demo/ingest/train.jsonl").read_text()
    assert "shopkeeper" not in train and "stations" not in train


def test_a_korean_copy_respaced_is_found_by_character_ngrams(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("held_out_ko.jsonl"), [{"messages": [
        {"role": "user", "content": f"다음 기사를 한 문장으로 요약하세요.\n\n{ARTICLE}"},
        {"role": "assistant", "content": "서울시가 한강 공원 자전거 대여를 무료로 한다."}]}])
    respaced = ARTICLE.replace("한강 공원 전 구간에서", "한강공원 전구간에서").replace("대여 서비스를", "대여서비스를")
    rows = [{"question": f"{respaced.replace('.', '!')} 이 소식의 요점은?", "answer": "무료 자전거 대여입니다."},
            {"question": "한강 공원에 가는 가장 빠른 길이 무엇인가요?", "answer": "지하철 5호선을 타세요."},
            {"question": "오늘 저녁에 무엇을 먹을까요? 비가 오니까 따뜻한 국물 요리가 좋겠어요.", "answer": "김치찌개 어때요?"}]
    write_jsonl(Path("ko.jsonl"), rows)
    run_stage("ingest", load_config(write_config(Path("c.yaml"), [
        {"name": "ko", "kind": "hf", "files": "ko.jsonl", "columns": {"user": "question", "assistant": "answer"}}],
        against=["held_out_ko.jsonl"])))
    assert list(dropped_reasons()) == [1]
    assert dropped_reasons()[1].startswith('contaminated: held_out_ko.jsonl, 25-character n-gram "서울시는내년부터한강공원')
    assert dropped_reasons()[1].endswith("of held_out_ko.jsonl:1")
    assert json.loads(Path("runs/demo/ingest/report.json").read_text())["train"] == 2


def test_the_held_out_split_is_an_evaluation_set_and_keep_only_reports(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    problems = [row["Problem"] for row in read_jsonl(MATHQA_TRAIN) if len(row["Problem"].split()) >= 20][:40]
    copies = [p.replace(" is ", " was ", 1) + " explain." for p in problems]
    write_jsonl(Path("qa.jsonl"), [{"INSTRUCTION": p, "RESPONSE": "42"} for p in problems + copies])
    source = [{"name": "qa", "kind": "hf", "files": "qa.jsonl"}]
    run_stage("ingest", load_config(write_config(Path("c.yaml"), source, eval_fraction=0.2)))
    report = json.loads(Path("runs/demo/ingest/report.json").read_text())
    evaluation = {row["messages"][0]["content"] for row in read_jsonl(Path("runs/demo/ingest/eval.jsonl"))}
    train = {row["messages"][0]["content"] for row in read_jsonl(Path("runs/demo/ingest/train.jsonl"))}
    split_pairs = [(p, c) for p, c in zip(problems, copies) if (p in evaluation) != (c in evaluation)]
    # the half of each split pair that landed in train is dropped: nothing left in train is a copy of eval
    assert split_pairs and all(p not in train and c not in train for p, c in split_pairs)
    assert report["decontamination"]["contaminated"] == {"held-out split": len(split_pairs)}
    assert report["train"] + report["eval"] + len(split_pairs) == 2 * len(problems)

    run_stage("ingest", load_config(write_config(Path("c.yaml"), source, eval_fraction=0.2, action="keep")))
    kept = json.loads(Path("runs/demo/ingest/report.json").read_text())
    assert kept["train"] == 2 * len(problems) - kept["eval"] and kept["decontamination"]["total"] == len(split_pairs)
    assert len(kept["decontamination"]["kept"]) == len(split_pairs) and dropped_reasons() == {}


def test_without_mathqa_the_held_out_split_is_still_checked(tmp_path: Path, monkeypatch) -> None:
    """evaluate.data: null (no MathQA) leaves the held-out split to check against, and is no crash."""
    monkeypatch.chdir(tmp_path)
    problems = [row["Problem"] for row in read_jsonl(MATHQA_TRAIN) if len(row["Problem"].split()) >= 20][:20]
    copies = [p.replace(" is ", " was ", 1) + " explain." for p in problems]
    write_jsonl(Path("qa.jsonl"), [{"INSTRUCTION": p, "RESPONSE": "42"} for p in problems + copies])
    config = write_config(Path("c.yaml"), [{"name": "qa", "kind": "hf", "files": "qa.jsonl"}], eval_fraction=0.25)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["evaluate"]["data"] = None
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    status, _, _ = run_stage("ingest", load_config(config))
    report = json.loads(Path("runs/demo/ingest/report.json").read_text())
    assert status == "done" and set(report["decontamination"]["contaminated"]) == {"held-out split"}


def test_the_fingerprint_follows_the_evaluation_sets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("d.jsonl"), list(read_jsonl(GSM))[:5])
    against = write_jsonl(Path("against.jsonl"), mathqa_test_items(0))
    source = [{"name": "one", "kind": "hf", "files": "d.jsonl"}]
    config = write_config(Path("c.yaml"), source, against=["against.jsonl"])
    stage = load_stage("ingest")

    def current() -> str:
        cfg = load_config(config)
        return fingerprint(stage, cfg, RunDir(cfg.run.root, cfg.run.name))[0]

    before = current()
    assert current() == before
    write_jsonl(against, mathqa_test_items(1))
    assert current() != before
    checked = current()
    write_config(config, source, against=["against.jsonl"], enabled=False)
    unchecked = current()
    assert unchecked != checked
    write_jsonl(against, mathqa_test_items(2))  # not checked, so not part of the fingerprint
    assert current() == unchecked


def test_an_against_file_that_is_missing_unreadable_or_of_another_shape_is_one_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("d.jsonl"), list(read_jsonl(GSM))[:5])
    source = [{"name": "one", "kind": "hf", "files": "d.jsonl"}]
    with pytest.raises(UserError, match=r"ingest.decontaminate.against: missing.jsonl does not exist"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=["missing.jsonl"])))
    Path("bad.jsonl").write_text('{"Problem": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl: line 2 is not valid JSON"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=["bad.jsonl"])))
    Path("empty.jsonl").write_text("\n", encoding="utf-8")  # an empty csv was refused, an empty jsonl checked nothing
    with pytest.raises(UserError, match=r"against: empty.jsonl holds no record, so it checks nothing"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=["empty.jsonl"])))
    write_jsonl(Path("other.jsonl"), [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"other.jsonl:1 \(other.jsonl\) is neither a record with `messages`.*"
                                        r"it has: question, answer"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=["other.jsonl"])))
    assert not Path("runs/demo/ingest").exists()

    write_config(Path("c.yaml"), source, against=["missing.jsonl"])
    result = subprocess.run([sys.executable, "-m", "distillery", "ingest", "-c", "c.yaml"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing.jsonl does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_against_never_reads_this_runs_own_files_and_says_when_runs_were_left_out(tmp_path: Path, monkeypatch) -> None:
    """From a review: `against` could name this run's own train.jsonl (each ingest then dropped another set: 310, 53,
    310 records); a pattern reaching another run's eval.jsonl said it matched no file, and a run's folder read its
    manifest.json as data."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("d.jsonl"), list(read_jsonl(GSM))[:5])
    source = [{"name": "one", "kind": "hf", "files": "d.jsonl"}]
    assert run_stage("ingest", load_config(write_config(Path("c.yaml"), source, eval_fraction=0.4)))[0] == "done"
    own = "runs/demo/ingest/train.jsonl"
    with pytest.raises(UserError, match=r"ingest.decontaminate.against: runs/demo/ingest/train.jsonl is in this run's "
                                        r"own directory"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=[own])))
    with pytest.raises(UserError, match=r"'runs/\*/ingest/\*.jsonl' matches only files inside Distillery runs.*such "
                                        r"as runs/demo/ingest/\w+.jsonl\. Name a file itself"):
        run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=["runs/*/ingest/*.jsonl"])))
    for spec in ("runs/demo", "runs/demo/*", "runs/demo/**"):  # a pattern in it read its manifest.json as data
        with pytest.raises(UserError, match=r"against: runs/demo(/\*+)? reads a Distillery run's folder runs/demo \(it "
                                            r"holds the run's manifest.json\): name the files you mean in its stage "
                                            r"folders \(runs/demo/ingest and the others\)"):
            run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=[spec])))
    for spec in ("runs/demo/ingest", "runs/demo/ingest/*.jsonl"):  # named outright, an own file is refused too
        with pytest.raises(UserError, match=r"only files in this run's own directory, which ingest writes into"):
            run_stage("ingest", load_config(write_config(Path("c.yaml"), source, against=[spec])))
    other = tmp_path / "other"
    other.mkdir()
    (Path("runs/demo")).rename(other / "demo")  # another run's held-out split, named itself, is read
    assert run_stage("ingest", load_config(write_config(Path("c.yaml"), source,
                                                        against=["other/demo/ingest/eval.jsonl"])))[0] == "done"


def test_the_demo_config_still_ingests(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    run_stage("ingest", load_config(ROOT / "configs" / "demo.yaml", [f"run.root={tmp_path}"]))
    report = json.loads((tmp_path / "demo" / "ingest" / "report.json").read_text())
    decontamination = report["decontamination"]
    mathqa_test = "configs/samples/mathqa/test.jsonl"  # the demo's decontaminate.against (it scores no MathQA)
    assert [s["set"] for s in decontamination["sets"]] == [mathqa_test, "held-out split"]
    assert decontamination["not_checked"] == []
    # MathQA test item 65 is in the demo's MathQA sample too, reworded (the sample is the split's last 80 items);
    # the GSM samples are made from templates, so the held-out ones have twins in train that differ only in names
    # and numbers; two CodeI/O records share the standard reference-code comments with the held-out one
    assert decontamination["contaminated"] == {"held-out split": 20, mathqa_test: 1}
    dropped = {(row["source"], row.get("line")): row["reason"] for row in read_jsonl(tmp_path / "demo" / "ingest" /
                                                                                    "dropped.jsonl")}
    assert dropped[("mathqa", 63)].endswith(" of test.jsonl:65")
    assert [r["dropped"] for r in report["sources"]][1:] == [{"contaminated: held-out split": 16},
                                                             {f"contaminated: {mathqa_test}": 1},
                                                             {"contaminated: held-out split": 4}]


def test_the_full_mathqa_test_split_finds_the_demo_samples_taken_from_it(tmp_path: Path, monkeypatch, shared_file) -> None:
    """The demo's MathQA 'train' sample is the last 80 problems of the test split (configs/samples/README.md):
    checked against the whole split, all are found but three of under 8 words ("1398 x 1398 = ?")."""
    full = shared_file("data/mathqa/test.jsonl")
    monkeypatch.chdir(tmp_path)
    config = write_config(Path("c.yaml"), [
        {"name": "mathqa", "kind": "hf", "files": str(MATHQA_TRAIN), "format": "mathqa"},
        {"name": "gsm", "kind": "hf", "files": str(GSM)}])
    run_stage("ingest", load_config(config, [f"evaluate.data={full}"]))
    report = json.loads(Path("runs/demo/ingest/report.json").read_text())
    assert report["decontamination"]["contaminated"] == {"evaluate.data test.jsonl": 77}
    assert report["decontamination"]["sets"][0]["items"] == 2985
    assert [source["train"] for source in report["sources"]] == [3, 60]
    train = Path("runs/demo/ingest/train.jsonl").read_text()
    assert all(short in train for short in ("1398 x 1398", "express 35 mps in kmph", "32.32 / 2000"))


def test_the_model_card_says_how_many_records_were_dropped_and_against_what(tmp_path: Path, monkeypatch) -> None:
    from distillery.commands.push import decontamination_line

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("d.jsonl"), list(read_jsonl(GSM))[:10] + [{"INSTRUCTION": mathqa_test_items(0)[0]["Problem"],
                                                                  "RESPONSE": "38"}])
    source = [{"name": "one", "kind": "hf", "files": "d.jsonl"}]
    run = RunDir("runs", "demo")
    assert decontamination_line(run) == "The training data was not checked for overlap with the evaluation sets."
    run_stage("ingest", load_config(write_config(Path("c.yaml"), source)))
    assert decontamination_line(run) == (
        "Decontamination: training records that overlap an evaluation set, dropped before training: 1 (1 against "
        "evaluate.data test.jsonl). Checked against evaluate.data test.jsonl (100 items), held-out split (0 items), "
        "by 13-word and 25-character (Hangul) n-grams.")
    run_stage("ingest", load_config(write_config(Path("c.yaml"), source), ["evaluate.data=someone/not_cached"]))
    assert decontamination_line(run).startswith(
        "Decontamination: training records that overlap an evaluation set, dropped before training: 0. Checked "
        "against held-out split (0 items), by 13-word and 25-character (Hangul) n-grams. Not checked: evaluate.data "
        "someone/not_cached (test), a Hub dataset not in the local Hugging Face cache")


def test_evaluate_data_that_is_a_folder_or_a_pipe_is_named_as_such_not_as_missing(tmp_path: Path) -> None:
    from distillery.evals.decontaminate import evaluate_data_files

    os.mkfifo(tmp_path / "fifo.jsonl")
    for path in (tmp_path, tmp_path / "fifo.jsonl"):
        assert evaluate_data_files(str(path), "test") == (
            [], f"evaluate.data {path} is not a regular file (a folder, a pipe or a device) (evaluate will say so too)")
    assert evaluate_data_files(str(tmp_path / "gone.jsonl"), "test")[1] == (
        f"evaluate.data {tmp_path / 'gone.jsonl'} does not exist (evaluate will say so too)")
