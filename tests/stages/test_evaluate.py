"""The evaluate stage: artifacts found or reported, outputs written, bad input explained (tiny model, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.core.rundir import RunDir
from distillery.runner import run_stage
from distillery.stage import StageContext
from distillery.stages import evaluate
from tests.fixtures.tiny_lm import build_tiny_lm

ROW = {"Problem": "what is {i} + 1 ?", "options": "a ) 1 , b ) 2 , c ) 33 , d ) 4 , e ) none of these", "correct": "b"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    rows = [{**ROW, "Problem": ROW["Problem"].format(i=i)} for i in range(6)]
    rows[2]["options"] = "1 or 2"  # cannot be split into five choices
    (tmp_path / "mathqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "a"}]}) + "\n")
    config = {"run": {"name": "t", "root": "runs"}, "model": {"path": str(tiny_dir)},
              "ingest": {"sources": [{"name": "toy", "kind": "hf", "files": "sft.jsonl", "format": "messages"}]},
              "export": {"enabled": False},
              "evaluate": {"data": "mathqa.jsonl", "artifacts": ["base"], "batch_size": 2,
                           "heldout": {"enabled": False}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp_path


def test_base_model_scores_and_outputs(project: Path) -> None:
    cfg = load_config("config.yaml")
    status, result, _ = run_stage("evaluate", cfg)
    assert status == "done"
    out = project / "runs" / "t" / "evaluate"
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.json", "comparison.md", "comparison.png", "heldout.json", "heldout_items.jsonl", "per_item.jsonl",
        "report.md", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 5 and list(results["artifacts"]) == ["base"]
    assert results["skipped_items"] == [{"id": "mathqa.jsonl:3", "reason": "options not parseable into 5 choices: '1 or 2'"}]
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["mathqa.jsonl:1", "mathqa.jsonl:2", "mathqa.jsonl:4", "mathqa.jsonl:5", "mathqa.jsonl:6"]
    assert all(len(r["loglikelihoods"]) == 5 and r["label"] == 1 for r in rows)
    base = results["artifacts"]["base"]
    assert base["acc"] == sum(r["acc"] for r in rows) / 5 and base["acc_stderr"] is not None
    assert "| base | base |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert run_stage("evaluate", cfg)[0] == "up to date"


def test_upstream_follows_the_artifacts(project: Path) -> None:
    cfg = load_config("config.yaml")
    assert evaluate.upstream(cfg) == ()
    cfg = load_config("config.yaml", ["evaluate.artifacts=auto"])
    assert evaluate.upstream(cfg) == ("finetune",)
    cfg = load_config("config.yaml", ["evaluate.artifacts=auto", "export.enabled=true"])
    assert evaluate.upstream(cfg) == ("finetune", "export")


def context(cfg, project: Path) -> StageContext:
    from rich.console import Console

    out = project / "out"
    out.mkdir()
    return StageContext(cfg=cfg, run=RunDir("runs", "t"), out=out, console=Console(quiet=True))


def listed_by_export(gguf: Path, *names: str) -> None:
    """export's summary.json naming these GGUFs as the ones it made (evaluate scores those only)."""
    (gguf.parent / "summary.json").write_text(json.dumps({"files": {name.split("-")[-1]: name for name in names}}))


def test_only_the_ggufs_export_made_are_scored(project: Path) -> None:
    """Every *.gguf in export/gguf/ was scored: one an earlier export left there, or one put there by hand."""
    gguf = project / "runs" / "t" / "export" / "gguf"
    gguf.mkdir(parents=True)
    for name in ("model-Q4_K_M.gguf", "model-Q8_0.gguf", "dropped-in.gguf"):
        (gguf / name).write_bytes(b"GGUF")
    listed_by_export(gguf, "model-Q4_K_M.gguf", "model-Q8_0.gguf")
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    ctx = context(load_config("config.yaml", ["export.enabled=true"]), project)
    assert [a.name for a in evaluate.exported_ggufs(ctx)] == ["model-Q4_K_M", "model-Q8_0"]
    (gguf.parent / "summary.json").write_text('{"files": ')
    with pytest.raises(UserError, match=r"export/summary.json is not what `distillery export` writes"):
        evaluate.exported_ggufs(ctx)


