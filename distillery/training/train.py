"""The finetune stage's training job: one model in one process (or one per GPU under `accelerate launch`).

Steps, in order:
1. load the base model through the backend: Unsloth's FastLanguageModel, or transformers (+ bitsandbytes nf4
   with double quantization and 16-bit compute when 4-bit); give the tokenizer the training chat template and EOS;
2. add LoRA adapters (r, alpha, dropout, target modules, rsLoRA, DoRA), or train every weight (method full);
3. generate the "before" samples on held-out prompts (kept in the output dir, so a resumed run reuses them);
4. build the trainer of the objective: TRL's SFTTrainer with loss on completions only (sft), the multiple-choice
   trainer, the KD trainer on the teacher's stored top-k log-probs (kd), or TRL's DistillationTrainer (on_policy);
5. train, resuming from the last complete checkpoint in <out>/checkpoints;
6. save the adapter with its tokenizer (or, method full, the whole model in 16 bits), the "after" samples and
   train_result.json.

The stage (distillery/stages/finetune.py) decides everything that depends on the config and the machine and passes it
here as a TrainJob; `python -m distillery.training.train <job.json>` is what `accelerate launch` runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError, stop_on_sigterm, storage_refusal
from distillery.core.records import read_jsonl
from distillery.core.rundir import atomic_write_text
from distillery.training.backends import backend_of
from distillery.training.settings import FinetuneConfig

log = logging.getLogger(__name__)

SAMPLES_BEFORE = "samples_before.json"


@dataclass
class TrainJob:
    """What the training process needs: every choice already made by the stage."""

    out: str  # the stage's output directory (checkpoints, the result or error file)
    adapter_dir: str  # where the adapter goes, with its tokenizer (method lora)
    model_dir: str  # where the whole trained model goes, in 16 bits, with its tokenizer (method full)
    metrics_path: str  # one JSON line per logged step
    train_path: str  # format's train.jsonl
    eval_path: str  # format's eval.jsonl
    model_path: str  # local directory or Hub id
    backend: str  # unsloth | hf
    device: str  # cuda | cpu
    load_in_4bit: bool
    precision: str  # bf16 | fp16 | fp32
    optimizer: str  # after falling back from 8-bit optimizers on CPU
    max_length: int
    seed: int
    template: str  # the chat template format rendered with
    eos_token: str
    finetune: FinetuneConfig  # the finetune config section
    trust_remote_code: bool = False
    teacher_logprobs: str = ""  # objective kd: format's teacher sidecar (training/kd.py)
    teacher_model: str = ""  # objective on_policy: the teacher's local directory or Hub id
    sample_prompts: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        data = {**asdict(self), "finetune": self.finetune.model_dump(mode="json")}
        atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainJob":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{**data, "finetune": FinetuneConfig.model_validate(data["finetune"])})


def prepare_tokenizer(tokenizer: Any, job: TrainJob) -> Any:
    """The tokenizer training uses and the adapter carries: format's chat template, its EOS, a pad token."""
    tokenizer.chat_template = job.template
    tokenizer.eos_token = job.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = job.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def generate_samples(model: Any, tokenizer: Any, job: TrainJob) -> list[str]:
    """Greedy completions of the held-out prompts, exactly as rendered for training: side by side, left-padded
    (one decode step for every prompt at once, not one per prompt)."""
    import torch

    from distillery.core.cpu_linear import packed_while_generating

    if not job.sample_prompts:
        return []
    backend = backend_of(job.backend)
    backend.for_inference(model)
    eos_id = tokenizer.convert_tokens_to_ids(job.eos_token)
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        # the prompts as the template wrote them, any BOS in their text (training/tokens.py)
        encoded = tokenizer(job.sample_prompts, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
        with torch.no_grad(), packed_while_generating(model):  # on a CPU in fp32: 2-4x faster a token
            output = model.generate(**encoded, max_new_tokens=job.finetune.sample_max_new_tokens,
                                    do_sample=False, use_cache=True, eos_token_id=eos_id,
                                    pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
        backend.for_training(model)
    width = encoded["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]


def training_arguments(job: TrainJob) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and TrainingArguments."""
    ft = job.finetune
    args = {
        "output_dir": str(Path(job.out) / "checkpoints"),
        "per_device_train_batch_size": ft.batch_size,
        "per_device_eval_batch_size": ft.batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "learning_rate": ft.learning_rate,
        "lr_scheduler_type": ft.lr_scheduler,
        "warmup_steps": ft.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        "weight_decay": ft.weight_decay,
        "optim": job.optimizer,
        "bf16": job.precision == "bf16",
        "fp16": job.precision == "fp16",
        "max_steps": ft.max_steps,
        "num_train_epochs": ft.epochs,
        "logging_steps": ft.logging_steps,
        "save_strategy": "steps",
        "save_steps": ft.save_steps,
        "save_total_limit": None,  # CheckpointKeeper deletes old checkpoints, only once a newer one is complete
        "report_to": [] if ft.report_to == "none" else [ft.report_to],
        "seed": job.seed,
        "data_seed": job.seed,
        "use_cpu": job.device == "cpu",
        "disable_tqdm": True,
        "dataloader_pin_memory": job.device == "cuda",
        "gradient_checkpointing": ft.gradient_checkpointing and not backend_of(job.backend).owns_gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,  # frozen base weights are unused by design under LoRA
        "train_sampling_strategy": "group_by_length" if ft.group_by_length else "random",
    }
    if ft.eval_steps:
        args.update({"eval_strategy": "steps", "eval_steps": ft.eval_steps})
    return args


def tokenized_rows(job: TrainJob, tokenizer: Any, path: str) -> list[dict]:
    """Format's split tokenized here (training/tokens.py: no second BOS, the prompt's own tokens) so that training
    sees exactly the tokens inference reads."""
    from distillery.training.tokens import training_example

    if not Path(path).is_file():
        return []
    return [training_example(tokenizer, r["prompt"], r["completion"], job.max_length) for r in read_jsonl(Path(path))]


def sft_trainer(job: TrainJob, model: Any, tokenizer: Any, args: dict[str, Any], with_eval: bool) -> Any:
    """TRL's SFTTrainer with the loss on completions only (the backend's subclass of it)."""
    from datasets import Dataset
    from trl import SFTConfig

    train = Dataset.from_list(tokenized_rows(job, tokenizer, job.train_path))
    evals = tokenized_rows(job, tokenizer, job.eval_path) if with_eval else []
    cls = backend_of(job.backend).sft_trainer(job.device)
    config = SFTConfig(**args, max_length=job.max_length, packing=job.finetune.packing,
                       completion_only_loss=True, eos_token=job.eos_token, dataset_num_proc=None)
    return cls(model=model, args=config, train_dataset=train, eval_dataset=Dataset.from_list(evals) if evals else None,
               processing_class=tokenizer)


def multiple_choice_trainer(job: TrainJob, model: Any, tokenizer: Any, args: dict[str, Any], with_eval: bool) -> Any:
    """The multiple-choice objective: it tokenizes its own options (training/trainers.py)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from distillery.training.trainers import MultipleChoiceCollator, mc_rows, multiple_choice_trainer as trainer_class

    train = mc_rows(read_jsonl(Path(job.train_path)))
    evals = mc_rows(read_jsonl(Path(job.eval_path))) if with_eval and Path(job.eval_path).is_file() else []
    return trainer_class()(
        model=model, args=TrainingArguments(**args, remove_unused_columns=False), train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evals) if evals else None,
        data_collator=MultipleChoiceCollator(tokenizer, job.max_length), processing_class=tokenizer)


