"""Export: the fine-tuned adapter (or fully fine-tuned model) -> a verified 16-bit HF model and verified GGUFs for
llama.cpp / Ollama.

Steps, in order:
1. read finetune's adapter and summary.json; take the training chat template and EOS from the adapter's
   tokenizer (cross-checked with format's chat_template.jinja / template.json);
2. check before writing anything: the quant types (i-quants need export.imatrix), that llama.cpp's converter
   supports the architecture, that the disk has room for everything the export writes, and that the memory
   the largest step needs is available (`estimate_memory`);
3. merge the adapter into the base's original 16-bit weights, streamed tensor by tensor (export/merge.py),
   into merged/, and prove it tensor by tensor (untargeted weights identical, targeted ones W + scale·B·A);
   small models also pass the distribution check against base + adapter run unmerged. A full fine-tune has
   nothing to merge: its own 16-bit shards go into merged/ (linked), proven identical and changed from the base;
4. convert merged/ with llama.cpp's converter to one f16/bf16/q8_0 GGUF, quantize it with llama.cpp's
   quantizer to every requested type (export/gguf.py);
5. verify every GGUF (export/verify.py) against the merged model run layer by layer: it loads in
   llama-cpp-python, carries the training chat template and EOS, tokenizes the prompts as the HF tokenizer
   does, and its next-token distributions match (the 16-bit file within export.verify.max_kl / min_top1;
   each quantized file reported and bounded loosely);
6. write an Ollama Modelfile beside each GGUF, verify.json, verify.png, summary.json and report.md.

The stage is resumable: merged/ and each GGUF appear under their final names only when complete, so a killed
export picks up where it stopped; nothing reaches runs/<name>/export/ before everything passed.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from distillery.export import gguf as gguf_io
from distillery.export import merge, ollama, verify
from distillery.export.gguf import QuantType
from distillery.config import RUN_NAME, DistilleryConfig, ExportConfig
from distillery.core.console import markdown_table, printable, summary_table
from distillery.core.errors import UserError
from distillery.core.isolation import Child, plain
from distillery.core.machine import available_memory
from distillery.core.models import CONFIG_ERRORS, bundled_name, local_model_files
from distillery.core.plots import figure
from distillery.core.summaries import FinetuneSummary
from distillery.core.rundir import atomic_write_text
from distillery.stage import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

OUTPUTS = {"merged": "merged", "gguf": "gguf", "verify": "verify.json", "summary": "summary.json", "report": "report.md",
           "verify_plot": "verify.png"}
GIB = 1024**3


class VerificationError(UserError):
    """An export whose files do not match the trained model: the stage fails, nothing is published."""


def kept_on_change(cfg: DistilleryConfig) -> tuple[str, ...]:
    """What another list of GGUF types (or verification settings) leaves valid of the last export: the merge, the
    converter's GGUF, the GGUFs of the types still asked for (the name stem is not among those settings) and its
    verify.json, whose results hold for the files it names as long as they are the same files (`earlier_result`)."""
    outtype, quants = plan_types(cfg.export)
    return ("merged/*", OUTPUTS["verify"],
            *(f"{OUTPUTS['gguf']}/*-{q.value.upper()}.gguf" for q in dict.fromkeys([outtype, *quants])))


def input_files(cfg: DistilleryConfig) -> list[Path]:
    return [Path(cfg.export.imatrix)] if cfg.export.imatrix else []


def model_files(cfg: DistilleryConfig) -> list[Path]:
    return local_model_files(cfg.export.base_16bit)


def training_template(ctx: StageContext, adapter_dir: Path) -> tuple[str, str, Any]:
    """(chat template, EOS token, tokenizer) of training, from the adapter's tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    except CONFIG_ERRORS as err:  # a file cut short or edited by hand
        raise UserError(f"the adapter's tokenizer in {adapter_dir} cannot be loaded ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); rerun `distillery finetune --force`.") from None
    template, eos = tokenizer.chat_template, tokenizer.eos_token
    if not template or not eos:
        raise UserError(f"the adapter's tokenizer in {adapter_dir} has no chat template or EOS; rerun "
                        "`distillery finetune --force`.")
    used_path = ctx.upstream("format", "chat_template")
    if used_path.is_file():
        used = used_path.read_text(encoding="utf-8")
        meta = json.loads(ctx.upstream("format", "template").read_text(encoding="utf-8"))
        if used != template or meta.get("eos_token") != eos:
            raise UserError(f"the adapter's chat template/EOS differ from format's ({used_path.parent}): the adapter is from "
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


def model_stem(cfg: DistilleryConfig, summary: FinetuneSummary) -> str:
    """export.model_name, else the base model's name: a local directory's own name (model.path `.` or `x/..` named
    nothing or `..`: '-Q4_K_M.gguf', which reads as an option in the card's and Ollama's commands)."""
    if cfg.export.model_name:
        return cfg.export.model_name
    path = str(summary.base_model or cfg.model.path)
    local = Path(path).expanduser()
    name = bundled_name(path) or (local.resolve().name if local.exists() else Path(path.rstrip("/")).name)
    # as export.model_name must be: a directory's name with a line break or `$(...)` in it wrote Modelfile lines of
    # its own and commands into the card; spaces and the like become '-'
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not RUN_NAME.fullmatch(stem):
        raise UserError(f"the base model {path} has no name the GGUF files can be named after ({name[:120]!r}): set "
                        "export.model_name, e.g. `export: {model_name: my-model}`.")
    return stem


def base_weight_bytes(base_model: str) -> int | None:
    """Bytes of the base's weights at 16 bits per parameter (None when it is not a local directory)."""
    base = Path(base_model)
    files = list(base.glob("*.safetensors")) or list(base.glob("*.bin"))
    if not files:
        return None
    size = sum(p.stat().st_size for p in files)
    config = json.loads((base / "config.json").read_text(encoding="utf-8")) if (base / "config.json").is_file() else {}
    return size // 2 if (config.get("dtype") or config.get("torch_dtype")) == "float32" else size


def still_to_write(out: Path, stem: str, outtype: QuantType, quants: list[QuantType]) -> list[str]:
    """What the export has left to write in `out`: "merged" unless a resumed run finished the merge, and each
    GGUF type (the converter's output first) whose file is not there yet."""
    left = [] if (out / OUTPUTS["merged"] / "config.json").is_file() else ["merged"]
    gguf = out / OUTPUTS["gguf"]
    return left + [q.value for q in dict.fromkeys([outtype, *quants])
                   if not (gguf / gguf_io.gguf_filename(stem, q.value)).is_file()]


def check_free_disk(cfg: ExportConfig, out: Path, weights_16bit: int, to_write: list[str]) -> dict[str, Any]:
    """Refuse to start when the disk cannot hold what is still to write (`still_to_write`: merged/, the
    intermediate, the quants) + the margin."""
    params = weights_16bit / 2
    need = sum(weights_16bit if name == "merged" else params * gguf_io.BITS_PER_WEIGHT[name] / 8 for name in to_write)
    need = need * 1.05 + cfg.min_free_disk_gb * GIB
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"not enough free disk in {out.parent}: the export needs about {need / GIB:.1f} GiB "
                        f"(still to write: {', '.join(to_write) or 'nothing'}; and export.min_free_disk_gb="
                        f"{cfg.min_free_disk_gb}) and {free / GIB:.1f} GiB are free. Free some space or lower "
                        "export.quantizations.")
    return {"needed_gib": round(need / GIB, 2), "free_gib": round(free / GIB, 2), "to_write": to_write}


