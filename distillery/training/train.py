"""The finetune stage's training job: one model in one process (or one per GPU under `accelerate launch`).

Steps, in order:
1. load the base model through the backend: Unsloth's FastLanguageModel, or transformers (+ bitsandbytes nf4
   with double quantization and 16-bit compute when 4-bit); give the tokenizer the training chat template and EOS;
2. add LoRA adapters (r, alpha, dropout, target modules, rsLoRA, DoRA);
3. generate the "before" samples on held-out prompts (kept in the output dir, so a resumed run reuses them);
4. build the trainer: TRL's SFTTrainer with loss on completions only, or the multiple-choice trainer;
5. train, resuming from the last complete checkpoint in <out>/checkpoints;
6. save the adapter with its tokenizer, the "after" samples and train_result.json.

The stage (distillery/stages/finetune.py) decides everything that depends on the config and the machine and passes it
here as a TrainJob; `python -m distillery.training.train <job.json>` is what `accelerate launch` runs.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError
from distillery.core.models import torch_dtype
from distillery.core.records import read_jsonl
from distillery.core.rundir import atomic_write_text
from distillery.training.settings import FinetuneConfig

log = logging.getLogger(__name__)

SAMPLES_BEFORE = "samples_before.json"


@dataclass
class TrainJob:
    """What the training process needs: every choice already made by the stage."""

    out: str  # the stage's output directory (checkpoints, the result or error file)
    adapter_dir: str  # where the adapter goes, with its tokenizer
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


def lora_settings(job: TrainJob) -> dict[str, Any]:
    lora = job.finetune.lora
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.target_modules), "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora, "bias": "none"}


def load_unsloth(job: TrainJob) -> tuple[Any, Any]:
    """Unsloth's FastLanguageModel: QLoRA on CUDA, 16-bit LoRA on CPU, Unsloth gradient checkpointing."""
    if job.finetune.objective == "multiple_choice":
        # Unsloth's CUDA forward skips building logits while training; the multiple-choice loss needs them.
        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")
    from unsloth import FastLanguageModel

    checkpointing = "unsloth" if job.finetune.gradient_checkpointing else False
    # No device_map: under `accelerate launch` (DDP) Unsloth itself puts each rank's whole model on its own GPU.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=job.model_path, max_seq_length=job.max_length, dtype=torch_dtype(job.precision),
        load_in_4bit=job.load_in_4bit, trust_remote_code=job.trust_remote_code,
        use_gradient_checkpointing=checkpointing,
    )
    model = FastLanguageModel.get_peft_model(
        model, **lora_settings(job), use_gradient_checkpointing=checkpointing, random_state=job.seed,
        max_seq_length=job.max_length,
    )
    return model, tokenizer


def load_hf(job: TrainJob) -> tuple[Any, Any]:
    """transformers + PEFT; on CUDA with 4-bit: bitsandbytes nf4, double quantization, 16-bit compute."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = torch_dtype(job.precision)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": job.trust_remote_code}
    if job.load_in_4bit:
        sharded = os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP / DeepSpeed shard parameters of one dtype: store the 4-bit weights in the compute dtype.
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}))
        if not sharded:
            # One whole copy per process (single GPU or DDP): each rank's model on its own GPU.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(job.model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code)
    if job.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.finetune.gradient_checkpointing)
    if job.finetune.gradient_checkpointing:
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_settings(job)))
    return model, tokenizer


def for_inference(model: Any, job: TrainJob) -> None:
    if job.backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    else:
        model.eval()


def for_training(model: Any, job: TrainJob) -> None:
    if job.backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(model)
    else:
        model.train()


def generate_samples(model: Any, tokenizer: Any, job: TrainJob) -> list[str]:
    """Greedy completions of the held-out prompts, exactly as rendered for training."""
    import torch

    if not job.sample_prompts:
        return []
    for_inference(model, job)
    eos_id = tokenizer.convert_tokens_to_ids(job.eos_token)
    answers = []
    try:
        for prompt in job.sample_prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=job.finetune.sample_max_new_tokens,
                                        do_sample=False, use_cache=True, eos_token_id=eos_id,
                                        pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        for_training(model, job)
    return answers


def training_arguments(job: TrainJob) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and TrainingArguments."""
    ft = job.finetune
    is_unsloth = job.backend == "unsloth"
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
        # Unsloth enables its own checkpointing on the model; the Trainer's would replace it.
        "gradient_checkpointing": ft.gradient_checkpointing and not is_unsloth,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,  # frozen base weights are unused by design under LoRA
        "train_sampling_strategy": "group_by_length" if ft.group_by_length else "random",
    }
    if ft.eval_steps:
        args.update({"eval_strategy": "steps", "eval_steps": ft.eval_steps})
    return args


