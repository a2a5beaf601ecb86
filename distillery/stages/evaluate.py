"""Evaluate: every artifact of a run (base, adapter, merged, each GGUF) on the run's own held-out data, by task,
and on MathQA exactly as lm-evaluation-harness scores it.

Steps, in order:
1. read format's held-out split as the training tokens (evals/heldout.py) and, when evaluate.data is set, MathQA
   (a local file or a Hub id), skipping and reporting records whose options cannot be parsed;
2. find the artifacts: the base model, the fine-tuned adapter (or, method full, the trained model, which then
   stands in for the merged one: export only linked its shards), the merged 16-bit model, each GGUF
   (`artifacts: auto` takes whatever the run has; a GGUF that does not load is reported and skipped);
3. score each, loading it once: the held-out loss per task and the task's metric on generated answers
   (evals/tasks.py); MathQA in loglikelihood mode (acc, acc_norm, standard errors) or generative mode (<think>
   reasoning, then an option letter);
4. check each GGUF against the merged model (or the adapter): a task whose loss or metric moved past
   evaluate.heldout's bounds is marked as failing;
5. write heldout.json, heldout_items.jsonl, heldout.png, results.json, per_item.jsonl, the MathQA comparison
   (comparison.md / .json / .png) and report.md, and print the tables.

The stage is resumable: each artifact's scores are kept in the partial directory as it is done, and an
interrupted evaluate (Ctrl-C, a kill, a GGUF that took the machine's memory) goes on from the next artifact.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from distillery.evals import generative, heldout, mathqa, report
from distillery.evals.gguf_backend import ANSWERS_AT_ONCE, GGUFContextError, GGUFDecodeError, GGUFLoadError, GGUFModel
from distillery.evals.hf_backend import HFModel, resolve_dtype
from distillery.export.llama_child import MAX_CONTEXT
from distillery.evals.scoring import build_request
from distillery.config import HELDOUT_OFF_NO_DATA, DistilleryConfig, EvaluateConfig
from distillery.core.chat_render import Chat, ChatRenderer, TemplateRefused, TemplateTooCostly
from distillery.core.console import printable, summary_table
from distillery.core.isolation import NativeCrash
from distillery.core.errors import UserError
from distillery.core.summaries import read_finetune_summary
from distillery.core.models import resolve_model_path
from distillery.core.records import report_json, write_jsonl
from distillery.core.rundir import atomic_write_text, sha256_json
from distillery.core.userinput import is_usable_file
from distillery.stage import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

OUTPUTS = {"results": "results.json", "per_item": "per_item.jsonl", "comparison": "comparison.json",
           "comparison_md": "comparison.md", "comparison_plot": "comparison.png", "heldout": "heldout.json",
           "heldout_items": "heldout_items.jsonl", "heldout_plot": "heldout.png", "report": "report.md"}
KINDS = ("base", "adapter", "merged", "gguf")
GIB = 1 << 30
SCORED = "scored"  # in the partial directory: each artifact's scores as it is done (save_scored)


def upstream(cfg: DistilleryConfig) -> tuple[str, ...]:
    """format (the held-out split), finetune (the adapter) and, when export is on, export (merged + GGUF)."""
    wanted = set(KINDS) if cfg.evaluate.artifacts == "auto" else set(cfg.evaluate.artifacts)
    stages = ("format",) if cfg.evaluate.heldout.enabled else ()
    stages += ("finetune",) if wanted - {"base"} else ()
    if cfg.export.enabled and wanted & {"merged", "gguf"}:
        stages += ("export",)
    return stages


def input_files(cfg: DistilleryConfig) -> list[Path]:
    """The local MathQA files (hashed into the fingerprint); Hub ids are not files."""
    ev = cfg.evaluate
    sources = ([ev.data] if ev.data else []) + ([ev.fewshot_data] if ev.fewshot_data and ev.num_fewshot else [])
    return [Path(s).expanduser() for s in sources if mathqa.is_local(s) and is_usable_file(Path(s).expanduser())]


@dataclass
class Artifact:
    name: str  # base, adapter (trained, for a full fine-tune), merged, or the GGUF's file stem
    kind: str  # base | adapter (what finetune trained) | merged | gguf
    path: Path | str
    base_model: str | None = None  # for an adapter: the model it was trained on


def find_artifacts(ctx: StageContext) -> list[Artifact]:
    """The artifacts to score; one named in evaluate.artifacts that the run lacks is a UserError."""
    cfg, wanted = ctx.cfg, ctx.cfg.evaluate.artifacts
    stages = upstream(cfg)
    base = resolve_model_path(cfg.model.path)
    found = {"base": [Artifact("base", "base", base)], "adapter": [], "merged": [], "gguf": []}
    if "finetune" in stages:
        found["adapter"] = trained_artifacts(ctx, base)
    if "export" in stages:
        merged = ctx.upstream("export", "merged")
        if (merged / "config.json").is_file():
            found["merged"].append(Artifact("merged", "merged", merged))
        found["gguf"] = exported_ggufs(ctx)
    if wanted == "auto":
        if any(a.name == "trained" for a in found["adapter"]):
            found["merged"] = []  # the same tensors as the trained model (export linked them): scored once
        return [a for kind in KINDS for a in found[kind]]
    missing = [kind for kind in wanted if not found[kind]]
    if missing:
        where = {"adapter": "runs/<name>/finetune/adapter (run `distillery finetune`)",
                 "merged": "runs/<name>/export/merged (run `distillery export` with export.enabled)",
                 "gguf": "runs/<name>/export/gguf/*.gguf (run `distillery export` with export.enabled)"}
        raise UserError("evaluate.artifacts: this run has no " + "; no ".join(where[k] for k in missing)
                        + ". Drop them from the list or use artifacts: auto.")
    return [a for kind in wanted for a in found[kind]]


def weights_of(artifact: Artifact) -> Path | None:
    """The model directory whose weights an HF artifact loads (an adapter: its base's; a Hub id: its snapshot in the
    local cache); None for a GGUF or a base that is not on this machine."""
    from distillery.export.merge import cached_model

    if artifact.kind == "gguf":
        return None
    try:
        model = resolve_model_path(artifact.base_model) if artifact.base_model else str(artifact.path)
    except UserError:
        return None
    return cached_model(model)


def within_memory(artifacts: list[Artifact], ctx: StageContext) -> list[Artifact]:
    """The artifacts whose weights fit the memory of the device they run on, checked before any is loaded: the
    merged 16-bit 32B model (61 GiB) was loaded onto a 40 GB GPU after base and adapter were scored, and every
    rerun tried it again. Under `artifacts: auto` a merged model that does not fit is left out, with a note (export
    checked its GGUFs against it); any other is a UserError naming what fits."""
    from distillery.evals.hf_backend import free_memory, hf_device, loaded_bytes

    dtype, needs = resolve_dtype(ctx.cfg.evaluate.dtype), {}
    for artifact in artifacts:
        path = weights_of(artifact)
        weights = loaded_bytes(path, dtype) if path is not None else None
        if weights is not None:
            needs[artifact.name] = weights + max(weights // 10, 512 << 20)  # and what scoring itself holds
    if not needs:
        return artifacts
    device = hf_device()
    free = free_memory(device)
    too_big = {name: need for name, need in needs.items() if free is not None and need > free}
    kept = [a for a in artifacts if a.name not in too_big]
    where = f"the {'GPU' if device == 'cuda' else 'machine'} has {free / GIB if free else 0:.1f} GiB free"
    for artifact in artifacts:
        if artifact.name not in too_big:
            continue
        need = (f"it needs about {too_big[artifact.name] / GIB:.1f} GiB in {dtype} (its weights and the scoring), "
                f"and {where}")
        if ctx.cfg.evaluate.artifacts == "auto" and artifact.kind == "merged":
            ctx.console.print(f"[yellow]the merged model is left out[/]: {need} (export checked its GGUFs against it). "
                              "List it in evaluate.artifacts on a machine with more memory.")
            continue
        listed = [kind for kind in KINDS if any(a.kind == kind for a in kept)]
        raise UserError(f"evaluate: {artifact.name} ({printable(str(artifact.path))}) would not fit: {need}. Leave it "
                        f"out (evaluate.artifacts: [{', '.join(listed)}]), or evaluate on a machine with more memory.")
    return kept


def exported_ggufs(ctx: StageContext) -> list[Artifact]:
    """The GGUFs export's summary.json lists, as push takes them: a file an earlier export left in gguf/, or one put
    there by hand, is not this export's model (every *.gguf there was scored)."""
    summary, folder = ctx.upstream("export", "summary"), ctx.upstream("export", "gguf")
    try:
        names = [Path(str(name)).name for name in json.loads(summary.read_text(encoding="utf-8"))["files"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{summary} is not what `distillery export` writes (the GGUFs it made): it was edited or cut "
                        "short. Run `distillery export --force`.") from None
    return [Artifact(Path(name).stem, "gguf", folder / name) for name in sorted(set(names))
            if (folder / name).is_file()]


def trained_artifacts(ctx: StageContext, base: str) -> list[Artifact]:
    """What finetune trained: its adapter on the base, or (method full) the whole trained model."""
    model, adapter = ctx.upstream("finetune", "model"), ctx.upstream("finetune", "adapter")
    if (model / "config.json").is_file():
        return [Artifact("trained", "adapter", model)]
    if (adapter / "adapter_config.json").is_file():
        return [Artifact("adapter", "adapter", adapter, trained_base(ctx.upstream("finetune", "summary"), base))]
    return []


def trained_base(summary: Path, default: str) -> str:
    """The base model finetune trained on (its summary), else the configured model."""
    if summary.is_file():
        base = read_finetune_summary(summary).base_model
        if Path(base).is_dir() or not Path(base).is_absolute():
            return base
    return default


def gguf_context(cfg: DistilleryConfig) -> int:
    """llama.cpp's context for scoring: a held-out sequence (cut at format.max_length) plus the longest answer
    either evaluation may generate (as many as are generated side by side when sampling), twice (GGUFModel: half
    holds the answers), and never under 2048. Half of it is the window MathQA items must fit (within_window): it
    counts the answer settings whether or not answers are generated, so that one config always scores the same
    items."""
    ev = cfg.evaluate
    longest = max(min(ev.heldout.samples, ANSWERS_AT_ONCE) * ev.heldout.max_new_tokens, ev.max_new_tokens)
    context = max(2048, 2 * (cfg.format.max_length + longest))
    if context > MAX_CONTEXT:
        raise UserError(f"evaluate: scoring a GGUF needs a llama.cpp context of {context:,} tokens (twice "
                        "format.max_length plus the longest answer: evaluate.max_new_tokens, or "
                        "evaluate.heldout.max_new_tokens times the samples generated side by side), more than the "
                        f"{MAX_CONTEXT:,} it can hold. Lower them.")
    return context


def load_model(artifact: Artifact, cfg: DistilleryConfig) -> Any:
    """A scorer for the artifact: transformers (+ PEFT) for HF directories, llama.cpp for GGUFs."""
    ev = cfg.evaluate
    if artifact.kind == "gguf":
        return GGUFModel(Path(artifact.path), n_ctx=gguf_context(cfg), threads=ev.gguf_threads)
    if artifact.kind == "adapter" and artifact.base_model:
        return HFModel(artifact.base_model or "", ev.dtype, adapter=Path(artifact.path),
                       trust_remote_code=cfg.model.trust_remote_code)
    return HFModel(str(artifact.path), ev.dtype, trust_remote_code=cfg.model.trust_remote_code)


def load_data(ev: EvaluateConfig) -> tuple[list[mathqa.Item], list[str], mathqa.LoadReport]:
    """The items to score, their contexts (with few-shot examples) and what was skipped."""
    loaded = mathqa.LoadReport()
    items = mathqa.load_items(ev.data, ev.split, ev.limit, loaded)
    pool: list[mathqa.Item] = []
    same_split = False
    if ev.num_fewshot:
        source = ev.fewshot_data or ev.data
        split = ev.fewshot_split if not mathqa.is_local(source) else "train"
        same_split = source == ev.data and (mathqa.is_local(source) or split == ev.split)
        keys = mathqa.FEWSHOT_KEYS if ev.fewshot_data else (mathqa.DATA_KEYS[0], mathqa.FEWSHOT_KEYS[1])
        pool = mathqa.load_items(source, split, None, mathqa.LoadReport(), keys)
    return items, mathqa.build_contexts(items, ev.num_fewshot, pool, same_split), loaded


def score_loglikelihood(model: Any, items: list[mathqa.Item], contexts: list[str], ev: EvaluateConfig,
                        progress: Any) -> list[dict[str, Any]]:
    requests = [build_request(model.encode, ctx, mathqa.continuations(item)) for item, ctx in zip(items, contexts)]
    lls = model.loglikelihoods(requests, ev.batch_size, progress)
    rows = []
    for item, ll in zip(items, lls):
        pred, pred_norm = mathqa.predictions(item, ll)
        rows.append({"id": item.id, "label": item.label, "pred": pred, "pred_norm": pred_norm,
                     "acc": int(pred == item.label), "acc_norm": int(pred_norm == item.label),
                     "loglikelihoods": ll})
    return rows


def chat_prompts(ctx: StageContext, items: list[mathqa.Item], tokenizer: Any) -> list[str]:
    """Generative prompts rendered with the run's chat template (format's), else the model's own."""
    stored = ctx.upstream("format", "chat_template")
    template = stored.read_text(encoding="utf-8") if stored.is_file() else tokenizer.chat_template
    if not template:
        raise UserError("evaluate.mode generative needs a chat template: run `distillery format` first, or use a "
                        "model that has one.")
    chats = [Chat([{"role": "user", "content": generative.user_prompt(item)}], True) for item in items]
    try:
        with ChatRenderer() as renderer:
            return renderer.render(chats, template, tokenizer.special_tokens_map)
    except TemplateRefused as err:
        raise UserError(f"evaluate: the run's chat template refused MathQA item {items[err.index].id}: {err.reason}. "
                        "Use evaluate.mode loglikelihood, or format.template qa, ko_qa, alpaca or r1.") from None
    except TemplateTooCostly as err:
        raise UserError(f"evaluate: the run's chat template took more than {err.budget()} rendering MathQA items "
                        f"{items[err.first].id} to {items[err.last].id}: it is broken or hostile. Use evaluate.mode "
                        "loglikelihood, or format.template qa, ko_qa, alpaca or r1.") from None


def score_generative(model: Any, items: list[mathqa.Item], prompts: list[str], ev: EvaluateConfig,
                     progress: Any) -> list[dict[str, Any]]:
    replies = model.generate(prompts, ev.max_new_tokens, ev.batch_size, progress)
    rows = []
    for item, reply in zip(items, replies):
        letter = generative.extract_letter(reply, item.choices)
        pred = "abcde".index(letter) if letter else None
        rows.append({"id": item.id, "label": item.label, "pred": pred, "acc": int(pred == item.label),
                     "no_answer": int(pred is None), "reply": reply})
    return rows


def summarize(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """acc/acc_norm with standard errors (loglikelihood) or acc/no_answer share (generative)."""
    if mode == "loglikelihood":
        return mathqa.aggregate(rows)
    acc = [float(r["acc"]) for r in rows]
    none = [float(r["no_answer"]) for r in rows]
    return {"n": len(rows), "acc": sum(acc) / len(acc), "acc_stderr": mathqa.mean_stderr(acc),
            "no_answer": sum(none) / len(none), "no_answer_stderr": mathqa.mean_stderr(none)}


@dataclass
class HeldoutSet:
    """The held-out items every artifact is scored on, and the ids generation stops at."""

    items: list[heldout.HeldoutItem]
    generate: list[heldout.HeldoutItem]
    eos_id: int

    @functools.cached_property
    def highest_id(self) -> int:
        """The largest token id of any item: a GGUF's vocabulary must hold it."""
        return max(max(item.prompt_ids + item.completion_ids) for item in self.items)


def load_heldout(ctx: StageContext) -> tuple[HeldoutSet | None, int]:
    """Format's eval split, tokenized with the training tokenizer (the adapter's, else the base model's) and
    format's EOS (None when the run has no held-out record to score), and how many records had no completion token
    within format.max_length."""
    from transformers import AutoTokenizer

    ho = ctx.cfg.evaluate.heldout
    eval_path = ctx.upstream("format", "eval")
    meta = format_meta(ctx.upstream("format", "template"))
    trained = trained_artifacts(ctx, "") if "finetune" in upstream(ctx.cfg) else []
    source = str(trained[0].path) if trained and (Path(trained[0].path) / "tokenizer_config.json").is_file() else \
        resolve_model_path(ctx.cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=ctx.cfg.model.trust_remote_code)
    tokenizer.eos_token = meta["eos_token"]
    items, dropped = heldout.load_items(eval_path, tokenizer, ctx.cfg.format.max_length, ho.limit)
    if not items:
        if dropped:
            ctx.console.print(f"[yellow]held-out data not scored[/]: none of the {dropped} records of "
                              f"{printable(str(eval_path))} has a completion token within format.max_length "
                              f"({ctx.cfg.format.max_length}): their prompts fill it. Raise format.max_length to "
                              "score them.")
        return None, dropped
    return HeldoutSet(items, heldout.generation_subset(items, ho.generate),
                      tokenizer.convert_tokens_to_ids(meta["eos_token"])), dropped


def format_meta(path: Path) -> dict[str, Any]:
    """format's template.json; one damaged on disk or edited by hand is a UserError naming it."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
        raise UserError(f"{path} cannot be read ({type(err).__name__}): `distillery format --force` writes it "
                        "again.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("eos_token"), str) or not meta["eos_token"]:
        raise UserError(f"{path} has no `eos_token` text, which format writes: `distillery format --force` writes it "
                        "again.")
    return meta


@dataclass
class MathQASet:
    items: list[mathqa.Item]
    prompts: list[str]  # contexts (loglikelihood) or chat prompts (generative)
    loaded: mathqa.LoadReport


def load_mathqa(ctx: StageContext) -> MathQASet:
    """MathQA as evaluate.data says (nothing when it is null); unparseable records are reported."""
    ev = ctx.cfg.evaluate
    if not ev.data:
        return MathQASet([], [], mathqa.LoadReport())
    from transformers import AutoTokenizer

    items, contexts, loaded = load_data(ev)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ctx.cfg.model.path),
                                              trust_remote_code=ctx.cfg.model.trust_remote_code)
    prompts = chat_prompts(ctx, items, tokenizer) if ev.mode == "generative" else contexts
    items, prompts = within_window(ctx.cfg, items, prompts, loaded, tokenizer)
    for skipped in loaded.skipped:
        ctx.console.print(f"[yellow]skipped MathQA item {printable(skipped['id'])}[/]: {printable(skipped['reason'])}")
    if not items:
        raise UserError(f"evaluate.data {ev.data}: no MathQA item can be scored ({len(loaded.skipped)} skipped, "
                        f"the first: {loaded.skipped[0]['reason']}).")
    return MathQASet(items, prompts, loaded)


def within_window(cfg: DistilleryConfig, items: list[mathqa.Item], prompts: list[str], loaded: mathqa.LoadReport,
                  tokenizer: Any) -> tuple[list[mathqa.Item], list[str]]:
    """The items whose tokens fit the window every artifact scores one sequence in (half a GGUF's context,
    gguf_context); a longer one (a hostile Problem, many long few-shot examples) is skipped and reported instead
    of failing llama.cpp's decode or building an attention mask of its length squared (counted with the base
    model's tokenizer)."""
    ev, window = cfg.evaluate, gguf_context(cfg) // 2
    kept: tuple[list[mathqa.Item], list[str]] = ([], [])
    for item, prompt in zip(items, prompts):
        if ev.mode == "loglikelihood":
            needed = len(tokenizer.encode(prompt)) + max(len(tokenizer.encode(c, add_special_tokens=False))
                                                         for c in mathqa.continuations(item))
        else:
            needed = len(tokenizer.encode(prompt, add_special_tokens=False)) + ev.max_new_tokens
        if needed > window:
            loaded.skipped.append({"id": item.id, "reason": f"{needed} tokens with its longest answer, more than the "
                                   f"{window} a sequence is scored in (raise format.max_length, or lower "
                                   "evaluate.num_fewshot or evaluate.max_new_tokens)"})
            continue
        kept[0].append(item)
        kept[1].append(prompt)
    return kept


@dataclass
class Scores:
    """Everything scored so far, artifact by artifact."""

    results: dict[str, Any]  # results.json: MathQA per artifact, errors, timings
    heldout: dict[str, Any] = field(default_factory=dict)  # heldout.json
    per_item: list[dict[str, Any]] = field(default_factory=list)
    heldout_items: list[dict[str, Any]] = field(default_factory=list)
    heldout_seconds: dict[str, float] = field(default_factory=dict)


def score_one(ctx: StageContext, artifact: Artifact, held: HeldoutSet | None, mqa: MathQASet, scores: Scores,
              limits: Any, advance: Any) -> None:
    """Load one artifact once and score it on the held-out data and MathQA; a GGUF that will not load is noted."""
    ev = ctx.cfg.evaluate
    started = time.time()
    try:
        model = load_model(artifact, ctx.cfg)
    except (GGUFLoadError, NativeCrash) as err:  # llama.cpp refused or crashed on this GGUF: the others still count
        why = str(err) + (" (evaluate asks for twice format.max_length plus the longest answer it generates: "
                          "lower evaluate.heldout.max_new_tokens, evaluate.max_new_tokens or format.max_length)"
                          if isinstance(err, GGUFContextError) else "")
        scores.results["errors"][artifact.name] = why
        ctx.console.print(f"[yellow]skipped {printable(artifact.name)}[/]: {printable(why)}")
        return
    loaded = time.time()
    try:
        if held and isinstance(model, GGUFModel):
            model.check_vocabulary(held.highest_id)
        if held:
            scored, rows = heldout.score_artifact(
                model, held.items, held.generate, held.eos_id, ev.heldout.max_new_tokens, ev.heldout.samples,
                ev.heldout.temperature, ev.batch_size, limits, advance, top_p=ev.heldout.top_p)
            scores.heldout[artifact.name] = scored
            scores.heldout_items += [{"artifact": artifact.name, **row} for row in rows]
            scores.heldout_seconds[artifact.name] = round(time.time() - loaded, 2)
        if mqa.items:
            score = score_loglikelihood if ev.mode == "loglikelihood" else score_generative
            rows = score(model, mqa.items, mqa.prompts, ev, advance)
            scores.results["artifacts"][artifact.name] = {"kind": artifact.kind, "path": str(artifact.path),
                                                          **summarize(rows, ev.mode)}
            scores.per_item += [{"artifact": artifact.name, **row} for row in rows]
    except (GGUFDecodeError, NativeCrash) as err:  # llama.cpp failed on this GGUF: the other artifacts still count
        scores.results["errors"][artifact.name] = str(err)
        ctx.console.print(f"[yellow]not scored {printable(artifact.name)}[/]: {printable(str(err))}")
    finally:
        if isinstance(model, GGUFModel):
            model.close()  # its llama.cpp child process
    scores.results.setdefault("seconds", {})[artifact.name] = round(time.time() - started, 2)


def run(ctx: StageContext) -> StageResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from distillery.reasoning.sandbox import Limits, check_isolation

    ev = ctx.cfg.evaluate
    held, dropped = load_heldout(ctx) if ev.heldout.enabled else (None, 0)
    mqa = load_mathqa(ctx)
    if held is None and not mqa.items:
        raise UserError(nothing_to_score(ev))
    artifacts = within_memory(find_artifacts(ctx), ctx)
    scores = Scores({"task": "mathqa", "mode": ev.mode, "data": ev.data, "split": ev.split, "n": len(mqa.items),
                     "num_fewshot": ev.num_fewshot, "dtype": resolve_dtype(ev.dtype), "skipped_items": mqa.loaded.skipped,
                     "artifacts": {}, "errors": {}})
    limits = Limits.from_config(ctx.cfg.distill.sandbox)
    if held and any(item.task == "code_io_input" for item in held.generate):
        check_isolation(limits)  # its answers run the dataset's reference code
    work = len(mqa.items) + (len(held.items) + 2 * len(held.generate) if held else 0)  # scored, answered, judged
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=ctx.console) as bar:
        for artifact in artifacts:
            task = bar.add_task(printable(f"evaluating {artifact.name}"), total=work)
            if restore_scored(ctx.out / SCORED, artifact, scores):  # scored before this run was interrupted
                bar.update(task, completed=work)
                ctx.console.print(f"{printable(artifact.name)}: scored before the stage was interrupted, kept")
                continue
            score_one(ctx, artifact, held, mqa, scores, limits, lambda n, task=task: bar.advance(task, n))
            save_scored(ctx.out / SCORED, artifact, scores)
    if not scores.results["artifacts"] and not scores.heldout:
        raise UserError("evaluate: no artifact could be scored: " + "; ".join(scores.results["errors"].values()))
    reference = heldout.quant_checks(scores.heldout, {a.name: a.kind for a in artifacts},
                                     ev.heldout.max_quant_loss_increase, ev.heldout.max_quant_drop)
    scores.results["heldout"] = {"items": len(held.items) if held else 0,
                                 "generated": len(held.generate) if held else 0,
                                 "dropped_no_completion_token": dropped, "reference": reference,
                                 "ggufs_not_checked": [a.name for a in artifacts if a.kind == "gguf" and reference is None
                                                       and a.name in scores.heldout],
                                 "seconds": scores.heldout_seconds}
    write_outputs(ctx, scores.results, scores.per_item, scores.heldout, scores.heldout_items)
    shutil.rmtree(ctx.out / SCORED, ignore_errors=True)
    return stage_result(scores.results, scores.heldout)


def scored_path(directory: Path, artifact: Artifact) -> Path:
    """Where one artifact's scores wait for the end of the stage; named by a digest, never by the artifact's name
    (a GGUF's file name)."""
    return directory / f"{sha256_json([artifact.kind, artifact.name])[:16]}.json"


SAVED_KEYS = {"name", "heldout", "heldout_seconds", "heldout_items", "mathqa", "per_item", "seconds"}


def artifact_scores(scores: Scores, name: str) -> dict[str, Any]:
    """Everything scored of one artifact, as save_scored keeps it."""
    return {"name": name, "heldout": scores.heldout.get(name), "heldout_seconds": scores.heldout_seconds.get(name),
            "heldout_items": [row for row in scores.heldout_items if row["artifact"] == name],
            "mathqa": scores.results["artifacts"].get(name), "per_item": [r for r in scores.per_item if r["artifact"] == name],
            "seconds": scores.results.get("seconds", {}).get(name)}


def save_scored(directory: Path, artifact: Artifact, scores: Scores) -> None:
    """Keep an artifact's scores in the partial directory, so that an interrupted evaluate goes on from the next
    artifact (the runner keeps that directory only while the config, the packages and every upstream artifact
    are the ones it was scored with). An artifact that could not be scored is tried again."""
    if artifact.name in scores.results["errors"]:
        return
    directory.mkdir(exist_ok=True)
    # json.dumps, not report_json: a broken model's infinite loss must come back as the float it was
    atomic_write_text(scored_path(directory, artifact), json.dumps(artifact_scores(scores, artifact.name)))


def restore_scored(directory: Path, artifact: Artifact, scores: Scores) -> bool:
    """Put back an artifact's scores saved by an interrupted run of this stage; False when there are none."""
    try:
        saved = json.loads(scored_path(directory, artifact).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none saved (written whole or not at all: atomic_write_text)
        return False
    if not (isinstance(saved, dict) and saved.get("name") == artifact.name and SAVED_KEYS <= saved.keys()
            and isinstance(saved["heldout_items"], list) and isinstance(saved["per_item"], list)):
        return False  # not what save_scored wrote: scored again
    name = artifact.name
    if saved["heldout"] is not None:
        scores.heldout[name], scores.heldout_seconds[name] = saved["heldout"], saved["heldout_seconds"]
    if saved["mathqa"] is not None:
        scores.results["artifacts"][name] = saved["mathqa"]
    scores.heldout_items += saved["heldout_items"]
    scores.per_item += saved["per_item"]
    scores.results.setdefault("seconds", {})[name] = saved["seconds"]
    return True


def nothing_to_score(ev: EvaluateConfig) -> str:
    """Why evaluate has nothing to score, naming the setting that would give it something."""
    if not ev.heldout.enabled:
        return f"evaluate has nothing to score: {HELDOUT_OFF_NO_DATA}."
    return ("evaluate has nothing to score: the run has no held-out record it can score (ingest.eval_fraction, "
            "format.max_length) and evaluate.data is not set. Set one of them.")


def write_outputs(ctx: StageContext, results: dict[str, Any], per_item: list[dict[str, Any]],
                  scored_heldout: dict[str, Any], heldout_items: list[dict[str, Any]]) -> None:
    out = {key: ctx.out / name for key, name in OUTPUTS.items()}
    ho = ctx.cfg.evaluate.heldout
    lines = [f"# Evaluation of run {ctx.cfg.run.name}", ""]
    out["heldout"].write_text(report_json(scored_heldout), encoding="utf-8")
    write_jsonl(out["heldout_items"], heldout_items)
    if scored_heldout:
        report.save_heldout_chart(scored_heldout, out["heldout_plot"])
        bounds = {"loss": ho.max_quant_loss_increase, "drop": ho.max_quant_drop}
        lines += report.render_heldout_markdown(scored_heldout, results["heldout"]["reference"], bounds) + [""]
    out["results"].write_text(report_json(results), encoding="utf-8")
    write_jsonl(out["per_item"], per_item)
    rows = report.comparison_rows(results) if results["artifacts"] else []
    out["comparison"].write_text(report_json(rows), encoding="utf-8")
    if rows:
        mathqa_md = report.render_markdown(results, rows)
        out["comparison_md"].write_text(mathqa_md, encoding="utf-8")
        report.save_chart(results, rows, out["comparison_plot"])
        lines += ["#" + mathqa_md]  # one level down in report.md
        metrics = report.METRICS[results["mode"]]
        table_rows = [(r["artifact"], r["kind"], *(report.fmt(r[m], r[f"{m}_stderr"]) for m in metrics),
                       *(f"{r[f'{m}_vs_base']:+.4f}" if f"{m}_vs_base" in r else "" for m in metrics)) for r in rows]
        ctx.console.print(summary_table(f"MathQA {results['mode']} ({results['n']} items, {results['num_fewshot']}-shot)",
                                        table_rows, ("artifact", "kind", *metrics, *(f"Δ {m}" for m in metrics))))
    else:
        lines += report.not_scored(results)[1:]  # with MathQA, its section lists them
    out["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")


def print_heldout(console: Any, scored_heldout: dict[str, Any], chart: Path) -> None:
    """The held-out table: one row per task, one column per artifact. The command that ran evaluate prints it once,
    after its summary table (cli.show_heldout), not the stage, so `distillery run` ends with it."""
    headers, rows = report.heldout_rows(scored_heldout)
    console.print(summary_table("held-out data: loss per completion token · the task's metric", rows, headers))
    console.print(f"chart: {printable(str(chart))}")


def stage_result(results: dict[str, Any], scored_heldout: dict[str, Any]) -> StageResult:
    metrics = {f"{name}_{m}": scored.get(m) for name, scored in results["artifacts"].items()
               for m in report.METRICS[results["mode"]]}
    metrics.update({f"{name}_heldout_loss": scored["overall"]["loss"] for name, scored in scored_heldout.items()})
    failing = sorted({name for name, scored in scored_heldout.items() for t in scored.values()
                      if t.get("vs_reference", {}).get("passed") is False})
    metrics["heldout_quants_failing"] = failing
    summary = [(name, f"held-out loss {scored['overall']['loss']:.3f}") for name, scored in scored_heldout.items()]
    summary += [(name, f"MathQA acc {scored['acc']:.3f}") for name, scored in results["artifacts"].items()]
    if results["n"]:
        summary.append(("MathQA items", str(results["n"])))
    if failing:
        summary.append(("GGUFs past the held-out bound", ", ".join(failing)))
    if results.get("heldout", {}).get("ggufs_not_checked"):
        summary.append(("GGUFs not checked", "no merged model or adapter scored to hold them against (add one to "
                        "evaluate.artifacts): " + ", ".join(results["heldout"]["ggufs_not_checked"])))
    if results["skipped_items"]:
        summary.append(("skipped items", str(len(results["skipped_items"]))))
    if results["errors"]:
        summary.append(("not scored", ", ".join(results["errors"])))
    return StageResult(metrics=metrics, summary=summary)


STAGE = Stage(name="evaluate", run=run, outputs=OUTPUTS, sections=("model", "evaluate"), upstream=upstream,
              packages=("torch", "transformers", "peft", "llama-cpp-python", "tokenizers", "sacrebleu", "math-verify",
                        "latex2sympy2_extended", "sympy"), input_files=input_files,
              also_reads=("distill.sandbox", "format.max_length"),  # code_io verdicts; the scoring window
              resumable=True, operational=("evaluate.gguf_threads", "evaluate.batch_size"))  # speed, not scores
