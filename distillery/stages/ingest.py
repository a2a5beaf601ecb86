"""Ingest: every configured data source -> one set of normalized records.

Steps, in order:
1. read each source through its registered reader (distillery/sources/), counting what it read and dropped,
   into shard files: one process per core for large inputs, records never all in memory (sources/shards.py);
2. cap each source at `max_records` (a seeded sample);
3. drop records whose content repeats one already kept, across sources (`dedupe`);
4. split train/eval by a seeded hash of each record's input row (stable when sources are added);
5. drop train records that overlap an evaluation set: evaluate's MathQA items, the held-out split, the
   `decontaminate.against` files (evals/decontaminate.py);
6. apply each source's `weight` to the train split;
7. copy the chosen lines into train.jsonl and eval.jsonl; write dropped.jsonl (every dropped item with its
   reason) and report.json/.md.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from distillery.sources import SOURCES, SourceReport
from distillery.sources.files import resolve_paths
from distillery.sources.workbook import size_text
from distillery.sources.shards import (DISK_RESERVE, Shard, SourceRows, input_bytes, merge_reports, plan_units, rank,
                                       read_units, worker_count)
from distillery.config import DistilleryConfig
from distillery.core.console import markdown_table, printable, summary_table
from distillery.core.errors import UserError
from distillery.core.records import MAX_RECORD_BYTES, load_json_line, write_jsonl
from distillery.core.rundir import RunDir
from distillery.evals.decontaminate import (EvaluationSet, Index, Sizes, against_files, against_set,
                                            evaluate_data_files, evaluate_data_set, find_contaminated, record_texts)
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
            field = f"ingest.sources.{i}.{kind.files_field} ({source.name})"
            files.extend(resolve_paths(spec, kind.suffixes, field, own_run(cfg)))
    if cfg.ingest.decontaminate.enabled:  # the evaluation sets: a changed test file redoes the check
        files.extend(evaluate_data_files(cfg.evaluate.data, cfg.evaluate.split)[0])
        files.extend(against_files(cfg.ingest.decontaminate.against, own_run(cfg)))
    return files


def own_run(cfg: DistilleryConfig) -> Path:
    """The run's own directory, which no source reads from: ingest writes its shards and outputs there (`files: .`
    in a project holding runs/ read back what it was writing, without end)."""
    return RunDir(cfg.run.root, cfg.run.name).path


def read_sources(cfg: DistilleryConfig, console, directory: Path) -> list[tuple[SourceRows, SourceReport]]:
    """Read every source into shards under `directory` (one process per core for large inputs), with a progress
    line per source; returns each source's rows and report."""
    sources = cfg.ingest.sources
    units = plan_units(sources, own_run(cfg))
    workers = worker_count(cfg.ingest.workers, units, input_bytes(units))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bars:
        tasks = [bars.add_task(printable(f"{source.name} ({source.kind})"), total=None) for source in sources]

        def progress(counts: list[int], shards: list[Shard | None]) -> None:
            for index, task in enumerate(tasks):
                mine = [i for i, unit in enumerate(units) if unit.source == index]
                finished = all(shards[i] is not None for i in mine)
                done = sum(len(shards[i].ids) if shards[i] else counts[i] for i in mine)
                bars.update(task, completed=done, total=done if finished else None)

        if workers > 1:
            console.print(f"reading {len(units)} files/sources in {workers} processes")
        shards = read_units(units, directory, cfg.run.seed, workers, progress)
    per_source = []
    for index, source in enumerate(sources):
        mine = [shard for shard, unit in zip(shards, units) if unit.source == index]
        per_source.append((SourceRows(mine), merge_reports(source.name, mine)))
    return per_source


def within_size(rows: SourceRows, report: SourceReport) -> list[int]:
    """Positions of the records of at most MAX_RECORD_BYTES; each larger one is dropped with its size. One 30 MB
    record took 4 GB to decontaminate and 8 GB to tokenize in format, and ended each as a crash."""
    kept = []
    for i, length in enumerate(rows.lengths):
        if length <= MAX_RECORD_BYTES:
            kept.append(i)
        else:
            report.drop(f"record over {MAX_RECORD_BYTES >> 20} MB", {"id": rows.ids[i], **rows.where(i)},
                        f"{length:,} bytes, more than any model's context holds: split it into shorter records")
    return kept


