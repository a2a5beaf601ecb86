"""The one place where a formatted example (format's prompt and completion) becomes tokens. Training, finetune's
length check and evaluate's held-out scoring all use it, so the model is trained and scored on exactly the tokens
llama.cpp reads at inference.

The chat template already writes any BOS and the other special tokens (format's named templates open with the BOS
for a tokenizer that adds one itself (core/vocab.adds_bos), as R1's and Llama 3's own templates do), so the rendered text is tokenized without
the tokenizer adding its own (add_special_tokens=False): tokenizers that add a BOS themselves
(DeepSeek-R1-Distill-Qwen, Llama 3, Kanana) would otherwise start every example with two, which inference never
sees. The prompt's tokens are those of the prompt alone, as inference reads it; the completion's are those of
prompt + completion after them. Where a token merges across the boundary (the r1 template's `>` and `<think` on a
tokenizer without R1's special tokens), the completion is tokenized alone instead of training a merged token the
model never meets after its prompt (TRL gives the merged token to the completion), unless that does not
reproduce the text (a tokenizer that adds a space before a text), where TRL's rule stays.
"""

from __future__ import annotations

from typing import Any, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_tokens(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """(the tokens of prompt + completion, how many of them are the prompt's)."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
    shared = common_prefix(prompt_ids, ids)
    if shared == len(prompt_ids):
        return ids, shared
    apart = prompt_ids + list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.decode(apart) == tokenizer.decode(ids):
        return apart, len(prompt_ids)
    return ids, shared


def training_example(tokenizer: Any, prompt: str, completion: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and completion_mask (1 on the tokens the loss covers), cut to max_length as the trainer cuts."""
    ids, prompt_len = split_tokens(tokenizer, prompt, completion)
    mask = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    return {"input_ids": ids[:max_length], "completion_mask": mask[:max_length]}


def completion_tokens_kept(tokenizer: Any, prompt: str, completion: str, max_length: int) -> int:
    """How many completion tokens survive the cut to max_length."""
    ids, prompt_len = split_tokens(tokenizer, prompt, completion)
    return max(0, min(len(ids), max_length) - prompt_len)
