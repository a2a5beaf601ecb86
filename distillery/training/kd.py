"""finetune `objective: kd`: train on the teacher's stored top-k log-probs (offline knowledge distillation).

Per completion token the loss is
    alpha * T^2 * KL(teacher || student)  +  (1 - alpha) * cross-entropy      (tokens the teacher scored)
    cross-entropy                                                            (every other completion token)
averaged over the completion tokens. The KL is taken over k + 1 buckets: the teacher's top-k tokens and one bucket
for everything else (the tail), so the student is not free to put mass outside the teacher's top-k; the teacher's
tail mass is 1 minus the sum of its top-k probabilities. At temperature T both sides are softened: the student's
full distribution exactly, the teacher's k + 1 buckets as if the tail were one token (exact at T = 1).

Format aligns the teacher's tokens with its training tokens (format's `teacher` sidecar): every row carries a
`teacher_index` per token (the row of the top-k table that describes that token, -1 where the teacher said
nothing), which packing and padding carry along like the labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NO_TEACHER = -1


def teacher_index_column(arrays: dict[str, np.ndarray] | None, row: int, length: int) -> list[int]:
    """For each of a row's `length` tokens, the top-k table row describing it, or -1."""
    index = [NO_TEACHER] * length
    if arrays is None or int(arrays["starts"][row]) < 0:
        return index
    start, end, first = int(arrays["offsets"][row]), int(arrays["offsets"][row + 1]), int(arrays["starts"][row])
    kept = max(0, min(end - start, length - first))  # the tokens max_length keeps
    index[first:first + kept] = range(start, start + kept)
    return index


def tail_log_mass(top_log_probs: Any) -> Any:
    """log(1 - sum(exp(top))) per row: the log-probability of every token outside the top-k."""
    import torch

    total = torch.logsumexp(top_log_probs, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(total))


def kd_token_loss(student_logits: Any, top_ids: Any, top_log_probs: Any, temperature: float) -> Any:
    """T^2 * KL(teacher || student) per token over the teacher's top-k tokens and the tail bucket.

    student_logits [N, V]; top_ids [N, k] (long); top_log_probs [N, k] (the teacher's, temperature 1)."""
    import torch

    teacher = top_log_probs.float()
    teacher_buckets = torch.cat([teacher, tail_log_mass(teacher).unsqueeze(-1)], dim=-1) / temperature
    teacher_log_p = torch.log_softmax(teacher_buckets, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    student_top = student.gather(-1, top_ids)
    student_log_q = torch.cat([student_top, tail_log_mass(student_top).unsqueeze(-1)], dim=-1)
    p = teacher_log_p.exp()
    kl = torch.where(p > 0, p * (teacher_log_p - student_log_q), torch.zeros_like(p)).sum(-1)
    return kl * temperature ** 2


class KDCollator:
    """TRL's language-modelling collator, with `teacher_index` padded (-1) or concatenated like the labels."""

    def __init__(self, base: Any, padding_free: bool):
        self.base, self.padding_free = base, padding_free

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        index = [torch.tensor(e["teacher_index"], dtype=torch.long) for e in examples]
        batch = self.base([{k: v for k, v in e.items() if k != "teacher_index"} for e in examples])
        width = batch["input_ids"].shape[1]
        rows = [torch.cat(index)] if self.padding_free else index
        out = torch.full((len(rows), width), NO_TEACHER, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row[:width]
        batch["teacher_index"] = out
        return batch


def kd_trainer(alpha: float, temperature: float, top_ids: np.ndarray, top_log_probs: np.ndarray) -> type:
    """A counting Trainer whose loss is the KD loss above; the top-k table stays on the CPU until a batch needs it."""
    import torch
    from transformers import Trainer

    from distillery.training.trainers import counting

    ids_table = torch.from_numpy(np.ascontiguousarray(top_ids)).long()
    log_probs_table = torch.from_numpy(np.ascontiguousarray(top_log_probs).astype(np.float32))

    class KDTrainer(counting(Trainer)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The loss below divides by the batch's token count itself (num_items_in_batch, counted over every
            # gradient-accumulation micro-batch and process), so the Trainer must not divide again.
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher_index = inputs.pop("teacher_index")
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, :-1]
            targets, index = labels[:, 1:], teacher_index[:, 1:]
            scored = targets != -100
            scored_logits, scored_index = logits[scored], index[scored]  # one copy of the scored rows
            ce = torch.nn.functional.cross_entropy(scored_logits.float(), targets[scored], reduction="none")
            per_token = ce.clone()
            taught = scored_index >= 0
            if bool(taught.any()):
                rows = scored_index[taught].cpu()
                kl = kd_token_loss(scored_logits[taught], ids_table[rows].to(logits.device),
                                   log_probs_table[rows].to(logits.device), temperature)
                per_token[taught] = alpha * kl + (1 - alpha) * ce[taught]
            count = num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1)
            loss = per_token.sum() / count
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # the gradient all-reduce averages over processes
            return (loss, outputs) if return_outputs else loss

    return KDTrainer


def kd_datasets(rows: list[dict], arrays: dict[str, np.ndarray] | None, packing: bool, max_length: int, seed: int) -> Any:
    """input_ids, labels and teacher_index per row (packed best-fit-decreasing when packing, as TRL packs)."""
    from datasets import Dataset

    examples = [{"input_ids": r["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])],
                 "teacher_index": teacher_index_column(arrays, i, len(r["input_ids"]))}
                for i, r in enumerate(rows)]
    dataset = Dataset.from_list([e for e in examples if any(label != -100 for label in e["labels"])])
    if packing:
        from trl.data_utils import pack_dataset

        dataset = pack_dataset(dataset.shuffle(seed=seed), max_length, "bfd")
    return dataset
