"""Small Trainer subclasses the finetune stage needs, built on demand (transformers/TRL are imported lazily):

- counting(base):               counts the real (non-pad) tokens each optimizer step trains on, for tokens/s;
- plain_loss_sft_trainer(base): TRL's SFTTrainer with transformers' own loss, for the hf backend on CPU;
- multiple_choice_trainer():    the "format match" objective for math_mc records: each option's continuation
                                log-likelihood, a softmax over the options, cross-entropy on the correct one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator


def count_tokens(inputs: dict[str, Any]) -> int:
    """Tokens in a batch: the attention mask's ones, or the packed row's length when padding-free."""
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum().item())
    if inputs.get("position_ids") is not None:
        return int(inputs["position_ids"].numel())
    return int(inputs["input_ids"].numel())


@contextmanager
def cpu_map_location() -> Iterator[None]:
    """transformers 5.17 loads a checkpoint's optimizer state onto `args.device` when several processes train; on
    CPU that device is cpu:<rank>, which torch.load cannot restore to, so resuming a CPU DDP run fails. Map it to
    plain cpu (the same memory) while the optimizer state loads."""
    import torch

    original = torch.load

    def load(*args: Any, map_location: Any = None, **kwargs: Any) -> Any:
        if isinstance(map_location, torch.device) and map_location.type == "cpu":
            map_location = "cpu"
        return original(*args, map_location=map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def resumable_on_cpu_processes(base: type) -> type:
    """`base` whose optimizer state loads back on CPU under several processes (see cpu_map_location)."""

    class ResumableOnCPUProcesses(base):
        def _load_optimizer_and_scheduler(self, checkpoint):
            if self.args.world_size > 1 and self.args.device.type == "cpu":
                with cpu_map_location():
                    return super()._load_optimizer_and_scheduler(checkpoint)
            return super()._load_optimizer_and_scheduler(checkpoint)

    ResumableOnCPUProcesses.__name__ = ResumableOnCPUProcesses.__qualname__ = f"Resumable{base.__name__}"
    return ResumableOnCPUProcesses


def counting(base: type) -> type:
    """`base` with a `tokens_seen` counter updated on every training micro-batch (and resumable on CPU processes)."""

    class Counting(resumable_on_cpu_processes(base)):
        tokens_seen = 0

        def training_step(self, model, inputs, *args, **kwargs):
            self.tokens_seen += count_tokens(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    Counting.__name__ = Counting.__qualname__ = f"Counting{base.__name__}"
    return Counting


def plain_loss_sft_trainer(base: type) -> type:
    """TRL 1.15's SFTTrainer asks the model for a fused LM head, a Triton kernel with no CPU path. Without it the
    loss is transformers' ordinary cross-entropy on the same labels (the completion mask is already in them)."""
    from transformers import Trainer

    class PlainLossSFTTrainer(counting(base)):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


def mc_rows(rows: Iterable[dict]) -> list[dict]:
    """The multiple-choice rows (math_mc, with choices and label) as {prompt, choices, label}."""
    return [{"prompt": r["prompt"], "choices": list(r["choices"]), "label": int(r["label"])}
            for r in rows if r.get("choices") and r.get("label") is not None]


class MultipleChoiceCollator:
    """Each example becomes one row per option: prompt + option text, with a mask over the option's tokens.

    The prompt and the option are tokenized as training tokenizes a prompt and its completion (training/tokens.py:
    the template's own BOS, the prompt's own tokens). Over-long rows lose tokens from the left, so the option itself
    is never cut.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, prompt: str, option: str) -> tuple[list[int], list[int]]:
        from distillery.training.tokens import split_tokens

        ids, start = split_tokens(self.tokenizer, prompt, option)  # the template wrote any BOS: no second one
        mask = [0] * start + [1] * (len(ids) - start)
        return ids[-self.max_length:], mask[-self.max_length:]

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        import torch

        encoded = [self.encode(f["prompt"], option) for f in features for option in f["choices"]]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        option_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            option_mask[row, :len(ids)] = torch.tensor(mask)
        return {"input_ids": input_ids, "attention_mask": attention, "option_mask": option_mask,
                "labels": torch.tensor([f["label"] for f in features]),
                "num_options": torch.tensor([len(f["choices"]) for f in features])}


def option_log_likelihoods(logits: Any, input_ids: Any, option_mask: Any) -> Any:
    """Sum of log p(token | everything before it) over each row's option tokens."""
    import torch

    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    token_log_probs = log_probs.gather(-1, targets).squeeze(-1)
    return (token_log_probs * option_mask[:, 1:]).sum(-1)


def multiple_choice_loss(scores: Any, labels: Any, num_options: int) -> Any:
    """Cross-entropy of the softmax over each example's options against its correct option."""
    import torch

    return torch.nn.functional.cross_entropy(scores.view(-1, num_options), labels)


def multiple_choice_trainer() -> type:
    from transformers import Trainer

    class MultipleChoiceTrainer(counting(Trainer)):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            options = int(inputs["num_options"][0])
            if not bool((inputs["num_options"] == options).all()):
                raise ValueError("every multiple-choice example in a batch must have the same number of options")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            scores = option_log_likelihoods(outputs.logits, inputs["input_ids"], inputs["option_mask"])
            loss = multiple_choice_loss(scores, inputs["labels"], options)
            return (loss, {"scores": scores.view(-1, options)}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return MultipleChoiceTrainer
