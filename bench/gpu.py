"""The GPU path, measured once: Unsloth 4-bit QLoRA against transformers + PEFT + bitsandbytes at DeepSeek-R1-
Distill-Qwen-7B's shape, Distillery's own finetune stage and 16-bit merge on CUDA, and Unsloth's peak memory at
R1-Distill-Qwen-14B's shape (the figure the 32B preset's "one 40 GB+ GPU" rests on).

    python bench/gpu.py --wheels .whl     # where pip works: the wheels a bare CUDA 13 / Python 3.12 machine lacks
    python bench/gpu.py --dry-run         # on CPU, before spending GPU time: tiny shapes, 2 steps, no 4-bit
    python bench/gpu.py --out DIR         # on the GPU machine: every figure, gpu.json and the log's figures in DIR

1. Unsloth vs the named baseline, transformers + PEFT + bitsandbytes (nf4, double quantization, bf16 compute,
   PEFT's prepare_model_for_kbit_training): both through Distillery's own loaders (distillery/training/train.py)
   and TRL's SFTTrainer with Distillery's trainer arguments, on a random-weight Qwen2ForCausalLM of R1-Distill-
   Qwen-7B's shape (weights built on the GPU and saved to local disk; random values change nothing about speed or
   memory) with the R1 tokenizer of bundled:tiny-qwen2-r1; LoRA r=16 on the seven projections, 2048 tokens,
   the same batch and random token ids, gradient checkpointing as each backend does it (Unsloth's own; the
   Trainer's non-reentrant one), 8-bit AdamW. tokens/s is timed from the end of the warm-up steps to the last
   step (CUDA synchronised); memory is torch.cuda.max_memory_allocated in the training process and the peak of
   nvidia-smi's memory.used sampled from outside (that one includes the CUDA context and the allocator's cache).
2. `distillery finetune` with configs/tiny-r1.yaml and finetune.load_in_4bit: true (distill off: its teacher is
   a llama.cpp GGUF), then export's merge into the *original 16-bit* base weights and its merge check, on CUDA.
3. Unsloth alone at R1-Distill-Qwen-14B's shape: peak memory at 1024 tokens x batch 1 and at the 32B preset's
   2048 x 2, and from the 7B and 14B figures an estimate for 32B (its own weights do not fit this disk).

Each training run is a child process (Unsloth patches transformers when imported; a crash is one failed part, not
the end of the bench). Results are written to DIR/gpu.json as each part ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from figures import figure
from shapes import SHAPES, build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = {"r": 16, "alpha": 16, "dropout": 0.0}

# The wheels a bare Python 3.12 machine with torch 2.11 (CUDA 13), transformers 5.17, peft and accelerate lacks:
# the training stack at the project's pins, what `import unsloth` and the datasets library import on CUDA, and
# the light dependencies Distillery's ingest, format and finetune import (pyproject.toml has the pins).
WHEELS = ("unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0", "bitsandbytes==0.50.2", "datasets==4.8.5",
          "dill==0.4.1", "multiprocess==0.70.19", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing-extensions==4.16.0", "python-calamine==0.9.1", "orjson==3.11.4",
          "python-dotenv==1.2.4", "openpyxl==3.1.5", "et-xmlfile==2.0.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CUDA_LIB = "libbitsandbytes_cuda130.so"  # torch 2.11's CUDA 13.0; the wheel carries one library per CUDA version


# ---- wheels (run where pip reaches PyPI) ---------------------------------------------------------------------


def repack(wheel: Path, drop) -> None:
    """Rewrite a wheel without the members `drop` selects, and without their RECORD lines."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if not drop(line.split(",", 1)[0])) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)


def prepare_wheels(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target), *WHEELS],
                   check=True)
    for wheel in target.glob("bitsandbytes-*.whl"):
        repack(wheel, lambda name: "libbitsandbytes_cuda" in name and not name.endswith(CUDA_LIB))
    for wheel in target.glob("unsloth-*.whl"):
        repack(wheel, lambda name: name.startswith("studio/"))  # Unsloth Studio's web app: not imported
    total = sum(p.stat().st_size for p in target.glob("*.whl"))
    print(f"{len(list(target.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {target}")


# ---- GPU memory seen from outside ----------------------------------------------------------------------------


