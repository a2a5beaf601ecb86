"""Ingest: every configured data source -> one set of normalized records.

Steps, in order:
1. read each source through its registered reader (distillery/sources/), counting what it read and dropped;
2. cap each source at `max_records` (a seeded sample);
3. drop records whose content repeats one already kept, across sources (`dedupe`);
4. split train/eval by a seeded hash of each record's input row (stable when sources are added);
5. apply each source's `weight` to the train split;
6. write train.jsonl, eval.jsonl, dropped.jsonl (every dropped item with its reason), report.json/.md.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from distillery.sources import SOURCES, SourceReport
from distillery.sources.files import resolve_paths
from distillery.config import DistilleryConfig
from distillery.core.console import markdown_table, summary_table
from distillery.core.errors import UserError
from distillery.core.records import write_jsonl
from distillery.stage import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl", "dropped": "dropped.jsonl", "report": "report.json",
           "report_md": "report.md"}


def input_files(cfg: DistilleryConfig) -> list[Path]:
    """Every local file the sources read: their content is part of the fingerprint."""
    files: list[Path] = []
    for i, source in enumerate(cfg.ingest.sources):
        kind = SOURCES[source.kind]
        spec = getattr(source, kind.files_field, None)
        if spec:
            files.extend(resolve_paths(spec, kind.suffixes, f"ingest.sources.{i}.{kind.files_field} ({source.name})"))
    return files


def _rank(seed: int, record_id: str) -> float:
    """A seeded, order-independent number in [0, 1) for a record: drives sampling and the split."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while records are built. Records are plain acyclic dicts that
    reference counting frees; the cyclic collector would only re-scan the growing heap again and again (about a
    third of the reading time for a 100k-row workbook, bench/ingest.py)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_sources(cfg: DistilleryConfig, console) -> tuple[list[list[dict]], list[SourceReport]]:
    """Run every source's reader with a progress line per source."""
    all_records, reports = [], []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for source in cfg.ingest.sources:
            task = progress.add_task(f"{source.name} ({source.kind})", total=None)
            report = SourceReport(source.name)
            records = []
            for record in SOURCES[source.kind].read(source, report):
                records.append(record)
                if len(records) % 2000 == 0:
                    progress.update(task, completed=len(records))
            if not report.read:  # `read` counts input rows/lines, which a reader may turn into several records
                report.read = len(records) + sum(report.dropped.values())
            progress.update(task, completed=len(records), total=len(records))
            all_records.append(records)
            reports.append(report)
    return all_records, reports


def cap(records: list[dict], limit: int | None, seed: int, report: SourceReport) -> list[dict]:
    """Keep a seeded sample of at most `limit` records; the rest are dropped with the reason."""
    if not limit or len(records) <= limit:
        return records
    ranked = sorted(records, key=lambda r: _rank(seed, r["id"]))
    for record in ranked[limit:]:
        report.drop("over max_records", {"id": record["id"], **_where(record)})
    keep = {r["id"] for r in ranked[:limit]}
    return [r for r in records if r["id"] in keep]


def dedupe(per_source: list[list[dict]], reports: list[SourceReport]) -> list[list[dict]]:
    """Drop records whose content was already kept (first source, first row wins)."""
    seen: dict[tuple, str] = {}
    result = []
    for records, report in zip(per_source, reports):
        kept = []
        for record in records:
            key = _content(record)
            if key in seen:
                report.drop("duplicate", {"id": record["id"], "duplicate_of": seen[key], **_where(record)})
            else:
                seen[key] = record["id"]
                kept.append(record)
        result.append(kept)
    return result


def _content(record: dict) -> tuple:
    """What a record says, as a hashable value: equal exactly when records.content_key is, but built without
    JSON-encoding every record a second time (ingest of 100k-row workbooks, bench/ingest.py)."""
    choices = record.get("choices")
    messages = tuple([(m["role"], m["content"]) for m in record["messages"]])  # messages hold only role and content
    return messages, tuple(choices) if choices is not None else None, record.get("label")


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/eval split by input row (see _group); at least one eval group when there are two or more."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    group_of = {r["id"]: _group(r) for r in records}
    ranks = {group: _rank(seed + 1, group) for group in set(group_of.values())}
    if len(ranks) < 2:
        return records, []
    eval_groups = {group for group, rank in ranks.items() if rank < fraction}
    if not eval_groups:
        eval_groups = {min(ranks, key=ranks.get)}
    if len(eval_groups) == len(ranks):  # a tiny source: keep something to train on
        eval_groups.discard(max(ranks, key=ranks.get))
    return ([r for r in records if group_of[r["id"]] not in eval_groups],
            [r for r in records if group_of[r["id"]] in eval_groups])


