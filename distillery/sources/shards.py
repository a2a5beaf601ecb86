"""Reading every source into JSONL shards, in worker processes, without holding the records in memory.

Ingest's unit of work is one file of a source that reads its files independently (`Source.per_file`: the
AI-Hub workbooks) or else a whole source. Each unit writes its records, as the JSON lines ingest will output,
to a shard file of its own and hands back only what ingest needs to decide each record's fate: its id, a digest
of its content (dedupe), the seeded rank of the input row it came from (the split) and where its line is.
Ingest then copies the chosen lines into train/eval. Units run in a pool of processes, one per core, or in this
process when there is one worker; their results are taken in reading order, so the output is the same byte for
byte whatever the number of workers (tests/stages/test_ingest_parallel.py).
"""

from __future__ import annotations

import functools
import gc
import glob
import hashlib
import os
import shutil
import signal
from array import array
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from distillery.core.errors import UserError
from distillery.core.machine import usable_cores
from distillery.core.isolation import NativeCrash
from distillery.core.records import content_digest, json_line, load_json_line
from distillery.sources import SOURCES, SourceReport
from distillery.sources.files import resolve_paths
from distillery.sources.registry import SourceParams
from distillery.sources.workbook import size_text

WHERE_KEYS = ("file", "sheet", "row", "line", "index")
TICK = 5000  # records between progress reports from a unit
PARALLEL_FROM_BYTES = 16 << 20  # below this much input a process pool costs more than it saves
OPEN_SHARDS = 64  # shard files a reader keeps open at once
DISK_RESERVE = 1 << 30  # a source stops before its records leave less than this free on the disk
DISK_CHECK_BYTES = 64 << 20  # written between two looks at the free space


def rank(seed: int, key: str) -> float:
    """A seeded, order-independent number in [0, 1) for a record id or a group: drives sampling and the split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_of(record: dict) -> str:
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


@dataclass
class Shard:
    """One unit's records: their JSON lines in `path`, and per record the columns ingest decides on."""

    path: Path
    report: SourceReport
    ids: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # content digests: equal exactly for equal content
    groups: array = field(default_factory=lambda: array("d"))  # rank(seed + 1, group_of(record))
    offsets: array = field(default_factory=lambda: array("q"))  # where each line starts in `path`
    lengths: array = field(default_factory=lambda: array("l"))


def write_shard(records: Iterable[dict], path: Path, report: SourceReport, seed: int,
                tick: Callable[[int], None] = lambda n: None) -> Shard:
    """Write `records` to `path` as JSON lines and return the shard with its columns."""
    shard, offset, check_at = Shard(path, report), 0, 0
    with open(path, "wb") as handle, cyclic_gc_paused():
        for record in records:
            line = json_line(record)
            if offset >= check_at:
                check_free_disk(path, offset, report.name)
                check_at = offset + DISK_CHECK_BYTES
            handle.write(line)
            shard.ids.append(record["id"])
            shard.keys.append(content_digest(record["messages"], record.get("choices"), record.get("label")))
            shard.groups.append(rank(seed + 1, group_of(record)))
            shard.offsets.append(offset)
            shard.lengths.append(len(line))
            offset += len(line)
            if len(shard.ids) % TICK == 0:
                tick(len(shard.ids))
    return shard


def check_free_disk(path: Path, written: int, source: str) -> None:
    """A source whose records would fill the disk stops with a message, before the disk is full: a small
    workbook can make huge records (a thousand long column names, each in every record's meta)."""
    if shutil.disk_usage(path.parent).free >= DISK_RESERVE:
        return
    low = f"the disk holding {path.parent} has less than {size_text(DISK_RESERVE)} left (ingest keeps that much free)"
    if not written:
        raise UserError(f"source {source}: {low}. Free some space, or set run.root to a directory on a disk with "
                        "more room.")
    raise UserError(f"source {source}: its records take {size_text(written)} so far, and {low}. Free some space, or "
                    "check the source: a few cells can make huge records (every named column of a workbook goes into "
                    "each record's meta).")


