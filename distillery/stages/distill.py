"""Distill: verified reasoning traces from a teacher model (R1-distillation, CodeI/O++ revision).

Steps, in order:
1. pick ingest's train records whose task has a verifier in `distill.tasks`, skip those that cannot be checked
   (no label, no reference answer, no CodeI/O meta) and cap them at `max_prompts`, spread evenly over the tasks;
2. skip the prompts an interrupted run already finished (progress.jsonl in the partial directory);
3. ask the teacher for K samples per prompt and check each with its verifier (CodeI/O input prediction runs the
   reference code in the sandbox); with `revise`, a failed sample gets the feedback and one more turn; a reply
   without usable text (empty, cut off for its size, refused by the teacher with a 400/413/422, an answer
   nested too deeply to write) is a dropped turn that says why, never kept;
4. append each finished prompt to progress.jsonl at once, so a restart sends only the rest to the teacher (kept
   across a kill or a UserError such as an unreachable teacher by the runner, which keeps the partial directory);
5. write train.jsonl (records in the ingest shape, `<think>` reasoning + final answer; only verified traces
   unless keep: all), traces.jsonl (every attempt with its verdicts), report.json/.md and report.png; a run
   in which no reply had usable text is a UserError naming the teacher, and writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field, ValidationError, model_validator

from distillery.config import DistillConfig, DistilleryConfig, TeacherConfig
from distillery.core.console import markdown_table, printable, summary_table
from distillery.core.errors import UserError
from distillery.core.models import local_model_files
from distillery.core.plots import figure
from distillery.core.records import make_record, read_jsonl, write_jsonl
from distillery.stage import Stage, StageContext, StageResult
from distillery.reasoning.prompts import question, revision_messages, teacher_messages, trace_content
from distillery.reasoning.sandbox import Limits, check_isolation
from distillery.reasoning.teachers import CutOff, Dropped
from distillery.reasoning.answers import after_reasoning
from distillery.reasoning.verifiers import VERIFIERS, Verdict, why_uncheckable

log = logging.getLogger(__name__)

OUTPUTS = {"train": "train.jsonl", "traces": "traces.jsonl", "report": "report.json", "report_md": "report.md",
           "report_plot": "report.png", "logprobs": "train.logprobs.safetensors"}
PROGRESS = "progress.jsonl"  # the finished prompts while the stage runs: what an interrupted run resumes from
# The deepest answer a verdict may hold: a worker thread parses it on a short stack, and progress.jsonl is written
# with json.dumps on the main thread's deeper one, where an answer nested near the recursion limit would raise.
MAX_ANSWER_DEPTH = 100


def select_prompts(records: list[dict], cfg: DistillConfig) -> tuple[list[dict], dict[str, int]]:
    """The records to distill, round-robin over tasks up to max_prompts, and the skipped counts by reason."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for record in records:
        verifier = cfg.tasks.get(record["task"])
        if verifier is None:
            continue
        reason = why_uncheckable(verifier, record)
        if reason:
            skipped[f"{record['task']}: {reason}"] += 1
        else:
            by_task[record["task"]].append(record)
    chosen: list[dict] = []
    queues = [list(reversed(by_task[task])) for task in sorted(by_task)]
    limit = cfg.max_prompts or sum(len(q) for q in queues)
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return chosen, dict(skipped)


class Message(BaseModel):
    role: str
    content: str


class Turn(BaseModel, extra="allow"):
    ok: bool
    dropped: str | None = None
    dropped_detail: str = ""


class Attempt(BaseModel, extra="allow"):
    verified: bool
    revised: bool
    turns: list[Turn] = Field(min_length=1)


class Kept(BaseModel, extra="allow"):
    id: str
    task: str
    messages: list[Message] = Field(min_length=1)