def test_a_gguf_that_does_not_load_is_reported_and_skipped(project: Path) -> None:
    gguf = project / "runs" / "t" / "export" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"not a gguf at all")
    listed_by_export(gguf, "model-Q4_K_M.gguf")
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    cfg = load_config("config.yaml", ["evaluate.artifacts=auto", "export.enabled=true", "evaluate.limit=2"])
    result = evaluate.run(context(cfg, project))
    results = json.loads((project / "out" / "results.json").read_text())
    assert list(results["artifacts"]) == ["base"]
    assert "not a GGUF file" in results["errors"]["model-Q4_K_M"]
    assert ("not scored", "model-Q4_K_M") in result.summary
    assert "model-Q4_K_M: " in (project / "out" / "comparison.md").read_text()


def test_a_gguf_llama_cpp_crashes_on_as_it_loads_is_reported_and_the_others_scored(project: Path) -> None:
    """A GGUF whose token ids are past its vocabulary makes llama.cpp abort while loading: that crash ended the
    stage (only a refusal was caught there), losing the other artifacts' scores."""
    from tests.export.test_llama_child import gguf_with_token_ids_past_its_vocabulary

    pytest.importorskip("llama_cpp")
    gguf = project / "runs" / "t" / "export" / "gguf"
    gguf.mkdir(parents=True)
    gguf_with_token_ids_past_its_vocabulary(gguf / "model-Q4_1.gguf")
    listed_by_export(gguf, "model-Q4_1.gguf")
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    cfg = load_config("config.yaml", ["evaluate.artifacts=auto", "export.enabled=true", "evaluate.limit=2"])
    result = evaluate.run(context(cfg, project))
    results = json.loads((project / "out" / "results.json").read_text())
    assert list(results["artifacts"]) == ["base"] and ("not scored", "model-Q4_1") in result.summary
    assert "llama.cpp crashed with SIGABRT" in results["errors"]["model-Q4_1"]
    assert "std::out_of_range" in results["errors"]["model-Q4_1"]


def test_an_artifact_the_run_lacks_is_a_user_error(project: Path) -> None:
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    cfg = load_config("config.yaml", ["evaluate.artifacts=[base, adapter]"])
    with pytest.raises(UserError, match="no runs/<name>/finetune/adapter"):
        evaluate.run(context(cfg, project))


def test_unknown_model_path_is_a_user_error(project: Path) -> None:
    cfg = load_config("config.yaml", ["model.path=./no/such/model"])
    with pytest.raises(UserError, match="does not exist locally"):
        run_stage("evaluate", cfg)