class NvidiaSmiPeak:
    """The peak of nvidia-smi's memory.used (MiB) while the block runs, sampled twice a second; None without one."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max(float(line) for line in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = self._read()
            if used is not None:
                self.peak = max(self.peak or 0.0, used)
            self._stop.wait(0.5)

    def __enter__(self) -> "NvidiaSmiPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---- building a model of a real shape ------------------------------------------------------------------------


# ---- one training run (a child process) ----------------------------------------------------------------------


def train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load `spec["model"]` through Distillery's loader for `spec["backend"]`, then for each (seq, batch, steps) run
    train on random token ids with TRL's SFTTrainer and Distillery's trainer arguments; returns the figures."""
    from distillery.training.backends import backend_of

    backend_of(spec["backend"]).start("sft")  # Unsloth first, so that its patches apply (as training/train.py does)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from distillery.core.machine import cpu_bf16_native
    from distillery.training.preflight import choose_optimizer, choose_precision, cuda_bf16
    from distillery.training.settings import FinetuneConfig
    from distillery.training.train import TrainJob, peak_memory_mb, prepare_tokenizer, training_arguments

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    first_seq, first_batch, _ = spec["runs"][0]
    ft = FinetuneConfig(backend=spec["backend"], load_in_4bit=cuda, lora=LORA, batch_size=first_batch,
                        gradient_checkpointing=True, optimizer="adamw_8bit", save_steps=10**6, sample_prompts=0,
                        logging_steps=1, learning_rate=1e-4)
    job = TrainJob(out=str(work), adapter_dir=str(work / "adapter"), metrics_path=str(work / "metrics.jsonl"),
                   train_path="", eval_path="", model_path=spec["model"], backend=spec["backend"], device=device,
                   load_in_4bit=cuda, precision=choose_precision("auto", cuda, cuda_bf16() if cuda else cpu_bf16_native()),
                   optimizer=choose_optimizer(ft.optimizer, cuda), max_length=max(r[0] for r in spec["runs"]),
                   seed=3407, template=tokenizer.chat_template, eos_token=tokenizer.eos_token, finetune=ft)
    started = time.time()
    model, tokenizer = backend_of(job.backend).load(job)
    tokenizer = prepare_tokenizer(tokenizer, job)
    if cuda:
        torch.cuda.synchronize()
    result: dict[str, Any] = {
        "backend": job.backend, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "load_in_4bit": job.load_in_4bit, "precision": job.precision, "optimizer": job.optimizer,
        "load_seconds": round(time.time() - started, 1),
        "memory_after_load_mb": round(torch.cuda.memory_allocated() / 2**20) if cuda else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), "runs": []}
    print(f"{job.backend}: loaded in {result['load_seconds']} s, "
          f"{result['memory_after_load_mb']} MiB allocated after loading", flush=True)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    generator = torch.Generator().manual_seed(0)
    for seq, batch, steps in spec["runs"]:
        warmup = spec["warmup"]
        total = warmup + steps
        ids = torch.randint(0, tokenizer.vocab_size, (total * batch, seq), generator=generator)
        dataset = Dataset.from_dict({"input_ids": ids.tolist()})
        run_ft = ft.model_copy(update={"batch_size": batch, "max_steps": total})
        run_job = dataclasses.replace(job, max_length=seq, finetune=run_ft)
        args = training_arguments(run_job)
        cls = backend_of(job.backend).sft_trainer(device)
        trainer = cls(model=model, args=SFTConfig(**args, max_length=seq, packing=False, dataset_num_proc=None),
                      train_dataset=dataset, processing_class=tokenizer)
        timer = StepTimer()
        trainer.add_callback(timer)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds = timer.ends[-1] - timer.ends[warmup - 1]
        tokens = steps * batch * seq
        run = {"seq": seq, "batch": batch, "warmup_steps": warmup, "steps": steps, "tokens": tokens,
               "tokens_seen": trainer.tokens_seen, "seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / seconds, 1), "losses": [round(x, 4) for x in timer.losses],
               "finite_loss": bool(timer.losses) and all(math.isfinite(x) for x in timer.losses),
               # on CPU (the dry run): the process's peak RSS
               "peak_allocated_mb": peak_memory_mb(device)[0],
               "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20) if cuda else None}
        result["runs"].append(run)
        print(f"{job.backend} {seq} x {batch}: {run['tokens_per_s']:.0f} tokens/s over {steps} steps, peak "
              f"{run['peak_allocated_mb']} MiB allocated, loss {run['losses'][0]} -> {run['losses'][-1]}", flush=True)
        del trainer
    return result


def train(backend: str, model: Path, runs: list[tuple[int, int, int]], warmup: int, work: Path) -> dict[str, Any]:
    """train_child in a child process, with nvidia-smi watched from here; a failure is reported, not raised."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({"backend": backend, "model": str(model), "runs": runs, "warmup": warmup,
                                     "work": str(work)}))
    result_path = work / "result.json"
    started = time.time()
    with NvidiaSmiPeak() as smi:
        code = subprocess.call([sys.executable, __file__, "--child", str(spec_path), str(result_path)], cwd=ROOT)
    if code != 0 or not result_path.is_file():
        print(f"{backend} on {model.name}: FAILED (exit code {code})", flush=True)
        return {"backend": backend, "failed": f"exit code {code}"}
    result = json.loads(result_path.read_text())
    result["nvidia_smi_peak_mb"] = smi.peak
    result["wall_seconds"] = round(time.time() - started, 1)
    print(f"{backend}: nvidia-smi peak {smi.peak} MiB, {result['wall_seconds']} s in all", flush=True)
    return result


# ---- 2. Distillery's own finetune stage and merge on the GPU -------------------------------------------------


def stage_and_merge(work: Path, steps: int) -> dict[str, Any]:
    """`distillery finetune` on tiny-r1 in 4-bit (16-bit on CPU), then the merge and its check (a child)."""
    import torch

    cuda = torch.cuda.is_available()
    command = [sys.executable, "-m", "distillery", "finetune", "-c", "configs/tiny-r1.yaml", "--force",
               "--set", f"run.root={work}", "--set", "distill.enabled=false",
               "--set", f"finetune.load_in_4bit={'true' if cuda else 'auto'}", "--set", f"finetune.max_steps={steps}"]
    started = time.time()
    code = subprocess.call(command, cwd=ROOT)
    summary_path = work / "tiny-r1" / "finetune" / "summary.json"
    if code != 0 or not summary_path.is_file():
        print(f"distillery finetune: FAILED (exit code {code})", flush=True)
        return {"failed": f"distillery finetune exit code {code}"}
    summary = json.loads(summary_path.read_text())
    print(f"distillery finetune: {summary['backend']}, 4-bit {summary['load_in_4bit']}, {summary['device']}, "
          f"{summary['steps']} steps, loss {summary['loss_start_mean']} -> {summary['loss_end_mean']}", flush=True)
    result_path = work / "merge.json"
    code = subprocess.call([sys.executable, __file__, "--merge-child", str(work / "tiny-r1"), str(result_path)],
                           cwd=ROOT)
    if code != 0 or not result_path.is_file():
        print(f"merge: FAILED (exit code {code})", flush=True)
        return {"finetune": summary, "failed": f"merge exit code {code}"}
    return {"finetune": summary, "merge": json.loads(result_path.read_text()),
            "seconds": round(time.time() - started, 1)}


def merge_child(run_dir: Path) -> dict[str, Any]:
    """Export's merge (export/merge.py) of the run's adapter into the base's 16-bit weights, its KL check, and
    the merged tensors against the base's own: untargeted ones byte-identical, targeted ones = W + scale*B@A."""
    summary = json.loads((run_dir / "finetune" / "summary.json").read_text())
    import torch
    from transformers import AutoTokenizer

    from distillery.export import merge

    adapter = run_dir / "finetune" / "adapter"
    merged = run_dir / "merged"
    started = time.time()
    info = merge.merge_adapter(merge.read_finetune(adapter, run_dir / "finetune" / "summary.json"), adapter, merged,
                               "bf16", "5GB")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = ["What is 12 * 7?", "서울은 어느 나라의 수도입니까?", "def f(x): return x + 1"]
    tokens = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for t in texts]
    model = merge.load_causal_lm(str(merged), "fp32")
    merged_lp = merge.next_token_logprobs(model, tokens)
    del model
    check = merge.verify_merge(summary["base_model"], adapter, tokens, merged_lp)
    weights = merge.check_merge(summary["base_model"], adapter, merged)
    print(f"merge: {info['seconds']} s; KL ratio {check['merge_kl_ratio']:.4g} (< {check['max_merge_kl_ratio']}: "
          f"{'passed' if check['passed'] else 'FAILED'}); {weights['untargeted_identical']} untargeted tensors "
          f"byte-identical to the base; targeted: merged - (W + scale*B@A) at most "
          f"{weights['max_error_in_16bit_steps']} bf16 steps", flush=True)
    return {"merge": info, "check": check, "weights": weights, "cuda": torch.cuda.is_available(),
            "seconds": round(time.time() - started, 1)}