class ProgressEntry(BaseModel, extra="allow"):
    """What distill_prompt writes for a prompt: what the report and the outputs read of a progress line."""

    id: str
    task: str
    verifier: str
    teacher: str
    seconds: float
    attempts: list[Attempt]
    kept: list[Kept]
    logprobs: list[Any] | None = None

    @model_validator(mode="after")
    def one_readable_scoring_per_kept_trace(self) -> ProgressEntry:
        if self.logprobs is None:
            return self
        if len(self.logprobs) != len(self.kept):  # the sidecar would pair later records with others' log-probs
            raise ValueError(f"{len(self.logprobs)} log-prob entries for {len(self.kept)} kept traces")
        for scored in self.logprobs:
            if scored and not (isinstance(scored, dict) and isinstance(scored.get("unscored"), str)):
                decoded_top_k(scored)
        return self


def decoded_top_k(scored: Any) -> Any:
    """One kept trace's top-k as its progress line carries it; a ValueError when it is not what distill writes."""
    from distillery.core.topk import TopK

    try:
        return TopK.decode(scored)
    except Exception as err:  # bad base64, a missing key, a k of zero: any of them means the line was changed
        raise ValueError(f"unreadable top-k log-probs ({type(err).__name__})") from None


def load_progress(path: Path) -> list[dict]:
    """Finished prompts of an interrupted run; a line torn by the interruption is dropped (and redone), and so is
    a whole line that is not what distill writes (edited by hand, or by another version): its prompt is asked
    again, never trained on as it stands."""
    if not path.is_file():
        return []
    done, good_bytes, wrong = [], 0, 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):  # torn at the end: the next line appended would join it
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
            try:
                ProgressEntry.model_validate(entry)
            except ValidationError:
                wrong += 1
                continue
            done.append(entry)
    with open(path, "r+b") as handle:
        handle.truncate(good_bytes)
    if wrong:
        log.warning("%s: %d line(s) not as distill writes them; their prompts are asked again", path, wrong)
    return done


