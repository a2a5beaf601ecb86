"""The sandbox's cost on real CodeI/O reference code, against running the same code without isolation.

Baseline: what CodeI/O's own checker does, a plain `python -` subprocess with a timeout (no limits, no uid, no
namespace, the caller's environment). Ours: reasoning.sandbox.run_function with the default limits. Both run the
reference code of the first N records of ../shared/data/codeio/rawcode_1k_parsed.jsonl on each record's first
io input, one at a time; printed: how many reproduce the recorded output (CodeI/O's comparison) and the
seconds per run, as a ratio to the baseline.

    .venv/bin/python bench/distill.py [N]     (default 64)

With --teacher, the teacher instead: prompts/s of the HTTP teacher against a real OpenAI-compatible server
(llama-cpp-python's `llama_cpp.server`, what `just serve-teacher` starts) at concurrency 1, 2 and 4, as ratios to
the in-process GGUF teacher, both on the bundled SmolLM2 GGUF with every core, 12 MathQA prompts, 32 tokens.

    .venv/bin/python bench/distill.py --teacher

With --objectives, the three ways to distill on configs/distill-kd.yaml (the bundled SmolLM2-135M-Instruct teaching
SmolLM2-24L-student): the same traces (one distill + format run) and the same optimizer steps under finetune
objective sft, kd and on_policy; for each, the held-out KL(teacher || student) per completion token over the whole
vocabulary (teacher-forced on format's eval split, fp32), the student's held-out loss and the training wall time.
Baseline: sft, the text-only distillation Distillery did before. Target: kd and on_policy below sft.

    .venv/bin/python bench/distill.py --objectives
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from figures import figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillery.reasoning.sandbox import Limits, run_function  # noqa: E402
from distillery.reasoning.verifiers import outputs_match  # noqa: E402
from distillery.core.models import bundled_gguf  # noqa: E402
from distillery.reasoning.teachers import GGUFTeacher, OpenAITeacher  # noqa: E402
from tests.fixtures.llama_server import LlamaServer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "codeio" / "rawcode_1k_parsed.jsonl"
MARK = "@@result@@"


def unsandboxed(code: str, funcname: str, args: dict, timeout_s: float) -> tuple[bool, object]:
    program = f"{code}\n\nimport json\nprint({MARK!r} + json.dumps({funcname}(**{args!r})))\n"
    try:
        done = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, None
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    return (True, json.loads(lines[-1][len(MARK):])) if done.returncode == 0 and lines else (False, None)


def prompts_per_second(teacher, questions: list[str], concurrency: int) -> float:
    def ask(question: str) -> list[str]:
        return teacher.complete([{"role": "user", "content": question}], 1, 0.0, 32, 1)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(ask, questions))
    return len(questions) / (time.perf_counter() - started)


def teacher_bench() -> int:
    samples = ROOT / "configs" / "samples" / "mathqa" / "test.jsonl"
    questions = [json.loads(line)["Problem"] for line in samples.read_text(encoding="utf-8").splitlines()[:12]]
    local = GGUFTeacher(bundled_gguf("SmolLM2-135M-Instruct"), 2048)
    try:
        base = prompts_per_second(local, questions, 1)
    finally:
        local.close()
    server = LlamaServer(threads=os.cpu_count() or 1).start()
    try:
        print(f"{len(questions)} MathQA prompts, 32 tokens each; in-process GGUF teacher: {base:.2f} prompts/s")
        for concurrency in (1, 2, 4):
            remote = OpenAITeacher(server.url, "smollm2", "NO_KEY", timeout_s=120, retries=0)
            try:
                rate = prompts_per_second(remote, questions, concurrency)
            finally:
                remote.close()
            print(f"  llama_cpp.server, concurrency {concurrency}: {rate:.2f} prompts/s, {rate / base:.2f}x")
            figure(f"distill teacher over HTTP (llama_cpp.server), concurrency {concurrency}",
                   f"{rate / base:.2f}x prompts/s ({rate:.2f} vs {base:.2f})", "in-process GGUF teacher, same GGUF")
    finally:
        server.kill()
    print("llama_cpp.server answers one request at a time, so on a small CPU concurrency only adds contention; a "
          "batching server (vLLM, SGLang) on a GPU is what concurrency is for.")
    return 0


PRESET = ROOT / "configs" / "distill-kd.yaml"


def distillery(stage: str, root: Path, *overrides: str) -> float:
    """`distillery <stage>` on the preset under `root`; returns its wall time."""
    sets = [arg for override in ("run.root=" + str(root), *overrides) for arg in ("--set", override)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "distillery", stage, "-c", str(PRESET), *sets], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"distillery {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def heldout_kl(run: Path, teacher_path: str, student_path: str, adapter: Path | None) -> tuple[float, float]:
    """(mean KL(teacher || student) per completion token, the student's mean loss per completion token) on
    format's eval split, both models in fp32, as training tokenizes each row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.core.records import read_jsonl
    from distillery.training.tokens import training_example

    max_length = yaml.safe_load(PRESET.read_text())["format"]["max_length"]
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        student = PeftModel.from_pretrained(student, adapter)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    kl_sum = loss_sum = tokens = 0.0
    with torch.no_grad():
        for row in read_jsonl(run / "format" / "eval.jsonl"):
            example = training_example(tokenizer, row["prompt"], row["completion"], max_length)
            ids = torch.tensor([example["input_ids"]])
            scored = torch.tensor(example["completion_mask"][1:], dtype=torch.bool)
            log_q = torch.log_softmax(student(ids).logits[0, :-1].float(), -1)[scored]
            log_p = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)[scored]
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            loss_sum -= float(log_q.gather(-1, ids[0, 1:][scored].unsqueeze(-1)).sum())
            tokens += int(scored.sum())
    return kl_sum / tokens, loss_sum / tokens


