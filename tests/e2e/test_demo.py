"""`just demo`'s path end to end: every stage on the bundled samples and the demo model, offline, then a
second run that finds everything up to date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "format", "finetune", "export", "evaluate")


# The demo's own config and stages; fewer steps and items than `just demo` to keep the suite short.
# One quant type: every type is written and decoded in tests/export/test_llama_child.py. Held-out loss only: the
# generated answers and their metrics go through the pipeline in tests/e2e/test_tiny_r1.py.
# 6 steps move the held-out loss of the first item of each task from 2.224 to 2.172 (the demo's 20: all 41, 2.209 ->
# 2.049).
LIGHTER = ("finetune.max_steps=6", "finetune.save_steps=3", "finetune.sample_prompts=0",
           "evaluate.heldout.limit=1", "evaluate.heldout.generate=0", "export.quantizations=[q8_0]",
           "export.outtype=q8_0")


def run_demo(run_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    sets = [arg for item in (f"run.root={run_root}", *LIGHTER) for arg in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "distillery", "run", "-c", "configs/demo.yaml", *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def check_push_dry_run(run_root: Path, run: Path) -> None:
    """`distillery push --dry-run` on the finished demo: the upload list and the model card, nothing uploaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    sets = [arg for item in (f"run.root={run_root}", *LIGHTER, "push.repo_id=me/demo-distilled")
            for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "distillery", "push", "-c", "configs/demo.yaml", "--dry-run", *sets],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = json.loads((run / "push" / "upload_plan.json").read_text())
    in_repo = {f["path_in_repo"] for f in plan["files"]}
    gguf = "SmolLM2-135M-Instruct-Q8_0"
    assert {"config.json", "tokenizer.json", "README.md", f"{gguf}.gguf", f"{gguf}.Modelfile"} <= in_repo
    assert plan["private"] is True and "dry run" in result.stdout and f"{gguf}.gguf" in result.stdout
    card = (run / "push" / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "license: apache-2.0" in card and "ollama create" in card and "llama-cli -m" in card
    assert "### Held-out data" in card and "| overall (6) |" in card  # held-out data only: 1 item of each task


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_every_stage_offline_then_is_up_to_date(tmp_path: Path) -> None:
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "demo"
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(manifest[stage]["status"] == "complete" for stage in STAGES), manifest.keys()

    finetune = json.loads((run / "finetune" / "summary.json").read_text())
    assert finetune["steps"] == 6 and (run / "finetune" / "loss.png").is_file()
    verify = json.loads((run / "export" / "verify.json").read_text())
    assert sorted(p.name for p in (run / "export" / "gguf").glob("*.gguf")) == ["SmolLM2-135M-Instruct-Q8_0.gguf"]
    assert verify["passed"] is True and verify["timings"]["merge"]["dtype"] == "fp16"  # the demo's export.dtype
    assert verify["timings"]["merge"]["method"] == "streamed"
    assert "held-out question" in first.stdout
    assert "kernels-community" not in first.stdout + first.stderr  # bitsandbytes' import-time noise, silenced
    heldout = json.loads((run / "evaluate" / "heldout.json").read_text())
    assert set(heldout) == {"base", "adapter", "SmolLM2-135M-Instruct-Q8_0"}
    assert heldout["adapter"]["overall"]["loss"] < heldout["base"]["overall"]["loss"]  # training on the data worked
    contaminated = json.loads((run / "ingest" / "report.json").read_text())["decontamination"]["contaminated"]
    assert any(name.endswith("mathqa/test.jsonl") and n >= 1 for name, n in contaminated.items()), contaminated
    assert first.stdout.count("held-out data:") == 1  # once, at the end
    assert "overall (" in first.stdout[first.stdout.rindex("run demo ("):]  # after the run's summary table
    assert "Held-out data" in (run / "evaluate" / "report.md").read_text()

    check_push_dry_run(tmp_path, run)

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("up to date") >= len(STAGES)
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {s: after[s]["finished"] for s in STAGES} == {s: manifest[s]["finished"] for s in STAGES}