def append_progress(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()


def sample_seed(seed: int, record_id: str) -> int:
    return (seed * 1_000_003 + int(record_id[:8], 16)) % 2**31


def distill_prompt(record: dict, cfg: DistillConfig, teacher: Any, limits: Limits, seed: int,
                   scorer: Any = None) -> dict:
    """Every sample of one prompt with its verdicts (and second turns), plus the training records kept (and,
    with distill.logprobs, the teacher's top-k log-probs on each of them)."""
    verifier_name = cfg.tasks[record["task"]]
    verify = VERIFIERS[verifier_name]
    first = teacher_messages(record, verifier_name, cfg.system_prompt)
    started = time.monotonic()
    replies = teacher.complete(first, cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens, seed)
    attempts, kept = [], []
    for k, reply in enumerate(replies):
        turns = [checked_turn(record, reply, verify, limits)]
        if not turns[0][1].ok and cfg.revise and not is_dropped(turns[0]):
            again = revision_messages(first, turns[0][0], turns[0][1].feedback)
            second = teacher.complete(again, 1, cfg.temperature, cfg.max_tokens, seed + 1000 + k)[0]
            turns.append(checked_turn(record, second, verify, limits))
        final = turns[-1][1]
        attempts.append({"sample": k, "verified": final.ok, "revised": len(turns) > 1,
                         "turns": [{"text": t, "ok": v.ok, "answer": v.answer, "expected": v.expected,
                                    "feedback": v.feedback, **v.details} for t, v in turns]})
        if any(is_dropped(turn) for turn in turns):
            continue
        trace = training_record(record, turns, final, k, teacher.name)
        # Identical samples (temperature 0, or a teacher that repeats itself) would be the same example twice.
        if (final.ok or cfg.keep == "all") and trace["id"] not in {r["id"] for r in kept}:
            kept.append(trace)
    entry = {"id": record["id"], "task": record["task"], "verifier": verifier_name, "teacher": teacher.name,
             "attempts": attempts, "kept": kept}
    if scorer is not None:
        entry["logprobs"] = [scored_trace(scorer, trace) for trace in kept]
    return {**entry, "seconds": round(time.monotonic() - started, 3)}


def scored_trace(scorer: Any, trace: dict) -> dict:
    """The teacher's top-k log-probs on a kept trace, as a progress line holds them (or why there are none)."""
    from distillery.reasoning.teacher_logprobs import Unscored

    scored = scorer.score(question(trace), trace["messages"][-1]["content"])
    return {"unscored": scored.reason} if isinstance(scored, Unscored) else scored.encode()


CUT_OFF_FEEDBACK = ("The reply was cut off at the token limit before it ended, so it has no final answer. Answer "
                    "again more briefly, ending with the final answer.")


def checked_turn(record: dict, reply: str | Dropped, verify: Any, limits: Limits) -> tuple[str, Verdict]:
    """The reply's text and its verdict; a reply without usable text, or whose answer nests too deeply to be
    written, fails with the reason in `dropped`."""
    if isinstance(reply, CutOff) and reply.strip():
        return str(reply), Verdict(ok=False, feedback=CUT_OFF_FEEDBACK, details={"cut_off": True})
    if isinstance(reply, str) and reply.strip():
        verdict = verify(record, reply, limits)
        if not nested_deeper_than(verdict.answer, MAX_ANSWER_DEPTH):
            return reply, verdict
        reply = Dropped("unreadable reply", f"its answer nests lists or objects more than {MAX_ANSWER_DEPTH} deep")
    why = reply if isinstance(reply, Dropped) else Dropped("no text", "an empty answer")
    return "", Verdict(ok=False, feedback=f"No usable reply: {why.reason} ({why.detail}).",
                       details={"dropped": why.reason, "dropped_detail": why.detail})


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts in `value` nest more than `limit` levels deep (counted level by level, without
    the recursion that json.dumps needs)."""
    level = [value]
    for _ in range(limit + 1):
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


def is_dropped(turn: tuple[str, Verdict]) -> bool:
    return "dropped" in turn[1].details


def training_record(record: dict, turns: list, final: Any, sample: int, teacher_name: str) -> dict:
    """The record with the teacher's trace as its answer, in the ingest shape."""
    # a reply cut off at max_tokens has no final answer (keep: all keeps its reasoning only)
    canonical = "" if final.details.get("cut_off") else final.canonical or after_reasoning(turns[-1][0]).strip()
    content = trace_content([(text, verdict.feedback) for text, verdict in turns], canonical)
    messages = question(record)
    meta = {**record.get("meta", {}), "distill": {"from_id": record["id"], "teacher": teacher_name, "sample": sample,
                                                  "verified": final.ok, "revised": len(turns) > 1}}
    return make_record(record["source"], record["task"], [*messages, {"role": "assistant", "content": content}],
                       meta, record.get("choices"), record.get("label"))


def run_prompts(todo: list[dict], ctx: StageContext, teacher: Any, limits: Limits, progress_path: Path,
                scorer: Any = None) -> None:
    """Distill the prompts, appending each one as soon as it is done.

    A parallel (HTTP) teacher gets up to `concurrency` prompts in flight, never more, so an interruption loses
    at most those; a local teacher runs one prompt at a time in this thread.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = ctx.cfg.distill
    workers = cfg.concurrency if teacher.parallel else 1

    def one(record: dict) -> dict:
        return distill_prompt(record, cfg, teacher, limits, sample_seed(ctx.cfg.run.seed, record["id"]), scorer)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=ctx.console) as progress:
        bar = progress.add_task(printable(f"teacher {teacher.name}"), total=len(todo))

        def save(entry: dict) -> None:
            append_progress(progress_path, entry)
            progress.advance(bar)

        if workers == 1:
            for entry in map(one, todo):
                save(entry)
        else:
            in_flight(one, todo, workers, save)


def in_flight(function: Any, items: list, workers: int, save: Any) -> None:
    """save(function(item)) for every item, `function` in threads, at most `workers` at a time, `save` in this
    thread as each finishes. When the run stops (Ctrl-C, a prompt's error), the prompts still in flight are let
    finish, as the pool's shutdown waits for them anyway, and those that succeed are saved before the error goes
    on: their replies are not asked for again. A second Ctrl-C leaves them unsaved."""
    queue = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers)
    unsaved: set = set()
    try:
        while True:
            while len(unsaved) < workers and (item := next(queue, None)) is not None:
                unsaved.add(pool.submit(function, item))
            if not unsaved:
                return
            finished, _ = wait(unsaved, return_when=FIRST_COMPLETED)
            failed = [future for future in finished if future.exception() is not None]
            for future in finished - set(failed):
                unsaved.discard(future)  # before save: one interrupted there is not saved twice
                save(future.result())
            unsaved -= set(failed)
            if failed:
                failed[0].result()  # raises its error
    except BaseException:
        save_the_rest(unsaved, save)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def save_the_rest(futures: set, save: Any) -> None:
    """After an error: wait for the prompts in flight and save those that succeed (their own errors are dropped:
    the first error is the one reported)."""
    if not futures:
        return
    log.warning("distill: stopping; waiting for the %d prompt(s) in flight to finish and saving them "
                "(Ctrl-C again: they are not saved)", len(futures))
    for future in wait(futures).done:
        if not future.cancelled() and future.exception() is None:
            save(future.result())


def task_report(entries: list[dict]) -> dict[str, dict[str, Any]]:
    """Per task: prompts, generated, verified (first turn / after revision), revised, rejected, kept, s/sample."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in entries:
        row = rows.setdefault(entry["task"], {"verifier": entry["verifier"], "prompts": 0, "generated": 0,
                                              "verified": 0, "verified_first_turn": 0, "revised": 0,
                                              "revised_verified": 0, "rejected": 0, "dropped": 0, "kept": 0,
                                              "seconds": 0.0})
        row["prompts"] += 1
        row["seconds"] += entry["seconds"]
        row["kept"] += len(entry["kept"])
        for attempt in entry["attempts"]:
            row["generated"] += 1
            row["verified"] += attempt["verified"]
            row["verified_first_turn"] += attempt["turns"][0]["ok"]
            row["revised"] += attempt["revised"]
            row["revised_verified"] += attempt["revised"] and attempt["verified"]
            row["rejected"] += not attempt["verified"]
            row["dropped"] += sum("dropped" in turn for turn in attempt["turns"])
    for row in rows.values():
        row["seconds_per_sample"] = round(row["seconds"] / max(row["generated"], 1), 3)
        row["seconds"] = round(row["seconds"], 2)
    return dict(sorted(rows.items()))


def model_files(cfg: DistilleryConfig) -> list[Path]:
    """A local teacher: its GGUF, or its HF directory's describing files (core/models.local_model_files)."""
    teacher = cfg.distill.teacher
    return local_model_files(teacher.path) if cfg.distill.enabled and teacher.kind in ("gguf", "hf") else []


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.distill
    if not cfg.enabled:
        raise UserError("distill is switched off (distill.enabled: false), so format would not use its traces. "
                        "Run it with --set distill.enabled=true (and the same for format/finetune), or set it in the config.")
    records = list(read_jsonl(ctx.upstream("ingest", "train")))
    prompts, skipped = select_prompts(records, cfg)
    if not prompts:
        raise UserError(f"distill: no ingest train record has a task in distill.tasks ({', '.join(cfg.tasks)}) and what "
                        f"its verifier needs{f' (skipped: {skipped})' if skipped else ''}. Add a MathQA or CodeI/O "
                        "source, or map your task to a verifier in distill.tasks.")
    progress_path = ctx.out / PROGRESS  # kept by the runner through a kill or a UserError: the rerun resumes
    done = {entry["id"]: entry for entry in load_progress(progress_path)
            if not cfg.logprobs or "logprobs" in entry}  # a prompt finished without log-probs is asked again
    todo = [r for r in prompts if r["id"] not in done]
    if done:
        ctx.console.print(f"distill: resuming, {len(prompts) - len(todo)} of {len(prompts)} prompts already done.")
    if todo:
        if any(cfg.tasks.get(r["task"]) == "codeio_input" for r in todo):
            check_isolation(Limits.from_config(cfg.sandbox))  # before the teacher is asked anything
        teacher = build_teacher(cfg.teacher, cfg.retries)
        try:
            scorer = build_scorer(ctx, teacher) if cfg.logprobs else None
            run_prompts(todo, ctx, teacher, Limits.from_config(cfg.sandbox), progress_path, scorer)
        finally:
            teacher.close()
    entries = {entry["id"]: entry for entry in load_progress(progress_path)}  # the last line of a prompt wins
    lost = [r["id"] for r in prompts if r["id"] not in entries]
    if lost:
        raise UserError(f"distill: {progress_path} lost the answers of {len(lost)} prompt(s) during this run (record "
                        f"{lost[0]}): it was changed while distill wrote it. Run distill again: it asks those again.")
    ordered = [entries[r["id"]] for r in prompts]
    refuse_if_nothing_usable(ordered, progress_path)
    return finish(ctx, ordered, skipped)


def build_scorer(ctx: StageContext, teacher: Any) -> Any:
    """Scores kept traces with the teacher in the student's token ids; refuses a teacher of another vocabulary."""
    from transformers import AutoTokenizer

    from distillery.core.models import resolve_model_path
    from distillery.reasoning.teacher_logprobs import Scorer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ctx.cfg.model.path),
                                              trust_remote_code=ctx.cfg.model.trust_remote_code)
    return Scorer(teacher, tokenizer, ctx.cfg.distill.logprobs)


