"""Finetune: LoRA / QLoRA (or full) training of the base model on format's prompt/completion pairs (Unsloth or hf).

Steps, in order:
1. read format's train/eval rows, chat template and EOS; refuse an empty training set;
2. (training/preflight.py) find the model (bundled demo -> local dir; a Hub id needs the Hub or its cache) and check,
   before loading any weights, that the LoRA target modules exist in it, or (method full) that the weights,
   gradients, optimizer state and activations fit in memory;
3. choose from the hardware: 4-bit (auto: CUDA only), precision (bf16/fp16/fp32), optimizer (8-bit needs CUDA);
4. check that every training example keeps at least one completion token within format.max_length;
5. train (training/train.py) in a child process, under `accelerate launch` when accelerate_config is set;
   a killed run resumes from its last complete checkpoint (checkpoints live in the stage's partial directory);
6. write adapter/ (+ tokenizer with the training chat template) or, method full, model/ (the whole model in 16
   bits, same tokenizer), metrics.jsonl, loss.png, samples.md, summary.json, and drop the checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


from distillery.config import DistillConfig, DistilleryConfig, FinetuneConfig, TeacherConfig
from distillery.core.console import code_block, markdown_table, printable, summary_table
from distillery.core.errors import UserError
from distillery.core.machine import cpu_bf16_native
from distillery.core.models import local_model_files
from distillery.core.plots import figure
from distillery.core.records import read_jsonl
from distillery.core.rundir import atomic_write_text
from distillery.core.summaries import FinetuneSummary
from distillery.stage import Stage, StageContext, StageResult, load_stage
from distillery.training.preflight import (
    check_accelerate_config,
    check_completions_fit,
    check_eval_rows_fit,
    check_full_finetune_memory,
    check_multiple_choice,
    check_target_modules,
    choose_4bit,
    choose_optimizer,
    choose_precision,
    cuda_available,
    cuda_bf16,
    locate_model,
    prompts_that_fit,
    refuse_quantized_base,
)

log = logging.getLogger(__name__)

OUTPUTS = {"adapter": "adapter", "model": "model", "metrics": "metrics.jsonl", "loss_plot": "loss.png", "samples": "samples.md",
           "summary": "summary.json"}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def input_files(cfg: DistilleryConfig) -> list[Path]:
    """The accelerate config, when one is set and exists (a missing one is reported when training starts)."""
    path = cfg.finetune.accelerate_config
    accelerate = [Path(path)] if path and Path(path).is_file() else []
    return accelerate


def model_files(cfg: DistilleryConfig) -> list[Path]:
    """An on_policy teacher's describing files (or its GGUF), when it is local."""
    ft = cfg.finetune
    return local_model_files(ft.on_policy.teacher) if ft.objective == "on_policy" else []


# ---- 1. format's outputs -------------------------------------------------------------------------------------


def load_format_outputs(directory: Path) -> tuple[list[dict], list[dict], str, dict]:
    """Train rows, eval rows, the chat template text and template.json of the format stage."""
    files = {key: directory / name for key, name in load_stage("format").outputs.items()}
    train = list(read_jsonl(files["train"]))
    evals = list(read_jsonl(files["eval"])) if files["eval"].is_file() else []
    template = files["chat_template"].read_text(encoding="utf-8")
    meta = json.loads(files["template"].read_text(encoding="utf-8"))
    if not train:
        raise UserError(f"{files['train']} has no training examples. Check the ingest sources (paths, "
                        "max_records) and the ingest report (runs/<name>/ingest/report.md), then rerun.")
    return train, evals, template, meta


# ---- 2. training ---------------------------------------------------------------------------------------------