def build_datasets(job: TrainJob, tokenizer: Any) -> tuple[Any, Any]:
    """Format's splits, tokenized here (training/tokens.py: no second BOS, TRL's completion boundary) so that TRL
    trains on exactly the tokens inference reads; the multiple-choice objective tokenizes its own options."""
    from datasets import Dataset

    from distillery.training.tokens import training_example

    def load(path: str) -> Any:
        rows = [training_example(tokenizer, r["prompt"], r["completion"], job.max_length)
                for r in read_jsonl(Path(path))] if Path(path).is_file() else []
        return Dataset.from_list(rows) if rows else None

    if job.finetune.objective == "multiple_choice":
        from distillery.training.trainers import mc_rows

        rows = [r for r in mc_rows(read_jsonl(Path(job.train_path)))]
        evals = [r for r in mc_rows(read_jsonl(Path(job.eval_path)))] if Path(job.eval_path).is_file() else []
        return Dataset.from_list(rows), (Dataset.from_list(evals) if evals else None)
    return load(job.train_path), load(job.eval_path)


def build_trainer(job: TrainJob, model: Any, tokenizer: Any) -> Any:
    """TRL's SFTTrainer (completion-only loss), or the multiple-choice trainer; both count tokens."""
    train_ds, eval_ds = build_datasets(job, tokenizer)
    if not job.finetune.eval_steps:
        eval_ds = None
    args = training_arguments(job)
    if eval_ds is None:
        args.pop("eval_strategy", None)
        args.pop("eval_steps", None)
    if job.finetune.objective == "multiple_choice":
        from transformers import TrainingArguments

        from distillery.training.trainers import MultipleChoiceCollator, multiple_choice_trainer

        return multiple_choice_trainer()(
            model=model, args=TrainingArguments(**args, remove_unused_columns=False), train_dataset=train_ds,
            eval_dataset=eval_ds, data_collator=MultipleChoiceCollator(tokenizer, job.max_length),
            processing_class=tokenizer)
    from trl import SFTConfig
    from trl import SFTTrainer  # Unsloth, once imported, has put its CPU-aware subclass here

    from distillery.training.trainers import counting, plain_loss_sft_trainer

    cls = plain_loss_sft_trainer(SFTTrainer) if job.device == "cpu" and job.backend == "hf" else counting(SFTTrainer)
    config = SFTConfig(**args, max_length=job.max_length, packing=job.finetune.packing,
                       completion_only_loss=True, eos_token=job.eos_token, dataset_num_proc=None)
    return cls(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident set size."""
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda max_memory_allocated"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak RSS"


def oom_message(job: TrainJob) -> str:
    ft = job.finetune
    return (f"CUDA ran out of memory while training {job.model_path}. Lower finetune.batch_size (now {ft.batch_size}) "
            f"and raise finetune.gradient_accumulation_steps to keep the effective batch, lower format.max_length "
            f"(now {job.max_length}) or finetune.lora.r (now {ft.lora.r}), keep finetune.gradient_checkpointing "
            "on, set finetune.load_in_4bit: true, or use finetune.optimizer: paged_adamw_8bit.")


def run_job(job: TrainJob, console: Any) -> dict[str, Any]:
    """Train as the job says and write the adapter, metrics and samples into job.out; returns the results."""
    import torch

    from distillery.training.callbacks import CheckpointKeeper, MetricsCallback, last_complete_checkpoint, trim_metrics

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
        model, tokenizer = load_unsloth(job) if job.backend == "unsloth" else load_hf(job)
        tokenizer = prepare_tokenizer(tokenizer, job)
        load_seconds = time.time() - started
        trainer = build_trainer(job, model, tokenizer)
        main_process = trainer.is_world_process_zero()
        single_process = trainer.args.world_size == 1
        before = load_or_generate_before(out, model, tokenizer, job) if single_process else []
        metrics = MetricsCallback(Path(job.metrics_path), console, trainer, enabled=main_process)
        trainer.add_callback(metrics)
        trainer.add_callback(CheckpointKeeper(job.finetune.save_total_limit))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        if resume:
            console.print(f"resuming from {resume.name} (step {resume_step}): the killed run's last complete checkpoint")
        train_started = time.time()
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_seconds = time.time() - train_started
        trainer.save_model(job.adapter_dir)  # the PEFT adapter and, as processing_class, the tokenizer
        after = generate_samples(model, tokenizer, job) if single_process else []
    except torch.cuda.OutOfMemoryError:
        raise UserError(oom_message(job)) from None
    memory, memory_kind = peak_memory_mb(job.device)
    tokens = trainer.tokens_seen * trainer.args.world_size
    return {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resume_step,
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
        "train_loss": output.training_loss,
        "world_size": trainer.args.world_size,
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(job.sample_prompts, before, after)],
        "main_process": main_process,
    }


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


def main(argv: list[str] | None = None) -> int:
    """`python -m distillery.training.train <job.json>`, started by the stage (under `accelerate launch` on several
    GPUs: one process each). Writes train_result.json (main process), or train_error.txt for a UserError.
    Ctrl-C ends it quietly with exit code 130: the stage reports the interrupt, the checkpoints stay to resume from."""
    argv = sys.argv[1:] if argv is None else argv
    job = TrainJob.load(Path(argv[0]))
    try:
        if job.backend == "unsloth":
            import unsloth  # noqa: F401  -- first, before transformers/TRL/PEFT, so that all its patches apply

        from rich.console import Console

        result = run_job(job, Console())
    except UserError as err:
        atomic_write_text(Path(job.out) / ERROR, str(err))
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED
    if result["main_process"]:
        atomic_write_text(Path(job.out) / RESULT, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