def unscored_kind(reason: str) -> str:
    """The kind of a reason a trace has no log-probs, for counting: its words before ': ', numbers as N (the
    report keeps one count and one whole example per kind, not one count per trace)."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", reason.split(": ")[0])


def write_logprobs(path: Path, entries: list[dict], k: int, teacher: str | None) -> dict[str, Any]:
    """The sidecar beside train.jsonl: record i's top-k rows are offsets[i]:offsets[i+1]; returns its summary."""
    from distillery.core.topk import TopK, bytes_per_token, save_sequences

    stored = [scored for entry in entries for scored in entry.get("logprobs") or [None] * len(entry["kept"])]
    sequences = [TopK.decode(s) if s and "unscored" not in s else None for s in stored]
    reasons = [s["unscored"] for s in stored if s and "unscored" in s]
    unscored = Counter(unscored_kind(reason) for reason in reasons)
    examples = {unscored_kind(reason): reason[:300] for reason in reversed(reasons)}  # the first of each kind
    save_sequences(path, sequences, {"k": k, "teacher": teacher})
    tokens = sum(len(s.tokens) for s in sequences if s is not None)
    return {"k": k, "records": sum(s is not None for s in sequences), "unscored": dict(unscored),
            "unscored_examples": examples, "tokens": tokens,
            "bytes": path.stat().st_size, "bytes_per_token": bytes_per_token(k)}