def build_job(ctx: StageContext, model_path: str, template: str, meta: dict, eval_rows: list[dict],
              tokenizer: Any) -> Any:
    from distillery.training.train import TrainJob

    ft = ctx.cfg.finetune
    cuda = cuda_available()
    load_in_4bit = choose_4bit(ft.load_in_4bit, cuda, ft.method)
    precision = choose_precision(ft.precision, cuda, cuda_bf16() if cuda else cpu_bf16_native())
    ctx.console.print(f"finetune: {ft.backend} backend on {'CUDA' if cuda else 'CPU'}, "
                      f"{weights_line(ft.method, load_in_4bit, cuda, ft.load_in_4bit)}, {precision}")
    note_export_original(ctx, model_path)
    return TrainJob(
        out=str(ctx.out), adapter_dir=str(ctx.out / OUTPUTS["adapter"]), model_dir=str(ctx.out / OUTPUTS["model"]),
        metrics_path=str(ctx.out / OUTPUTS["metrics"]),
        train_path=str(ctx.upstream("format", "train")), eval_path=str(ctx.upstream("format", "eval")),
        model_path=model_path, backend=ft.backend, device="cuda" if cuda else "cpu", load_in_4bit=load_in_4bit,
        precision=precision, optimizer=choose_optimizer(ft.optimizer, cuda), max_length=ctx.cfg.format.max_length,
        seed=ctx.cfg.run.seed, template=template, eos_token=meta["eos_token"], finetune=ft,
        trust_remote_code=ctx.cfg.model.trust_remote_code,
        sample_prompts=prompts_that_fit(eval_rows, ft.sample_prompts, tokenizer, ctx.cfg.format.max_length),
        **teacher_of(ctx, tokenizer),
    )


def note_export_original(ctx: StageContext, model_path: str) -> None:
    """Said before training, not after it: export merges a LoRA trained on a base published quantized into the
    base's 16-bit original, which must be on this machine (61 GiB for the 32B); found missing only when export
    started, it stopped `distillery run` hours in. Training goes on: it can download meanwhile."""
    from distillery.export.merge import cached_model, original_16bit

    if not ctx.cfg.export.enabled or ctx.cfg.finetune.method == "full" or cached_model(model_path) is None:
        return  # nothing to merge, or a base not downloaded yet (training fetches it; export will look again)
    try:
        original_16bit(model_path, ctx.cfg.export.base_16bit)
    except UserError as err:
        ctx.console.print(f"[yellow]export will need the base's 16-bit weights[/]: {printable(str(err))} Download "
                          "it while training runs.")


def weights_line(method: str, load_in_4bit: bool, cuda: bool, setting: object) -> str:
    if method == "full":
        return "full fine-tuning: every weight trained (fp32 master weights, 16-bit mixed precision)"
    return (f"{'4-bit (QLoRA)' if load_in_4bit else '16-bit'} base weights"
            f"{' (4-bit needs CUDA)' if not cuda and setting == 'auto' else ''}")


def teacher_of(ctx: StageContext, student_tokenizer: Any) -> dict[str, str]:
    """What the distillation objectives read: kd, format's aligned top-k log-probs; on_policy, the HF teacher
    (refused before any work when it does not share the student's tokenizer)."""
    from distillery.training.backends import backend_of

    ft, distill = ctx.cfg.finetune, ctx.cfg.distill
    refusal = backend_of(ft.backend).refusal(ft.objective)
    if refusal:
        raise UserError(refusal)
    if ft.objective == "kd":
        path = ctx.upstream("format", "teacher")
        if not path.is_file():
            raise UserError("finetune.objective kd trains on the teacher's top-k log-probs, and format has none: set "
                            "distill.enabled: true and distill.logprobs: 20 (a teacher that shares the student's "
                            "tokenizer), then rerun distill and format; or use objective: sft.")
        check_teacher_rows(ctx)
        return {"teacher_logprobs": str(path)}
    if ft.objective == "on_policy":
        teacher = ft.on_policy.teacher or (distill.teacher.path if distill.teacher.kind == "hf" else None)
        if not teacher:
            raise UserError("finetune.objective on_policy needs an HF teacher: set finetune.on_policy.teacher (a local "
                            "directory, Hub id or bundled:<name>) or distill.teacher with kind: hf.")
        return {"teacher_model": check_on_policy_teacher(locate_model(teacher), student_tokenizer, ctx)}
    return {}