def kd_trainer(job: TrainJob, model: Any, tokenizer: Any, args: dict[str, Any], with_eval: bool) -> Any:
    """Offline KD on the teacher's top-k log-probs that format aligned with these tokens (training/kd.py)."""
    from transformers import TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from distillery.core.topk import load_sequences
    from distillery.training.kd import KDCollator, kd_datasets, kd_trainer as trainer_class

    ft, rows = job.finetune, tokenized_rows(job, tokenizer, job.train_path)
    arrays, _ = load_sequences(Path(job.teacher_logprobs), len(rows))
    train = kd_datasets(rows, arrays, ft.packing, job.max_length, job.seed)
    eval_rows = tokenized_rows(job, tokenizer, job.eval_path) if with_eval else []
    evals = kd_datasets(eval_rows, None, False, job.max_length, job.seed) if eval_rows else None
    collator = KDCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=ft.packing),
                          padding_free=ft.packing)
    return trainer_class(ft.kd.alpha, ft.kd.temperature, arrays["ids"], arrays["logprobs"])(
        model=model, args=TrainingArguments(**args, remove_unused_columns=False), train_dataset=train,
        eval_dataset=evals, data_collator=collator, processing_class=tokenizer)


def on_policy_trainer(job: TrainJob, model: Any, tokenizer: Any, args: dict[str, Any], with_eval: bool) -> Any:
    """TRL's DistillationTrainer: the student generates, the teacher scores its tokens (training/on_policy.py)."""
    from distillery.training.on_policy import on_policy_trainer as build

    return build(job, model, tokenizer, args)