def test_generative_mode_reports_accuracy_and_no_answer_share(project: Path) -> None:
    cfg = load_config("config.yaml", ["evaluate.mode=generative", "evaluate.max_new_tokens=4", "evaluate.limit=2"])
    run_stage("evaluate", cfg)
    results = json.loads((project / "runs" / "t" / "evaluate" / "results.json").read_text())
    base = results["artifacts"]["base"]
    assert base["n"] == 2 and 0 <= base["acc"] <= 1 and 0 <= base["no_answer"] <= 1
    rows = [json.loads(line) for line in (project / "runs" / "t" / "evaluate" / "per_item.jsonl").read_text().splitlines()]
    assert all("reply" in r and r["no_answer"] == int(r["pred"] is None) for r in rows)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, demo_model_path: str) -> Path:
    """A run directory as finetune and export leave it: a PEFT adapter (small random lora_B) on the demo
    model, the merged 16-bit model, and the bundled Q4_1 GGUF."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.evals.test_gguf_backend import bundled_gguf

    run = tmp_path_factory.mktemp("project") / "runs" / "demo"
    adapter, export = run / "finetune" / "adapter", run / "export"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(adapter)
    (run / "finetune" / "summary.json").write_text(json.dumps({
        "backend": "hf", "base_model": demo_model_path, "model_path": "bundled:SmolLM2-135M-Instruct", "device": "cpu",
        "load_in_4bit": False, "precision": "fp32", "template": "chat", "max_length": 512, "lora": {"r": 8},
        "steps": 0}))
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(export / "merged")
    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(export / "merged")
    (export / "gguf").mkdir()
    (export / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf").symlink_to(bundled_gguf())
    listed_by_export(export / "gguf", "SmolLM2-135M-Instruct-Q4_1.gguf")
    from tests.evals.test_heldout import eval_rows, write_eval

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    (run / "format").mkdir()
    write_eval(run / "format" / "eval.jsonl", eval_rows(tokenizer))
    (run / "format" / "template.json").write_text(json.dumps({"name": "chat", "eos_token": tokenizer.eos_token}))
    return run


@pytest.mark.integration
def test_every_artifact_of_a_demo_run_is_scored_and_compared(demo_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp")
    from rich.console import Console

    monkeypatch.chdir(demo_run.parent.parent)
    sample = Path(__file__).resolve().parents[2] / "configs" / "samples" / "mathqa" / "test.jsonl"
    config = {"run": {"name": "demo", "root": "runs"},
              "ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl", "format": "messages"}]},
              "evaluate": {"data": str(sample), "limit": 6, "batch_size": 4, "dtype": "float32",
                           "heldout": {"generate": 1, "max_new_tokens": 16}}}
    cfg = load_config_dict(config, demo_run.parent.parent)
    out = demo_run / ".evaluate.partial"
    out.mkdir()
    evaluate.run(StageContext(cfg=cfg, run=RunDir("runs", "demo"), out=out, console=Console(quiet=True)))
    results = json.loads((out / "results.json").read_text())
    assert list(results["artifacts"]) == ["base", "adapter", "merged", "SmolLM2-135M-Instruct-Q4_1"]
    assert results["errors"] == {} and results["n"] == 6
    lls = {}
    for line in (out / "per_item.jsonl").read_text().splitlines():
        row = json.loads(line)
        lls.setdefault(row["artifact"], []).extend(row["loglikelihoods"])
    diff = lambda a, b: max(abs(x - y) for x, y in zip(lls[a], lls[b]))  # noqa: E731
    assert diff("adapter", "base") > 0.01  # the adapter changes the model ...
    assert diff("adapter", "merged") < 0.2  # ... and merging it (to bf16) keeps that change
    assert diff("SmolLM2-135M-Instruct-Q4_1", "base") < 1.0
    table = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in table for name in results["artifacts"])
    assert (out / "comparison.png").stat().st_size > 1000
    check_heldout(out, demo_run)


@pytest.mark.integration
def test_a_gguf_llama_cpp_cannot_decode_is_reported_and_the_other_artifacts_kept(
        demo_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp refusing a batch (here a context of fewer cells than one held-out sequence) is that GGUF's error
    in results.json and the summary, not the end of the stage and of every score before it."""
    pytest.importorskip("llama_cpp")
    from rich.console import Console

    monkeypatch.chdir(demo_run.parent.parent)
    monkeypatch.setattr(evaluate, "gguf_context", lambda cfg: 16)
    config = {"run": {"name": "demo", "root": "runs"},
              "ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl", "format": "messages"}]},
              "evaluate": {"data": None, "artifacts": ["base", "gguf"], "heldout": {"generate": 0}}}
    cfg = load_config_dict(config, demo_run.parent.parent)
    out = demo_run / ".evaluate.undecodable"
    out.mkdir()
    result = evaluate.run(StageContext(cfg=cfg, run=RunDir("runs", "demo"), out=out, console=Console(quiet=True)))
    error = json.loads((out / "results.json").read_text())["errors"]["SmolLM2-135M-Instruct-Q4_1"]
    assert "llama.cpp could not decode" in error and "no room for them in its context of 16 cells" in error
    assert list(json.loads((out / "heldout.json").read_text())) == ["base"]
    assert ("not scored", "SmolLM2-135M-Instruct-Q4_1") in result.summary