def check_architecture(model_dir: Path) -> None:
    """Fail before the merge when llama.cpp's converter cannot convert this architecture."""
    from distillery.export.converter import supported_models

    archs = gguf_io.model_architectures(model_dir)
    supported = set(supported_models())
    unsupported = [a for a in archs if a not in supported]
    if archs and unsupported:
        raise UserError(f"llama.cpp's converter does not support the architecture {', '.join(unsupported)} (from "
                        f"{model_dir / 'config.json'}), so it cannot be exported to GGUF. Supported include "
                        f"{', '.join(sorted(a for a in supported if 'Llama' in a or 'Qwen' in a)[:6])}, ...")


# what the torch child imports as soon as it starts, while this process checks the plan
TORCH_MODULES = ("torch", "transformers", "peft", "safetensors.torch")
MEMORY_HINT = "If the machine ran out of memory, free some: the export's estimate is in the message before it started."
# Models up to this size (16-bit weights) also get the distribution check of the merge, which loads the base and
# base + adapter whole in fp32 (4x this); above it the tensor-by-tensor check stands alone.
SMALL_MODEL_BYTES = 512 << 20


def check_conversion(ctx: StageContext, base: Path, tokenizer: Any, outtype: QuantType, weights: int) -> None:
    """The converter's dry run before a merge that takes minutes (models over SMALL_MODEL_BYTES; a small one's
    merge is quicker than the check, and the conversion right after it says the same). Skipped on a rerun that
    has the merged model already: the conversion comes next."""
    merged_dir = ctx.out / OUTPUTS["merged"]
    if weights <= SMALL_MODEL_BYTES or (merged_dir / "config.json").is_file():
        return
    ctx.console.print("checking that llama.cpp's converter takes this model (a dry run: names and vocabulary)")
    gguf_io.check_convertible(base, tokenizer, outtype.value, ctx.out, ctx.run.log_path("export-converter"))