@dataclass(frozen=True)
class Unit:
    """One piece of reading: a source, or one file of a `per_file` source."""

    source: int  # index of the source in the config
    params: SourceParams  # for a file unit, the source's params with its files field set to that one file
    label: str  # for progress and errors: "aihub-ko-en (뉴스.xlsx)"


def plan_units(sources: list[SourceParams], exclude: Path | None = None) -> list[Unit]:
    """The units to read, in the order their records are output. Each names its files as resolved here, never
    as patterns (a file "[AI-Hub] 1.xlsx"), and none in `exclude` (the run's own directory): a source's reader
    resolves only those."""
    units = []
    for index, params in enumerate(sources):
        kind = SOURCES[params.kind]
        field_name = kind.files_field
        spec = getattr(params, field_name, None)
        if not spec:  # a Hub dataset
            units.append(Unit(index, params, params.name))
            continue
        files = resolve_paths(spec, kind.suffixes, f"source {params.name}: {field_name}", exclude)
        named = [glob.escape(str(path)) for path in files]
        if not kind.per_file:
            units.append(Unit(index, params.model_copy(update={field_name: named}), params.name))
            continue
        for path, name in zip(files, named):
            units.append(Unit(index, params.model_copy(update={field_name: name}), f"{params.name} ({path.name})"))
    return units


def read_unit(unit: Unit, path: Path, seed: int, tick: Callable[[int], None] = lambda n: None) -> Shard:
    """Run the unit's reader into a shard file (in a worker process or in this one)."""
    report = SourceReport(unit.params.name)
    return write_shard(SOURCES[unit.params.kind].read(unit.params, report), path, report, seed, tick)


def worker_count(wanted: int | None, units: list[Unit], input_bytes: int) -> int:
    """`wanted` processes, or by default one per core when the input is large enough to pay for starting them."""
    if wanted is None:
        wanted = usable_cores() if input_bytes >= PARALLEL_FROM_BYTES else 1
    return max(1, min(wanted, len(units)))


_counts: Any = None  # in a worker: the shared per-unit record counts, set by _start_worker


def _start_worker(counts: Any, pipeline: int) -> None:
    """A reading process: ends with the pipeline however that ends (a kill -9 left them reading on, orphaned)."""
    from distillery.core.isolation import die_with

    global _counts
    _counts = counts
    die_with(pipeline)


def _report_count(unit_index: int, n: int) -> None:
    _counts[unit_index] = n


def read_units(units: list[Unit], directory: Path, seed: int, workers: int,
               progress: Callable[[list[int], list[Shard | None]], None]) -> list[Shard]:
    """Every unit's shard, in unit order. `progress(counts, done)` is called as records come in: the records
    read so far and the finished shards (None where unfinished), both by unit."""
    paths = [directory / f"{i:05d}.jsonl" for i in range(len(units))]
    if workers == 1:
        shards: list[Shard | None] = [None] * len(units)
        counts = [0] * len(units)
        for i, unit in enumerate(units):
            def tick(n: int, i: int = i) -> None:
                counts[i] = n
                progress(counts, shards)

            shards[i] = read_unit(unit, paths[i], seed, tick)
            counts[i] = len(shards[i].ids)
            progress(counts, shards)
        return shards  # type: ignore[return-value]
    return _read_in_pool(units, paths, seed, workers, progress)