OBJECTIVES = {"sft": sft_trainer, "multiple_choice": multiple_choice_trainer, "kd": kd_trainer,
              "on_policy": on_policy_trainer}


def build_trainer(job: TrainJob, model: Any, tokenizer: Any) -> Any:
    """The trainer of job.finetune.objective; every one counts the tokens it trains on."""
    args = training_arguments(job)
    with_eval = bool(job.finetune.eval_steps) and Path(job.eval_path).is_file()
    if not with_eval:
        args.pop("eval_strategy", None)
        args.pop("eval_steps", None)
    return OBJECTIVES[job.finetune.objective](job, model, tokenizer, args, with_eval)


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident set size."""
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda max_memory_allocated"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak RSS"


def load_model(job: TrainJob) -> tuple[Any, Any]:
    """The backend's model and tokenizer; a model directory whose files do not load (a config.json that does not
    match the weights, a missing or refused shard, a pickle-only checkpoint) is the user's to fix, not a bug that
    a rerun would resume from."""
    import pickle

    import torch

    try:
        return backend_of(job.backend).load(job)
    except (torch.cuda.OutOfMemoryError, UserError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split())[:400]
        raise UserError(f"model.path: {job.model_path} cannot be loaded for training ({type(err).__name__}: "
                        f"{reason}). Its config.json, weights and tokenizer files must be one model's, whole and in "
                        "safetensors: check them, or download the model again.") from None


def oom_message(job: TrainJob) -> str:
    ft = job.finetune
    smaller = ("or finetune.method: lora (adapters on a frozen base, 4-bit on CUDA)" if ft.method == "full" else
               f"or finetune.lora.r (now {ft.lora.r}), set finetune.load_in_4bit: true")
    return (f"CUDA ran out of memory while training {job.model_path}. Lower finetune.batch_size (now {ft.batch_size}) "
            f"and raise finetune.gradient_accumulation_steps to keep the effective batch, lower format.max_length "
            f"(now {job.max_length}) {smaller}, keep finetune.gradient_checkpointing on, or use "
            "finetune.optimizer: paged_adamw_8bit.")


def run_job(job: TrainJob, console: Any) -> dict[str, Any]:
    """Train as the job says and write the adapter, metrics and samples into job.out; returns the results."""
    import torch

    from distillery.training.callbacks import (CheckpointKeeper, MetricsCallback, last_complete_checkpoint,
                                               tokens_trained, trim_metrics)

    out = Path(job.out)
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(checkpoints)
    resume_step = int(resume.name.split("-")[-1]) if resume else 0
    trim_metrics(Path(job.metrics_path), resume_step)
    if job.finetune.report_to == "tensorboard":
        # TensorBoard's default is ./runs/<date>, which would land among the pipeline's run directories.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    try:
        started = time.time()
        model, tokenizer = load_model(job)
        tokenizer = prepare_tokenizer(tokenizer, job)
        load_seconds = time.time() - started
        trainer = build_trainer(job, model, tokenizer)
        trainer.tokens_seen = resumed_tokens = tokens_trained(resume)  # the run's count goes on across a resume
        main_process = trainer.is_world_process_zero()
        single_process = trainer.args.world_size == 1
        before = load_or_generate_before(out, model, tokenizer, job) if single_process else []
        metrics = MetricsCallback(Path(job.metrics_path), console, trainer, enabled=main_process)
        trainer.add_callback(metrics)
        trainer.add_callback(CheckpointKeeper(job.finetune.save_total_limit, lambda: trainer.tokens_seen))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        if resume:
            console.print(f"resuming from {resume.name} (step {resume_step}): the killed run's last complete checkpoint")
        train_started = time.time()
        train_loss = train_from(trainer, resume, console)
        train_seconds = time.time() - train_started
        check_finite(trainer.model)
        changed = save_trained(trainer, job)
        after = generate_samples(model, tokenizer, job) if single_process else []
    except torch.cuda.OutOfMemoryError:
        raise UserError(oom_message(job)) from None
    memory, memory_kind = peak_memory_mb(job.device)
    tokens = trainer.tokens_seen * trainer.args.world_size  # the run's, across any resume
    trained_now = (trainer.tokens_seen - resumed_tokens) * trainer.args.world_size  # this process's, for tokens/s
    return {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resume_step,
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(trained_now / train_seconds, 1) if trained_now > 0 and train_seconds > 0 else None,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
        "train_loss": train_loss,
        "world_size": trainer.args.world_size,
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(job.sample_prompts, before, after)],
        "main_process": main_process,
        **changed,
    }


def train_from(trainer: Any, resume: Path | None, console: Any) -> float | None:
    """trainer.train from the checkpoint (None: from the start); returns the mean training loss. A checkpoint that
    already holds every step trains nothing: its weights are loaded and kept as they are."""
    from distillery.training.callbacks import AlreadyTrained, StopWhenAlreadyTrained

    trainer.add_callback(StopWhenAlreadyTrained())
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
    except AlreadyTrained:
        console.print(f"{resume.name} holds all {trainer.state.global_step} steps: nothing left to train")
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return sum(logged) / len(logged) if logged else None


def check_finite(model: Any) -> None:
    """Training that diverged (NaN weights in the base, a learning rate far too high) leaves NaN or inf in what it
    trained, with a loss logged as 0: nothing of it is saved as if it had worked."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"training diverged: {len(bad)} trained tensors hold NaN or inf (the first: {bad[0]}), so "
                        "nothing was saved. metrics.jsonl shows from which step the loss or grad_norm is null. Check "
                        "model.path's weights for NaN or inf, or lower finetune.learning_rate.")