def estimate_memory(base: Path, prompts: int, new_tokens: int, whole_model: int = 0) -> dict[str, Any]:
    """Peak memory of the export's largest step, from the base's tensor shapes (no weights read): the streamed
    merge (row blocks; `whole_model` bytes for an adapter merged with the whole model loaded), the converter (llama.cpp's is lazy: about a tensor at a time, in fp32 at worst), the
    layer-by-layer reference (one decoder layer in fp32 and the logits of every probe position) and a GGUF
    verification child (its logits buffer), over a baseline for this process (Python, torch, the tokenizer)."""
    tensors = merge.base_tensors(base)
    numel = {name: math.prod(entry["shape"]) for name, _, entry in tensors}
    largest = max(numel.values(), default=0)
    layer = sum(n for name, n in numel.items() if name.startswith("model.layers.0."))
    vocab = max((entry["shape"][0] for name, _, entry in tensors if name.endswith(("lm_head.weight", "embed_tokens.weight"))),
                default=0)
    positions = prompts * (192 + new_tokens)  # a generous prompt length
    # llama.cpp's converter turns each bf16 tensor into fp32, then f16: 6 bytes per value of the largest one
    steps = {"merge": max(8 * merge.ROW_BLOCK_ELEMENTS * 4, whole_model), "convert": 6 * largest + (300 << 20),
             "reference": layer * 4 + positions * vocab * 4 * 3 + verify.VOCAB_BLOCK * 8192 * 4,
             "verify": 2 * positions * vocab * 8}
    baseline = 600 << 20
    return {"bytes": baseline + max(steps.values()), "largest_step": max(steps, key=steps.get),
            "steps_gib": {k: round(v / GIB, 2) for k, v in steps.items()}}


def check_memory(base: Path, cfg: ExportConfig, whole_model: tuple[int, str] = (0, "")) -> dict[str, Any]:
    """Refuse to start when the export's estimated peak is more than this machine has available. `whole_model`:
    the bytes of a merge that loads the whole model, and why it does (merge.why_whole_model)."""
    estimate = estimate_memory(base, len(cfg.verify.prompts), cfg.verify.new_tokens, whole_model[0])
    free = available_memory()
    estimate["available_gib"] = round(free / GIB, 2) if free else None
    estimate["needed_gib"] = round(estimate.pop("bytes") / GIB, 2)
    if free is not None and estimate["needed_gib"] * GIB > free:
        step = estimate["largest_step"]
        advice = (f"or export on a machine with more memory: {whole_model[1]}, so the merge loads the whole 16-bit "
                  "model (train without them to stream it)." if step == "merge" and whole_model[0]
                  else MEMORY_ADVICE[step])
        raise UserError(f"the export needs about {estimate['needed_gib']:.1f} GiB of memory (its largest step: "
                        f"{step}) and {free / GIB:.1f} GiB are available. Close other programs, {advice}")
    return estimate


# What lowers each step's memory: only the verification's logits depend on settings.
MEMORY_ADVICE = {
    "merge": "or export on a machine with more memory (the merge's row blocks have a fixed size).",
    "convert": "or export on a machine with more memory (llama.cpp's converter holds the largest tensor in fp32).",
    "reference": "or lower export.verify.prompts / export.verify.new_tokens (the verification's logits).",
    "verify": "or lower export.verify.prompts / export.verify.new_tokens (the verification's logits).",
}


@dataclass
class Plan:
    """Everything decided before the first file is written."""

    summary: FinetuneSummary
    adapter_dir: Path  # what finetune trained: the adapter, or (method full) the whole model
    outtype: QuantType
    quants: list[QuantType]
    imatrix: Any
    template: str
    eos: str
    tokenizer: Any
    dtype: str
    stem: str
    disk: dict[str, Any]
    memory: dict[str, Any]
    base: Path  # the 16-bit weights merged into: the base, or the original of a base published quantized
    small: bool  # up to SMALL_MODEL_BYTES in 16 bits: the distribution check, one torch child for merge and reference