def check_teacher_rows(ctx: StageContext) -> None:
    """kd with no train row carrying the teacher's log-probs would be cross-entropy under kd's name: refused,
    with the reasons distill gave (a teacher of another tokenizer echoes other tokens than those sent)."""
    stats = json.loads(ctx.upstream("format", "stats").read_text(encoding="utf-8"))
    if (stats.get("teacher_logprobs") or {}).get("rows", 0) > 0:
        return
    report_path = ctx.upstream("distill", "report")
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    logprobs = report.get("logprobs") or {}
    reasons, examples = logprobs.get("unscored") or {}, logprobs.get("unscored_examples") or {}
    said = "; ".join(f"{n} x {printable(str(examples.get(kind, kind)))}" for kind, n in list(reasons.items())[:3])
    raise UserError("finetune.objective kd trains on the teacher's top-k log-probs, and no train example has them"
                    + (f" (distill could not score its traces: {said}; all of them in {report_path})" if said else "")
                    + ". The teacher must share the student's tokenizer (docs/distill.md): use such a teacher and "
                    "rerun distill with --force, or use objective: sft.")


def note_generation_past_context(ctx: StageContext, model_path: str, max_length: int) -> None:
    """on_policy's student writes on_policy.max_new_tokens after a prompt of up to max_length: said when that runs
    past the model's context (positions it never saw, and generation that slows with every token); not refused,
    as format does not refuse, for a model with RoPE scaling may be meant to."""
    from distillery.core.models import model_config, text_config

    new = ctx.cfg.finetune.on_policy.max_new_tokens
    context = getattr(text_config(model_config(model_path, ctx.cfg.model.trust_remote_code)), "max_position_embeddings", None)
    if isinstance(context, int) and max_length + new > context:
        ctx.console.print(f"[yellow]past the model's context[/]: on_policy generates up to {new:,} tokens after prompts "
                          f"of up to {max_length:,} (format.max_length), past the {context:,} positions of "
                          f"{printable(model_path)}. Lower finetune.on_policy.max_new_tokens to "
                          f"{max(context - max_length, 1):,} unless the model is meant to be extended.")


def check_on_policy_teacher(teacher_path: str, student_tokenizer: Any, ctx: StageContext) -> str:
    from distillery.core.models import load_tokenizer
    from distillery.core.vocab import hf_encoder
    from distillery.reasoning.teacher_logprobs import check_teacher_vocabulary

    teacher = load_tokenizer(teacher_path, ctx.cfg.model.trust_remote_code, "finetune.on_policy.teacher")
    check_teacher_vocabulary(student_tokenizer, hf_encoder(teacher), teacher_path)
    return teacher_path


def training_command(job_path: Path, accelerate_config: str | None) -> list[str]:
    """The training process: plain Python, or `accelerate launch` (one process per GPU) with the given config."""
    if not accelerate_config:
        return [sys.executable, "-m", "distillery.training.train", str(job_path)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
            "-m", "distillery.training.train", str(job_path)]