def _group(record: dict) -> str:
    """The input row a record came from: the records of one row (both translation directions, the output- and
    input-prediction prompts of one CodeI/O record) land in the same split, so eval never holds the mirror
    image of a train example. Records without a location fall back to their id. The file counts by name only,
    so moving the data keeps the split."""
    meta = record.get("meta", {})
    where = [meta[key] for key in WHERE_KEYS if key in meta]
    if not where:
        return record["id"]
    if "file" in meta:
        where[0] = _file_name(meta["file"])
    return "\0".join([record["source"], *map(str, where)])


_file_name = functools.lru_cache(maxsize=None)(os.path.basename)


def apply_weight(records: list[dict], weight: float, seed: int) -> list[dict]:
    """Repeat (weight > 1) or subsample (weight < 1) a source's train records, deterministically."""
    if weight == 1.0 or not records:
        return records
    whole, frac = int(weight), weight - int(weight)
    ranked = sorted(records, key=lambda r: _rank(seed + 2, r["id"]))
    return records * whole + ranked[: math.floor(len(records) * frac)]


WHERE_KEYS = ("file", "sheet", "row", "line", "index")


def _where(record: dict) -> dict[str, Any]:
    meta = record.get("meta", {})
    return {k: meta[k] for k in WHERE_KEYS if k in meta}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    seed = cfg.run.seed
    with cyclic_gc_paused():
        per_source, reports = read_sources(cfg, ctx.console)
    per_source = [cap(recs, src.max_records, seed, rep) for recs, src, rep in zip(per_source, cfg.ingest.sources, reports)]
    if cfg.ingest.dedupe:
        per_source = dedupe(per_source, reports)

    train, evaluation, rows = [], [], []
    for records, source, report in zip(per_source, cfg.ingest.sources, reports):
        source_train, source_eval = split(records, cfg.ingest.eval_fraction, seed)
        weighted = apply_weight(source_train, source.weight, seed)
        train.extend(weighted)
        evaluation.extend(source_eval)
        rows.append({"source": source.name, "kind": source.kind, "read": report.read, "kept": len(records),
                     "dropped": dict(report.dropped), "train": len(weighted), "eval": len(source_eval),
                     "notes": report.notes})

    if not train:
        raise UserError("ingest: no record survived (see the dropped reasons above); nothing to train on.")
    write_jsonl(ctx.out / OUTPUTS["train"], train)
    write_jsonl(ctx.out / OUTPUTS["eval"], evaluation)
    write_jsonl(ctx.out / OUTPUTS["dropped"], (row for rep in reports for row in rep.dropped_rows))
    report = {"sources": rows, "train": len(train), "eval": len(evaluation),
              "dropped": sum(sum(r["dropped"].values()) for r in rows)}
    (ctx.out / OUTPUTS["report"]).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (ctx.out / OUTPUTS["report_md"]).write_text(render_report(rows, report), encoding="utf-8")
    print_report(ctx.console, rows)
    return StageResult(
        metrics={"train": len(train), "eval": len(evaluation), "dropped": report["dropped"]},
        summary=[("train", str(len(train))), ("eval", str(len(evaluation))), ("dropped", str(report["dropped"]))],
    )


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])) or "-"


HEADERS = ("source", "kind", "read", "kept", "dropped", "train", "eval")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    return [(r["source"], r["kind"], str(r["read"]), str(r["kept"]), _reasons(r["dropped"]), str(r["train"]),
             str(r["eval"])) for r in rows]


def print_report(console, rows: list[dict]) -> None:
    console.print(summary_table("ingest report", table_rows(rows), HEADERS))
    for r in rows:
        for note in r["notes"]:
            console.print(f"  [dim]{r['source']}:[/] {note}")


def render_report(rows: list[dict], totals: dict) -> str:
    lines = ["# Ingest report", "", *markdown_table(HEADERS, table_rows(rows))]
    lines += ["", f"Total: {totals['train']} train, {totals['eval']} eval, {totals['dropped']} dropped "
              "(each dropped item with its reason in dropped.jsonl)."]
    notes = [f"- {r['source']}: {note}" for r in rows for note in r["notes"]]
    if notes:
        lines += ["", "## Notes", *notes]
    return "\n".join(lines) + "\n"


STAGE = Stage(name="ingest", run=run, outputs=OUTPUTS, sections=("ingest",),
              packages=("python-calamine", "openpyxl", "datasets", "pandas"), input_files=input_files)
