"""finetune `objective: on_policy`: TRL's DistillationTrainer on the same PEFT LoRA the rest of the pipeline merges.

The student generates a completion for each of format's training prompts (one sample, `on_policy.max_new_tokens`
at `on_policy.temperature`), the teacher scores every generated token, and the loss is the generalised JSD between
them (`on_policy.beta`: 0 = forward KL(teacher || student), 1 = reverse KL), averaged over the generated tokens.
With `on_policy.lmbda` below 1, that share of optimizer steps is on-policy and the others take format's own
completions in place of the student's (GKD's mix, Agarwal et al. 2024, TRL's GKDTrainer `lmbda`), chosen per step
from the seed, so a resumed run makes the same choices.

Two adaptations to TRL 1.15 (pinned):
- TRL computes the divergence with a Triton kernel, which exists only on CUDA. On CPU `divergence_loss` below
  computes the same quantity in plain torch (the logits of the completion tokens only), in its place.
- format's prompts are already rendered through the training template (BOS included); TRL would tokenize a plain
  string prompt with the tokenizer's special tokens added, a second BOS for R1-Distill-Qwen. They are tokenized
  here as training tokenizes them.
The teacher's embedding may be padded to more rows than the student's (Qwen2.5: 151,936 vs 152,064, one
tokenizer; the stage has already checked the tokenizers match): its extra rows are dropped, as no token uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.core.models import torch_dtype


def divergence_loss(student_hidden_states: Any, teacher_hidden_states: Any, student_lm_head_weight: Any,
                    teacher_lm_head_weight: Any, completion_mask: Any, beta: float, num_items_in_batch: Any = None,
                    student_lm_head_bias: Any = None, teacher_lm_head_bias: Any = None,
                    student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                    student_final_logit_softcapping: float | None = None,
                    teacher_final_logit_softcapping: float | None = None, temperature: float = 1.0) -> tuple:
    """TRL's `_chunked_divergence_loss` in plain torch: (loss, the student's entropy summed, valid tokens)."""
    import torch

    valid = completion_mask.reshape(-1) != 0
    count = valid.sum()

    def log_probs(hidden: Any, weight: Any, bias: Any, scale: float, softcap: float | None) -> Any:
        logits = hidden.reshape(-1, hidden.size(-1))[valid].float() @ weight.float().t()
        if bias is not None:
            logits = logits + bias.float()
        logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.log_softmax(logits / temperature, dim=-1)

    student = log_probs(student_hidden_states, student_lm_head_weight, student_lm_head_bias, student_logit_scale,
                        student_final_logit_softcapping)
    with torch.no_grad():
        teacher = log_probs(teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                            teacher_final_logit_softcapping)
    p_student, p_teacher = student.exp(), teacher.exp()
    if beta == 0:
        divergence = (p_teacher * (teacher - student)).sum(-1)
    elif beta == 1:
        divergence = (p_student * (student - teacher)).sum(-1)
    else:
        mixture = torch.logaddexp(student + torch.log1p(torch.tensor(-beta)), teacher + torch.log(torch.tensor(beta)))
        divergence = (beta * (p_teacher * (teacher - mixture)).sum(-1)
                      + (1 - beta) * (p_student * (student - mixture)).sum(-1))
    divisor = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    entropy = -(p_student * student).sum(-1).detach().sum()
    return divergence.sum() / divisor, entropy, count


def load_teacher(job: Any, student: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(job.teacher_model, dtype=torch_dtype(job.precision),
                                                   trust_remote_code=job.trust_remote_code)
    vocab = student.config.get_text_config().vocab_size if hasattr(student.config, "get_text_config") else \
        student.config.vocab_size
    if teacher.config.vocab_size > vocab:
        teacher.resize_token_embeddings(vocab)  # padded rows only: the tokenizers were checked to be the same
    elif teacher.config.vocab_size < vocab:
        pad_teacher_to(teacher, vocab)
    if job.device == "cuda":
        teacher = teacher.to(torch.device("cuda", torch.cuda.current_device()))
    return teacher.eval()


# The teacher's logit for a row it was padded with: no probability, and finite (the JSD's 0 * log 0 stays 0).
PADDED_LOGIT = -1e4


def pad_teacher_to(teacher: Any, vocab: int) -> None:
    """A teacher whose embedding has fewer rows than the student's (the student's padded to a multiple): TRL
    compares the two sizes. The teacher gets the student's rows, and its padded ones are never predicted: no
    tokenizer id reaches them, so no probability may go there."""
    rows = teacher.config.vocab_size
    teacher.resize_token_embeddings(vocab, mean_resizing=False)

    def no_padded_rows(module: Any, inputs: Any, logits: Any) -> Any:
        logits[..., rows:] = PADDED_LOGIT
        return logits

    teacher.get_output_embeddings().register_forward_hook(no_padded_rows)


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step `step` trains on the student's own generations: a draw from the seed and the step."""
    import random

    return lmbda >= 1 or random.Random(f"{seed}:{step}").random() < lmbda


def reference_completions(rows: list[dict], tokenizer: Any, max_length: int) -> dict[str, list[list[int]]]:
    """{prompt: the token ids of each of its completions}, as training tokenizes and cuts them (a prompt distilled
    several times has several)."""
    from distillery.training.tokens import training_example

    references: dict[str, list[list[int]]] = {}
    for row in rows:
        example = training_example(tokenizer, row["prompt"], row["completion"], max_length)
        ids = [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m]
        references.setdefault(row["prompt"], []).append(ids)
    return references


def on_policy_trainer(job: Any, model: Any, tokenizer: Any, args: dict[str, Any]) -> Any:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    import trl.trainer.distillation_trainer as distillation

    from distillery.core.records import read_jsonl
    from distillery.training.trainers import resumable_on_cpu_processes

    if job.device != "cuda":
        distillation._chunked_divergence_loss = divergence_loss

    policy = job.finetune.on_policy
    rows = list(read_jsonl(Path(job.train_path)))
    references = reference_completions(rows, tokenizer, job.max_length)

    class FormatPromptDistillationTrainer(resumable_on_cpu_processes(DistillationTrainer)):
        tokens_seen = 0
        prompts: list = []

        def _tokenize_prompts(self, prompts: list) -> Any:
            if prompts and isinstance(prompts[0], str):
                self.prompts = prompts
                ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
                return ids, None, {}
            return super()._tokenize_prompts(prompts)

        def _generate_single_turn(self, prompt_ids: Any, *rest: Any, **kwargs: Any) -> Any:
            if on_policy_step(job.seed, self.state.global_step, policy.lmbda):
                return super()._generate_single_turn(prompt_ids, *rest, **kwargs)
            step = self.state.global_step
            return [references[prompt][step % len(references[prompt])] for prompt in self.prompts]

        def training_step(self, model, inputs, *rest, **kwargs):
            loss = super().training_step(model, inputs, *rest, **kwargs)
            self.tokens_seen = int(self.state.num_input_tokens_seen or 0)
            return loss

    prompts = [{"prompt": row["prompt"]} for row in rows]
    args = {key: value for key, value in args.items() if key not in ("eval_strategy", "eval_steps")}
    args["gradient_checkpointing"] = args["gradient_checkpointing"] and job.device == "cuda"
    config = DistillationConfig(**args, beta=policy.beta, temperature=policy.temperature,
                                max_completion_length=policy.max_new_tokens, remove_unused_columns=False)
    return FormatPromptDistillationTrainer(model=model, teacher_model=load_teacher(job, model), args=config,
                                           train_dataset=Dataset.from_list(prompts), processing_class=tokenizer)
