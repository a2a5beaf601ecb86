"""The two training backends behind one small interface, so the training job never branches on a backend name.

- unsloth: Unsloth's FastLanguageModel (QLoRA on CUDA, 16-bit LoRA on CPU, Unsloth's gradient checkpointing); it
  must be imported before transformers/TRL/PEFT, and it patches them for the whole process;
- hf:      transformers + PEFT (+ bitsandbytes nf4 with double quantization and 16-bit compute when 4-bit).

Each backend says what it can train (`refusal`), loads the model with its LoRA adapters (method lora) or every
weight trainable in fp32 master weights, the Trainer's autocast computing in 16 bits (method full), switches the
model between generation and training, and names the SFTTrainer class that suits it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from distillery.core.models import torch_dtype
from distillery.training.settings import ON_POLICY_ON_UNSLOTH

if TYPE_CHECKING:
    from distillery.training.train import TrainJob


def load_dtype(job: TrainJob) -> Any:
    """The weights' dtype as loaded: LoRA's frozen base in the training precision; full fine-tuning's master
    weights in fp32, since updates far below a 16-bit weight's resolution would round away (pure bf16 left a
    tenth of the demo model's tensors unchanged after three steps)."""
    import torch

    return torch.float32 if job.finetune.method == "full" else torch_dtype(job.precision)


def lora_settings(job: TrainJob) -> dict[str, Any]:
    lora = job.finetune.lora
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.target_modules), "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora, "bias": "none"}


class UnslothBackend:
    name = "unsloth"
    owns_gradient_checkpointing = True  # set on the model; the Trainer's own would replace it

    def refusal(self, objective: str) -> str | None:
        if objective == "on_policy":
            return ON_POLICY_ON_UNSLOTH
        return None

    def start(self, objective: str) -> None:
        if objective in ("multiple_choice", "kd"):
            # Unsloth's CUDA forward skips building logits while training; these losses read them.
            os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")
        import unsloth  # noqa: F401  -- first, before transformers/TRL/PEFT, so that all its patches apply

    def load(self, job: TrainJob) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        checkpointing = "unsloth" if job.finetune.gradient_checkpointing else False
        # No device_map: under `accelerate launch` (DDP) Unsloth itself puts each rank's whole model on its own GPU.
        full = job.finetune.method == "full"
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=job.model_path, max_seq_length=job.max_length, dtype=load_dtype(job),
            load_in_4bit=job.load_in_4bit, trust_remote_code=job.trust_remote_code,
            use_gradient_checkpointing=checkpointing, full_finetuning=full,
        )
        if full:
            return model, tokenizer
        model = FastLanguageModel.get_peft_model(
            model, **lora_settings(job), use_gradient_checkpointing=checkpointing, random_state=job.seed,
            max_seq_length=job.max_length,
        )
        return model, tokenizer

    def for_inference(self, model: Any) -> None:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)

    def for_training(self, model: Any) -> None:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(model)

    def sft_trainer(self, device: str) -> type:
        from trl import SFTTrainer  # Unsloth, once imported, has put its CPU-aware subclass here

        from distillery.training.trainers import counting

        return counting(SFTTrainer)


class HFBackend:
    name = "hf"
    owns_gradient_checkpointing = False

    def refusal(self, objective: str) -> str | None:
        return None

    def start(self, objective: str) -> None:
        pass

    def load(self, job: TrainJob) -> tuple[Any, Any]:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        dtype = torch_dtype(job.precision)
        kwargs: dict[str, Any] = {"dtype": load_dtype(job), "trust_remote_code": job.trust_remote_code}
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
        model.config.use_cache = False
        if job.finetune.method == "full":
            return model, tokenizer
        if job.finetune.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_settings(job)))
        return model, tokenizer

    def for_inference(self, model: Any) -> None:
        model.eval()

    def for_training(self, model: Any) -> None:
        model.train()

    def sft_trainer(self, device: str) -> type:
        from trl import SFTTrainer

        from distillery.training.trainers import counting, plain_loss_sft_trainer

        return plain_loss_sft_trainer(SFTTrainer) if device == "cpu" else counting(SFTTrainer)


BACKENDS = {backend.name: backend for backend in (UnslothBackend(), HFBackend())}


def backend_of(name: str) -> UnslothBackend | HFBackend:
    return BACKENDS[name]