@pytest.mark.integration
def test_an_interrupted_evaluate_goes_on_from_the_next_artifact(demo_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage stopped while the merged model is scored (an out-of-memory error, say; the runner keeps a
    resumable stage's partial directory on any failure): base and adapter were kept there, and the same call scores
    only what is left; the outputs hold all four and the kept scores are not left among them."""
    pytest.importorskip("llama_cpp")
    from rich.console import Console

    monkeypatch.chdir(demo_run.parent.parent)
    config = {"run": {"name": "demo", "root": "runs"},
              "ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl", "format": "messages"}]},
              "evaluate": {"data": None, "heldout": {"generate": 1, "max_new_tokens": 4}}}
    cfg = load_config_dict(config, demo_run.parent.parent)
    out = demo_run / ".evaluate.resumed"
    out.mkdir()
    scored, stopped, score_one = [], [], evaluate.score_one

    def interrupted_at_merged(ctx, artifact, *args) -> None:  # the first time only
        if artifact.name == "merged" and "merged" not in stopped:
            stopped.append("merged")
            raise MemoryError("stopped here")
        scored.append(artifact.name)
        score_one(ctx, artifact, *args)

    monkeypatch.setattr(evaluate, "score_one", interrupted_at_merged)
    stage = lambda: evaluate.run(StageContext(cfg=cfg, run=RunDir("runs", "demo"), out=out,  # noqa: E731
                                              console=Console(quiet=True)))
    with pytest.raises(MemoryError):
        stage()
    assert scored == ["base", "adapter"] and len(list((out / evaluate.SCORED).iterdir())) == 2
    kept = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (out / evaluate.SCORED).iterdir()}
    stage()
    assert scored == ["base", "adapter", "merged", "SmolLM2-135M-Instruct-Q4_1"]
    results = json.loads((out / "heldout.json").read_text())
    assert list(results) == ["base", "adapter", "merged", "SmolLM2-135M-Instruct-Q4_1"]
    assert results["base"] == kept["base"]["heldout"] and results["adapter"]["overall"] == kept["adapter"]["heldout"]["overall"]
    rows = [json.loads(line) for line in (out / "heldout_items.jsonl").read_text().splitlines()]
    assert [r["artifact"] for r in rows] == [name for name in results for _ in range(results[name]["overall"]["items"])]
    assert not (out / evaluate.SCORED).exists() and evaluate.STAGE.resumable


def check_heldout(out: Path, run: Path) -> None:
    """heldout.json: {artifact: {task: {...}}} for every artifact, the merged model's loss the direct computation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.evals.heldout import load_items

    scored = json.loads((out / "heldout.json").read_text())
    assert list(scored) == ["base", "adapter", "merged", "SmolLM2-135M-Instruct-Q4_1"]
    for name, tasks in scored.items():
        assert set(tasks) == {"qa", "translate_ko_en", "overall"}, name
        assert all({"items", "loss", "ppl", "tokens"} <= set(t) for t in tasks.values())
        assert tasks["qa"]["metric"] == "accuracy" and tasks["translate_ko_en"]["metric"] == "chrf"
    gguf = scored["SmolLM2-135M-Instruct-Q4_1"]["overall"]
    assert "vs_reference" in scored["SmolLM2-135M-Instruct-Q4_1"]["qa"] and gguf["tokens"] == scored["base"]["overall"]["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(str(run / "export" / "merged"))
    items, _ = load_items(run / "format" / "eval.jsonl", tokenizer, 512, None)
    model = AutoModelForCausalLM.from_pretrained(str(run / "export" / "merged"), dtype=torch.float32).eval()
    nll = tokens = 0.0
    for item in items:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([item.prompt_ids + item.completion_ids])).logits[0].double(), -1)
        nll -= sum(float(logprobs[len(item.prompt_ids) - 1 + k, t]) for k, t in enumerate(item.completion_ids))
        tokens += len(item.completion_ids)
    assert abs(scored["merged"]["overall"]["loss"] - nll / tokens) < 1e-4
    assert (out / "heldout.png").read_bytes()[:4] == b"\x89PNG" and "Held-out data" in (out / "report.md").read_text()


def load_config_dict(config: dict, directory: Path):
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return load_config(directory / "config.yaml")


def test_many_samples_are_refused_and_the_gguf_context_does_not_grow_with_them(tmp_path: Path) -> None:
    """samples: 100000 asked for 210 GB of generation rows (a crash); a GGUF's context holds only the answers
    generated side by side, whatever the samples."""
    base = {"ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl"}]}}
    with pytest.raises(UserError, match=r"evaluate.heldout.samples: Input should be less than or equal to 64"):
        load_config_dict({**base, "evaluate": {"heldout": {"samples": 65}}}, tmp_path)
    contexts = [evaluate.gguf_context(load_config_dict({**base, "evaluate": {"heldout": {"samples": k}}}, tmp_path))
                for k in (8, 64)]
    assert contexts[0] == contexts[1] <= 2 * (2048 + 8 * 256)