def build_teacher(cfg: TeacherConfig, retries: int) -> Any:
    """The teacher distill.teacher describes (distillery/reasoning/teachers.py)."""
    from distillery.core.models import resolve_model_path
    from distillery.reasoning.teachers import GGUFTeacher, HFTeacher, OpenAITeacher, resolve_gguf_path

    if cfg.kind == "gguf":
        return GGUFTeacher(resolve_gguf_path(cfg.path), cfg.context_length)
    if cfg.kind == "hf":
        return HFTeacher(resolve_model_path(cfg.path, "distill.teacher.path"))
    url, model = openai_location(cfg)
    if not url or not model:
        missing = "url (or $OPENAI_BASE_URL)" if not url else "model (or $OPENAI_MODEL)"
        raise UserError(f"distill.teacher: kind openai needs {missing}, e.g. --set distill.teacher.url=http://localhost:8000/v1")
    return OpenAITeacher(url, model, cfg.api_key_env, cfg.timeout_s, retries, cfg.max_retry_wait_s)


def openai_location(cfg: TeacherConfig) -> tuple[str | None, str | None]:
    """An openai teacher's base URL and model: the config's, else $OPENAI_BASE_URL and $OPENAI_MODEL."""
    return cfg.url or os.environ.get("OPENAI_BASE_URL"), cfg.model or os.environ.get("OPENAI_MODEL")


