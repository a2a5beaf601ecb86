"""Export speed on the demo model (CPU): seconds per GB for the 16-bit merge, llama.cpp's conversion and its
quantizer; llama.cpp's generation speed per GGUF type as a ratio to the HF model's `generate`; and what the
portable llama.cpp build costs against a native one on this machine.

    .venv/bin/python bench/export.py [--tokens 64] [--quants q8_0 q4_k_m] [--repeat 3] [--no-native]
    .venv/bin/python bench/export.py --scale [--shapes 0.5b 1.5b 3b]
    .venv/bin/python bench/export.py --builds-at 1.5b [--quants q8_0 q4_k_m] [--repeat 2]

--scale grows the model: random-weight Qwen2s of real shapes (bench/shapes.py: Qwen2.5-0.5B, R1-Distill-Qwen-1.5B,
Qwen2.5-3B, with the R1 tokenizer), each through `distillery finetune` (hf backend, 2 steps) and `distillery export`
(q8_0, verification on) in their own processes; for each size the 16-bit bytes, export's wall time and the peak
of its process tree's memory, sampled five times a second: anonymous memory (the sum of RssAnon over export and its
children: what the machine must really have; memory-mapped weights the kernel can drop are not in it) and RSS.
A straight line through the sizes projects 8B and 32B. Baseline: 8.5 GB peak anonymous memory and 163-240 s at
the 1.78B shape, measured on main at 8a0e01f (whole-model merge, fp32 verification).

--builds-at runs only the build comparison, on the GGUFs of a random-weight model of a real shape: the demo model's
rows are 576 wide, not a multiple of 256, so its "q4_k_m" is mostly Q5_0 (llama.cpp's fallback), where a real
model's is Q4_K and Q6_K. On an AMX CPU it also gives what the x86-64-v4-amx build gains over x86-64-v4.

Baselines: per-GB rates are absolute (bytes written by merge, bytes read by conversion and quantization);
tokens/s is compared with transformers `generate` (greedy, fp32, KV cache) on the merged model, same prompt,
same number of new tokens, same threads. The build comparison runs the installed llama-cpp-python (the CPU's level:
x86-64-v4-amx, v4 or v3), the x86-64-v4 build where the CPU has AVX-512, and one compiled with llama.cpp's default
-march=native (patched as the AMX level is; each compiled once into the wheel cache, a few minutes) on the same
files, alternating, best of --repeat runs: generation tokens/s (one token at a time) and prompt tokens/s (a
480-token batch). Every llama.cpp measurement runs in its own process: a build that crashes on this CPU is
reported as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import figure  # noqa: E402

from distillery.export import gguf as gguf_io  # noqa: E402
from distillery.export import llama_build, merge  # noqa: E402
from distillery.core.isolation import describe_exit  # noqa: E402
from distillery.core.models import resolve_model_path  # noqa: E402
from distillery.stage import artifact  # noqa: E402
from tests.fixtures.adapter_run import make_adapter_run  # noqa: E402

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint."
PROMPT_TOKENS = 480


def hf_tokens_per_second(model_dir: Path, tokens: int) -> float:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = merge.load_causal_lm(str(model_dir), "fp32")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)


def measure_here(path: Path, tokens: int) -> dict[str, float]:
    """In a measuring process: generation and prompt tokens/s of the llama_cpp this process imports."""
    import os

    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, verbose=False, n_threads=os.cpu_count() or 1)
    messages = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)  # warm-up
    # Ban EOS so that every run generates exactly `tokens` tokens, as min_new_tokens does for HF.
    bias = {llm.token_eos(): -1e9}
    started = time.perf_counter()
    result = llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0, logit_bias=bias)
    generation = result["usage"]["completion_tokens"] / (time.perf_counter() - started)
    batch = llm.tokenize(((PROMPT + " ") * 60).encode())[:PROMPT_TOKENS]
    llm.reset()
    started = time.perf_counter()
    llm.eval(batch)
    prompt = len(batch) / (time.perf_counter() - started)
    llm.close()
    return {"generation": generation, "prompt": prompt}


def measure(path: Path, tokens: int, llama_dir: Path | None = None) -> dict[str, float] | str:
    """tokens/s of one GGUF in a fresh process (with `llama_dir`'s llama_cpp first on the path), or what killed it."""
    env = None
    if llama_dir is not None:
        import os

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama_dir), *sys.path])}
    done = subprocess.run([sys.executable, __file__, "--measure", str(path), "--tokens", str(tokens)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return f"crashed ({describe_exit(done.returncode)})" if done.returncode < 0 else done.stderr.strip()[-300:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def unpacked_build(profile: str, into: Path) -> Path:
    """The cached wheel of `profile` (compiled now if needed), unpacked into `into` for PYTHONPATH."""
    wheel = llama_build.build(profile)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(into), str(wheel)],
                   check=True)
    return into


def compare_builds(files: dict[str, Path], tokens: int, repeat: int, tmp: Path,
                   targets: bool = True) -> dict[tuple[str, str], dict[str, float] | str]:
    """The installed build (and x86-64-v4 where this CPU has AVX-512) against a native one on the same files,
    alternating, best of `repeat`; `targets`: the installed build's figures carry the >= 0.95x target (else they
    are informational). Returns the best tokens/s per (build, file), or what killed a build."""
    installed = llama_build.installed_build().get("profile", "installed")
    builds: dict[str, Path | None] = {installed: None}
    if installed != "x86-64-v4" and set(llama_build.X86_64_V4) <= llama_build.cpu_flags():
        builds["x86-64-v4"] = unpacked_build("x86-64-v4", tmp / "x86-64-v4")
    builds["native"] = unpacked_build("native", tmp / "native")
    best: dict[tuple[str, str], dict[str, float] | str] = {}
    for _ in range(repeat):
        for name, path in files.items():
            for build, directory in builds.items():
                got, previous = measure(path, tokens, directory), best.get((build, name))
                if isinstance(got, str) or isinstance(previous, str):
                    best[(build, name)] = got if isinstance(got, str) else previous
                else:
                    best[(build, name)] = got if previous is None else {k: max(v, previous[k]) for k, v in got.items()}
    print(f"\nllama.cpp builds on this CPU ({llama_build.describe_cpu()}), best of {repeat}, tokens/s")
    print(f"{'file':14} {'build':14} {'generation':>11} {'prompt':>9}")
    for name in files:
        for build in builds:
            got = best[(build, name)]
            shown = got if isinstance(got, str) else f"{got['generation']:11.1f} {got['prompt']:9.0f}"
            print(f"{name:14} {build:14} {shown}")
        for build in builds:
            if build != "native" and not isinstance(best[(build, name)], str):
                default = build == installed
                figure(f"llama.cpp {build}{' (default)' if default else ''}, {name}",
                       speed_ratios(best[(build, name)], best[("native", name)]),
                       "llama.cpp built with -march=native, same machine", ">= 0.95x" if default and targets else "-")
    return best


def speed_ratios(ours: dict[str, float], theirs: dict[str, float] | str) -> str:
    """'generation 1.01x (131 vs 130), prompt 0.98x (994 vs 1010) tokens/s', or our speeds where theirs crashed."""
    if isinstance(theirs, str):
        return f"generation {ours['generation']:.0f}, prompt {ours['prompt']:.0f} tokens/s; the other build {theirs}"
    return ", ".join(f"{kind} {ours[kind] / theirs[kind]:.2f}x ({ours[kind]:.0f} vs {theirs[kind]:.0f})"
                     for kind in ("generation", "prompt")) + " tokens/s"


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of RssAnon, sum of VmRSS) in bytes over `root` and all its descendants, from /proc."""
    parents, stats = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(status.parent.name)
        parents[pid] = int(fields.get("PPid", "0").strip())
        stats[pid] = (int(fields.get("RssAnon", "0 kB").split()[0]), int(fields.get("VmRSS", "0 kB").split()[0]))
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    anon = sum(stats.get(pid, (0, 0))[0] for pid in tree)
    rss = sum(stats.get(pid, (0, 0))[1] for pid in tree)
    return anon * 1024, rss * 1024


def run_measured(command: list[str]) -> dict[str, float]:
    """Run a command; its wall time and the peaks of its process tree's anonymous memory and RSS."""
    import threading

    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, rss = tree_memory(process.pid)
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], rss)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.stdout.read()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}):\n{output[-3000:]}")
    return {"seconds": time.time() - started, "peak_anon": peaks[0], "peak_rss": peaks[1]}