def train(job: Any, ft: FinetuneConfig, ctx: StageContext) -> dict:
    """Run the training job in a child process and return its results.

    A child because Unsloth patches transformers and TRL when imported (and wants to be imported before them):
    the pipeline process, which may go on to evaluate or export, stays unpatched, and both backends start clean.
    The same child runs under `accelerate launch` for several GPUs; only this process writes the manifest.
    """
    from distillery.training.train import ERROR, INTERRUPTED, RESULT, STAGE_PID

    job_path = ctx.out / "job.json"
    job.save(job_path)
    for stale in (RESULT, ERROR):
        (ctx.out / stale).unlink(missing_ok=True)
    command = training_command(job_path, ft.accelerate_config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           STAGE_PID: str(os.getpid())}  # the training process ends with this one (no orphan trains on)
    if ft.accelerate_config:
        ctx.console.print(printable(f"finetune: accelerate launch --config_file {ft.accelerate_config}"))
    code = subprocess.call(command, env=env)
    if code in (INTERRUPTED, -signal.SIGINT):
        raise KeyboardInterrupt  # the child was stopped by Ctrl-C (sent to it alone): an interrupt, not a failure
    if (ctx.out / ERROR).is_file():
        raise UserError((ctx.out / ERROR).read_text(encoding="utf-8"))
    if code == 2:  # its message could not be written (a full disk): the child printed it above
        raise UserError("the training process stopped on what its message above says (it could not write it to "
                        f"{ctx.out / ERROR}: is the disk full?); the checkpoints are kept to resume from.")
    if code < 0:  # killed by a signal (the OOM killer's SIGKILL, a kill): no bug of ours, and resumable
        from distillery.core.isolation import NativeCrash

        raise NativeCrash("the training process", "training", code,
                          "Run the same command again to resume from the last complete checkpoint.")
    if code != 0 or not (ctx.out / RESULT).is_file():
        raise RuntimeError(f"the training process exited with code {code} (its output is above); run the same "
                           "command again to resume from the last checkpoint")
    return json.loads((ctx.out / RESULT).read_text(encoding="utf-8"))


# ---- 3. reports ----------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.is_file() else []


