"""Export speed on the demo model (CPU): seconds per GB for the 16-bit merge, llama.cpp's conversion and its
quantizer; llama.cpp's generation speed per GGUF type as a ratio to the HF model's `generate`; and what the
portable llama.cpp build costs against a native one on this machine.

    .venv/bin/python bench/export.py [--tokens 64] [--quants q8_0 q4_k_m] [--repeat 3] [--no-native]

Baselines: per-GB rates are absolute (bytes written by merge, bytes read by conversion and quantization);
tokens/s is compared with transformers `generate` (greedy, fp32, KV cache) on the merged model, same prompt,
same number of new tokens, same threads. The build comparison runs the installed (portable, x86-64-v3 by
default) llama-cpp-python, the x86-64-v4 build where the CPU has AVX-512, and one compiled with llama.cpp's
default -march=native (each compiled once into the wheel cache, a few minutes) on the same files, alternating, best of --repeat runs: generation tokens/s (one
token at a time) and prompt tokens/s (a 480-token batch). Every llama.cpp measurement runs in its own process:
a build that crashes on this CPU (native on AMX) is reported as such.
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


def compare_builds(files: dict[str, Path], tokens: int, repeat: int, tmp: Path) -> None:
    """The installed build (and x86-64-v4 where this CPU has AVX-512) against a native one on the same files,
    alternating, best of `repeat`."""
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
    print(f"{'file':10} {'build':12} {'generation':>11} {'prompt':>9}")
    for name in files:
        for build in builds:
            got = best[(build, name)]
            shown = got if isinstance(got, str) else f"{got['generation']:11.1f} {got['prompt']:9.0f}"
            print(f"{name:10} {build:12} {shown}")
        native = best[("native", name)]
        for build in builds:
            ours = best[(build, name)]
            for kind in ("generation", "prompt"):
                if build == "native" or isinstance(ours, str):
                    continue
                if isinstance(native, str):
                    result = f"{ours[kind]:.0f} tokens/s; the native build {native}"
                else:
                    result = f"{ours[kind] / native[kind]:.2f}x tokens/s ({ours[kind]:.0f} vs {native[kind]:.0f})"
                figure(f"llama.cpp {build} build, {name} {kind}", result,
                       "llama.cpp built with -march=native, same machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    parser.add_argument("--repeat", type=int, default=3, help="build comparison: best of this many runs")
    parser.add_argument("--no-native", action="store_true", help="skip the comparison with a native build")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the measuring child process
    args = parser.parse_args()
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
