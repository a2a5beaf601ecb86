"""Export: the fine-tuned adapter -> a verified 16-bit HF model and verified GGUFs for llama.cpp / Ollama.

Steps, in order:
1. read finetune's adapter and summary.json; take the training chat template and EOS from the adapter's
   tokenizer (cross-checked with format's chat_template.jinja / template.json);
2. check before writing anything: the quant types (i-quants need export.imatrix), that llama.cpp's converter
   supports the architecture, and that the disk has room for everything the export writes;
3. merge the adapter into the base's original 16-bit weights (export/merge.py) into merged/, and prove the
   merge kept the adapter (merged == base+adapter != base on fixed tokens);
4. convert merged/ with llama.cpp's converter to one f16/bf16/q8_0 GGUF, quantize it with llama.cpp's
   quantizer to every requested type (export/gguf.py);
5. verify every GGUF: it loads in llama-cpp-python, carries the training chat template and EOS, tokenizes the
   prompts as the HF tokenizer does, and its next-token distributions match the merged model's (the 16-bit
   file within export.verify.max_kl / min_top1; each quantized file reported and bounded loosely);
6. write an Ollama Modelfile beside each GGUF, verify.json, verify.png, summary.json and report.md.

The stage is resumable: merged/ and each GGUF appear under their final names only when complete, so a killed
export picks up where it stopped; nothing reaches runs/<name>/export/ before everything passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from distillery.export import gguf as gguf_io
from distillery.export import merge, ollama
from distillery.export.gguf import QuantType
from distillery.config import DistilleryConfig, ExportConfig
from distillery.core.console import summary_table
from distillery.core.errors import UserError
from distillery.core.rundir import atomic_write_text
from distillery.stage import StageContext, StageResult

log = logging.getLogger(__name__)

NAME = "export"
UPSTREAM = ("finetune",)
SECTIONS = ("model", "export")
PACKAGES = ("torch", "transformers", "peft", "unsloth", "llama-cpp-python")
RESUMABLE = True
GIB = 1024**3


class VerificationError(UserError):
    """An export whose files do not match the trained model: the stage fails, nothing is published."""


def input_files(cfg: DistilleryConfig) -> list[Path]:
    return [Path(cfg.export.imatrix)] if cfg.export.imatrix else []


def training_template(ctx: StageContext, adapter_dir: Path) -> tuple[str, str, Any]:
    """(chat template, EOS token, tokenizer) of training, from the adapter's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    template, eos = tokenizer.chat_template, tokenizer.eos_token
    if not template or not eos:
        raise UserError(f"the adapter's tokenizer in {adapter_dir} has no chat template or EOS; rerun "
                        "`distillery finetune --force`.")
    fmt_dir = ctx.upstream("format")
    if (fmt_dir / "chat_template.jinja").is_file():
        used = (fmt_dir / "chat_template.jinja").read_text(encoding="utf-8")
        meta = json.loads((fmt_dir / "template.json").read_text(encoding="utf-8"))
        if used != template or meta.get("eos_token") != eos:
            raise UserError(f"the adapter's chat template/EOS differ from format's ({fmt_dir}): the adapter is from "
                            "another format run. Rerun `distillery finetune --force`.")
    return template, eos, tokenizer


def plan_types(cfg: ExportConfig) -> tuple[QuantType, list[QuantType]]:
    """The converter's output type and the requested types; i-quants without an imatrix are refused."""
    quants = [gguf_io.parse_quant(q) for q in cfg.quantizations]
    needing = [q.value for q in quants if q.needs_imatrix]
    if needing and not cfg.imatrix:
        raise UserError(f"export.quantizations: {', '.join(needing)} need an importance matrix: set export.imatrix "
                        "to a llama-imatrix file, or use k-quants (q4_k_m, q5_k_m, q6_k, q8_0).")
    return QuantType(cfg.outtype), quants


def model_stem(cfg: DistilleryConfig, summary: dict[str, Any]) -> str:
    if cfg.export.model_name:
        return cfg.export.model_name
    return Path(str(summary.get("base_model") or cfg.model.path).rstrip("/")).name.removeprefix("bundled:")