def teacher_environment(cfg: DistilleryConfig) -> dict[str, str | None]:
    """The teacher location taken from the environment (never the key), for the fingerprint: switching the teacher
    through $OPENAI_BASE_URL or $OPENAI_MODEL redoes distill, as switching it in the config does. A variable the
    config leaves to the environment but that is unset now is None (the runner keeps the value distill ran with)."""
    teacher = cfg.distill.teacher
    if teacher.kind != "openai":
        return {}
    url, model = openai_location(teacher)
    taken: dict[str, str | None] = {}
    if not teacher.url:
        taken["OPENAI_BASE_URL"] = shown_url(url) or None
    if not teacher.model:
        taken["OPENAI_MODEL"] = model or None
    return taken


def shown_url(url: str | None) -> str | None:
    """`url` as manifest.json may store it: no user:password@, and a query string (which can carry a key) only as
    its digest."""
    import hashlib
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))
    return f"{shown} (query sha256:{hashlib.sha256(parts.query.encode()).hexdigest()[:12]})" if parts.query else shown


def dropped_replies(entries: list[dict]) -> dict[str, dict[str, Any]]:
    """Teacher replies without usable text, by reason: how many, and the detail of the first."""
    dropped: dict[str, dict[str, Any]] = {}
    for turn in (t for entry in entries for attempt in entry["attempts"] for t in attempt["turns"]):
        if "dropped" in turn:
            reason = dropped.setdefault(turn["dropped"], {"replies": 0, "example": turn["dropped_detail"]})
            reason["replies"] += 1
    return dropped