def objectives_bench() -> int:
    from distillery.core.models import resolve_model_path

    work = ROOT / "bench" / "out" / "objectives"
    shutil.rmtree(work, ignore_errors=True)
    shared = work / "shared"
    seconds = distillery("format", shared)
    print(f"distill (top-20 log-probs) + format of the preset: {seconds:.0f} s")
    teacher = resolve_model_path("bundled:SmolLM2-135M-Instruct")
    student = resolve_model_path(yaml.safe_load(PRESET.read_text())["model"]["path"])
    base_kl, base_loss = heldout_kl(shared / "distill-kd", teacher, student, None)
    print(f"  untrained student: held-out KL {base_kl:.3f} nats/token, loss {base_loss:.3f}")
    results = {}
    for objective in ("sft", "kd", "on_policy"):
        root = work / objective
        shutil.copytree(shared, root)
        seconds = distillery("finetune", root, f"finetune.objective={objective}")
        run = root / "distill-kd"
        kl, loss = heldout_kl(run, teacher, student, run / "finetune" / "adapter")
        steps = json.loads((run / "finetune" / "summary.json").read_text())["steps"]
        results[objective] = kl
        print(f"  {objective:10s} {steps} steps: held-out KL {kl:.3f} nats/token, loss {loss:.3f}, finetune {seconds:.0f} s")
        if objective != "sft":
            figure(f"distill objective {objective}: held-out KL(teacher||student), {steps} steps",
                   f"{kl / results['sft']:.2f}x ({kl:.3f} vs {results['sft']:.3f} nats/token)",
                   "objective sft on the same traces and steps", "< 1x")
    print(f"objectives: held-out KL(teacher||student) sft {results['sft']:.3f}, kd {results['kd']:.3f}, "
          f"on_policy {results['on_policy']:.3f}")
    return 0


def main() -> int:
    if "--objectives" in sys.argv[1:]:
        return objectives_bench()
    if "--teacher" in sys.argv[1:]:
        return teacher_bench()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (../shared exists only beside the project's own checkouts)")
        return 0
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:count]]
    limits = Limits()
    results = {}
    for name in ("baseline (plain subprocess)", "sandbox"):
        reproduced, started = 0, time.perf_counter()
        for row in rows:
            io = row["ios"][0]
            if name == "sandbox":
                run = run_function(row["refcode"], row["funcname"], io["input"], limits)
                ok, value = run.ok, run.value
            else:
                ok, value = unsandboxed(row["refcode"], row["funcname"], io["input"], limits.timeout_s)
            reproduced += ok and outputs_match(value, io["output"])
        results[name] = (reproduced, (time.perf_counter() - started) / len(rows))
    base = results["baseline (plain subprocess)"][1]
    print(f"CodeI/O reference code, {len(rows)} real records, first io each, one run at a time")
    for name, (reproduced, seconds) in results.items():
        print(f"  {name:28s} reproduced {reproduced}/{len(rows)}  {seconds * 1000:7.1f} ms/run  "
              f"ratio {seconds / base:.2f}x baseline")
    reproduced, seconds = results["sandbox"]
    figure("distill sandbox, cost per run of CodeI/O reference code", f"{seconds / base:.2f}x the time "
           f"({seconds * 1000:.0f} vs {base * 1000:.0f} ms), reproduced {reproduced}/{len(rows)}",
           "plain python subprocess with a timeout (CodeI/O's checker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