def unstreamed_merge(adapter_dir: Path) -> str:
    """Why this adapter is merged with the whole model loaded ("" when it streams, or has no config to read)."""
    try:
        return merge.why_whole_model(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return ""


def plan_export(ctx: StageContext, children: ExitStack) -> tuple[Plan, Child]:
    """Read finetune's outputs and check everything that can be checked before writing (steps 1 and 2); the torch
    child of step 3, started before the slow checks (the training tokenizer, the converter's model list) so that it
    imports torch while they run, and only after the quick ones, which refuse most mistakes."""
    cfg = ctx.cfg.export
    summary = merge.read_finetune(ctx.upstream("finetune", "adapter"), ctx.upstream("finetune", "summary"),
                                  ctx.upstream("finetune", "model"))
    full = summary.method == "full"
    adapter_dir = ctx.upstream("finetune", "model" if full else "adapter")
    outtype, quants = plan_types(cfg)
    imatrix = gguf_io.load_imatrix(Path(cfg.imatrix)) if cfg.imatrix else None
    base = adapter_dir if full else merge.original_16bit(summary.base_model, cfg.base_16bit)
    merge.refuse_pickled_base(merge.local_base(summary.base_model) if full else base)
    ctx.out.mkdir(parents=True, exist_ok=True)
    stem, weights = model_stem(ctx.cfg, summary), base_weight_bytes(str(base))
    disk = check_free_disk(cfg, ctx.out, weights, still_to_write(ctx.out, stem, outtype, quants)) if weights else {}
    whole = "" if full else unstreamed_merge(adapter_dir)
    memory = check_memory(base, cfg, ((weights or 0) if whole else 0, whole)) if list(base.glob("*.safetensors")) else {}
    torch_child = children.enter_context(torch_child_for(ctx))
    template, eos, tokenizer = training_template(ctx, adapter_dir)
    if (base / "config.json").is_file():
        check_architecture(base)
        check_conversion(ctx, base, tokenizer, outtype, weights or 0)
    return Plan(summary, adapter_dir, outtype, quants, imatrix, template, eos, tokenizer,
                merge.merged_dtype_name(cfg.dtype, str(base)), stem, disk, memory, base,
                (weights or 0) <= SMALL_MODEL_BYTES), torch_child


def merge_and_check(ctx: StageContext, plan: Plan, report: dict[str, Any], timings: dict[str, Any],
                    child: Child, earlier: dict[str, Any]) -> None:
    """Step 3: the 16-bit merge (kept when a killed run already finished it), proven tensor by tensor, and for
    small models by next-token distributions too (or the `earlier` check of the same files). All of it in the
    torch child."""
    if plan.summary.method == "full":
        return export_full_finetune(ctx, plan, report, timings, child, earlier)
    cfg, merged_dir, base = ctx.cfg.export, ctx.out / OUTPUTS["merged"], str(plan.base)
    summary = plan.summary.model_copy(update={"base_model": base})
    trust = ctx.cfg.model.trust_remote_code
    child.doing = f"merging the adapter into {merged_dir}"
    if (merged_dir / "config.json").is_file():
        timings["merge"] = {"resumed": True}
    else:
        replaced = plan.base != merge.local_base(plan.summary.base_model)
        timings["merge"] = child.call(plain, merge.merge_adapter, summary, plan.adapter_dir, merged_dir, plan.dtype,
                                      cfg.max_shard_size, trust, replaced)
    if reuse_merge_check(ctx, earlier, report, timings):
        return
    started = time.time()
    report["merge"] = {"tensors": child.call(plain, merge.check_merge, base, plan.adapter_dir, merged_dir)}
    if plan.small:
        _, prompt_ids = verify.rendered_prompts(plan.tokenizer, cfg.verify.prompts)
        merged_lp = child.call(plain, verify.reference_logprobs, merged_dir, prompt_ids)
        report["merge"]["distributions"] = child.call(plain, merge.verify_merge, base,
                                                      plan.adapter_dir, prompt_ids, merged_lp, "fp32", trust)
    else:
        report["merge"]["distributions"] = {"passed": None, "skipped": f"the model is over {SMALL_MODEL_BYTES >> 20} "
                                            "MiB in 16 bits: the tensor check stands alone"}
    timings["verify_merge_seconds"] = round(time.time() - started, 2)
    tensors, distributions = report["merge"]["tensors"], report["merge"]["distributions"]
    report["merge"]["passed"] = tensors["passed"] is not False and distributions["passed"] is not False and (
        tensors["passed"] or distributions["passed"])
    if not report["merge"]["passed"]:
        fail(ctx, report, "the merged model does not hold the adapter: " + merge_failure(report["merge"]),
             discard=(merged_dir,))


def export_full_finetune(ctx: StageContext, plan: Plan, report: dict[str, Any], timings: dict[str, Any],
                         child: Child, earlier: dict[str, Any]) -> None:
    """Step 3 for a full fine-tune: no merge; its shards into merged/, proven to be the trained tensors."""
    merged_dir, summary = ctx.out / OUTPUTS["merged"], plan.summary
    child.doing = f"writing the trained model into {merged_dir}"
    if (merged_dir / "config.json").is_file():
        timings["merge"] = {"resumed": True}
    else:
        timings["merge"] = child.call(plain, merge.export_trained, plan.adapter_dir, merged_dir, plan.dtype,
                                      ctx.cfg.export.max_shard_size)
    if reuse_merge_check(ctx, earlier, report, timings):
        return
    tensors = child.call(plain, merge.check_trained_copy, summary.base_model, plan.adapter_dir, merged_dir)
    report["merge"] = {"tensors": tensors, "passed": tensors["passed"], "distributions": {
        "passed": None, "skipped": "a full fine-tune has no adapter to run unmerged"}}
    if not tensors["passed"]:
        fail(ctx, report, "the exported model is not the trained one: " + merge_failure(report["merge"]),
             discard=(merged_dir,))


def file_identity(path: Path) -> list[int]:
    """What tells one file from another without reading it: inode, size and mtime (a hard link keeps all three; a
    file written again changes them)."""
    stat = path.stat()
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def verified_against(ctx: StageContext) -> dict[str, Any]:
    """What a check's result holds for: the verification settings, the merged model's files (the reference every
    GGUF is compared with), and what made them: the model and export settings a carry-over keeps the same and the
    trained files (a partial directory of another config must never lend its checks)."""
    merged, trained = ctx.out / OUTPUTS["merged"], ctx.upstream("finetune", "adapter").parent
    made_by = ctx.cfg.export.model_dump(mode="json", exclude={"quantizations", "keep_intermediate", "verify", "threads",
                                                               "min_free_disk_gb"})
    return {"settings": ctx.cfg.export.verify.model_dump(mode="json"),
            "made_by": {"model": ctx.cfg.model.model_dump(mode="json"), "export": made_by,
                        "trained": {str(p.relative_to(trained)): file_identity(p) for p in sorted(trained.rglob("*"))
                                    if p.is_file() and "checkpoints" not in p.relative_to(trained).parts}},
            "merged": {p.name: file_identity(p) for p in sorted(merged.iterdir()) if p.is_file()}}


def earlier_verification(ctx: StageContext) -> dict[str, Any]:
    """The verify.json the partial directory already holds, written by an attempt of this config stopped before it
    finished or carried over from the last export unchanged (runner.carry_over_last_run); {} when none."""
    try:
        earlier = json.loads((ctx.out / OUTPUTS["verify"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def reuse_merge_check(ctx: StageContext, earlier: dict[str, Any], report: dict[str, Any],
                      timings: dict[str, Any]) -> bool:
    """Record what the checks of this export hold for (`verified_against`, once the merged model is there), and
    keep the `earlier` check of this same merged model when it passed: a 32B merge's check reads the base, the
    adapter and the merge again, minutes."""
    report["verified_against"] = verified_against(ctx)
    if not (isinstance(earlier.get("merge"), dict) and earlier["merge"].get("passed") is True
            and earlier.get("verified_against") == report["verified_against"]):  # a small model's check reads prompts
        return False
    report["merge"] = {**earlier["merge"], "reused": True}
    timings["verify_merge_seconds"] = "reused"
    return True


def earlier_result(earlier: dict[str, Any], against: dict[str, Any], name: str, path: Path) -> dict[str, Any] | None:
    """An earlier passing verification of this same GGUF file, made with these settings against this same merged
    model; None when anything differs."""
    results = earlier.get("gguf")
    result = results.get(name) if isinstance(results, dict) else None
    if not (isinstance(result, dict) and result.get("passed") is True and earlier.get("verified_against") == against):
        return None
    return {**result, "reused": True} if result.get("identity") == file_identity(path) else None


def merge_failure(result: dict[str, Any]) -> str:
    tensors, distributions = result["tensors"], result["distributions"]
    if tensors.get("out_of_range"):
        return (f"{', '.join(tensors['out_of_range'][:5])} hold values past the merged type's range (inf or nan; fp16 "
                "ends at 65504): set export.dtype: bf16")
    if tensors.get("method") == "full":
        return (f"tensors identical to the trained model's {tensors['identical_to_trained']}, missing "
                f"{tensors['missing'] or 'none'}, {tensors['changed_from_base']} tensors changed from the base")
    if tensors.get("absent_from_merged"):
        return f"the base's tensors {', '.join(tensors['absent_from_merged'][:5])} are missing from the merged model"
    if tensors.get("passed") is False:
        return (f"untargeted tensors identical {tensors['untargeted_identical']}, worst targeted tensor "
                f"{tensors['worst_tensor']} {tensors['max_error_in_16bit_steps']} 16-bit steps from W + scale*B@A, "
                f"{tensors['weights_changed']} weights changed by the adapter")
    if distributions.get("passed") is False:
        return (f"KL(base+adapter || merged) is {distributions['merge_kl_ratio']:.3g} of KL(base+adapter || base) "
                f"(must be < {distributions['max_merge_kl_ratio']})")
    return "no check could run"


def convert_and_quantize(ctx: StageContext, plan: Plan, timings: dict[str, Any], step: Any) -> tuple[Path, dict[str, Path]]:
    """Step 4: the converter's GGUF, then every requested type from it; files already complete are kept."""
    gguf_dir = ctx.out / OUTPUTS["gguf"]
    gguf_dir.mkdir(exist_ok=True)
    intermediate = gguf_dir / gguf_io.gguf_filename(plan.stem, plan.outtype.value)
    keep_only_requested(gguf_dir, plan.stem, [plan.outtype, *plan.quants])
    step(f"converting to {intermediate.name} (llama.cpp converter)")
    if not intermediate.is_file():
        timings["convert_seconds"] = round(gguf_io.convert_to_gguf(
            ctx.out / OUTPUTS["merged"], intermediate, plan.outtype.value, plan.stem,
            log_path=ctx.run.log_path("export-converter")), 2)
    to_quantize = [q for q in plan.quants if q != plan.outtype
                   and not (gguf_dir / gguf_io.gguf_filename(plan.stem, q.value)).is_file()]
    if plan.imatrix is not None and to_quantize:
        gguf_io.check_imatrix(plan.imatrix, intermediate, str(ctx.cfg.export.imatrix))
    files: dict[str, Path] = {}
    for quant in plan.quants:
        target = gguf_dir / gguf_io.gguf_filename(plan.stem, quant.value)
        step(f"quantizing to {target.name}")
        if quant in to_quantize:
            timings[f"quantize_{quant.value}_seconds"] = round(
                gguf_io.quantize_gguf(intermediate, target, quant, plan.imatrix, ctx.cfg.export.threads), 2)
        files[quant.value] = target
    return intermediate, files


def keep_only_requested(gguf_dir: Path, stem: str, types: list[QuantType]) -> None:
    """Remove GGUFs the last export left that this one does not write: carried over by type
    (runner.carry_over_last_run), a file of another name stem (an older version named the base directory
    "my model" so, where it is now "my-model") would otherwise be published unverified beside the new ones."""
    wanted = {gguf_io.gguf_filename(stem, q.value) for q in types}
    for path in gguf_dir.glob("*.gguf"):
        if path.name not in wanted:
            path.unlink()


def verify_all(ctx: StageContext, plan: Plan, checked: dict[str, Path], probe: dict[str, Any],
               reused: dict[str, dict[str, Any]], timings: dict[str, Any], step: Any) -> dict[str, Any]:
    """Step 5: every GGUF against the merged model; the 16-bit one within the tight bounds. A GGUF whose earlier
    verification still holds (`reused`) keeps it."""
    cfg = ctx.cfg.export
    eos_id = plan.tokenizer.convert_tokens_to_ids(plan.eos)
    results = {}
    for name, path in checked.items():
        step(f"verifying {path.name}")
        if name in reused:
            results[name], timings[f"verify_{name}_seconds"] = reused[name], "reused"
            continue
        reference_bound = name == plan.outtype.value and plan.outtype != QuantType.Q8_0
        started = time.time()
        results[name] = verify.verify_gguf(
            path, plan.template, plan.eos, eos_id, probe,
            max_kl=cfg.verify.max_kl if reference_bound else cfg.verify.quant_max_kl,
            min_top1=cfg.verify.min_top1 if reference_bound else None, threads=cfg.threads)
        results[name]["identity"] = file_identity(path)
        timings[f"verify_{name}_seconds"] = round(time.time() - started, 2)
    return results


def probe_and_reference(ctx: StageContext, intermediate: Path, timings: dict[str, Any],
                        child: Child) -> dict[str, Any]:
    """The verification probes (prompts + the 16-bit GGUF's greedy answer) and the merged model's log-probs on
    them, layer by layer."""
    cfg, merged_dir = ctx.cfg.export, ctx.out / OUTPUTS["merged"]
    started = time.time()
    probe = verify.probe_tokens(merged_dir, cfg.verify.prompts, cfg.verify.new_tokens, intermediate, cfg.threads)
    child.doing = f"running {merged_dir} layer by layer"
    probe["reference"] = child.call(plain, verify.reference_logprobs, merged_dir, probe["token_lists"])
    timings["reference_seconds"] = round(time.time() - started, 2)
    return probe


def write_modelfiles(ctx: StageContext, plan: Plan, files: dict[str, Path]) -> dict[str, Any]:
    """Step 6: a Modelfile beside each GGUF; one whose TEMPLATE cannot be derived is written without it and
    warned about, never an error (the GGUFs are finished and verified)."""
    reasons = {ollama.write_modelfile(path, plan.template, plan.tokenizer, plan.eos) for path in files.values()}
    why = next((r for r in reasons if r), None)
    if why:
        ctx.console.print(f"[yellow]Ollama Modelfiles without TEMPLATE[/]: {printable(why)}")
    return {"template": why is None, "warning": why}


def run(ctx: StageContext) -> StageResult:
    with ExitStack() as children:
        plan, torch_child = plan_export(ctx, children)
        return export_planned(ctx, plan, torch_child, children)


def torch_child_for(ctx: StageContext) -> Child:
    return Child("torch", f"exporting {ctx.out}", hint=MEMORY_HINT, preload=TORCH_MODULES)


def export_planned(ctx: StageContext, plan: Plan, torch_child: Child, children: ExitStack) -> StageResult:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    timings: dict[str, Any] = {}
    report: dict[str, Any] = {"model": plan.stem, "base_model": plan.summary.base_model,
                              "backend": plan.summary.backend, "method": plan.summary.method, "disk": plan.disk, "memory": plan.memory,
                              "outtype": plan.outtype.value}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=ctx.console, transient=False) as progress:
        task = progress.add_task("export", total=5 + 2 * len(plan.quants))

        def step(description: str) -> None:
            progress.update(task, description=description, advance=1)  # counts the steps started

        step(f"checking the trained model's {plan.dtype} weights, tensor by tensor" if plan.summary.method == "full"
             else f"merging the adapter into {plan.dtype} weights and checking every tensor")
        earlier = earlier_verification(ctx)
        merge_and_check(ctx, plan, report, timings, torch_child, earlier)
        # A big model's merge heap goes back to the system before the converter runs; a small one's child is kept
        # for the reference (a fresh one would import torch again).
        if not plan.small:
            torch_child.close()
        intermediate, files = convert_and_quantize(ctx, plan, timings, step)
        if not plan.small:
            torch_child = children.enter_context(torch_child_for(ctx))
        step("the merged model's reference distributions, layer by layer")
        checked = {plan.outtype.value: intermediate, **files}
        reused = {name: found for name, path in checked.items()
                  if (found := earlier_result(earlier, report["verified_against"], name, path))}
        # no reference run when every GGUF keeps its earlier verification
        probe = probe_and_reference(ctx, intermediate, timings, torch_child) if len(reused) < len(checked) else {}
        torch_child.close()  # its memory goes back before the GGUFs are run
        results = verify_all(ctx, plan, checked, probe, reused, timings, step)
        report["gguf"] = results
        step("writing Modelfiles and reports")
        report["ollama"] = write_modelfiles(ctx, plan, files)
        progress.update(task, completed=5 + 2 * len(plan.quants))
    # The 16-bit GGUF goes last: an export stopped while it wrote its reports reruns without converting again.
    dropped = () if plan.outtype.value in files or ctx.cfg.export.keep_intermediate else (intermediate,)
    report["timings"] = timings
    report["passed"] = report["merge"]["passed"] and all(r["passed"] for r in results.values())
    write_reports(ctx, report, leaving=dropped)
    if not report["passed"]:
        bad = [f"{r['file']} ({', '.join(k for k, ok in r['checks'].items() if not ok)})"
               for r in results.values() if not r["passed"]]
        failed = tuple(ctx.out / OUTPUTS["gguf"] / r["file"] for r in results.values() if not r["passed"])
        fail(ctx, report, "GGUF verification failed: " + "; ".join(bad), discard=failed + dropped)
    print_summary(ctx, report)
    for path in dropped:
        path.unlink()
    return stage_result(results, files)


def stage_result(results: dict[str, Any], files: dict[str, Path]) -> StageResult:
    rows = [(f"{name}", f"top1 {r['top1_agreement']:.3f}, KL {r['mean_kl']:.4g}") for name, r in results.items()]
    return StageResult(
        metrics={"merge_passed": True, "files": [p.name for p in files.values()],
                 **{f"{n}_mean_kl": r["mean_kl"] for n, r in results.items()},
                 **{f"{n}_top1": r["top1_agreement"] for n, r in results.items()}},
        summary=[("files", ", ".join(p.name for p in files.values()))] + rows,
    )


def fail(ctx: StageContext, report: dict[str, Any], message: str, discard: tuple[Path, ...] = ()) -> None:
    """Keep the numbers where the user can read them, delete the files that failed (the rest of the partial
    directory stays for the rerun to resume from), then stop."""
    for path in discard:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    kept = ctx.run.path / "export.verify-failed.json"
    atomic_write_text(kept, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    raise VerificationError(f"export verification failed, nothing was published: {message}. Details: {kept}")


def write_reports(ctx: StageContext, report: dict[str, Any], leaving: tuple[Path, ...] = ()) -> None:
    """verify.json, summary.json (its `files`: the GGUFs the stage publishes, not those in `leaving`), report.md
    and the chart."""
    out = {key: ctx.out / name for key, name in OUTPUTS.items()}
    atomic_write_text(out["verify"], json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    present = {r["file"] for r in report["gguf"].values() if (out["gguf"] / r["file"]).is_file()}
    kept = present - {path.name for path in leaving}
    summary = {"model": report["model"], "base_model": report["base_model"], "backend": report["backend"],
               "files": {n: r["file"] for n, r in report["gguf"].items() if r["file"] in kept},
               "passed": report["passed"], "timings": report["timings"]}
    atomic_write_text(out["summary"], json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out["report"], render_report(report))
    save_verify_plot(report, out["verify_plot"])


HEADERS = ("file", "type", "MiB", "top-1 agreement", "mean KL (nats)", "max KL", "template", "EOS", "passed")


def _rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(r["file"], name, f"{r['bytes'] / 2**20:.0f}", f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4g}",
             f"{r['max_kl']:.4g}", "ok" if r["checks"]["chat_template"] else "DIFFERS",
             "ok" if r["checks"]["eos"] else "DIFFERS",
             ("yes (checked before)" if r.get("reused") else "yes") if r["passed"] else "NO")
            for name, r in report["gguf"].items()]


def merge_sentence(merge_result: dict[str, Any]) -> str:
    """One line on what proved the merge kept the adapter."""
    tensors, distributions = merge_result["tensors"], merge_result["distributions"]
    if tensors.get("method") == "full":
        verdict = "the trained weights are in the export" if merge_result["passed"] else "FAILED"
        return (f"no merge (full fine-tune): {tensors['identical_to_trained']} tensors identical to the trained "
                f"model's, {tensors['changed_from_base']} changed from the base -> {verdict}")
    parts = []
    if tensors.get("passed") is not None:
        parts.append(f"{tensors['targeted']} adapted tensors within {tensors['max_error_in_16bit_steps']} 16-bit steps "
                     f"of W + scale*B@A, untargeted identical {tensors['untargeted_identical']}")
    if distributions.get("passed") is not None:
        parts.append(f"KL(base+adapter || merged) {distributions['merge_kl_ratio']:.3g} of KL(base+adapter || base) "
                     f"(< {distributions['max_merge_kl_ratio']})")
    verdict = "the adapter is in the merged weights" if merge_result["passed"] else "FAILED"
    earlier = " (checked before; the same merged files)" if merge_result.get("reused") else ""
    return f"merge: {'; '.join(parts) or 'not checked'} -> {verdict}{earlier}"


def print_summary(ctx: StageContext, report: dict[str, Any]) -> None:
    ctx.console.print(merge_sentence(report["merge"]))
    ctx.console.print(summary_table("export verification vs the merged HF model", _rows(report), HEADERS))


def render_report(report: dict[str, Any]) -> str:
    lines = [f"# Export report: {report['model']}", "", merge_sentence(report["merge"]) + ".", "",
             *markdown_table(HEADERS, _rows(report))]
    if report.get("ollama", {}).get("warning"):
        lines += ["", f"Ollama Modelfiles without TEMPLATE: {report['ollama']['warning']}"]
    return "\n".join(lines) + "\n\nKL is KL(merged HF || GGUF) over every position of the fixed prompts.\n"


def save_verify_plot(report: dict[str, Any], path: Path) -> None:
    names = list(report["gguf"])
    with figure(path, (8, 3.2), ncols=2) as (fig, (left, right)):
        left.bar(names, [report["gguf"][n]["top1_agreement"] for n in names], color="#4878d0")
        left.set_ylim(0, 1.05)
        left.set_title("top-1 agreement with merged HF")
        right.bar(names, [report["gguf"][n]["mean_kl"] for n in names], color="#d65f5f")
        right.set_title("mean KL (nats)")


STAGE = Stage(name="export", run=run, outputs=OUTPUTS, sections=("model", "export"), upstream=("finetune",),
              packages=("torch", "transformers", "peft", "unsloth", "llama-cpp-python"), resumable=True,
              input_files=input_files, model_files=model_files, operational=("export.threads", "export.min_free_disk_gb"),
              # another list of GGUF types, or of verification settings: the merge and the GGUFs already written
              # are kept (a 32B merge and each of its quantizations take minutes), and their checks where they hold
              carries_over_when=("export.quantizations", "export.keep_intermediate", "export.verify"),
              carry_over=kept_on_change)