def describe_dropped(dropped: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{d['replies']} {reason} (e.g. {d['example']})" for reason, d in dropped.items())


def refuse_if_nothing_usable(entries: list[dict], progress_path: Path) -> None:
    """A teacher that gave no usable text at all is a setup mistake (wrong model, a server's reasoning parser,
    max_tokens used up before the answer), not a run with 0 records; its replies are not kept to resume from."""
    replies = sum(len(attempt["turns"]) for entry in entries for attempt in entry["attempts"])
    dropped = dropped_replies(entries)
    if replies and sum(d["replies"] for d in dropped.values()) == replies:
        progress_path.unlink(missing_ok=True)
        raise UserError(f"distill: teacher {entries[0]['teacher']} gave no usable text in any of its {replies} "
                        f"replies: {describe_dropped(dropped)}. Check that distill.teacher names a chat model that "
                        "answers in choices[0].message.content, with distill.max_tokens room for the answer; "
                        "nothing was written, a rerun asks again.")


def finish(ctx: StageContext, entries: list[dict], skipped: dict[str, int]) -> StageResult:
    kept = [record for entry in entries for record in entry["kept"]]
    write_jsonl(ctx.out / OUTPUTS["train"], kept)
    write_jsonl(ctx.out / OUTPUTS["traces"], traces(entries))
    rows = task_report(entries)
    dropped = dropped_replies(entries)
    teacher = entries[0]["teacher"] if entries else None
    report = {"teacher": teacher, "keep": ctx.cfg.distill.keep,
              "samples_per_prompt": ctx.cfg.distill.samples_per_prompt, "revise": ctx.cfg.distill.revise,
              "tasks": rows, "skipped": skipped, "dropped": dropped, "train_records": len(kept)}
    if ctx.cfg.distill.logprobs:
        report["logprobs"] = write_logprobs(ctx.out / OUTPUTS["logprobs"], entries, ctx.cfg.distill.logprobs, teacher)
    (ctx.out / OUTPUTS["report"]).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (ctx.out / OUTPUTS["report_md"]).write_text(render_report(report), encoding="utf-8")
    save_report_plot(rows, ctx.out / OUTPUTS["report_plot"])
    ctx.console.print(summary_table("distill report", table_rows(rows), HEADERS))
    if dropped:  # the detail quotes the teacher's server: '[/INST]' in it is text, not markup
        ctx.console.print(f"[yellow]distill: teacher replies without usable text, dropped[/]: "
                          f"{printable(describe_dropped(dropped))}.")
    if "logprobs" in report:
        ctx.console.print(logprobs_line(report["logprobs"]))
    (ctx.out / PROGRESS).unlink()  # last: the rerun of a stage that failed before here resumes from it
    generated = sum(r["generated"] for r in rows.values())
    verified = sum(r["verified"] for r in rows.values())
    replies_dropped = sum(d["replies"] for d in dropped.values())
    summary = [("verified", f"{verified}/{generated}"), ("kept", str(len(kept))), ("prompts", str(len(entries)))]
    if replies_dropped:
        summary.append(("dropped replies", ", ".join(f"{d['replies']} {reason}" for reason, d in dropped.items())))
    return StageResult(
        metrics={"prompts": len(entries), "generated": generated, "verified": verified, "train_records": len(kept),
                 "dropped_replies": replies_dropped},
        summary=summary,
    )


def logprobs_line(lp: dict) -> str:
    unscored = ", ".join(f"{n} {why}" for why, n in lp["unscored"].items())
    return (f"teacher top-{lp['k']} log-probs: {lp['records']} records, {lp['tokens']:,} tokens, {lp['bytes']:,} bytes "
            f"({lp['bytes_per_token']} per token)" + (f"; without (cross-entropy only): {unscored}" if unscored else "") + ".")


def traces(entries: list[dict]) -> Iterator[dict]:
    """One line per sample: the prompt id, its task, and every turn with its verdict."""
    for entry in entries:
        for attempt in entry["attempts"]:
            yield {"id": entry["id"], "task": entry["task"], "verifier": entry["verifier"], "teacher": entry["teacher"],
                   **attempt}


HEADERS = ("task", "prompts", "generated", "verified", "1st turn", "revised (fixed)", "rejected", "dropped", "kept",
           "s/sample")


def table_rows(rows: dict[str, dict]) -> list[tuple[str, ...]]:
    return [(task, str(r["prompts"]), str(r["generated"]), str(r["verified"]), str(r["verified_first_turn"]),
             f"{r['revised']} ({r['revised_verified']})", str(r["rejected"]), str(r["dropped"]), str(r["kept"]),
             f"{r['seconds_per_sample']:.2f}") for task, r in rows.items()]


def render_report(report: dict) -> str:
    lines = [f"# Distill report (teacher {report['teacher']}, keep {report['keep']}, K={report['samples_per_prompt']}, "
             f"revise {report['revise']})", "", *markdown_table(HEADERS, table_rows(report["tasks"]))]
    lines += ["", f"{report['train_records']} training records in train.jsonl; every attempt with its verdicts in "
              "traces.jsonl."]
    if report["skipped"]:
        lines += ["", "Skipped (cannot be checked): " + ", ".join(f"{n} {why}" for why, n in report["skipped"].items())]
    if report["dropped"]:
        lines += ["", f"Teacher replies without usable text, dropped: {describe_dropped(report['dropped'])}."]
    if "logprobs" in report:
        lines += ["", logprobs_line(report["logprobs"]).replace("teacher top", "Teacher top", 1)]
    return "\n".join(lines) + "\n"


def save_report_plot(rows: dict[str, dict], path: Path) -> None:
    tasks = list(rows) or ["(none)"]
    first = [rows[t]["verified_first_turn"] if t in rows else 0 for t in tasks]
    fixed = [rows[t]["revised_verified"] if t in rows else 0 for t in tasks]
    rejected = [rows[t]["rejected"] if t in rows else 0 for t in tasks]
    with figure(path, (6, 3.5)) as (fig, ax):
        ax.bar(tasks, first, color="#6acc64", label="verified, first turn")
        ax.bar(tasks, fixed, bottom=first, color="#4878d0", label="verified after revision")
        ax.bar(tasks, rejected, bottom=[a + b for a, b in zip(first, fixed)], color="#d65f5f", label="rejected")
        ax.set_ylabel("samples")
        ax.set_title("Teacher samples by verdict")
        ax.legend()


STAGE = Stage(name="distill", run=run, outputs=OUTPUTS, sections=("model", "distill"), upstream=("ingest",),
              packages=("llama-cpp-python", "transformers", "httpx", "math-verify", "latex2sympy2_extended", "sympy"),
              resumable=True, environment=teacher_environment, model_files=model_files,
              operational=("distill.concurrency", "distill.retries", "distill.teacher.timeout_s",
                           "distill.teacher.max_retry_wait_s", "distill.teacher.api_key_env"))
