"""The finetune config section, owned here because the training child reads it too (typed, in its TrainJob).

distillery/config.py puts it into the config as `finetune:`; this module imports only the project's core.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery.core.userinput import UserPath


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters (a name the model lacks is refused, with its list).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class KDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of KL(teacher || student) over the teacher's top-k; "
                         "1 - alpha weighs the cross-entropy on the completion.")
    temperature: float = Field(1.0, ge=0.05, le=100, description="Softening temperature of both distributions (the "
                               "KL is scaled by its square); 0.05 to 100 (past them the scaled log-probs overflow).")


class OnPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it

    teacher: str | None = Field(None, description="The teacher: a local HF directory, Hub id or bundled:<name> sharing "
                                "the student's tokenizer; unset: distill.teacher.path when its kind is hf.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD: 0 = forward KL(teacher || student), "
                        "1 = reverse KL(student || teacher).")
    temperature: float = Field(1.0, ge=0.01, le=100, description="Sampling temperature of the student's "
                               "generations; 0.01 to 100 (nearer 0 the sampling probabilities overflow).")
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Tokens the student generates per prompt (one "
                                "sample per prompt), at most 32768.")
    lmbda: float = Field(1.0, ge=0, le=1, description="Share of optimizer steps on the student's own generations "
                         "(GKD's lambda); the others score format's completions (the teacher's traces) with the "
                         "same loss. 1: every step on-policy.")


FULL_IN_4BIT = ("finetune.load_in_4bit: true cannot go with finetune.method: full: 4-bit weights are frozen (QLoRA "
                "trains adapters on them). Set load_in_4bit: auto (full fine-tuning trains 16-bit mixed precision) or "
                "method: lora.")
ON_POLICY_ON_UNSLOTH = ("finetune.objective on_policy runs TRL's DistillationTrainer, which generates with the student "
                        "between steps; Unsloth's patched model does not run it. Set finetune.backend: hf.")


class FinetuneConfig(BaseModel):
    """LoRA and trainer settings: the finetune section, read by the stage and, typed, by the training child."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it

    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train LoRA adapters on the frozen base (4-bit QLoRA on CUDA). full: train every "
                            "weight (fp32 master weights, 16-bit mixed precision; about 16 bytes per parameter with "
                            "AdamW, checked against the machine's memory before loading) and write the whole model.")
    backend: Literal["unsloth", "hf"] = Field("unsloth", description="unsloth (default) or hf (transformers+PEFT+TRL).")
    load_in_4bit: Literal["auto", True, False] = Field(
        "auto", description="auto: 4-bit on CUDA, 16-bit on CPU. true: insist (fails without CUDA)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (unless max_steps > 0).")
    max_steps: int = Field(-1, description="If > 0, overrides epochs.")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step (effective batch = batch_size x this).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (of the LoRA weights, or of every weight with method: full, "
                                 "where 1e-5 to 5e-5 is usual).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt"] = Field("linear", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="8-bit / paged AdamW need CUDA (bitsandbytes); on CPU adamw_torch is used, with a warning."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where supported, else fp16/fp32.")
    packing: bool = Field(False, description="Pack several sft or kd examples into one max_length row (TRL bfd; off under Unsloth on CPU).")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding; "
                                  "the loss curve then varies with each batch's lengths).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass (Unsloth's own on GPU).")
    logging_steps: int = Field(1, ge=1, description="Log loss, learning rate and tokens/s every N steps (metrics.jsonl).")
    eval_steps: int | None = Field(None, ge=1, description="Loss on format's eval split every N steps (off when unset; not with on_policy).")
    save_steps: int = Field(10, ge=1, description="Checkpoint every N optimizer steps (what a resume restarts from).")
    save_total_limit: int = Field(2, ge=1, description="Complete checkpoints kept while training (older ones deleted).")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Experiment tracker; keys (WANDB_API_KEY) only from the environment or .env."
    )
    objective: Literal["sft", "multiple_choice", "kd", "on_policy"] = Field(
        "sft", description="sft: cross-entropy on the completions; multiple_choice: softmax over math_mc options; "
                           "kd: the teacher's top-k log-probs stored by distill (distill.logprobs); on_policy: the "
                           "student generates and an HF teacher scores every token (TRL's DistillationTrainer).")
    kd: KDConfig = Field(default_factory=KDConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    sample_prompts: int = Field(3, ge=0, description="Held-out prompts generated before and after training (samples.md).")
    sample_max_new_tokens: int = Field(48, ge=1, description="Tokens generated per sample prompt.")
    accelerate_config: UserPath | None = Field(
        None, description="An accelerate config (configs/accelerate/ddp.yaml, fsdp.yaml, deepspeed_zero2.yaml): "
                          "training runs under `accelerate launch` with it, one process per GPU (or per CPU "
                          "process with ddp_cpu.yaml / fsdp_cpu.yaml). The unsloth backend runs data-parallel "
                          "(DDP) only; FSDP and DeepSpeed need backend: hf.",
    )

    @model_validator(mode="after")
    def _what_the_method_and_backend_can_train(self) -> "FinetuneConfig":
        """Refused when the config loads, not when training starts (after distill and format have run)."""
        if self.method == "full" and self.load_in_4bit is True:
            raise ValueError(FULL_IN_4BIT)
        if self.objective == "on_policy" and self.backend == "unsloth":
            raise ValueError(ON_POLICY_ON_UNSLOTH)
        return self

    @model_validator(mode="after")
    def _lengths_to_group(self) -> "FinetuneConfig":
        if self.objective == "multiple_choice" and self.group_by_length:
            raise ValueError("group_by_length groups examples by their token count, and the multiple_choice objective "
                             "tokenizes its options only as it batches them: set group_by_length: false")
        return self

    @model_validator(mode="after")
    def _settings_the_objective_reads(self) -> "FinetuneConfig":
        """Settings an objective's trainer never reads are refused rather than silently ignored."""
        if self.packing and self.objective in ("multiple_choice", "on_policy"):
            batches = {"multiple_choice": "batches each question with its options",
                       "on_policy": "trains on the student's own generations"}[self.objective]
            raise ValueError(f"packing packs sft and kd examples into max_length rows; the {self.objective} objective "
                             f"{batches} and never packs: set packing: false")
        if self.eval_steps and self.objective == "on_policy":
            raise ValueError("eval_steps: the on_policy objective's trainer (TRL's DistillationTrainer) runs no "
                             "held-out loss here: unset eval_steps (evaluate scores the held-out split after training)")
        return self