def scale_config(tmp: Path, model: Path) -> Path:
    """The demo's data and settings on `model`: hf backend, 2 steps, q8_0, evaluate off."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    for source in data["ingest"]["sources"]:
        for key in ("path", "files"):
            if key in source:
                source[key] = str(ROOT / source[key])
    data["run"] = {"name": "scale", "root": str(tmp / "runs"), "seed": 42}
    data["model"] = {"path": str(model)}
    data.pop("distill", None)
    data["format"] = {**data.get("format", {}), "template": "r1", "max_length": 1024}
    data["finetune"] = {"backend": "hf", "max_steps": 2, "batch_size": 1, "lora": {"r": 8, "alpha": 16},
                        "sample_prompts": 0, "save_steps": 100, "gradient_checkpointing": True}
    data["export"] = {"quantizations": ["q8_0"]}
    data["evaluate"] = {"enabled": False}
    path = tmp / "scale.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def scale(shapes: list[str]) -> None:
    """Export's time and peak memory as the model grows, and the projection to 8B and 32B."""
    from shapes import build_model, parameters

    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{shape}-") as tmp:
            model = Path(tmp) / "model"
            built = build_model(shape, model, device="cpu")
            config = scale_config(Path(tmp), model)
            run_measured([sys.executable, "-m", "distillery", "finetune", "-c", str(config)])
            measured = run_measured([sys.executable, "-m", "distillery", "export", "-c", str(config)])
            verify = json.loads((Path(tmp) / "runs" / "scale" / "export" / "verify.json").read_text())
            rows.append({"shape": shape, "parameters": built["parameters"], "bytes": built["bytes"], **measured,
                         "passed": verify["passed"], "method": verify["timings"]["merge"].get("method")})
            r = rows[-1]
            print(f"{shape}: {r['bytes'] / GB:.2f} GB, export {r['seconds']:.0f} s, peak anonymous "
                  f"{r['peak_anon'] / GB:.2f} GB, peak RSS {r['peak_rss'] / GB:.2f} GB, verification "
                  f"{'passed' if r['passed'] else 'FAILED'}, merge {r['method']}", flush=True)
    print("\nexport as the model grows (q8_0, verification on; CPU)")
    print(f"{'shape':6} {'params':>7} {'16-bit GB':>10} {'export s':>9} {'s/GB':>6} {'peak anon GB':>13} {'peak RSS GB':>12}")
    for r in rows:
        print(f"{r['shape']:6} {r['parameters'] / 1e9:6.2f}B {r['bytes'] / GB:10.2f} {r['seconds']:9.0f} "
              f"{r['seconds'] / (r['bytes'] / GB):6.0f} {r['peak_anon'] / GB:13.2f} {r['peak_rss'] / GB:12.2f}")
    for r in rows:
        figure(f"export at the {r['shape']} shape ({r['parameters'] / 1e9:.2f}B, {r['bytes'] / GB:.1f} GB in 16 bits): peak "
               f"anonymous memory", f"{r['peak_anon'] / GB:.2f} GB ({r['peak_anon'] / r['bytes']:.2f}x the 16-bit model), "
               f"{r['seconds']:.0f} s", "8.5 GB and 163-240 s at 1.78B before streaming (main at 8a0e01f)",
               "<= 2.5 GB at 1.78B, flat as the model grows")
    if len(rows) >= 2:
        # least squares in the 16-bit size: anonymous memory and time
        xs = [r["bytes"] for r in rows]
        for key, unit, scale_by in (("peak_anon", "GB", GB), ("seconds", "s", 1)):
            ys = [r[key] for r in rows]
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
            for target in ("8b", "32b"):
                size = parameters(target) * 2
                value = (mean_y + slope * (size - mean_x)) / scale_by
                figure(f"export at the {target} shape ({size / GB:.0f} GB in 16 bits), projected: "
                       f"{'peak anonymous memory' if key == 'peak_anon' else 'wall time on 2 cores'}",
                       f"{value:.1f} {unit} (straight line through {', '.join(r['shape'] for r in rows)})", "- (projection)")


