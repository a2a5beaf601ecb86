"""Export speed on the demo model (CPU): seconds per GB for the 16-bit merge, llama.cpp's conversion and its
quantizer, and llama.cpp's generation speed per GGUF type as a ratio to the HF model's `generate`.

    .venv/bin/python bench/export.py [--tokens 64] [--quants q8_0 q4_k_m]

Baselines: per-GB rates are absolute (bytes written by merge, bytes read by conversion and quantization);
tokens/s is compared with transformers `generate` (greedy, fp32, KV cache) on the merged model, same prompt,
same number of new tokens, same threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import figure  # noqa: E402

from exports import gguf as gguf_io  # noqa: E402
from exports import merge  # noqa: E402
from pipeline.models import resolve_model_path  # noqa: E402
from tests.fixtures.adapter_run import make_adapter_run  # noqa: E402

GB = 1e9
PROMPT = "Write a short story about a robot who learns to paint."


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


def llama_tokens_per_second(path: Path, tokens: int) -> float:
    llm = gguf_io.load_gguf(path, n_ctx=512)
    messages = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)  # warm-up
    # Ban EOS so that every run generates exactly `tokens` tokens, as min_new_tokens does for HF.
    bias = {llm.token_eos(): -1e9}
    started = time.perf_counter()
    result = llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0, logit_bias=bias)
    seconds = time.perf_counter() - started
    llm.close()
    return result["usage"]["completion_tokens"] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quants", nargs="+", default=["q8_0", "q4_k_m"])
    args = parser.parse_args()
    base = resolve_model_path("bundled:SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run = make_adapter_run(Path(tmp) / "runs", base)
        adapter = run.stage_dir("finetune") / "adapter"
        summary = merge.read_finetune(run.stage_dir("finetune"))
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
            speed = llama_tokens_per_second(path, args.tokens)
            print(f"{'llama.cpp ' + name:20} {speed:9.1f} {speed / hf:7.2f}x")
            figure(f"generation, llama.cpp {name}", f"{speed / hf:.2f}x tokens/s ({speed:.0f} vs {hf:.0f})",
                   "transformers generate, merged model fp32")


if __name__ == "__main__":
    main()