def base_weight_bytes(base_model: str) -> int | None:
    """Bytes of the base's weights at 16 bits per parameter (None when it is not a local directory)."""
    base = Path(base_model)
    files = list(base.glob("*.safetensors")) or list(base.glob("*.bin"))
    if not files:
        return None
    size = sum(p.stat().st_size for p in files)
    config = json.loads((base / "config.json").read_text(encoding="utf-8")) if (base / "config.json").is_file() else {}
    return size // 2 if (config.get("dtype") or config.get("torch_dtype")) == "float32" else size


def check_free_disk(cfg: ExportConfig, out: Path, weights_16bit: int, outtype: QuantType,
                    quants: list[QuantType]) -> dict[str, float]:
    """Refuse to start when the disk cannot hold merged/ + the intermediate + every quant + the margin."""
    params = weights_16bit / 2
    need = weights_16bit + params * gguf_io.BITS_PER_WEIGHT[outtype.value] / 8
    need += sum(params * gguf_io.BITS_PER_WEIGHT[q.value] / 8 for q in quants if q != outtype)
    need = need * 1.05 + cfg.min_free_disk_gb * GIB
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"not enough free disk in {out.parent}: the export needs about {need / GIB:.1f} GiB "
                        f"(merged model, GGUFs and export.min_free_disk_gb={cfg.min_free_disk_gb}) and "
                        f"{free / GIB:.1f} GiB are free. Free some space or lower export.quantizations.")
    return {"needed_gib": round(need / GIB, 2), "free_gib": round(free / GIB, 2)}


def check_architecture(model_dir: Path) -> None:
    """Fail before the merge when llama.cpp's converter cannot convert this architecture."""
    from distillery.export.converter import check_converter

    archs = gguf_io.model_architectures(model_dir)
    supported = set(check_converter())
    unsupported = [a for a in archs if a not in supported]
    if archs and unsupported:
        raise UserError(f"llama.cpp's converter does not support the architecture {', '.join(unsupported)} (from "
                        f"{model_dir / 'config.json'}), so it cannot be exported to GGUF. Supported include "
                        f"{', '.join(sorted(a for a in supported if 'Llama' in a or 'Qwen' in a)[:6])}, ...")