def builds_at(shape: str, quants: list[str], tokens: int, repeat: int) -> None:
    """The build comparison on the GGUFs (f16 converted, then each of `quants`) of a random model of `shape`."""
    from shapes import build_model

    with tempfile.TemporaryDirectory(prefix=f"bench-builds-{shape}-") as tmp:
        model = Path(tmp) / "model"
        build_model(shape, model, device="cpu")
        f16 = Path(tmp) / "m-F16.gguf"
        gguf_io.convert_to_gguf(model, f16, "f16", "m")
        files = {}
        for name in quants:
            quant = gguf_io.parse_quant(name)
            files[f"{shape} {name}"] = Path(tmp) / gguf_io.gguf_filename("m", quant.value)
            gguf_io.quantize_gguf(f16, files[f"{shape} {name}"], quant)
        f16.unlink()
        best = compare_builds(files, tokens, repeat, Path(tmp), targets=False)  # the demo's figures hold the target
    for name in files:  # what the AMX level gains over the level it replaces, on this CPU
        amx, v4 = best.get(("x86-64-v4-amx", name)), best.get(("x86-64-v4", name))
        if isinstance(amx, dict) and v4 is not None:
            figure(f"llama.cpp x86-64-v4-amx over x86-64-v4, {name}", speed_ratios(amx, v4),
                   "the x86-64-v4 build, same machine", "> 1x prompt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    parser.add_argument("--repeat", type=int, default=3, help="build comparison: best of this many runs")
    parser.add_argument("--no-native", action="store_true", help="skip the comparison with a native build")
    parser.add_argument("--builds-at", metavar="SHAPE", help="only the build comparison, on a random model of this "
                        "bench/shapes.py shape")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the measuring child process
    parser.add_argument("--scale", action="store_true", help="grow the model: export's memory and time per size")
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b", "3b"], help="--scale: bench/shapes.py names")
    args = parser.parse_args()
    if args.scale:
        scale(args.shapes)
        return
    if args.builds_at:
        builds_at(args.builds_at, args.quants, args.tokens, args.repeat)
        return
    if args.measure:
        print(json.dumps(measure_here(args.measure, args.tokens)))
        return
    base = resolve_model_path("bundled:SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run = make_adapter_run(Path(tmp) / "runs", base)
        adapter = artifact(run, "finetune", "adapter")
        summary = merge.read_finetune(adapter, artifact(run, "finetune", "summary"))
        merged = Path(tmp) / "merged"
        stats = merge.merge_adapter(summary, adapter, merged, "bf16", "5GB")
        merged_gb = stats["bytes"] / GB
        rows = [("merge (PEFT, bf16)", stats["seconds"], merged_gb)]
        f16 = Path(tmp) / "m-F16.gguf"
        rows.append(("convert -> f16 (llama.cpp)", gguf_io.convert_to_gguf(merged, f16, "f16", "m"), merged_gb))
        files = {"f16": f16}
        for name in args.quants:
            quant = gguf_io.parse_quant(name)
            out = Path(tmp) / gguf_io.gguf_filename("m", quant.value)
            rows.append((f"quantize f16 -> {name}", gguf_io.quantize_gguf(f16, out, quant), f16.stat().st_size / GB))
            files[name] = out
        print(f"\nexport speed on SmolLM2-135M ({merged_gb:.3f} GB merged), CPU")
        print(f"{'step':32} {'seconds':>8} {'GB':>7} {'s/GB':>8}")
        for step, seconds, gb in rows:
            print(f"{step:32} {seconds:8.2f} {gb:7.3f} {seconds / gb:8.1f}")
        figure("export, demo model: " + ", ".join(step.split(" (")[0] for step, _, _ in rows),
               ", ".join(f"{seconds / gb:.0f}" for _, seconds, gb in rows) + " s/GB", "- (absolute rates)")
        hf = hf_tokens_per_second(merged, args.tokens)
        print(f"\ngeneration, {args.tokens} new tokens, greedy (baseline: transformers generate, fp32)")
        print(f"{'model':20} {'tokens/s':>9} {'vs HF':>7}")
        print(f"{'HF merged (fp32)':20} {hf:9.1f} {1.0:7.2f}x")
        for name, path in files.items():
            got = measure(path, args.tokens)
            if isinstance(got, str):
                print(f"{'llama.cpp ' + name:20} {got}")
                continue
            speed = got["generation"]
            print(f"{'llama.cpp ' + name:20} {speed:9.1f} {speed / hf:7.2f}x")
            figure(f"generation, llama.cpp {name}", f"{speed / hf:.2f}x tokens/s ({speed:.0f} vs {hf:.0f})",
                   "transformers generate, merged model fp32")
        if not args.no_native:
            compare_builds({name: files[name] for name in args.quants}, args.tokens, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()