# ---- 3. the 32B estimate -------------------------------------------------------------------------------------


def linear_parameters(shape: dict[str, int]) -> int:
    """Parameters in the decoder's linear layers (what bitsandbytes stores in 4 bits)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (h * h * 2 + h * kv * 2 + 3 * h * i)


def estimate_32b(peak_7b: float, peak_14b: float) -> float:
    """Peak MiB at 32B from the 7B and 14B peaks at the same length and batch: a straight line in the 4-bit linear
    parameters plus the 16-bit embeddings (what grows with the model), fitted through the two measured points."""
    def size(shape: str) -> float:
        s = SHAPES[shape]
        return linear_parameters(s) * 0.5 + 2 * s["vocab_size"] * s["hidden_size"] * 2
    slope = (peak_14b - peak_7b) / (size("14b") - size("7b"))
    return peak_7b + slope * (size("32b") - size("7b"))


# ---- the whole bench -----------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo",
                 "datasets", "triton", "xformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    total = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "gpu": gpu, "gpu_memory_gib": total,
            "cuda": torch.version.cuda, "versions": versions}


def save(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")


def gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def ratio_figures(results: dict[str, Any], label: str) -> None:
    unsloth, hf = results.get("unsloth_7b", {}), results.get("hf_7b", {})
    if "runs" not in unsloth or "runs" not in hf:
        return
    u, h = unsloth["runs"][0], hf["runs"][0]
    figure(f"finetune, {label} 4-bit QLoRA on GPU: unsloth",
           f"{u['tokens_per_s'] / h['tokens_per_s']:.2f}x tokens/s at {u['peak_allocated_mb'] / h['peak_allocated_mb']:.2f}x "
           f"peak memory ({u['tokens_per_s']:.0f} vs {h['tokens_per_s']:.0f} tokens/s; {u['peak_allocated_mb'] / 1024:.1f} vs "
           f"{h['peak_allocated_mb'] / 1024:.1f} GiB allocated, {gib(unsloth['nvidia_smi_peak_mb'])} vs "
           f"{gib(hf['nvidia_smi_peak_mb'])} GiB nvidia-smi)",
           "transformers + PEFT + bitsandbytes 4-bit, same batch", ">= 2x at no more memory (Unsloth's claim)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="download and trim the wheels the GPU machine lacks into DIR")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps, on CPU: every code path")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-bench", help="gpu.json goes here")
    parser.add_argument("--work", type=Path, help="model files and runs (default: a temporary directory)")
    parser.add_argument("--budget-s", type=float, default=450, help="skip part 3 when it would not end by then")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (a rerun of the ones that failed)")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merge-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = train_child(json.loads(args.child[0].read_text()))
        args.child[1].write_text(json.dumps(result, indent=2))
        return 0
    if args.merge_child:
        args.merge_child[1].write_text(json.dumps(merge_child(args.merge_child[0]), indent=2, default=str))
        return 0
    if args.wheels:
        prepare_wheels(args.wheels)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/gpu.py measures the CUDA path: no CUDA GPU here (run --dry-run to check the code on CPU).")
        return 0
    started = time.time()
    dry = args.dry_run
    work = args.work or Path(tempfile.mkdtemp(prefix="distillery-gpu-"))
    main_shape, seq, batch, steps, warmup = ("tiny", 64, 2, 2, 1) if dry else ("7b", 2048, 2, 20, 3)
    label = "tiny (dry run)" if dry else "R1-Distill-Qwen-7B shape"
    results: dict[str, Any] = {"environment": environment(), "dry_run": dry}
    print(json.dumps(results["environment"]), flush=True)

    parts = set(args.parts.split(","))

    # 1. Unsloth against transformers + PEFT + bitsandbytes at the 7B shape.
    if "1" in parts:
        model_dir = work / f"qwen2-{main_shape}"
        results["model_7b"] = build_model(main_shape, model_dir)
        for backend in ("unsloth", "hf"):
            results[f"{backend}_7b"] = train(backend, model_dir, [(seq, batch, steps)], warmup, work / f"{backend}-7b")
            save(args.out, results)
        shutil.rmtree(model_dir, ignore_errors=True)
        ratio_figures(results, label)

    # 2. Distillery's finetune stage in 4-bit and the merge into the original 16-bit weights.
    if "2" in parts:
        results["stage"] = stage_and_merge(work / "runs", 2 if dry else 10)
        save(args.out, results)
    if "stage" in results:
        stage_figure(results["stage"])

    # 3. Unsloth's peak memory at the 14B shape, and the 32B estimate.
    elapsed = time.time() - started
    if "3" in parts and (dry or elapsed < args.budget_s - 150):
        shape = "tiny" if dry else "14b"
        big_dir = work / f"qwen2-{shape}-big"
        results["model_14b"] = build_model(shape, big_dir)
        runs = [(64, 1, 2), (64, 2, 1)] if dry else [(1024, 1, 4), (2048, 2, 3)]
        results["unsloth_14b"] = train("unsloth", big_dir, runs, 1, work / "unsloth-14b")
        shutil.rmtree(big_dir, ignore_errors=True)
        save(args.out, results)
        report_14b(results, dry)
    else:
        print(f"part 3 (14B) skipped: {elapsed:.0f} s used of a {args.budget_s:.0f} s budget", flush=True)
    results["seconds"] = round(time.time() - started, 1)
    save(args.out, results)
    print(f"bench/gpu.py done in {results['seconds']} s; results in {args.out / 'gpu.json'}", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def stage_figure(stage: dict[str, Any]) -> None:
    name = "distillery finetune (tiny-r1, 4-bit) + merge into 16-bit weights on GPU"
    baseline, target = "base + adapter unmerged (export's merge check)", "passes"
    if "merge" not in stage:
        figure(name, f"FAILED: {stage.get('failed')}", baseline, target)
        return
    check, weights = stage["merge"]["check"], stage["merge"]["weights"]
    figure(name, f"{'passed' if check['passed'] and weights['passed'] else 'FAILED'}: KL ratio "
           f"{check['merge_kl_ratio']:.3g}, {weights['untargeted_identical']} untargeted tensors "
           f"identical to the base, targeted within {weights['max_error_in_16bit_steps']} bf16 steps of W + scale*B@A",
           baseline, target)


def report_14b(results: dict[str, Any], dry: bool) -> None:
    big = results.get("unsloth_14b", {})
    if "runs" not in big:
        return
    short, long = big["runs"]
    name = "tiny (dry run)" if dry else "R1-Distill-Qwen-14B shape"
    figure(f"finetune, {name}, unsloth 4-bit: peak GPU memory",
           f"{short['peak_allocated_mb'] / 1024:.1f} GiB at {short['seq']} x {short['batch']}, "
           f"{long['peak_allocated_mb'] / 1024:.1f} GiB at {long['seq']} x {long['batch']} "
           f"({long['tokens_per_s']:.0f} tokens/s)", "- (absolute)", "-")
    unsloth = results.get("unsloth_7b", {})
    if dry or "runs" not in unsloth or unsloth["runs"][0]["seq"] != long["seq"] or unsloth["runs"][0]["batch"] != long["batch"]:
        return
    estimate = estimate_32b(unsloth["runs"][0]["peak_allocated_mb"], long["peak_allocated_mb"]) / 1024
    results["estimate_32b_gib"] = round(estimate, 1)
    figure("finetune, R1-Distill-Qwen-32B, unsloth 4-bit at 2048 x 2: peak GPU memory (estimate)",
           f"{estimate:.1f} GiB, extrapolated from the 7B and 14B peaks (not run: 65 GB of weights)",
           "- (estimate)", "fits one 40 GB+ GPU (the preset's claim)")


if __name__ == "__main__":
    sys.exit(main())