def test_hostile_mathqa_rows_are_skipped_and_reported_not_scored(project: Path) -> None:
    """A Problem longer than the window a sequence is scored in would fail llama.cpp's decode (or build a mask of its
    length squared); a field that reads as rich markup would end the stage when its skip is printed."""
    rows = [{**ROW, "Problem": "what is 1 + 1 ?"}, {**ROW, "Problem": "one more word " * 2000},
            {**ROW, "correct": "[/x]"}]
    (project / "mathqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config("config.yaml")
    window = evaluate.gguf_context(cfg) // 2
    status, _, _ = run_stage("evaluate", cfg)
    results = json.loads((project / "runs" / "t" / "evaluate" / "results.json").read_text())
    assert status == "done" and results["n"] == 1
    reasons = {s["id"]: s["reason"] for s in results["skipped_items"]}
    assert reasons["mathqa.jsonl:3"] == "correct is '[/x]', not one of a-e"
    assert f"more than the {window} a sequence is scored in" in reasons["mathqa.jsonl:2"]
    (project / "mathqa.jsonl").write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no MathQA item can be scored"):
        run_stage("evaluate", load_config("config.yaml"))


def test_held_out_records_whose_prompts_fill_max_length_are_named_as_the_reason(project: Path,
                                                                                 tiny_dir: Path) -> None:
    """Every held-out prompt longer than format.max_length leaves no completion token to score: the message names
    format.max_length, not a missing held-out split."""
    from rich.console import Console

    fmt = project / "runs" / "t" / "format"
    fmt.mkdir(parents=True)
    rows = [{"id": f"r{k}", "task": "qa", "prompt": "<|user|>" + "a long question " * 8 + "\n<|assistant|>",
             "completion": "yes<eos>", "meta": {}} for k in range(3)]
    (fmt / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (fmt / "template.json").write_text(json.dumps({"name": "chat", "eos_token": "<eos>"}))
    cfg = load_config("config.yaml", ["evaluate.heldout.enabled=true", "evaluate.data=null", "format.max_length=32"])
    console = Console(record=True, width=200)
    out = project / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"no held-out record it can score \(ingest.eval_fraction, format.max_length\)"):
        evaluate.run(StageContext(cfg=cfg, run=RunDir("runs", "t"), out=out, console=console))
    printed = console.export_text()
    assert "none of the 3 records of" in printed and "Raise format.max_length to score them" in printed


def test_records_that_fill_max_length_are_counted_in_the_results_when_mathqa_is_scored(project: Path) -> None:
    """From a review: with every held-out record past format.max_length and MathQA scored, results.json said 0 were
    dropped."""
    fmt = project / "runs" / "t" / "format"
    fmt.mkdir(parents=True)
    row = {"task": "qa", "prompt": "<|user|>" + "a long question " * 8 + "\n<|assistant|>", "completion": "yes<eos>"}
    (fmt / "eval.jsonl").write_text("".join(json.dumps({"id": f"r{k}", **row}) + "\n" for k in range(3)))
    (fmt / "template.json").write_text(json.dumps({"name": "chat", "eos_token": "<eos>"}))
    cfg = load_config("config.yaml", ["evaluate.heldout.enabled=true", "format.max_length=32"])
    evaluate.run(context(cfg, project))
    results = json.loads((project / "out" / "results.json").read_text())
    assert results["heldout"]["items"] == 0 and results["heldout"]["dropped_no_completion_token"] == 3


@pytest.mark.parametrize(("change", "message"), [
    ({"task": None}, r"line 2 has no `task`, where format writes text"),
    ({"completion": 7}, r"line 2 has `completion` a number, where format writes text"),
    ({"task": ["a", "b"]}, r"line 2 has `task` a list"),
    ({"prompt": None}, r"line 2 has `prompt` null"),
    ({"task": "a\nb\x1b[31mEVIL"}, r"line 2 has the task 'a\\nb\\x1b\[31mEVIL': a task is letters, digits"),
    ({"task": "overall"}, r"line 2 has the task 'overall'.*and not `overall`"),
    ({"meta": "x"}, r"line 2 has `meta` of another type, where format writes an object"),
])
def test_a_damaged_held_out_row_is_one_message_naming_its_line(project: Path, change: dict, message: str) -> None:
    """From a review: a row of format's eval.jsonl damaged on disk or edited by hand was a KeyError or TypeError
    ("a bug in Distillery"); a task with a line break or escapes broke the tables, and one named `overall` vanished
    under the row of all tasks."""
    cfg = heldout_only(project)
    path = project / "runs" / "t" / "format" / "eval.jsonl"
    first, second = path.read_text().splitlines()
    row = {key: value for key, value in {**json.loads(second), **change}.items() if value is not None or key == "prompt"}
    path.write_text(first + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message + r".*`distillery format --force` writes the file again"):
        evaluate.run(context(cfg, project))


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"name": "chat"}), "\udcff"])
def test_a_damaged_template_json_is_one_message(project: Path, text: str) -> None:
    cfg = heldout_only(project)
    (project / "runs" / "t" / "format" / "template.json").write_text(text, errors="surrogateescape")
    with pytest.raises(UserError, match=r"template.json (cannot be read|has no `eos_token` text).*`distillery format "
                                        r"--force` writes it again"):
        evaluate.run(context(cfg, project))