def save_loss_plot(rows: list[dict], path: Path, title: str) -> None:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    with figure(path, (6, 3.5)) as (fig, ax):
        if train:
            ax.plot(*zip(*train), marker=".", color="#4878d0", label="train loss")
        if evals:
            ax.plot(*zip(*evals), marker="o", color="#d65f5f", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()


def render_samples(samples: list[dict], title: str) -> str:
    """Before/after generations side by side, one section per held-out prompt."""
    lines = [f"# {title}", ""]
    if not samples:
        return "\n".join(lines + ["No held-out prompts (format's eval split is empty or sample_prompts is 0).", ""])
    for i, s in enumerate(samples, 1):
        lines += [f"## Prompt {i}", "", *code_block(s["prompt"].rstrip(), "text"), "",
                  *markdown_table(("before tuning", "after tuning"), [(_cell(s["before"]), _cell(s["after"]))]), ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    # < as &lt;: a model's answer holding <img ...> or <details> is shown, not rendered
    return text.strip().replace("<", "&lt;").replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def window_mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def run_loss(rows: list[dict], result: dict) -> float | None:
    """The mean training loss over every step of the run, from metrics.jsonl (each logged loss weighted by the
    steps it covers): the Trainer's own figure divides only this process's losses by all the steps, a tenth of
    the truth for a run resumed at step 90 of 100. The Trainer's where the log does not reach the last step."""
    logged = [r for r in rows if "loss" in r and "step" in r]
    if not logged or logged[-1]["step"] != result["global_step"]:
        return result["train_loss"]
    total, previous = 0.0, 0
    for row in logged:
        total += row["loss"] * (row["step"] - previous)
        previous = row["step"]
    return total / previous if previous else result["train_loss"]


def build_summary(job: Any, result: dict, rows: list[dict], model_setting: str, template_name: str,
                  train_examples: int, memory_estimate: dict | None = None) -> dict:
    losses = [r["loss"] for r in rows if "loss" in r]
    ft = job.finetune
    summary = FinetuneSummary(
        backend=job.backend, base_model=job.model_path, model_path=model_setting,
        device=job.device, load_in_4bit=job.load_in_4bit, precision=job.precision,
        optimizer=job.optimizer, template=template_name,
        max_length=job.max_length, objective=ft.objective, method=ft.method,
        lora=ft.lora.model_dump(mode="json") if ft.method == "lora" else {},
        train_examples=train_examples, steps=result["global_step"], max_steps=ft.max_steps,
        resumed_from_step=result["resumed_from_step"], first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, train_loss=run_loss(rows, result),
        # Single steps see different batches; the means of the first and last few steps show the trend.
        loss_start_mean=window_mean(losses[:5]), loss_end_mean=window_mean(losses[-5:]),
        tokens=result["tokens"], tokens_per_s=result["tokens_per_s"],
        train_seconds=result["train_seconds"], peak_memory_mb=result["peak_memory_mb"],
        peak_memory_kind=result["peak_memory_kind"], world_size=result["world_size"], memory_estimate=memory_estimate,
        tensors_changed=result.get("tensors_changed"), tensors_compared=result.get("tensors_compared"),
    )
    return summary.model_dump(mode="json")


def run(ctx: StageContext) -> StageResult:
    ft = ctx.cfg.finetune
    check_accelerate_config(ft.accelerate_config, cuda_available(), ft.backend)
    train_rows, eval_rows, template, meta = load_format_outputs(ctx.run.stage_dir("format"))
    check_eval_rows(ft, eval_rows)
    check_tracker_installed(ft.report_to)
    model_path = locate_model(ctx.cfg.model.path)
    trust = ctx.cfg.model.trust_remote_code
    if ft.method == "lora":
        check_target_modules(model_path, ft.lora.target_modules, trust, ft.backend, ft.objective)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    job = build_job(ctx, model_path, template, meta, eval_rows, tokenizer)
    memory = None
    if ft.method == "full":
        refuse_quantized_base(model_path, trust)
        memory = check_full_finetune_memory(model_path, ft, job.max_length, job.device == "cuda",
                                            job.precision != "fp32", trust)
        ctx.console.print(f"finetune: full fine-tuning needs about {memory['needed_gib']} GiB "
                          f"({memory['available_gib']} GiB available)")
    if ft.objective == "on_policy":
        note_generation_past_context(ctx, model_path, job.max_length)
    if ft.objective == "multiple_choice":
        check_multiple_choice(train_rows)
    else:
        check_completions_fit(train_rows, tokenizer, job.max_length)
        if ft.eval_steps and (note := check_eval_rows_fit(eval_rows, tokenizer, job.max_length, ft.eval_steps)):
            ctx.console.print(printable(note))
    result = train(job, ft, ctx)
    rows = read_metrics(ctx.out / OUTPUTS["metrics"])
    title = (f"{ft.backend} full fine-tune" if ft.method == "full" else f"{ft.backend} LoRA r={ft.lora.r}") \
        + f" on {Path(model_path).name}"
    save_loss_plot(rows, ctx.out / OUTPUTS["loss_plot"], title)
    (ctx.out / OUTPUTS["samples"]).write_text(render_samples(result["samples"], f"Samples: {title}"), encoding="utf-8")
    summary = build_summary(job, result, rows, ctx.cfg.model.path, meta.get("name", ""), len(train_rows), memory)
    atomic_write_text(ctx.out / OUTPUTS["summary"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    drop_training_state(ctx.out)
    return report(ctx, summary)


def check_eval_rows(ft: FinetuneConfig, eval_rows: list[dict]) -> None:
    """eval_steps needs held-out rows (with options, for multiple_choice); without them the trainer stopped with
    a traceback after loading the model, and every rerun did the same."""
    usable = [r for r in eval_rows if r.get("choices")] if ft.objective == "multiple_choice" else eval_rows
    if ft.eval_steps and not usable:
        raise UserError(f"finetune.eval_steps is {ft.eval_steps}, but format's eval split has no "
                        f"{'multiple-choice ' if ft.objective == 'multiple_choice' else ''}example to evaluate "
                        "(ingest.eval_fraction 0, or too few records to hold any out): unset eval_steps, or give "
                        "ingest enough records to hold some out.")


def check_tracker_installed(report_to: str) -> None:
    """An experiment tracker transformers would fail to start after the model has loaded."""
    import importlib.util

    if report_to != "none" and importlib.util.find_spec(report_to) is None:  # the package is named as the tracker
        raise UserError(f"finetune.report_to is {report_to}, which is not installed: `.venv/bin/pip install "
                        f"{report_to}`, or set report_to: none.")


def drop_training_state(out: Path) -> None:
    """Checkpoints and job files are only for resuming; the checkpoints are renamed away before deletion so a
    kill in between never leaves a checkpoint with files missing."""
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        trash = out / ".trash-checkpoints"
        shutil.rmtree(trash, ignore_errors=True)
        checkpoints.rename(trash)
        shutil.rmtree(trash)
    for name in ("job.json", "train_result.json", "samples_before.json"):
        (out / name).unlink(missing_ok=True)
    for staging in (".model-fp32", ".model.tmp"):  # left by a kill while the full model was being written
        shutil.rmtree(out / staging, ignore_errors=True)


def weights_kind(s: dict) -> str:
    if s["method"] == "full":
        return "every weight trained (fp32 master)"
    return "4-bit base" if s["load_in_4bit"] else "16-bit base"


def report(ctx: StageContext, s: dict) -> StageResult:
    loss = f"{s['loss_start_mean']:.3f} -> {s['loss_end_mean']:.3f}" if s["first_loss"] is not None else "n/a"
    speed = "-" if s["tokens_per_s"] is None else str(s["tokens_per_s"])  # None: resumed with no step left
    rows = [("steps", f"{s['steps']} (resumed from {s['resumed_from_step']})" if s["resumed_from_step"] else str(s["steps"])),
            ("loss (mean of first/last 5 steps)", loss), ("tokens/s", speed),
            ("peak memory", f"{s['peak_memory_mb']:.0f} MB ({s['peak_memory_kind']})"),
            ("weights", f"{weights_kind(s)}, {s['precision']}, {s['device']}")]
    if s["method"] == "full":
        rows.append(("tensors changed from the base", f"{s['tensors_changed']}/{s['tensors_compared']} (fp32)"))
    ctx.console.print(summary_table(f"finetune ({s['backend']})", rows, ("", "")))
    metrics = {k: s[k] for k in ("steps", "first_loss", "last_loss", "loss_start_mean", "loss_end_mean",
                                 "tokens_per_s", "peak_memory_mb", "resumed_from_step")}
    return StageResult(metrics=metrics, summary=[("loss", loss), ("steps", str(s["steps"])),
                                                  ("tokens/s", speed)])


# Of the distill section, finetune reads only the teacher an on_policy objective may take (distill.teacher.kind and
# path, when on_policy.teacher is unset); what distill made reaches it through format, its upstream. The rest is
# left out of its fingerprint: a changed distill.concurrency retrained the model, and so did another teacher for sft.
NOT_READ_OF_DISTILL = (*(f"distill.{key}" for key in DistillConfig.model_fields if key != "teacher"),
                       *(f"distill.teacher.{key}" for key in TeacherConfig.model_fields if key not in ("kind", "path")))
DISTILL_TEACHER = ("distill.teacher.kind", "distill.teacher.path")
# How often it logs, how many checkpoints it keeps, where it reports: a change of one must not retrain the model.
HOW_IT_RUNS = ("finetune.logging_steps", "finetune.save_total_limit", "finetune.report_to")


def not_read(cfg: DistilleryConfig) -> tuple[str, ...]:
    """Finetune's operational settings: distill's teacher counts only where an on_policy run takes it."""
    ft = cfg.finetune
    teacher_read = ft.objective == "on_policy" and not ft.on_policy.teacher
    return (*NOT_READ_OF_DISTILL, *HOW_IT_RUNS, *(() if teacher_read else DISTILL_TEACHER))
STAGE = Stage(name="finetune", run=run, outputs=OUTPUTS, sections=("model", "distill", "finetune"), upstream=("format",),
              packages=("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "accelerate", "bitsandbytes"),
              resumable=True, input_files=input_files, model_files=model_files,
              operational=not_read)