def _read_in_pool(units: list[Unit], paths: list[Path], seed: int, workers: int,
                  progress: Callable[[list[int], list[Shard | None]], None]) -> list[Shard]:
    # spawn, not fork: the parent holds a progress-drawing thread, and a forked child must not inherit its locks
    context = get_context("spawn")
    counts = context.Array("q", len(units), lock=False)  # each slot written by one worker only
    shards: list[Shard | None] = [None] * len(units)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(counts, os.getpid()))
    try:
        futures = {pool.submit(read_unit, unit, paths[i], seed, functools.partial(_report_count, i)): i
                   for i, unit in enumerate(units)}
        pending: set[Future] = set(futures)
        processes: dict = {}
        while pending:
            processes.update(getattr(pool, "_processes", None) or {})  # private; only to say how a dead one ended
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            for future in sorted(done, key=futures.__getitem__):  # the first unit's error first, as in one process
                try:
                    shards[futures[future]] = future.result()
                except BrokenProcessPool:
                    raise worker_died(units, shards, list(processes.values())) from None
            progress(list(counts), shards)
    except BaseException:
        _stop_workers(pool)  # an error or Ctrl-C: do not wait for the other units to finish reading
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return shards  # type: ignore[return-value]


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()


def worker_died(units: list[Unit], shards: list[Shard | None], processes: list[Any]) -> NativeCrash:
    """A reading process died (a native crash, the OOM killer): say how, and which units were being read."""
    unfinished = [unit.label for unit, shard in zip(units, shards) if shard is None]
    doing = f"reading {unfinished[0]}" if len(unfinished) == 1 else f"reading one of: {', '.join(unfinished[:6])}"
    if len(unfinished) > 6:
        doing += f" (and {len(unfinished) - 6} more)"
    for process in processes:  # the dead one may still be ending (writing a core file): wait a moment for it
        process.terminate()
        process.join(timeout=5)
    ended = [process.exitcode for process in processes if process.exitcode not in (None, 0, -signal.SIGTERM)]
    return NativeCrash("a reading process", doing, ended[0] if ended else None,
                       hint="Set `ingest.workers: 1` to read in one process and see which file it is.")


@dataclass
class SourceRows:
    """A source's records as columns over its shards, by position in reading order; lines are read on demand."""

    shards: list[Shard]
    ids: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    groups: array = field(default_factory=lambda: array("d"))
    shard: array = field(default_factory=lambda: array("I"))  # which shard holds each line
    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("l"))
    handles: dict[int, BinaryIO] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for number, shard in enumerate(self.shards):
            self.ids += shard.ids
            self.keys += shard.keys
            self.groups += shard.groups
            self.shard += array("I", [number]) * len(shard.ids)
            self.offsets += shard.offsets
            self.lengths += shard.lengths

    def __len__(self) -> int:
        return len(self.ids)

    def line(self, i: int) -> bytes:
        number = self.shard[i]
        if number not in self.handles:
            if len(self.handles) >= OPEN_SHARDS:  # a source of thousands of workbooks: as many files open
                self.close()
            self.handles[number] = open(self.shards[number].path, "rb")
        handle = self.handles[number]
        handle.seek(self.offsets[i])
        return handle.read(self.lengths[i])

    def where(self, i: int) -> dict[str, Any]:
        """The record's location (file, sheet, row, line, index), for a dropped-row entry."""
        meta = load_json_line(self.line(i)).get("meta", {})
        return {key: meta[key] for key in WHERE_KEYS if key in meta}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def merge_reports(name: str, shards: list[Shard]) -> SourceReport:
    """One source's report from its units' reports, as if it had been read in one go."""
    report = SourceReport(name)
    for shard in shards:
        report.add(shard.report)
    if not report.read:  # `read` counts input rows/lines, which a reader may turn into several records
        report.read = sum(len(shard.ids) for shard in shards) + sum(report.dropped.values())
    return report


def input_bytes(units: list[Unit]) -> int:
    """The size of the local files the units read (a Hub dataset counts as nothing)."""
    total = 0
    for unit in units:
        kind = SOURCES[unit.params.kind]
        spec = getattr(unit.params, kind.files_field, None)
        if spec:
            total += sum(path.stat().st_size for path in resolve_paths(spec, kind.suffixes, unit.label))
    return total