def save_trained(trainer: Any, job: TrainJob) -> dict[str, Any]:
    """LoRA: the PEFT adapter and, as processing_class, the tokenizer. Full: the whole model, written in fp32 by
    the Trainer (which gathers it from every process under FSDP), compared with the base tensor by tensor, then
    streamed into 16-bit shards. Returns what the comparison found (full only)."""
    if job.finetune.method == "lora":
        trainer.save_model(job.adapter_dir)
        return {}
    staging = Path(job.out) / ".model-fp32"
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return {}
    changed = tensors_changed(staging, job.model_path)
    save_16bit(staging, Path(job.model_dir), sixteen_bit_dtype(job))
    shutil.rmtree(staging)
    return changed


def tensors_changed(trained: Path, base_model: str) -> dict[str, Any]:
    """How many of the trained model's tensors differ from the base's (in fp32, before any 16-bit rounding), one
    tensor in memory at a time: full fine-tuning must have changed every one."""
    import torch

    from distillery.export.merge import TensorFiles, local_base

    ours, base = TensorFiles(trained), TensorFiles(local_base(base_model))
    compared = [name for name in ours.files if name in base]
    unchanged = [name for name in compared if torch.equal(ours.get(name).float(), base.get(name).float())]
    return {"tensors_changed": len(compared) - len(unchanged), "tensors_compared": len(compared),
            "unchanged": unchanged[:10]}