def test_nothing_to_score_with_the_held_out_split_switched_off_names_that_setting(project: Path) -> None:
    """heldout.enabled: false with no evaluate.data blamed ingest.eval_fraction and format.max_length, which were
    fine: the run had held-out records, scoring them was switched off."""
    message = (r"evaluate.heldout.enabled is false and evaluate.data is not set. Set heldout.enabled: true \(the run's "
               r"held-out split\) or evaluate.data")
    with pytest.raises(UserError, match=message):  # refused as the config loads, before any stage runs
        load_config("config.yaml", ["evaluate.data=null"])
    cfg = load_config("config.yaml", ["evaluate.data=null", "evaluate.enabled=false"])  # off in `run`, run by name
    with pytest.raises(UserError, match=message):
        evaluate.run(context(cfg, project))


def test_a_few_shot_source_that_cannot_be_read_is_named_by_its_own_setting(project: Path) -> None:
    """A missing or empty evaluate.fewshot_data was blamed on evaluate.data, which was fine."""
    (project / "empty.jsonl").write_text("", encoding="utf-8")
    for source, error in (("nope.jsonl", "evaluate.fewshot_data: nope.jsonl does not exist"),
                          ("empty.jsonl", "evaluate.fewshot_data empty.jsonl: no scoreable MathQA item")):
        cfg = load_config("config.yaml", [f"evaluate.fewshot_data={source}", "evaluate.num_fewshot=1"])
        with pytest.raises(UserError, match=f"^{error}"):
            evaluate.load_data(cfg.evaluate)


