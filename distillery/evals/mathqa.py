"""MathQA as lm-evaluation-harness 0.4.13's `mathqa` task defines it: data, prompts, metrics.

- context:      "Question: {Problem}\\nAnswer:" (n-shot: k solved train examples first, each followed by "\\n\\n")
- choices:      the `options` string split with the harness's regular expression (sources.hf)
- continuation: " " + choice, scored by its summed log-probability given the context
- acc:          argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice) in characters
                (numpy semantics: an empty choice's " " continuation is scored, its normalised score is -inf)
- stderr:       sample standard deviation / sqrt(n), the harness's `mean_stderr`
- few-shot:     one random.Random(1234) drawing k examples per item, in item order (the harness's default sampler)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distillery.sources.hf import LETTERS, read_local_file, split_mathqa_options
from distillery.core.errors import UserError
from distillery.core.userinput import is_usable_file, path_exists

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Item:
    """One MathQA problem ready to score."""

    id: str  # where it came from: file:line or dataset/split:index
    problem: str
    choices: tuple[str, ...]
    label: int
    category: str = ""


@dataclass
class LoadReport:
    """Items read, and the ones skipped with the reason (their ids)."""

    read: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def is_local(data: str) -> bool:
    """A path (existing, or spelled like a file) rather than a Hub dataset id."""
    path = Path(data).expanduser()
    return data.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES or path_exists(path)


def parse_item(row: dict[str, Any], item_id: str) -> Item:
    """A MathQA row -> Item; ValueError with the reason when it cannot be scored."""
    problem = row.get("Problem")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("empty Problem")
    options = row.get("options")
    choices = split_mathqa_options(options) if isinstance(options, str) else []
    if len(choices) != len(LETTERS):
        raise ValueError(f"options not parseable into 5 choices: {str(options)[:80]!r}")
    correct = str(row.get("correct") or "").strip().lower()
    if correct not in tuple(LETTERS):  # one letter: "" or "ab" is a substring of "abcde", not an answer
        raise ValueError(f"correct is {row.get('correct')!r}, not one of a-e")
    return Item(item_id, problem, tuple(choices), LETTERS.index(correct), str(row.get("category") or ""))


DATA_KEYS = ("evaluate.data", "evaluate.split")  # the settings a source and its split come from, for messages
FEWSHOT_KEYS = ("evaluate.fewshot_data", "evaluate.fewshot_split")


def iter_rows(data: str, split: str, keys: tuple[str, str] = DATA_KEYS) -> Iterator[tuple[dict[str, Any], str]]:
    """(row, id) pairs from a local file or a Hub dataset split; `keys` name the settings in messages."""
    if is_local(data):
        path = local_file(data, keys[0])
        for row, where in read_local_file(path):
            yield row, f"{path.name}:{where.get('line', where.get('index', where.get('row')))}"
        return
    for index, row in enumerate(load_hub_split(data, split, keys)):
        yield row, f"{data}/{split}:{index}"


def local_file(data: str, key: str) -> Path:
    """The file `data` names; missing, a directory, or not read by its suffix (one of LOCAL_SUFFIXES) is a UserError
    naming the setting (a .txt file was read as Parquet and failed on its magic bytes)."""
    path = Path(data).expanduser()
    fix = ("Point it at a MathQA jsonl/json/csv/parquet file (e.g. configs/samples/mathqa/test.jsonl) or a Hub id "
           "(regisss/math_qa).")
    if path_exists(path) and path.is_dir():
        raise UserError(f"{key}: {data} is a directory. {fix}")
    if not is_usable_file(path):
        raise UserError(f"{key}: {data} does not exist. {fix}")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"{key}: {data} is read by its suffix, which is not one of {', '.join(LOCAL_SUFFIXES)}. "
                        "Rename it to the format it holds (JSON Lines: .jsonl).")
    return path


def load_hub_split(dataset: str, split: str, keys: tuple[str, str] = DATA_KEYS) -> Any:
    """A Hub dataset split (from the local cache where the Hub cannot serve it), failing fast with the way out."""
    from distillery.sources.hf import load_hub_dataset

    hint = (f"Download it where you have network (`hf download {dataset} --repo-type dataset`) and set "
            f"{keys[0]} to the local file, or load it once with network.")
    try:
        return load_hub_dataset(dataset, None, split, 10.0, keys[0], hint)
    except ValueError as err:
        raise UserError(f"{keys[0]} {dataset}: no split {split!r} ({err}). Set {keys[1]}.") from None


def load_items(data: str, split: str, limit: int | None, report: LoadReport,
               keys: tuple[str, str] = DATA_KEYS) -> list[Item]:
    """The first `limit` scoreable items (all when None); unparseable rows are skipped and reported."""
    items: list[Item] = []
    for row, item_id in iter_rows(data, split, keys):
        if limit is not None and items and len(items) >= limit:
            break
        report.read += 1
        try:
            items.append(within_size(parse_item(row, item_id)))
        except ValueError as err:
            report.skipped.append({"id": item_id, "reason": str(err)})
    if not items:
        first = f"; the first: {report.skipped[0]['reason']}" if report.skipped else ""
        raise UserError(f"{keys[0]} {data}: no scoreable MathQA item (read {report.read}, skipped "
                        f"{len(report.skipped)}{first}). It needs the columns Problem, options and correct.")
    return items


MAX_ITEM_CHARS = 100_000  # a MathQA problem and its options are a few hundred characters


def within_size(item: Item) -> Item:
    """The item, unless its text is longer than any problem (a 30 MB Problem copied into every few-shot context
    that drew it grew evaluate past 2.8 GB before the contexts were measured)."""
    size = len(item.problem) + sum(map(len, item.choices))
    if size > MAX_ITEM_CHARS:
        raise ValueError(f"{size:,} characters of problem and options, more than any MathQA item")
    return item


def question(item: Item) -> str:
    return f"Question: {item.problem}\nAnswer:"


def solved_example(item: Item) -> str:
    """A few-shot example as the harness renders it: question, delimiter, the right choice, blank line."""
    return question(item) + TARGET_DELIMITER + item.choices[item.label] + FEWSHOT_DELIMITER


def build_contexts(items: list[Item], num_fewshot: int, pool: list[Item], same_split: bool) -> list[str]:
    """Each item's context; few-shot examples drawn like the harness's default sampler (seed 1234).

    When the examples come from the split being scored, the harness draws k+1 and drops the item itself.
    """
    if num_fewshot == 0:
        return [question(item) for item in items]
    if len(pool) < num_fewshot + same_split:
        raise UserError(f"evaluate.num_fewshot {num_fewshot}: the few-shot split has only {len(pool)} items.")
    rnd = random.Random(FEWSHOT_SEED)
    contexts = []
    for item in items:
        if same_split:
            shots = [s for s in rnd.sample(pool, num_fewshot + 1) if s != item][:num_fewshot]
        else:
            shots = rnd.sample(pool, num_fewshot)
        contexts.append("".join(solved_example(s) for s in shots) + question(item))
    return contexts


def continuations(item: Item) -> list[str]:
    return [TARGET_DELIMITER + choice for choice in item.choices]


def predictions(item: Item, loglikelihoods: list[float]) -> tuple[int, int]:
    """(pred, pred_norm): by log-likelihood, and by log-likelihood per character of the choice.

    With numpy's semantics, as the harness computes them: an empty choice (test item 1041's fifth, `e ) `)
    divides by zero, giving -inf (never the normalised pick), and ties go to the first index."""
    import numpy as np

    lengths = np.array([float(len(choice)) for choice in item.choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = np.asarray(loglikelihoods, dtype=np.float64) / lengths
    return int(np.argmax(loglikelihoods)), int(np.argmax(normed))


def mean_stderr(values: list[float]) -> float | None:
    """The harness's standard error of a mean: sample standard deviation (n-1) / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def aggregate(per_item: list[dict[str, Any]]) -> dict[str, Any]:
    """acc, acc_norm and their standard errors over per-item rows carrying 0/1 `acc` and `acc_norm`."""
    result: dict[str, Any] = {"n": len(per_item)}
    for metric in ("acc", "acc_norm"):
        values = [float(row[metric]) for row in per_item]
        result[metric] = sum(values) / len(values) if values else None
        result[f"{metric}_stderr"] = mean_stderr(values)
    return result
