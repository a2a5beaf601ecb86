"""Held-out scoring: the run's own held-out data (format's eval split: the training template, the exact
prompt/completion tokens training uses) scored per task for every artifact, down to each GGUF.

- **loss**: the mean negative log-likelihood per completion token, and its perplexity, per task and overall,
  from one teacher-forced pass (transformers with the shared-prefix packing of hf_backend.py; llama.cpp in its
  child process for a GGUF). Every artifact reads the same token ids (training/tokens.py);
- **generation**: each item's prompt continued greedily (or `samples` times at a temperature) until the
  training EOS, then scored by its task (`score_task`): chrF++ and BLEU for translation, math-verify for math
  answers, the option letter for MathQA, CodeI/O's own verifiers (input prediction in the sandbox), and for any
  other task exact match and chrF++, named as such.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distillery.core.errors import UserError
from distillery.core.records import TASK_PATTERN, read_jsonl_numbered
from distillery.training.tokens import split_tokens

THINK_CLOSE = "</think>"


@dataclass
class HeldoutItem:
    id: str
    task: str
    prompt_ids: list[int]
    completion_ids: list[int]
    reference: str  # the answer the record holds (after any reasoning), for the generation metrics
    record: dict[str, Any] = field(default_factory=dict)  # meta, choices and label: what the task's checker reads


def reference_answer(completion: str, eos: str) -> str:
    """The completion's answer text: without the EOS and the template's tail, after any </think> reasoning."""
    text = completion.split(eos)[0] if eos else completion
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return text.strip()


def load_items(eval_path: Path, tokenizer: Any, max_length: int, limit: int | None) -> tuple[list[HeldoutItem], int]:
    """Format's eval split as items (at most `limit` per task, in file order), tokenized as training tokenizes
    them and cut to format.max_length; returns (items, how many had no completion token left to score)."""
    items, per_task, empty = [], {}, 0
    for line, row in read_jsonl_numbered(eval_path) if eval_path.is_file() else []:
        check_row(row, eval_path, line)
        if limit is not None and per_task.get(row["task"], 0) >= limit:
            continue
        ids, prompt_len = split_tokens(tokenizer, row["prompt"], row["completion"])
        ids = ids[:max_length]
        if len(ids) <= prompt_len:
            empty += 1
            continue
        per_task[row["task"]] = per_task.get(row["task"], 0) + 1
        record = {"id": row["id"], "task": row["task"], "meta": row.get("meta", {})}
        if "choices" in row:
            record["choices"], record["label"] = row["choices"], row["label"]
        items.append(HeldoutItem(row["id"], row["task"], ids[:prompt_len], ids[prompt_len:],
                                 reference_answer(row["completion"], tokenizer.eos_token or ""), record))
    return items, empty


ROW_TEXTS = ("id", "task", "prompt", "completion")
JSON_TYPES = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}


def check_row(row: dict[str, Any], path: Path, line: int) -> None:
    """A UserError naming the line when a row of format's eval split is not as format writes it (damaged on disk, or
    edited by hand): its texts, a task that can name a table row, and a `meta` object."""
    fix = "`distillery format --force` writes the file again"
    for key in ROW_TEXTS:
        if not isinstance(row.get(key), str):
            what = f"has no `{key}`" if key not in row else f"has `{key}` {JSON_TYPES.get(type(row[key]), 'of another type')}"
            raise UserError(f"{path}: line {line} {what}, where format writes text: {fix}.")
    if not re.fullmatch(TASK_PATTERN, row["task"]) or row["task"] == "overall":
        raise UserError(f"{path}: line {line} has the task {row['task'][:80]!r}: a task is letters, digits, `_`, `.` "
                        "and `-` (it names a row of evaluate's tables), and not `overall`. Set such a name as the "
                        "source's `task` (ingest.sources) and run again; a file damaged since: " + fix + ".")
    if not isinstance(row.get("meta", {}), dict):
        raise UserError(f"{path}: line {line} has `meta` {JSON_TYPES.get(type(row['meta']), 'of another type')}, "
                        f"where format writes an object: {fix}.")


def item_losses(model: Any, items: list[HeldoutItem], batch_size: int,
                progress: Callable[[int], None] = lambda n: None) -> list[tuple[float, int]]:
    """(summed negative log-likelihood of the completion, its token count) per item, teacher-forced."""
    return nll_pairs(model.completion_logprobs(*sequences(items), batch_size, progress), items)


def sequences(items: list[HeldoutItem]) -> tuple[list[list[int]], list[int]]:
    """Each item's prompt + completion tokens, and where its completion starts."""
    return [i.prompt_ids + i.completion_ids for i in items], [len(i.prompt_ids) for i in items]


def nll_pairs(logprobs: list[float], items: list[HeldoutItem]) -> list[tuple[float, int]]:
    return [(-score, len(item.completion_ids)) for score, item in zip(logprobs, items)]


def loss_summary(pairs: list[tuple[float, int]]) -> dict[str, float]:
    """Mean negative log-likelihood per token (pooled over the items' tokens) and its perplexity."""
    nll, tokens = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    loss = nll / tokens if tokens else float("nan")
    return {"loss": round(loss, 6), "ppl": round(perplexity(loss), 4), "tokens": tokens}


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a broken model's loss, past 709 nats a token
        return float("inf")