def test_the_held_out_table_is_printed_once_by_the_command_with_the_chart_where_the_stage_keeps_it(
        project: Path, monkeypatch) -> None:
    """`just demo` printed the held-out table twice, from the stage and again at the end of the run. The stage now
    prints none; the command prints it after its summary, naming the chart in the finished stage's directory (the
    table's 'chart:' line once named .evaluate.partial/heldout.png, which is renamed away when the stage ends)."""
    from rich.console import Console

    from distillery import cli

    cfg = heldout_only(project)
    run = RunDir("runs", "t")
    stage_console, command_console = Console(record=True, width=300), Console(record=True, width=300)
    out = run.partial_dir("evaluate")
    out.mkdir(parents=True)
    evaluate.run(StageContext(cfg=cfg, run=run, out=out, console=stage_console))
    assert "held-out data" not in stage_console.export_text()
    out.rename(run.stage_dir("evaluate"))
    monkeypatch.setattr(cli, "console", command_console)
    cli.show_heldout(cfg)
    printed = command_console.export_text()
    assert printed.count("held-out data:") == 1 and "overall (2)" in printed
    assert f"chart: {run.stage_dir('evaluate') / 'heldout.png'}" in printed


def heldout_only(project: Path, *overrides: str):
    """The project's config scoring a held-out split of two records (written as format writes it), no MathQA."""
    fmt = project / "runs" / "t" / "format"
    fmt.mkdir(parents=True)
    rows = [{"id": f"r{k}", "task": "qa", "prompt": f"<|user|>what is {k}?\n<|assistant|>", "completion": f"{k}<eos>",
             "meta": {}} for k in range(2)]
    (fmt / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (fmt / "template.json").write_text(json.dumps({"name": "chat", "eos_token": "<eos>"}))
    return load_config("config.yaml", ["evaluate.heldout.enabled=true", "evaluate.data=null",
                                       "evaluate.heldout.max_new_tokens=2", *overrides])


def test_a_gguf_not_scored_is_named_in_the_report_without_mathqa(project: Path) -> None:
    """Only MathQA's section listed what was not scored: scoring held-out data alone (the demo), report.md had no
    word of a GGUF that failed (and, with a reference, said every GGUF was within the quant bounds)."""
    gguf = project / "runs" / "t" / "export" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"not a gguf at all")
    listed_by_export(gguf, "model-Q4_K_M.gguf")
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    cfg = heldout_only(project, "evaluate.artifacts=auto", "export.enabled=true")
    evaluate.run(context(cfg, project))
    text = (project / "out" / "report.md").read_text()
    assert "Not scored:\n- model-Q4_K_M: " in text and "is not a GGUF file" in text


def test_ggufs_scored_without_a_reference_are_said_to_be_unchecked(project: Path) -> None:
    """From a review: with `artifacts: [gguf]` nothing held the GGUFs against the merged model or the adapter, and
    nothing said so: no quant check looked like a passed one."""
    from tests.evals.test_gguf_backend import bundled_gguf

    pytest.importorskip("llama_cpp")
    gguf = project / "runs" / "t" / "export" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "model-Q4_1.gguf").write_bytes(bundled_gguf().read_bytes())
    listed_by_export(gguf, "model-Q4_1.gguf")
    (project / "runs" / "t" / "finetune").mkdir(parents=True)
    cfg = heldout_only(project, "evaluate.artifacts=[gguf]", "export.enabled=true", "evaluate.heldout.generate=0")
    result = evaluate.run(context(cfg, project))
    results = json.loads((project / "out" / "results.json").read_text())
    assert results["heldout"]["reference"] is None and results["heldout"]["ggufs_not_checked"] == ["model-Q4_1"]
    assert ("GGUFs not checked", "no merged model or adapter scored to hold them against (add one to "
            "evaluate.artifacts): model-Q4_1") in result.summary