def cap(rows: SourceRows, positions: list[int], limit: int | None, seed: int, report: SourceReport) -> list[int]:
    """Of `positions`, those of a seeded sample of at most `limit` records; the rest are dropped with the reason."""
    if not limit or len(positions) <= limit:
        return positions
    ranked = sorted(positions, key=lambda i: rank(seed, rows.ids[i]))
    for i in ranked[limit:]:
        report.drop("over max_records", {"id": rows.ids[i], **rows.where(i)})
    return sorted(ranked[:limit])


def dedupe(per_source: list[SourceRows], kept: list[list[int]], reports: list[SourceReport]) -> list[list[int]]:
    """Drop records whose content was already kept (first source, first row wins)."""
    seen: dict[bytes, str] = {}
    result = []
    for rows, positions, report in zip(per_source, kept, reports):
        unique = []
        for i in positions:
            first = seen.get(rows.keys[i])
            if first is None:
                seen[rows.keys[i]] = rows.ids[i]
                unique.append(i)
            else:
                report.drop("duplicate", {"id": rows.ids[i], "duplicate_of": first, **rows.where(i)})
        result.append(unique)
    return result


def split(rows: SourceRows, kept: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Train/eval positions by the seeded rank of each record's input row (shards.group_of), so that the records
    of one row stay together; at least one eval group when there are two or more."""
    if fraction <= 0 or len(kept) < 2:
        return kept, []
    groups = {rows.groups[i] for i in kept}  # a group's rank stands for the group (64 bits of a sha256)
    if len(groups) < 2:
        return kept, []
    eval_groups = {group for group in groups if group < fraction}
    if not eval_groups:
        eval_groups = {min(groups)}
    if len(eval_groups) == len(groups):  # a tiny source: keep something to train on
        eval_groups.discard(max(groups))
    return ([i for i in kept if rows.groups[i] not in eval_groups], [i for i in kept if rows.groups[i] in eval_groups])


def why_none_survived(table: list[dict]) -> str:
    """Each source's rows read and its most common drop reasons, for the message that ends an ingest with no
    training record (the report that lists them is not written then)."""
    parts = []
    for row in table:
        reasons = sorted(row["dropped"].items(), key=lambda item: -item[1])[:3]
        dropped = ", ".join(f"{reason}: {count}" for reason, count in reasons)
        parts.append(f"{row['source']}: {row['read']} read" + (f", dropped {dropped}" if dropped else "")
                     + (f", {row['eval']} held out" if row["eval"] else ""))
    return "; ".join(parts)


def apply_weight(rows: SourceRows, train: list[int], weight: float, seed: int) -> list[int]:
    """Repeat (weight > 1) or subsample (weight < 1) a source's train records, deterministically; a weight below 1
    keeps at least one record, so that a small source does not vanish without a reason given."""
    if weight == 1.0 or not train:
        return train
    whole, frac = int(weight), weight - int(weight)
    ranked = sorted(train, key=lambda i: rank(seed + 2, rows.ids[i]))
    sampled = math.floor(len(train) * frac)
    return train * whole + ranked[: sampled if whole else max(sampled, 1)]


def copy_lines(handle: BinaryIO, rows: SourceRows, positions: list[int]) -> None:
    for i in positions:
        handle.write(rows.line(i))


def write_outputs(out: Path, chosen: list[tuple[SourceRows, list[int], list[int]]], reports: list[SourceReport]) -> None:
    """train.jsonl and eval.jsonl from the chosen lines of each source, in source order; dropped.jsonl."""
    check_room(out, sum(rows.lengths[i] for rows, train, held in chosen for i in (*train, *held)))
    with open(out / OUTPUTS["train"], "wb") as train, open(out / OUTPUTS["eval"], "wb") as evaluation:
        for rows, train_positions, eval_positions in chosen:
            copy_lines(train, rows, train_positions)
            copy_lines(evaluation, rows, eval_positions)
    write_jsonl(out / OUTPUTS["dropped"], (row for rep in reports for row in rep.dropped_rows))


def check_room(out: Path, needed: int) -> None:
    """train.jsonl and eval.jsonl would leave less than DISK_RESERVE free (a `weight` copies a source's records up to
    100 times): a UserError before a byte of them is written."""
    free = shutil.disk_usage(out).free
    if free - needed < DISK_RESERVE:
        raise UserError(f"ingest: train.jsonl and eval.jsonl would take {size_text(needed)}, more than the disk "
                        f"holding {out.parent} can take while {size_text(DISK_RESERVE)} stays free ({size_text(free)} "
                        "free now). Free some space, or lower the sources' `weight` or `max_records`.")


def held_out_set(per_source: list[tuple[SourceRows, SourceReport]], splits: list[tuple[list[int], list[int]]]) -> EvaluationSet:
    held_out = EvaluationSet("held-out split")
    for (rows, _), (_, eval_positions) in zip(per_source, splits):
        held_out.items += [(rows.ids[i], record_texts(load_json_line(rows.line(i)))) for i in eval_positions]
    return held_out


def evaluation_sets(cfg: DistilleryConfig, held_out: EvaluationSet) -> tuple[list[EvaluationSet], list[str]]:
    """What training records are checked against, in the order a record's overlap is named by: evaluate.data's
    MathQA items, the `against` files, the held-out split; and the sets that could not be checked, with why."""
    mathqa, not_checked = evaluate_data_set(cfg.evaluate.data, cfg.evaluate.split)
    sets = [mathqa] if mathqa else []
    sets += [against_set(path) for path in against_files(cfg.ingest.decontaminate.against, own_run(cfg))]
    return sets + [held_out], [not_checked] if not_checked else []


def decontaminate(cfg: DistilleryConfig, per_source: list[tuple[SourceRows, SourceReport]],
                  splits: list[tuple[list[int], list[int]]]) -> tuple[list[list[int]], dict]:
    """Each source's train positions without the contaminated records (all of them with action: keep), and the
    decontamination part of the report."""
    settings = cfg.ingest.decontaminate
    trains = [train for train, _ in splits]
    if not settings.enabled:
        return trains, {"enabled": False}
    sets, not_checked = evaluation_sets(cfg, held_out_set(per_source, splits))
    index = Index(sets, Sizes(settings.word_ngram, settings.char_ngram))
    counts: Counter = Counter()
    kept: list[dict] = []
    for number, ((rows, report), train) in enumerate(zip(per_source, trains)):
        found = find_contaminated(index, ((i, load_json_line(rows.line(i))) for i in train))
        for position, overlap in sorted(found.items()):
            counts[overlap.set] += 1
            where = {"id": rows.ids[position], **rows.where(position)}
            if settings.action == "drop":
                report.drop(overlap.reason, where, overlap.detail)
            else:
                kept.append({"source": report.name, "reason": f"{overlap.reason}, {overlap.detail}", **where})
        if settings.action == "drop" and found:
            trains[number] = [i for i in train if i not in found]
    summary = {"enabled": True, "action": settings.action, "word_ngram": settings.word_ngram,
               "char_ngram": settings.char_ngram, "sets": [s.as_dict() for s in index.summaries],
               "not_checked": not_checked, "contaminated": dict(counts), "total": sum(counts.values())}
    if settings.action == "keep":
        summary["kept"] = kept
    return trains, summary


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    seed = cfg.run.seed
    directory = Path(tempfile.mkdtemp(prefix=".shards-", dir=ctx.out))
    per_source: list[tuple[SourceRows, SourceReport]] = []
    try:
        per_source = read_sources(cfg, ctx.console, directory)
        reports = [report for _, report in per_source]
        kept = [cap(rows, within_size(rows, report), src.max_records, seed, report)
                for (rows, report), src in zip(per_source, cfg.ingest.sources)]
        if cfg.ingest.dedupe:
            kept = dedupe([rows for rows, _ in per_source], kept, reports)
        splits = [split(rows, positions, cfg.ingest.eval_fraction) for (rows, _), positions in zip(per_source, kept)]
        trains, decontamination = decontaminate(cfg, per_source, splits)
        chosen, table = [], []
        for (rows, report), source_train, (_, source_eval), source in zip(per_source, trains, splits, cfg.ingest.sources):
            weighted = apply_weight(rows, source_train, source.weight, seed)
            chosen.append((rows, weighted, source_eval))
            if report.unlisted():
                report.note(f"dropped.jsonl lists the first {len(report.dropped_rows):,} of its "
                            f"{sum(report.dropped.values()):,} dropped items; all are counted by reason")
            table.append({"source": source.name, "kind": source.kind, "read": report.read,
                          "kept": len(source_train) + len(source_eval),
                          "dropped": dict(report.dropped), "train": len(weighted), "eval": len(source_eval),
                          "notes": report.notes})
        if not any(train for _, train, _ in chosen):
            raise UserError(f"ingest: no record survived ({why_none_survived(table)}); nothing to train on.")
        write_outputs(ctx.out, chosen, reports)
    finally:
        for rows, _ in per_source:
            rows.close()
        shutil.rmtree(directory, ignore_errors=True)
    return finish(ctx, table, decontamination)


def finish(ctx: StageContext, rows: list[dict], decontamination: dict) -> StageResult:
    """The report (report.json, report.md, the console table) and the stage's result."""
    train, evaluation = sum(r["train"] for r in rows), sum(r["eval"] for r in rows)
    report = {"sources": rows, "train": train, "eval": evaluation,
              "dropped": sum(sum(r["dropped"].values()) for r in rows), "decontamination": decontamination}
    (ctx.out / OUTPUTS["report"]).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (ctx.out / OUTPUTS["report_md"]).write_text(render_report(rows, report), encoding="utf-8")
    print_report(ctx.console, rows, decontamination)
    contaminated = decontamination.get("total", 0)
    return StageResult(
        metrics={"train": train, "eval": evaluation, "dropped": report["dropped"], "contaminated": contaminated},
        summary=[("train", str(train)), ("eval", str(evaluation)), ("dropped", str(report["dropped"])),
                 ("contaminated", str(contaminated))],
    )


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])) or "-"