CORRECTNESS_KINDS = ("math", "option", "codeio", "text")


def generation_subset(items: list[HeldoutItem], per_task: int | None) -> list[HeldoutItem]:
    """The first `per_task` items of each task (all when None)."""
    counts: dict[str, int] = {}
    chosen = []
    for item in items:
        if per_task is None or counts.get(item.task, 0) < per_task:
            counts[item.task] = counts.get(item.task, 0) + 1
            chosen.append(item)
    return chosen


def score_artifact(model: Any, items: list[HeldoutItem], generate: list[HeldoutItem], eos_id: int,
                   max_new_tokens: int, samples: int, temperature: float, batch_size: int, limits: Any,
                   progress: Callable[[int], None] = lambda n: None,
                   top_p: float = 1.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One artifact's held-out scores: {task: {items, loss, ppl, <metric>...}, "overall": {...}} and one row per
    item (its loss and, where generated, its answers and verdicts). One answer is greedy; k samples are drawn at
    `temperature` from the `top_p` nucleus. `progress` counts each item scored, answered and judged."""
    from distillery.evals import tasks

    position = {id(item): k for k, item in enumerate(items)}  # by the item itself: ids repeat without ingest's dedupe
    logprobs, replies = model.score_and_generate(*sequences(items), [position[id(item)] for item in generate],
                                                 max_new_tokens, batch_size, eos_id, samples,
                                                 temperature if samples > 1 else 0.0, top_p, progress)
    pairs = nll_pairs(logprobs, items)
    rows = [{"id": item.id, "task": item.task, "nll": round(nll, 6), "tokens": n} for item, (nll, n) in zip(items, pairs)]
    scores: dict[str, Any] = {}
    for task in sorted({i.task for i in items}):
        members = [k for k, item in enumerate(items) if item.task == task]
        scores[task] = {"items": len(members), **loss_summary([pairs[k] for k in members])}
        asked = [k for k in members if k in replies]
        if not asked:
            continue
        kind = tasks.kind_of(task, [items[k].record for k in asked], [items[k].reference for k in asked])
        verdicts = [checked(kind, items[k], replies[k], limits, progress) for k in asked]
        scores[task].update({"generated": len(asked), **tasks.sample_metrics(
            kind, task, [items[k].reference for k in asked], [replies[k] for k in asked], verdicts)})
        if samples > 1 and kind in CORRECTNESS_KINDS:
            scores[task][f"pass@{samples}"] = round(sum(any(x["correct"] for x in v) for v in verdicts) / len(asked), 4)
        for k, item_verdicts in zip(asked, verdicts):
            rows[k].update({"replies": replies[k], "verdicts": item_verdicts})
    scores["overall"] = {"items": len(items), **loss_summary(pairs)}
    return scores, rows


def checked(kind: str, item: HeldoutItem, replies: list[str], limits: Any, progress: Callable[[int], None]) -> list[dict]:
    """The verdict on each reply to one item (a CodeI/O input runs in the sandbox: seconds); then progress(1)."""
    from distillery.evals import tasks

    verdicts = [tasks.check_item(kind, item.record, item.reference, reply, limits) for reply in replies]
    progress(1)
    return verdicts


LOSS_FLOOR = 0.01  # nats a token: a GGUF this close to the reference passes whatever the ratio


def quant_checks(results: dict[str, dict[str, Any]], kinds: dict[str, str], max_loss_increase: float,
                 max_drop: float) -> str | None:
    """Each GGUF's tasks against the merged model's (the adapter's when the merged model was not scored or its loss
    is not finite: a broken reference would fail every GGUF): a loss more than `max_loss_increase` higher
    (relative) and more than LOSS_FLOOR higher (a task trained to a loss near 0 makes any ratio large), or a main
    metric more than `max_drop` lower, fails. Writes `vs_reference` into each GGUF task; returns the reference
    artifact's name (None: nothing to compare)."""
    from distillery.evals.tasks import main_metric

    reference = next((name for kind in ("merged", "adapter") for name, k in kinds.items() if k == kind
                      and name in results and all(finite(s.get("loss")) for s in results[name].values())), None)
    if reference is None:
        return None
    for name, scored in results.items():
        if kinds.get(name) != "gguf":
            continue
        for task, mine in scored.items():
            theirs = results[reference].get(task)
            if not theirs:
                continue
            increase = relative_increase(mine["loss"], theirs["loss"])
            check = {"reference": reference, "loss_increase": round(increase, 4)}
            passed = increase <= max_loss_increase or mine["loss"] - theirs["loss"] <= LOSS_FLOOR
            ours, ref = main_metric(mine), main_metric(theirs)
            if ours is not None and ref is not None:
                check["metric_drop"] = round(ref - ours, 4)
                passed = passed and ref - ours <= max_drop
            mine["vs_reference"] = {**check, "passed": passed}
    return reference


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def relative_increase(loss: float, reference: float) -> float:
    """How much higher `loss` is than `reference`, relative to it; from a reference of 0 any increase is infinite."""
    if reference > 0:
        return (loss - reference) / reference
    return 0.0 if loss <= reference else float("inf")