def test_artifact_names_are_shown_as_they_are_not_read_as_markup() -> None:
    """A GGUF is named after the base model's directory: `model [v2]` lost its `[v2]` in the tables, and `m[/x]`
    ended the stage with a MarkupError (exit 1) after every artifact was scored."""
    from rich.console import Console

    console = Console(record=True, width=300)
    scored = {name: {"qa": {"items": 1, "loss": 1.0}, "overall": {"items": 1, "loss": 1.0}}
              for name in ("model [v2]-Q8_0", "m[/x]-Q4_K_M")}
    evaluate.print_heldout(console, scored, Path("runs/t/evaluate/heldout.png"))
    printed = console.export_text()
    assert "model [v2]-Q8_0" in printed and "m[/x]-Q4_K_M" in printed


def test_a_gguf_context_past_what_llama_cpp_holds_is_refused_naming_the_settings(project: Path) -> None:
    """evaluate.max_new_tokens=4294967296 was an unexpected MemoryError (32 GiB), 2147483648 a context that wrapped
    in 32 bits without a word."""
    with pytest.raises(UserError, match=r"evaluate.max_new_tokens: Input should be less than or equal to 1048576"):
        load_config("config.yaml", ["evaluate.max_new_tokens=4294967296"])
    cfg = load_config("config.yaml", ["evaluate.heldout.max_new_tokens=1048576", "evaluate.heldout.samples=8"])
    with pytest.raises(UserError, match=r"a llama.cpp context of 16,779,264 tokens .* more than the 16,777,216 it can "
                                        r"hold. Lower them"):
        evaluate.gguf_context(cfg)


def header_only_model(directory: Path, rows: int, columns: int) -> Path:
    """A model directory whose one safetensors file declares a rows x columns bf16 tensor and holds no data: its
    size is read from the header alone."""
    import struct

    directory.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [rows, columns], "data_offsets": [0, rows * columns * 2]}})
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return directory


@pytest.mark.parametrize("artifacts", ["auto", ["base", "merged"]])
def test_an_hf_artifact_too_big_for_the_memory_is_left_out_under_auto_or_refused_before_loading(
        tmp_path: Path, demo_model_path: str, monkeypatch, artifacts) -> None:
    """The merged 16-bit 32B model (61 GiB) was loaded onto a 40 GB GPU after base and adapter had been scored, and
    every rerun tried it again: the GGUFs were never scored."""
    from types import SimpleNamespace

    from rich.console import Console

    from distillery.evals import hf_backend
    from distillery.evals.hf_backend import loaded_bytes
    from distillery.stages.evaluate import Artifact, within_memory

    assert loaded_bytes(Path(demo_model_path), "float32") == 4 * 134_515_008  # its tied embeddings once
    assert loaded_bytes(Path(demo_model_path), "bfloat16") == 2 * 134_515_008
    merged = header_only_model(tmp_path / "merged", 40_000, 40_000)  # 6.0 GiB in float32, 0.6 more to score
    found = [Artifact("base", "base", demo_model_path), Artifact("merged", "merged", merged),
             Artifact("Q4_K_M", "gguf", tmp_path / "m.gguf")]
    monkeypatch.setattr(hf_backend, "free_memory", lambda device: 2 << 30)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ingest": {"sources": [{"name": "a", "kind": "hf", "files": "a.jsonl"}]},
                                      "evaluate": {"artifacts": artifacts, "dtype": "float32"}}), encoding="utf-8")
    ctx = SimpleNamespace(cfg=load_config(config), console=Console(record=True, width=300))
    if artifacts == "auto":
        assert [a.name for a in within_memory(found, ctx)] == ["base", "Q4_K_M"]
        assert ("the merged model is left out: it needs about 6.6 GiB in float32 (its weights and the scoring), and the "
                "machine has 2.0 GiB free (export checked its GGUFs against it)") in ctx.console.export_text()
        return
    with pytest.raises(UserError, match=r"evaluate: merged \(.*merged\) would not fit: it needs about 6\.6 GiB in "
                                        r"float32 \(its weights and the scoring\), and the machine has 2\.0 GiB free\. "
                                        r"Leave it out \(evaluate\.artifacts: \[base, gguf\]\)"):
        within_memory(found, ctx)