HEADERS = ("source", "kind", "read", "kept", "dropped", "train", "eval")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    return [(r["source"], r["kind"], str(r["read"]), str(r["kept"]), _reasons(r["dropped"]), str(r["train"]),
             str(r["eval"])) for r in rows]


def decontamination_lines(summary: dict) -> list[str]:
    """What the training records were checked against, and what was found."""
    if not summary.get("enabled"):
        return ["Not checked against the evaluation sets (ingest.decontaminate.enabled: false)."]
    sets = "; ".join(f"{s['set']} ({s['items']} items)" for s in summary["sets"])
    found = ", ".join(f"{n} {name}" for name, n in summary["contaminated"].items()) or "none"
    done = "dropped (dropped.jsonl lists them)" if summary["action"] == "drop" else \
        "kept (action: keep; report.json lists them)"
    lines = [f"Checked against {sets}, by {summary['word_ngram']}-word and {summary['char_ngram']}-character "
             f"(Hangul) n-grams.",
             f"Contaminated training records: {summary['total']}" + (f" ({found}), {done}." if summary["total"] else ".")]
    return lines + [f"Not checked: {reason}." for reason in summary["not_checked"]]


def print_report(console, rows: list[dict], decontamination: dict) -> None:
    console.print(summary_table("ingest report", table_rows(rows), HEADERS))
    for r in rows:
        for note in r["notes"]:
            console.print(f"  [dim]{printable(r['source'])}:[/] {printable(note)}")
    for line in decontamination_lines(decontamination):
        console.print(f"  [dim]decontamination:[/] {printable(line)}")


def render_report(rows: list[dict], totals: dict) -> str:
    lines = ["# Ingest report", "", *markdown_table(HEADERS, table_rows(rows))]
    lines += ["", f"Total: {totals['train']} train, {totals['eval']} eval, {totals['dropped']} dropped "
              "(each dropped item with its reason in dropped.jsonl)."]
    lines += ["", "## Decontamination", "", *decontamination_lines(totals["decontamination"])]
    notes = [f"- {r['source']}: {note}" for r in rows for note in r["notes"]]
    if notes:
        lines += ["", "## Notes", *notes]
    return "\n".join(lines) + "\n"


STAGE = Stage(name="ingest", run=run, outputs=OUTPUTS, sections=("ingest",),
              packages=("python-calamine", "openpyxl", "datasets", "pandas", "pyarrow"), input_files=input_files,
              operational=("ingest.workers",))  # the records are the same whatever the number of readers