def verify_tokens(merged_dir: Path, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Each fixed prompt through the training chat template, plus the merged model's greedy answer, as token ids.

    Returns {texts, prompt_ids (the HF tokenizer's ids of each text), token_lists (prompt + answer),
    reference (the merged model's next-token log-probs at every position)}."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = merge.load_causal_lm(str(merged_dir), "fp32")
    if torch.cuda.is_available():
        model = model.to("cuda")
    texts, prompt_ids, token_lists = [], [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids.append(list(ids))
        if new_tokens:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            ids = out[0].tolist()
        texts.append(text)
        token_lists.append(ids)
    reference = merge.next_token_logprobs(model, token_lists)
    del model
    return {"texts": texts, "prompt_ids": prompt_ids, "token_lists": token_lists, "reference": reference}


def verify_gguf(path: Path, template: str, eos: str, eos_id: int, probe: dict[str, Any], max_kl: float,
                min_top1: float | None, threads: int) -> dict[str, Any]:
    """Load one GGUF and check its metadata, its tokenizer and its next-token distributions."""
    from distillery.export.llama_child import LlamaChild

    n_ctx = max(len(t) for t in probe["token_lists"]) + 8
    with LlamaChild(path, "verifying", n_ctx=max(n_ctx, 256), logits_all=True, threads=threads or None) as llama:
        meta = llama.metadata
        tokenizer_match = llama.tokenize(probe["texts"], add_bos=False, special=True) == probe["prompt_ids"]
        stats = gguf_io.compare_logprobs(probe["reference"], gguf_io.gguf_logprobs(llama, probe["token_lists"]))
    checks = {
        "loads": True,
        "chat_template": meta["chat_template"] == template,
        "eos": meta["eos_token_id"] == eos_id and meta["eos_token"] == eos,
        "tokenizer": tokenizer_match,
        "kl": stats["mean_kl"] <= max_kl,
    }
    if min_top1 is not None:
        checks["top1"] = stats["top1_agreement"] >= min_top1
    return {"file": path.name, "bytes": path.stat().st_size, **stats, "max_kl_bound": max_kl,
            "min_top1_bound": min_top1, "eos_token": meta["eos_token"], "checks": checks,
            "passed": all(checks.values())}


def run(ctx: StageContext) -> StageResult:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cfg = ctx.cfg.export
    finetune_dir = ctx.upstream("finetune")
    summary = merge.read_finetune(finetune_dir)
    if summary["backend"] == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as Unsloth asks, for its merge)
    adapter_dir = finetune_dir / "adapter"
    outtype, quants = plan_types(cfg)
    imatrix = gguf_io.load_imatrix(Path(cfg.imatrix)) if cfg.imatrix else None
    template, eos, tokenizer = training_template(ctx, adapter_dir)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    base_model = summary["base_model"]
    dtype = merge.merged_dtype_name(cfg.dtype, base_model)
    stem = model_stem(ctx.cfg, summary)
    ctx.out.mkdir(parents=True, exist_ok=True)
    disk = {}
    weights = base_weight_bytes(base_model)
    if weights:
        disk = check_free_disk(cfg, ctx.out, weights, outtype, quants)
    if Path(base_model, "config.json").is_file():
        check_architecture(Path(base_model))

    merged_dir, gguf_dir = ctx.out / "merged", ctx.out / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    intermediate = gguf_dir / gguf_io.gguf_filename(stem, outtype.value)
    steps = 4 + 2 * len(quants)
    timings: dict[str, Any] = {}
    report: dict[str, Any] = {"model": stem, "base_model": base_model, "backend": summary["backend"],
                              "disk": disk, "outtype": outtype.value}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=ctx.console, transient=False) as progress:
        task = progress.add_task("export", total=steps)

        def step(description: str) -> None:
            progress.update(task, description=description)

        step(f"merging the adapter into {dtype} weights ({summary['backend']})")
        if (merged_dir / "config.json").is_file():
            timings["merge"] = {"resumed": True}
        else:
            timings["merge"] = merge.merge_adapter(summary, adapter_dir, merged_dir, dtype, cfg.max_shard_size,
                                                   ctx.cfg.model.trust_remote_code)
        progress.advance(task)

        step("verifying the merge (base vs base+adapter vs merged)")
        started = time.time()
        probe = verify_tokens(merged_dir, cfg.verify.prompts, cfg.verify.new_tokens)
        report["merge"] = merge.verify_merge(base_model, adapter_dir, probe["token_lists"], probe["reference"],
                                             trust_remote_code=ctx.cfg.model.trust_remote_code)
        timings["verify_merge_seconds"] = round(time.time() - started, 2)
        progress.advance(task)
        if not report["merge"]["passed"]:
            m = report["merge"]
            fail(ctx, report, "the merged model does not reproduce base+adapter (or the adapter changes nothing): "
                 f"KL(base+adapter || merged) is {m['merge_kl_ratio']:.3g} of KL(base+adapter || base) "
                 f"(must be < {m['max_merge_kl_ratio']})")

        step(f"converting to {intermediate.name} (llama.cpp converter)")
        if not intermediate.is_file():
            timings["convert_seconds"] = round(gguf_io.convert_to_gguf(merged_dir, intermediate, outtype.value, stem), 2)
        progress.advance(task)

        files: dict[str, Path] = {}
        for quant in quants:
            target = gguf_dir / gguf_io.gguf_filename(stem, quant.value)
            step(f"quantizing to {target.name}")
            if quant != outtype and not target.is_file():
                timings[f"quantize_{quant.value}_seconds"] = round(
                    gguf_io.quantize_gguf(intermediate, target, quant, imatrix, cfg.threads), 2)
            files[quant.value] = target
            progress.advance(task)

        results = {}
        checked = {outtype.value: intermediate, **files}
        for name, path in checked.items():
            step(f"verifying {path.name}")
            reference_bound = name == outtype.value and outtype != QuantType.Q8_0
            started = time.time()
            results[name] = verify_gguf(
                path, template, eos, eos_id, probe,
                max_kl=cfg.verify.max_kl if reference_bound else cfg.verify.quant_max_kl,
                min_top1=cfg.verify.min_top1 if reference_bound else None, threads=cfg.threads)
            timings[f"verify_{name}_seconds"] = round(time.time() - started, 2)
            progress.advance(task)
        report["gguf"] = results

        step("writing Modelfiles and reports")
        for path in files.values():
            ollama.write_modelfile(path, template, tokenizer, eos)
        if outtype.value not in files and not cfg.keep_intermediate:
            intermediate.unlink()
        progress.advance(task)

    report["timings"] = timings
    report["passed"] = report["merge"]["passed"] and all(r["passed"] for r in results.values())
    write_reports(ctx, report)
    if not report["passed"]:
        bad = [f"{r['file']} ({', '.join(k for k, ok in r['checks'].items() if not ok)})"
               for r in results.values() if not r["passed"]]
        fail(ctx, report, "GGUF verification failed: " + "; ".join(bad))
    print_summary(ctx, report)
    rows = [(f"{name}", f"top1 {r['top1_agreement']:.3f}, KL {r['mean_kl']:.4g}") for name, r in results.items()]
    return StageResult(
        metrics={"merge_passed": True, "files": [p.name for p in files.values()],
                 **{f"{n}_mean_kl": r["mean_kl"] for n, r in results.items()},
                 **{f"{n}_top1": r["top1_agreement"] for n, r in results.items()}},
        summary=[("files", ", ".join(p.name for p in files.values()))] + rows,
    )


def fail(ctx: StageContext, report: dict[str, Any], message: str) -> None:
    """Keep the numbers where the user can read them (the partial directory is discarded), then stop."""
    kept = ctx.run.path / "export.verify-failed.json"
    atomic_write_text(kept, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    raise VerificationError(f"export verification failed, nothing was published: {message}. Details: {kept}")


def write_reports(ctx: StageContext, report: dict[str, Any]) -> None:
    atomic_write_text(ctx.out / "verify.json", json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    summary = {"model": report["model"], "base_model": report["base_model"], "backend": report["backend"],
               "files": {n: r["file"] for n, r in report["gguf"].items() if (ctx.out / "gguf" / r["file"]).is_file()},
               "passed": report["passed"], "timings": report["timings"]}
    atomic_write_text(ctx.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(ctx.out / "report.md", render_report(report))
    save_verify_plot(report, ctx.out / "verify.png")


HEADERS = ("file", "type", "MiB", "top-1 agreement", "mean KL (nats)", "max KL", "template", "EOS", "passed")


def _rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(r["file"], name, f"{r['bytes'] / 2**20:.0f}", f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4g}",
             f"{r['max_kl']:.4g}", "ok" if r["checks"]["chat_template"] else "DIFFERS",
             "ok" if r["checks"]["eos"] else "DIFFERS", "yes" if r["passed"] else "NO")
            for name, r in report["gguf"].items()]


def print_summary(ctx: StageContext, report: dict[str, Any]) -> None:
    m = report["merge"]
    ctx.console.print(f"merge: mean KL(base+adapter || merged) {m['merged_vs_base_plus_adapter']['mean_kl']:.3g} "
                      f"vs || base {m['base_vs_base_plus_adapter']['mean_kl']:.3g} (ratio {m['merge_kl_ratio']:.3g} "
                      f"< {m['max_merge_kl_ratio']}) -> the adapter is in the merged weights")
    ctx.console.print(summary_table("export verification vs the merged HF model", _rows(report), HEADERS))


def render_report(report: dict[str, Any]) -> str:
    m = report["merge"]
    lines = [f"# Export report: {report['model']}", "",
             f"Merge ({report['backend']} backend): mean KL(base+adapter || merged) "
             f"{m['merged_vs_base_plus_adapter']['mean_kl']:.4g}, KL(base+adapter || base) "
             f"{m['base_vs_base_plus_adapter']['mean_kl']:.4g}, ratio {m['merge_kl_ratio']:.3g} "
             f"(< {m['max_merge_kl_ratio']}) -> {'kept the adapter' if m['passed'] else 'FAILED'}.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    return "\n".join(lines) + "\n\nKL is KL(merged HF || GGUF) over every position of the fixed prompts.\n"


def save_verify_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["gguf"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(names, [report["gguf"][n]["top1_agreement"] for n in names], color="#4878d0")
    left.set_ylim(0, 1.05)
    left.set_title("top-1 agreement with merged HF")
    right.bar(names, [report["gguf"][n]["mean_kl"] for n in names], color="#d65f5f")
    right.set_title("mean KL (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