def sixteen_bit_dtype(job: TrainJob) -> str:
    """The trained model's dtype on disk: the training precision, or the base's own 16-bit dtype after fp32."""
    from distillery.export.merge import local_base, merged_dtype_name

    if job.precision in ("bf16", "fp16"):
        return job.precision
    return merged_dtype_name("auto", str(local_base(job.model_path)))


def save_16bit(source: Path, target: Path, dtype: str) -> None:
    """`source` (a saved model) into `target` in 16 bits, tensor by tensor, with the tokenizer and a generation
    config that stops at the training EOS; `target` appears only when complete."""
    from distillery.export.merge import finish_merged_dir, streamed_copy

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    streamed_copy(source, tmp, dtype)
    finish_merged_dir(tmp, source)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load_or_generate_before(out: Path, model: Any, tokenizer: Any, job: TrainJob) -> list[str]:
    """The untrained model's answers (LoRA starts as the identity); saved so a resumed run does not redo them."""
    path = out / SAMPLES_BEFORE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("prompts") == job.sample_prompts:
            return saved["answers"]
    answers = generate_samples(model, tokenizer, job)
    atomic_write_text(path, json.dumps({"prompts": job.sample_prompts, "answers": answers}, ensure_ascii=False))
    return answers


RESULT = "train_result.json"
ERROR = "train_error.txt"
INTERRUPTED = 130  # the exit code of a shell's command stopped by Ctrl-C


STAGE_PID = "DISTILLERY_STAGE_PID"


def watch_stage() -> None:
    """End this process (as a kill -9 would: the checkpoints allow for it) when the stage that started it dies. A
    kill -9 of `distillery finetune` alone left it training on, orphaned, beside the rerun's own training process:
    both wrote the same checkpoints and metrics.jsonl (steps 5 and 6 logged twice, out of order)."""
    from distillery.core.isolation import die_with

    if os.environ.get(STAGE_PID, "").isdigit():
        die_with(int(os.environ[STAGE_PID]))


def main(argv: list[str] | None = None) -> int:
    """`python -m distillery.training.train <job.json>`, started by the stage (under `accelerate launch` on several
    GPUs: one process each). Writes train_result.json (main process), or train_error.txt for a UserError.
    Ctrl-C ends it quietly with exit code 130: the stage reports the interrupt, the checkpoints stay to resume from."""
    argv = sys.argv[1:] if argv is None else argv
    watch_stage()
    stop_on_sigterm()  # a scheduler's SIGTERM to the whole job: stopped as by Ctrl-C, not killed mid-write
    job = TrainJob.load(Path(argv[0]))
    try:
        backend_of(job.backend).start(job.finetune.objective)  # Unsloth first, before transformers/TRL/PEFT
        from rich.console import Console

        result = run_job(job, Console())
    except UserError as err:
        atomic_write_text(Path(job.out) / ERROR, str(err))
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as err:  # a checkpoint written onto a full disk: the user's to fix, the earlier ones kept
        said = storage_refusal(err, f"under {job.out}")
        if said is None:
            raise
        with contextlib.suppress(OSError):  # the disk may not take even this
            atomic_write_text(Path(job.out) / ERROR, said)
        print(f"finetune: {said}", file=sys.stderr)
        return 2
    if result["main_process"]:
        atomic_write_text(Path(job.out) / RESULT, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
