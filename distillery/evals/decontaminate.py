"""Decontamination: which training records overlap the evaluation sets a run scores on.

A training record is contaminated when it shares an n-gram with an evaluation text, after both are normalized
(NFKC, lower case, punctuation and symbols removed, whitespace collapsed):

- a run of `word_ngram` words (13, as GPT-3 and Llama 2 did), within one paragraph of a message;
- a run of `char_ngram` characters of a paragraph's Hangul words, spaces removed: Korean spacing varies and a
  Korean word packs several English words' worth, so words are a poor unit there;
- a paragraph too short for either, but of 8 words or 14 Hangul characters at least, compared whole (spaces
  removed): only an equal paragraph matches it.

An n-gram that many training records of one source and task share (more than 10, or more than a quarter of them)
is boilerplate, a prompt template or a stock phrase, not a copied evaluation item: it is not counted (GPT-3
ignored 13-grams found in more than 10 training documents for the same reason). A record that holds an evaluation
item whole (its normalized words in a row) is contaminated however many records do: distilled traces repeat their
problem in every sampled answer.

Only the evaluation side is held: a sorted array of the 64-bit hashes of its n-grams. Training records stream
past it once, in batches, and keep nothing but their hits.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from distillery.core.errors import UserError
from distillery.core.unseen import IGNORABLE
from distillery.core.userinput import is_usable_file, path_exists
from distillery.evals.mathqa import LOCAL_SUFFIXES, LoadReport, is_local, load_items
from distillery.sources.files import resolve_paths
from distillery.sources.hf import read_local_file
from distillery.sources.text import HANGUL

BOILERPLATE = 10  # training records of one source and task that may share an n-gram before it counts as boilerplate
# A paragraph shorter than an n-gram is compared whole from 8 words (GPT-3 let n go down to 8 for short items) or
# 14 Hangul characters (8 English words' worth); below that it says nothing specific ("7", "Thank you.", "네.").
SHORTEST_WORDS = 8
SHORTEST_HANGUL = 14
BATCH = 4096  # training records hashed per lookup in the index
WORD = re.compile(r"[^\W_]+")  # letters and digits of any script
# WORD for ASCII text in one bytes.translate: letters lower-cased, digits kept, everything else a space
ASCII_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))


@dataclass(frozen=True)
class Sizes:
    words: int = 13
    chars: int = 25


def words_and_hangul(text: str) -> tuple[list[str], str]:
    """The words of a text after NFKC and lower case, punctuation and symbols separating them like spaces; and
    its Hangul words run together."""
    if text.isascii():  # the same words, five times faster
        return text.encode().translate(ASCII_WORD_BYTES).decode().split(), ""
    # characters that show nothing (a zero-width space, a soft hyphen from a web page) would split a word in two
    words = WORD.findall(unicodedata.normalize("NFKC", IGNORABLE.sub("", text)).lower())
    return words, "".join(filter(HANGUL.search, words))


def paragraph_ngrams(text: str, sizes: Sizes) -> list[Any]:
    """Tuples of `sizes.words` words and strings of `sizes.chars` characters of the Hangul words; for a paragraph
    too short for either but not trivially short, the whole paragraph as one (None, text) pair."""
    words, korean = words_and_hangul(text)
    found: list[Any] = []
    if len(words) >= sizes.words:
        found += zip(*(words[k:] for k in range(sizes.words)))
    if len(korean) >= sizes.chars:
        ends = range(sizes.chars, len(korean) + 1)
        found += map(korean.__getitem__, map(slice, range(len(ends)), ends))
    if not found and (len(words) >= SHORTEST_WORDS or len(korean) >= SHORTEST_HANGUL):
        found.append((None, "".join(words)))
    return found


def ngrams(texts: list[str], sizes: Sizes) -> list[Any]:
    """Every n-gram of a record's or an item's texts, paragraph by paragraph: none spans a blank line, where
    prompt templates set their content apart, so that a template's last words and an item's first do not make an
    n-gram that every item starting alike shares."""
    found: list[Any] = []
    for text in texts:
        for paragraph in text.split("\n\n"):
            found += paragraph_ngrams(paragraph, sizes)
    return found


def joined_words(texts: list[str]) -> str:
    """All the words of some texts (words_and_hangul), one space between each two."""
    return " ".join(word for text in texts for word in words_and_hangul(text)[0])


def record_texts(record: dict[str, Any]) -> list[str]:
    """What a record says: its messages' contents (a math_mc record's user message lists its choices)."""
    return [message["content"] for message in record["messages"]]


def describe(gram: Any) -> str:
    """An n-gram for a message: its kind and how it starts."""
    if isinstance(gram, str):
        return f'{len(gram)}-character n-gram "{gram[:12]}…"'
    if gram[0] is None:
        return f'the whole paragraph "{gram[1][:24]}…"'
    return f'{len(gram)}-gram "{" ".join(gram[:6])} …"'


@dataclass
class EvaluationSet:
    """Texts a run evaluates on: (item id, texts) per item, under a name for the report."""

    name: str
    items: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class SetSummary:
    name: str
    items: int
    ngrams: int
    too_short: int  # items with no n-gram and no paragraph long enough to compare whole: not checked

    def as_dict(self) -> dict[str, Any]:
        return {"set": self.name, "items": self.items, "ngrams": self.ngrams, "too_short": self.too_short}


@dataclass(frozen=True)
class Overlap:
    set: str
    item: str
    gram: str

    @property
    def reason(self) -> str:
        return f"contaminated: {self.set}"

    @property
    def detail(self) -> str:
        return f"{self.gram} of {self.item}"


class Index:
    """The hashed n-grams of the evaluation sets, sorted, each with the first item it came from.

    Python's str hash is salted per process: the index is built and used in the same process (ingest's own)."""

    def __init__(self, sets: list[EvaluationSet], sizes: Sizes) -> None:
        import numpy as np  # here, not at the top: an up-to-date ingest imports this module and never needs it

        self.sizes = sizes
        self.items: list[tuple[str, str]] = []  # item number -> (set name, item id)
        self.texts: list[list[str]] = []  # item number -> its texts
        self.joined_of: dict[int, str] = {}  # item number -> its joined words, once asked for (copied_whole)
        self.summaries: list[SetSummary] = []
        hashes, owners = array("q"), array("q")
        for evaluation in sets:
            before, too_short = len(hashes), 0
            for item_id, texts in evaluation.items:
                grams = ngrams(texts, sizes)
                too_short += not grams
                hashes.extend(map(hash, grams))
                owners.extend(itertools.repeat(len(self.items), len(grams)))
                self.items.append((evaluation.name, item_id))
                self.texts.append(texts)
            self.summaries.append(SetSummary(evaluation.name, len(evaluation.items), len(hashes) - before, too_short))
        self.hashes, first = np.unique(np.frombuffer(hashes, dtype=np.int64), return_index=True)
        self.owners = np.frombuffer(owners, dtype=np.int64)[first]
        self.owned = np.bincount(self.owners, minlength=len(self.items))  # item number -> entries it owns

    def __len__(self) -> int:
        return len(self.hashes)

    def hits(self, hashes: array, counts: list[int]) -> dict[int, list[int]]:
        """The entries (distinct n-grams found in the index) of each record of a batch that has any, by its number
        in the batch."""
        import numpy as np

        if not len(hashes) or not len(self.hashes):
            return {}
        wanted = np.frombuffer(hashes, dtype=np.int64)
        entries = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        found = self.hashes[entries] == wanted
        by_record: dict[int, list[int]] = {}
        if found.any():
            records = np.repeat(np.arange(len(counts)), counts)[found]
            for number, entry in sorted(set(zip(records.tolist(), entries[found].tolist()))):
                by_record.setdefault(number, []).append(entry)
        return by_record

    def copied_whole(self, texts: list[str], entries: list[int]) -> Overlap | None:
        """The first item the record holds whole, its normalized words in a row: of the items every one of whose
        own n-grams the record shares (a template's item is one too), the one whose text is in the record's."""
        import numpy as np

        owners, shared = np.unique(self.owners[entries], return_counts=True)
        candidates = [int(owner) for owner, count in zip(owners, shared) if count == self.owned[owner]]
        if not candidates:
            return None
        record = f" {joined_words(texts)} "
        owner = next((owner for owner in candidates if f" {self.joined(owner)} " in record), None)
        if owner is None:
            return None
        set_name, item_id = self.items[owner]
        return Overlap(set_name, item_id, "the whole text")

    def joined(self, owner: int) -> str:
        """An item's joined_words, worked out once: a template's item is a candidate for every record using it."""
        if owner not in self.joined_of:
            self.joined_of[owner] = joined_words(self.texts[owner])
        return self.joined_of[owner]

    def overlap(self, texts: list[str], entries: list[int]) -> Overlap:
        """What a training record shares with the evaluation sets: with the first item (by set, then item) that
        `entries` come from, its first n-gram in the record's order."""
        owner = min(int(self.owners[entry]) for entry in entries)
        targets = {int(self.hashes[entry]) for entry in entries if self.owners[entry] == owner}
        gram = next(g for g in ngrams(texts, self.sizes) if hash(g) in targets)
        set_name, item_id = self.items[owner]
        return Overlap(set_name, item_id, describe(gram))


def boilerplate_limit(records: int) -> int:
    """How many training records of one source and task may share an n-gram before it is boilerplate: 10, or a
    quarter of them in a small source (whose template comments and phrases recur in a few records only)."""
    return min(BOILERPLATE, max(1, records // 4))


def find_contaminated(index: Index, records: Iterable[tuple[int, dict[str, Any]]]) -> dict[int, Overlap]:
    """The records (position, record) of one source that overlap an evaluation set, by position."""
    import numpy as np

    if not len(index):
        return {}
    dead = np.zeros(len(index), dtype=bool)  # boilerplate for this source: more than BOILERPLATE records share it
    shared: Counter = Counter()  # (task, entry) -> records sharing it
    per_task: Counter = Counter()
    hits: dict[int, tuple[str, list[int]]] = {}
    texts_of: dict[int, list[str]] = {}
    found = {}
    for batch in batched(records, BATCH):
        hashes, counts = array("q"), []
        for _, record in batch:
            per_task[record["task"]] += 1
            before = len(hashes)
            hashes.extend(map(hash, ngrams(record_texts(record), index.sizes)))
            counts.append(len(hashes) - before)
        for number, entries in index.hits(hashes, counts).items():
            position, record = batch[number]
            if whole := index.copied_whole(record_texts(record), entries):
                found[position] = whole  # not counted as sharing: copies of an item do not make it boilerplate
                continue
            for entry in entries:
                key = (record["task"], entry)
                shared[key] += 1
                if dead[entry] or shared[key] > BOILERPLATE:
                    dead[entry] = True
                    continue
                hits.setdefault(position, (record["task"], []))[1].append(entry)
                texts_of[position] = record_texts(record)
    for position, (task, entries) in hits.items():
        real = [entry for entry in entries if not dead[entry] and shared[(task, entry)] <= boilerplate_limit(per_task[task])]
        if real:
            found[position] = index.overlap(texts_of[position], real)
    return found


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# Where the evaluation sets come from.


def hub_cache_files(dataset: str, split: str) -> list[Path]:
    """The files of a Hub dataset's split in the local Hugging Face cache (`hf download`), without the network:
    the snapshot's json/jsonl/csv/parquet files named for the split or in a folder named for it. [] if absent."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = Path(HF_HUB_CACHE) / ("datasets--" + dataset.replace("/", "--"))
    ref = repo / "refs" / "main"
    try:  # a name the system cannot look up (over 255 bytes) is not in the cache either
        snapshot = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if snapshot is None or not snapshot.is_dir():
            return []
    except (OSError, ValueError):
        return []
    named = re.compile(rf"{re.escape(split)}([-_.].*)?")
    return sorted(path for path in snapshot.rglob("*") if path.is_file() and path.suffix.lower() in LOCAL_SUFFIXES
                  and any(named.fullmatch(part) for part in (path.stem, *path.relative_to(snapshot).parent.parts)))


def evaluate_data_files(data: str | None, split: str) -> tuple[list[Path], str | None]:
    """The local files behind evaluate.data, and why none when it cannot be checked (null: no MathQA set)."""
    if data is None:
        return [], None
    if is_local(data):
        path = Path(data).expanduser()
        if is_usable_file(path):
            return [path], None
        what = "is not a regular file (a folder, a pipe or a device)" if path_exists(path) else "does not exist"
        return [], f"evaluate.data {data} {what} (evaluate will say so too)"
    files = hub_cache_files(data, split)
    if files:
        return files, None
    return [], (f"evaluate.data {data} ({split}), a Hub dataset not in the local Hugging Face cache "
                f"(`hf download {data} --repo-type dataset` once, or set evaluate.data to a local file)")


def evaluate_data_set(data: str | None, split: str) -> tuple[EvaluationSet | None, str | None]:
    """The MathQA items evaluate scores (all of them, whatever evaluate.limit), by their problems (choices such as
    "a ) 10 , b ) 12 , ..." recur across items and tell nothing apart); or None and why it cannot be checked."""
    files, not_checked = evaluate_data_files(data, split)
    if not files:
        return None, not_checked
    evaluation = EvaluationSet(f"evaluate.data {Path(data).name}" if is_local(data) else f"evaluate.data {data} ({split})")
    for path in files:
        for item in load_items(str(path), split, None, LoadReport()):
            evaluation.items.append((item.id, [item.problem]))
    return evaluation, None


def against_set(path: Path) -> EvaluationSet:
    """An `against` file: records with `messages` (ingest's own shape), or MathQA rows (`Problem`)."""
    evaluation = EvaluationSet(str(path))
    try:
        for row, where in read_local_file(path):
            item_id = f"{path.name}:{where.get('line', where.get('index', where.get('row')))}"
            evaluation.items.append((item_id, row_texts(row, path, item_id)))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"ingest.decontaminate.against: cannot read {path} ({type(err).__name__}: "
                        f"{getattr(err, 'strerror', None) or err}). Fix the file or remove it from the list.") from None
    if not evaluation.items:  # as an empty csv is: a file that checks nothing is a mistake, not a clean result
        raise UserError(f"ingest.decontaminate.against: {path} holds no record, so it checks nothing. Fill it or "
                        "remove it from the list.")
    return evaluation


def row_texts(row: dict[str, Any], path: Path, item_id: str) -> list[str]:
    messages = row.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return record_texts(row)
    problem = row.get("Problem")
    if isinstance(problem, str):
        return [problem]
    raise UserError(f"ingest.decontaminate.against: {item_id} ({path}) is neither a record with `messages` "
                    f"(like ingest's train.jsonl/eval.jsonl) nor a MathQA row with `Problem`; it has: "
                    f"{', '.join(map(str, row)) or 'nothing'}. Convert the file or remove it from the list.")


def against_files(against: list[str], own_run: Path) -> list[Path]:
    """The `against` files; none in the run's own directory (its train.jsonl checked against itself dropped a
    different set at every run)."""
    return resolve_paths(against, LOCAL_SUFFIXES, "ingest.decontaminate.against", own_run) if against else []

