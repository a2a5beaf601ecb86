"""Finetune speed: tokens/s and peak memory of the unsloth backend against the hf backend (transformers + PEFT +
TRL, the named baseline), and TRL packing against no packing, on the same config and data. Printed as ratios.

    python bench/finetune.py [--config configs/demo.yaml] [--steps 20]
    python bench/finetune.py --methods   # full fine-tuning against LoRA (unsloth), and full's memory estimate

Each variant is a fresh `python -m distillery finetune --force` process (Unsloth patches TRL when imported) under a
temporary run root. tokens/s is measured from metrics.jsonl between the first and the last
logged step (model loading, the first step's warm-up and checkpoint saves excluded); memory is the process's
peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA.

On CPU: the demo model, unsloth vs hf (16-bit), packing vs none on the hf backend (Unsloth turns packing off
on CPU), and 2 processes (accelerate launch, DDP over gloo: configs/accelerate/ddp_cpu.yaml, batch 2 each) vs 1
process with the same global batch of 4. For 2 processes tokens/s counts both (rank 0's count x 2) and memory is
rank 0's, per process; on 2 cores expect no speed-up: the figure shows the overhead, the tests show correctness. On CUDA additionally: a 1.5B model in 4-bit (QLoRA) on both backends, and packing on Unsloth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from figures import figure

ROOT = Path(__file__).resolve().parents[1]
GPU_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def run_variant(config: Path, root: Path, name: str, steps: int, sets: list[str]) -> dict:
    """Train one variant; returns its measured tokens/s, peak memory and losses."""
    # One run name for all variants: ingest and format run once; --force retrains finetune each time.
    command = [sys.executable, "-m", "distillery", "finetune", "-c", str(config), "--force",
               "--set", f"run.root={root}", "--set", "run.name=bench", "--set", f"finetune.max_steps={steps}",
               "--set", f"finetune.save_steps={steps}", "--set", "finetune.sample_prompts=0"]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = root / "bench" / "finetune"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    processes = summary.get("world_size", 1)  # metrics.jsonl counts rank 0's tokens
    estimate = (summary.get("memory_estimate") or {}).get("needed_gib")
    return {"name": name, "processes": processes, "estimate_gib": estimate,
            "tokens_per_s": processes * (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_memory_mb": summary["peak_memory_mb"], "memory_kind": summary["peak_memory_kind"],
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"], "tokens": last["tokens"]}


def print_figure(name: str, a: dict, b: dict, baseline: str, target: str) -> None:
    figure(name, f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s at {a['peak_memory_mb'] / b['peak_memory_mb']:.2f}x "
           f"peak memory ({a['tokens_per_s']:.0f} vs {b['tokens_per_s']:.0f} tokens/s)", baseline, target)


def print_table(results: list[dict]) -> None:
    print(f"{'variant':<28}{'tokens/s':>10}{'peak MB':>10}  memory kind             loss first -> last")
    for r in results:
        print(f"{r['name']:<28}{r['tokens_per_s']:>10.1f}{r['peak_memory_mb']:>10.0f}  {r['memory_kind']:<24}"
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}")


def methods(config: Path, steps: int, where: str) -> None:
    """Full fine-tuning (fp32 master weights, 16-bit autocast, AdamW over every weight) against LoRA, unsloth."""
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        lora = run_variant(config, Path(tmp), "unsloth-lora", steps, ["finetune.backend=unsloth"])
        full = run_variant(config, Path(tmp), "unsloth-full", steps, ["finetune.backend=unsloth", "finetune.method=full",
                                                                       "finetune.learning_rate=2e-5"])
    print(f"finetune methods on {where}: {steps} steps per variant, config {config.name}")
    print_table([lora, full])
    print_figure(f"finetune, demo model on {where}: full fine-tuning", full, lora, "LoRA (unsloth, same batch)",
                 "reported, no target")
    figure(f"finetune, demo model on {where}: full fine-tuning's memory estimate",
           f"{full['estimate_gib']:.2f} GiB estimated, {full['peak_memory_mb'] / 1024:.2f} GiB measured "
           f"({full['memory_kind']})", "the measured peak", "estimate >= measured, within 1.5x")


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", action="store_true", help="full fine-tuning against LoRA only")
    args = parser.parse_args()
    config = Path(args.config)
    cuda = torch.cuda.is_available()
    if args.methods:
        methods(config, args.steps, torch.cuda.get_device_name(0) if cuda else "CPU")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        unsloth = run_variant(config, root, "unsloth", args.steps, ["finetune.backend=unsloth"])
        hf = run_variant(config, root, "hf", args.steps, ["finetune.backend=hf"])
        packed = run_variant(config, root, "hf-packing", args.steps, ["finetune.backend=hf", "finetune.packing=true"])
        two = run_variant(config, root, "hf-2-processes", args.steps, [
            "finetune.backend=hf", f"finetune.accelerate_config={ROOT / 'configs/accelerate/ddp_cpu.yaml'}",
            "finetune.batch_size=2"]) if not cuda else None
        results = [unsloth, hf, packed] + ([two] if two else [])
        if cuda:
            gpu = ["finetune.load_in_4bit=true", f"model.path={GPU_MODEL}"]
            big_unsloth = run_variant(config, root, "unsloth-1.5b-4bit", args.steps, gpu + ["finetune.backend=unsloth"])
            big_hf = run_variant(config, root, "hf-1.5b-4bit", args.steps, gpu + ["finetune.backend=hf"])
            unsloth_packed = run_variant(config, root, "unsloth-packing", args.steps,
                                         ["finetune.backend=unsloth", "finetune.packing=true"])
            results += [big_unsloth, big_hf, unsloth_packed]
    device = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"finetune bench on {device}: {args.steps} steps per variant, config {config.name}")
    print_table(results)
    print("targets (GPU): unsloth >= 2x hf tokens/s at no more memory; packing >= 2x on the demo data. "
          "Variants run one after another: on a shared machine, load changes between them move the ratios.")
    where = "GPU" if cuda else "CPU"
    print_figure(f"finetune, demo model on {where}: unsloth", unsloth, hf, "hf backend (transformers + PEFT + TRL)",
                 ">= 2x at no more memory (on GPU)")
    print_figure(f"finetune, demo model on {where}: hf packing", packed, hf, "hf backend without packing", ">= 2x")
    if two:
        figure("finetune, demo model on CPU: 2 processes (DDP, gloo)", f"{two['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
               f"tokens/s, {two['peak_memory_mb']:.0f} vs {hf['peak_memory_mb']:.0f} MB peak per process",
               "1 process, same global batch (hf backend)", "- (2 cores: overhead only)")
    if cuda:
        print_figure("finetune, 1.5B 4-bit on GPU: unsloth", big_unsloth, big_hf, "hf backend, 4-bit (bitsandbytes)",
                     ">= 2x at no more memory")
        print_figure("finetune, demo model on GPU: unsloth packing", unsloth_packed, unsloth, "unsloth without packing",
                     ">= 2x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
