"""Stage order, fingerprints, and running a stage with its prerequisites.

A stage's fingerprint hashes its whole config sections, the run seed, its external input files, its
upstream stages' fingerprints, the package versions that matter and the settings it takes
from the environment (distill: a teacher located by $OPENAI_BASE_URL / $OPENAI_MODEL). A stage whose fingerprint and
outputs are unchanged, and whose upstream stages' files are those it last read, is skipped ("up to date");
`force` redoes it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import hashlib
import os
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from stat import S_ISREG
from typing import Any

from distillery.config import DistilleryConfig, redact
from distillery.core.console import console
from distillery.core.errors import StageFailed, UserError, interrupts_held, storage_refusal
from distillery.core.userinput import is_usable_file, path_exists
from distillery.core.rundir import (RunDir, atomic_write_text, describe_outputs, is_run_manifest, package_versions,
                                    remove_path, sha256_file, sha256_json, unwritable)
from distillery.stage import STAGES, Stage, StageContext, StageResult, load_stage

log = logging.getLogger(__name__)


def pipeline_stages(cfg: DistilleryConfig) -> list[str]:
    """The stages `distillery run` runs: every one whose config section is not switched off."""
    return [name for name in STAGES if getattr(getattr(cfg, name, None), "enabled", True)]


def plan(target: str, cfg: DistilleryConfig) -> list[str]:
    """The stages to run for `target`: its upstream chain in pipeline order, then itself."""
    needed: list[str] = []

    def visit(name: str) -> None:
        for upstream in load_stage(name).upstream_of(cfg):
            visit(upstream)
        if name not in needed:
            needed.append(name)

    visit(target)
    return sorted(needed, key=STAGES.index)


def fingerprint(stage: Stage, cfg: DistilleryConfig, run: RunDir) -> tuple[str, dict]:
    """The stage's fingerprint and the inputs it was computed from (stored in the manifest). `upstream_outputs`
    (what each upstream stage wrote) is stored beside them, outside the fingerprint: runs made before it was
    recorded keep their fingerprints."""
    dump = cfg.model_dump(mode="json")
    upstream, upstream_outputs = {}, {}
    for name in stage.upstream_of(cfg):
        entry = run.stage_entry(name)
        if not entry or entry.get("status") != "complete":
            raise UserError(f"stage {stage.name} needs {name} first: run `distillery {name}`.")
        upstream[name], upstream_outputs[name] = entry["fingerprint"], outputs_digest(entry)
    inputs = {
        "config": {**without_operational({section: dump[section] for section in stage.sections}, stage.operational_of(cfg)),
                   **also_read(stage, dump)},
        "seed": cfg.run.seed,
        "upstream": upstream,
        "files": {str(path): input_digest(path) for path in [*stage.input_files(cfg), *stage.model_files(cfg)]},
        "packages": package_versions(stage.packages),
    }
    environment = known_environment(stage.environment(cfg), run.stage_entry(stage.name) or {})
    if environment:  # only then: every other fingerprint stays as it was
        inputs["environment"] = environment
    return sha256_json(inputs), {**inputs, "upstream_outputs": upstream_outputs}


def input_digest(path: Path) -> str:
    """sha256 of a file the stage reads; one it cannot read (its permissions, a device that fails) is the user's,
    and so is one that is not a regular file: a pipe blocked the hash (holding the run) and /dev/zero never ended."""
    if path_exists(path) and not is_usable_file(path):
        raise UserError(f"{path} is not a regular file (a pipe, a device or a folder): point the setting at a file.")
    try:
        stat = path.stat()
        return file_digest(str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}): check the file and its permissions, or take "
                        "it out of the config.") from None


# Over this, an input file is known by its size, modification time and first and last 16 MiB: a teacher GGUF of tens
# of GB hashed whole at every command would take minutes; one copied over it or rewritten changes one of them.
LARGE_INPUT_BYTES = 1 << 30
SAMPLED_BYTES = 16 << 20


@functools.lru_cache(maxsize=4096)
def file_digest(path: str, *identity: int) -> str:
    """sha256_file, once in a process for a file as it stands (device, inode, size, modification and change
    times): push asks whether export's chain and then evaluate's are up to date, and they share the data files."""
    size, modified = identity[2], identity[3]
    if size <= LARGE_INPUT_BYTES:
        return sha256_file(Path(path))
    digest = hashlib.sha256(f"{size}:{modified}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLED_BYTES))
        handle.seek(max(size - SAMPLED_BYTES, 0))
        digest.update(handle.read(SAMPLED_BYTES))
    return "sampled:" + digest.hexdigest()


def without_operational(sections: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The config sections less the stage's operational settings (`Stage.operational`, dotted keys)."""
    sections = copy.deepcopy(sections)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        holder = lookup(sections, parent) if parent else sections
        if isinstance(holder, dict):  # a recorded config may lack a section (changed_only compares old entries)
            holder.pop(leaf, None)
    return sections


def also_read(stage: Stage, dump: dict[str, Any]) -> dict[str, Any]:
    """The values of the stage's `also_reads` settings (dotted keys outside its sections)."""
    return {key: setting(dump, key) for key in stage.also_reads}


def setting(dump: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of the config dump (the dump itself for "")."""
    for part in filter(None, key.split(".")):
        dump = dump[part]
    return dump


def recorded_fingerprint(stage: Stage, cfg: DistilleryConfig, run: RunDir, fp: str, inputs: dict) -> str:
    """`fp`, or the fingerprint an entry recorded by an older version that counted other things, when what it
    counted is what this one reads: its recorded inputs (which hash to it) equal the current ones but for settings
    this version leaves out (`operational`), settings it has added (`also_reads`) and the local models' describing
    files it has added (`model_files`). Such a run stays up to date, and so do the stages below it, whose
    fingerprints hold this one: an upgrade never retrains a model. The added values it is accepted with are kept
    in the entry: changing one later makes it out of date. Any other file new since (a data file put into a source's
    folder, an `against` glob matching one more) makes the stage out of date."""
    entry = run.stage_entry(stage.name) or {}
    recorded, kept = entry.get("fingerprint"), entry.get("inputs")
    if recorded in (None, fp) or not isinstance(kept, dict):
        return fp
    counted = {key: value for key, value in kept.items() if key not in BOOKKEEPING}
    if sha256_json(counted) != recorded or set(counted) - {"config", "files"} != set(inputs) - {"config", "files",
                                                                                                "upstream_outputs"}:
        return fp
    if any(counted[key] != inputs[key] for key in counted if key not in ("config", "files")):
        return fp
    dump = cfg.model_dump(mode="json")
    if not isinstance(counted.get("config"), dict) or not same_reading(stage, stage.operational_of(cfg),
                                                                          counted["config"], dump):
        return fp
    files = counted.get("files") if isinstance(counted.get("files"), dict) else {}
    if any(inputs["files"].get(path) != digest for path, digest in files.items()):
        return fp
    new, model = set(inputs["files"]) - set(files), {str(path) for path in stage.model_files(cfg)}
    if new - model or (new and model & set(files)):  # a version that counted model files counted them all
        return fp
    added = {"also_reads": {key: value for key, value in also_read(stage, dump).items() if key not in counted["config"]},
             "files_since": {path: digest for path, digest in inputs["files"].items() if path not in files}}
    missing = {key: value for key, value in added.items() if kept.get(key) is None}
    if missing:  # kept from the first acceptance on, each on its own (an entry may hold one from an older version)
        with contextlib.suppress(OSError):  # bookkeeping: a read-only run is still up to date
            run.update_stage(stage.name, {**entry, "inputs": {**kept, **missing}})
    return recorded if all(kept.get(key) in (None, added[key]) for key in added) else fp


# What the runner writes into an entry's inputs beside what it fingerprinted.
BOOKKEEPING = ("upstream_outputs", "also_reads", "files_since")


def same_reading(stage: Stage, operational: tuple[str, ...], recorded: dict[str, Any], dump: dict[str, Any]) -> bool:
    """Whether a recorded config (the stage's sections, maybe with its also_reads keys) holds the values this
    version reads now, its operational settings left out of both."""
    sections = {name: value for name, value in recorded.items() if name in stage.sections}
    if set(sections) != set(stage.sections):
        return False
    now = {section: dump[section] for section in stage.sections}
    if without_operational(sections, operational) != without_operational(now, operational):
        return False
    return all(recorded[key] == setting(dump, key) for key in stage.also_reads if key in recorded)


def known_environment(environment: dict[str, str | None], previous: dict) -> dict[str, str]:
    """The stage's settings from environment variables; one unset now (None) keeps the value the stage last ran
    with: running `finetune` in a shell without $OPENAI_BASE_URL must not redo a finished distill."""
    recorded = previous.get("inputs", {}).get("environment", {})
    known = {name: value if value is not None else recorded.get(name) for name, value in environment.items()}
    return {name: value for name, value in known.items() if value is not None}


def outputs_digest(entry: dict) -> str:
    """One digest of every file a finished stage wrote (their sha256s, from its manifest entry)."""
    return sha256_json({rel: info["sha256"] for rel, info in entry.get("outputs", {}).items()})


def same_upstream_outputs(run: RunDir, entry: dict, inputs: dict) -> bool:
    """Whether the upstream stages' files are those the stage's last run read: `--force` on a stage whose outputs
    then differ (a retrained adapter) makes the stages below it out of date, not only a changed config. An entry
    written before the digests were kept: whether every upstream stage finished before it started."""
    recorded = entry.get("inputs", {}).get("upstream_outputs")
    if recorded is not None:
        return recorded == inputs["upstream_outputs"]
    started = entry.get("started", "")
    return all((run.stage_entry(name) or {}).get("finished", "~") <= started for name in inputs["upstream"])


def up_to_date(run: RunDir, name: str, fp: str, inputs: dict) -> bool:
    """Finished with this fingerprint, its outputs as it left them, its upstream files those it read. An entry
    from before the upstream digests were kept gets them now, so that a later forced upstream is noticed."""
    entry = run.stage_entry(name) or {}
    if not (run.is_complete(name, fp) and same_upstream_outputs(run, entry, inputs)):
        return False
    if "upstream_outputs" not in entry.get("inputs", {}):
        with contextlib.suppress(OSError):  # bookkeeping: a read-only run is still up to date
            run.update_stage(name, {**entry, "inputs": {**entry.get("inputs", {}),
                                                        "upstream_outputs": inputs["upstream_outputs"]}})
    return True


def first_out_of_date(target: str, cfg: DistilleryConfig) -> str | None:
    """The first stage of `target`'s chain, itself last, that `distillery <target>` would run again for this config
    (its settings, input files or packages changed, or an upstream stage's files), else None."""
    run = RunDir(cfg.run.root, cfg.run.name)
    for name in plan(target, cfg):
        stage = load_stage(name)
        try:
            fp, inputs = fingerprint(stage, cfg, run)
        except UserError:  # an upstream stage that has not finished
            return name
        if not up_to_date(run, name, recorded_fingerprint(stage, cfg, run, fp, inputs), inputs):
            return name
    return None


def run_stage(name: str, cfg: DistilleryConfig, force: bool = False) -> tuple[str, StageResult | None, float]:
    """Run one stage unless it is up to date; returns (status, result, seconds)."""
    stage = load_stage(name)
    run = RunDir(cfg.run.root, cfg.run.name)
    fp, inputs = fingerprint(stage, cfg, run)
    accepted = recorded_fingerprint(stage, cfg, run, fp, inputs)  # fp, or what a run recorded by an older version
    if not force and up_to_date(run, name, accepted, inputs) and not attempt_to_resume(stage, run, fp, accepted):
        entry = run.stage_entry(name) or {}
        # What a killed run left, or the partial directory of an attempt of another config, set aside below: with
        # its record gone it can never be resumed as that config, and the next run of this one that is not up to
        # date would take it for its own (another config's merge and checks, published as this one's).
        with contextlib.suppress(OSError):
            remove_path(run.partial_dir(name))
        console.print(f"[green]{name}[/]: up to date ({accepted[:12]}), nothing to do; --force redoes it."
                      + set_aside_attempt(run, name, entry))
        summary = [tuple(row) for row in entry.get("summary", [])]
        return "up to date", StageResult(metrics=entry.get("metrics", {}), summary=summary), 0.0

    partial = run.partial_dir(name)
    previous = last_attempt(run.stage_entry(name) or {})
    # a partial directory of another config, or of older upstream files (an export of the last adapter), is not resumed
    resumable = (stage.resumable and not force and previous.get("fingerprint") in (fp, accepted)
                 and same_upstream_outputs(run, previous, inputs))
    prepare_run_dir(run, name, keep=resumable, config_dump=redact(cfg.model_dump(mode="json")))
    started = time.time()
    save_entry(run, name, {"status": "running", "fingerprint": fp, "inputs": inputs, "started": _now()})
    console.rule(f"[bold]{name}")
    try:
        if not resumable and not force:
            carry_over_last_run(stage, cfg, run, inputs)
        result = stage.run(StageContext(cfg=cfg, run=run, out=partial, console=console, force=force))
        outputs = describe_outputs(partial)  # hashed before the interrupts are held (a 32B GGUF takes minutes)
        # inside the try: a disk that fills as the finished stage is recorded is the user's to free, as one while
        # it ran
        with interrupts_held():
            run.publish(name)
            run.update_stage(name, {
                "status": "complete",
                "fingerprint": fp,
                "inputs": inputs,
                "outputs": outputs,
                "metrics": result.metrics,
                "summary": [list(row) for row in result.summary],
                "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                "finished": _now(),
                "seconds": round(time.time() - started, 2),
            })
    except BaseException as err:
        failure = storage_failure(err, run)
        record_failure(run, stage, fp, inputs, failure)
        if failure is err:
            raise
        raise failure from None
    return "done", result, time.time() - started


def prepare_run_dir(run: RunDir, name: str, keep: bool, config_dump: dict) -> None:
    """The stage's partial directory (a leftover kept only to resume from) and the run's config.yaml; a run
    directory that cannot be written (no permission, a read-only disk) is the user's to fix."""
    partial = run.partial_dir(name)
    for folder in (run.stage_dir(name), partial):
        if is_run_manifest(folder / "manifest.json"):
            raise UserError(f"{folder} holds another Distillery run (its manifest.json), which this stage would "
                            f"replace: move that run out of {run.path} first.")
    run.remove_replaced(name)
    try:
        if os.path.lexists(partial) and not (keep and partial.is_dir() and not partial.is_symlink()):
            remove_path(partial)  # a leftover of another config (never resumed from), or a link: only the link goes
        partial.mkdir(parents=True, exist_ok=True)
        run.save_config(config_dump)
    except OSError as err:
        raise unwritable(run.path, err.strerror or str(err)) from None


def carry_over_last_run(stage: Stage, cfg: DistilleryConfig, run: RunDir, inputs: dict) -> None:
    """Start a fresh run of a stage with the files of its last finished run that stay valid: when the two differ
    only in the stage's `carries_over_when` settings, its files matching `carry_over` (`carried_files`) are
    hard-linked into the partial directory (nothing is copied; the stage replaces files, never writes into them)
    and the stage resumes from them. They are linked in a staging folder beside it and moved in a top folder at a
    time: a kill never leaves half of one (a merged model without its shards). Where links cannot be made, the
    stage starts from nothing, as before."""
    staging = run.path / f".{stage.name}.carrying"
    if os.path.lexists(staging):
        remove_path(staging)  # what a killed carry-over left
    entry, patterns = run.stage_entry(stage.name) or {}, stage.carry_over_of(cfg)
    changed = changed_only(entry.get("inputs", {}), inputs, stage.carries_over_when) \
        if patterns and entry.get("status") == "complete" else []
    last, partial = run.stage_dir(stage.name), run.partial_dir(stage.name)
    kept = carried_files(last, entry.get("outputs", {}), patterns) if changed else []
    if not kept:
        return
    try:
        for rel in kept:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(last / rel, staging / rel)
    except OSError as err:
        log.info("%s: the last run's files cannot be linked (%s); starting afresh", stage.name, err)
        remove_path(staging)
        return
    for top in sorted({rel.split("/", 1)[0] for rel in kept}):
        os.replace(staging / top, partial / top)
    remove_path(staging)
    console.print(f"[green]{stage.name}[/]: only {', '.join(changed)} changed since the last run: its "
                  f"{described(kept)} are kept.")


def carried_files(last: Path, outputs: dict[str, dict], patterns: tuple[str, ...]) -> list[str]:
    """The last run's files (as its manifest lists them) that match `patterns` and are as it left them, inside its
    directory. A pattern `folder/*` takes the folder whole or not at all: a merged model missing one shard is no
    merged model."""
    if last.is_symlink():
        return []
    matched = [rel for rel in outputs if inside(rel) and any(fnmatch.fnmatchcase(rel, p) for p in patterns)]
    good = {rel for rel in matched if unchanged(last, rel, outputs[rel])}
    for folder in (p[:-2] for p in patterns if p.endswith("/*")):
        members = {rel for rel in matched if rel.startswith(folder + "/")}
        if members - good:
            good -= members
    return sorted(good)


def changed_only(recorded: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """The `keys` (dotted, inside the config sections) whose values differ between two fingerprints' inputs, when
    everything else is equal (upstream files included); [] when anything else differs or none of them does."""
    def rest(inputs: dict) -> dict:
        return {**inputs, "config": without_operational(inputs.get("config", {}), keys)}

    if not recorded or rest(recorded) != rest(current):
        return []
    return [key for key in keys if lookup(recorded["config"], key) != lookup(current["config"], key)]


def lookup(sections: dict, key: str) -> Any:
    for part in key.split("."):
        sections = sections.get(part) if isinstance(sections, dict) else None
    return sections


def inside(rel: str) -> bool:
    """A manifest's output path that stays inside the stage's directory (the manifest is a file anyone can edit)."""
    path = PurePosixPath(rel)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in rel


def unchanged(last: Path, rel: str, info: dict) -> bool:
    """`last / rel` is a regular file reached through no link (a folder of the stage's moved elsewhere and linked
    back is not the run's), of the size and mtime the manifest recorded for it."""
    path = last / rel
    if os.path.realpath(path) != os.path.join(os.path.realpath(last), os.path.normpath(rel)):
        return False
    try:
        stat = path.lstat()
    except OSError:
        return False
    return S_ISREG(stat.st_mode) and stat.st_size == info.get("bytes") and stat.st_mtime_ns == info.get("mtime_ns")


def described(files: list[str]) -> str:
    """'merged/ (7 files), gguf/a.gguf, gguf/b.gguf': a folder of more than three files counted, other files named."""
    folders: dict[str, list[str]] = {}
    for rel in files:
        folders.setdefault(rel.split("/", 1)[0] if "/" in rel else "", []).append(rel)
    return ", ".join(f"{folder}/ ({len(names)} files)" if folder and len(names) > 3 else ", ".join(names)
                     for folder, names in folders.items())


def storage_failure(err: BaseException, run: RunDir) -> BaseException:
    """A disk or quota that filled up, a file-size limit or a read-only disk met while a stage wrote: a UserError
    saying which and what to do (the stage's partial files go, as for any failure); any other error as it is."""
    said = storage_refusal(err, f"under {run.path}")
    return UserError(said) if said else err


def record_failure(run: RunDir, stage: Stage, fp: str, inputs: dict, err: BaseException) -> None:
    """The manifest entry of a stage that did not finish: `interrupted` (Ctrl-C) or `failed`; an unexpected error
    is raised again as StageFailed, with the log that holds its traceback. A resumable stage keeps its partial
    directory on every failure (a CUDA out-of-memory error after hours of training must not cost the
    checkpoints): the same command resumes from it, and a changed config (its fingerprint) or --force discards
    it. A resumable stage deletes itself whatever must not be resumed from (export: a merge that failed its
    check)."""
    partial = run.partial_dir(stage.name)
    if not stage.resumable or (partial.is_dir() and not any(partial.iterdir())):  # nothing to resume from
        shutil.rmtree(partial, ignore_errors=True)
    entry = {"fingerprint": fp, "inputs": inputs}
    if isinstance(err, KeyboardInterrupt):
        save_entry(run, stage.name, {"status": "interrupted", **entry})
        return
    entry = {"status": "failed", **entry, "error": _short(err)}
    if isinstance(err, UserError) or not isinstance(err, Exception):
        save_entry(run, stage.name, entry)
        return
    log_path = write_failure_log(run, stage.name, err)
    save_entry(run, stage.name, {**entry, "log": log_path})
    raise StageFailed(stage.name, err, log_path) from err


def save_entry(run: RunDir, stage: str, attempt: dict) -> None:
    """Record an attempt that has not finished (running, failed, interrupted) in the manifest. Over a finished run
    of the stage it goes under `attempt`: the stage's directory still holds that run's files, so its entry stays
    (going back to the config that made them is up to date, not hours of training again). When even the manifest
    cannot be written, the error that ended the stage still counts."""
    previous = run.stage_entry(stage) or {}
    if previous.get("status") == "complete":
        attempt = {**{key: value for key, value in previous.items() if key != "attempt"}, "attempt": attempt}
    try:
        run.update_stage(stage, attempt)
    except OSError as err:
        log.warning("could not record %s as %s in %s: %s", stage, attempt["status"], run.manifest_path, err)


def attempt_to_resume(stage: Stage, run: RunDir, fp: str, accepted: str) -> bool:
    """A resumable stage's attempt of this same config that did not finish (a `--force` run that ran out of
    memory) and left work to go on from: the same command resumes it rather than call the stage up to date."""
    attempt = (run.stage_entry(stage.name) or {}).get("attempt", {})
    partial = run.partial_dir(stage.name)
    return (stage.resumable and attempt.get("fingerprint") in (fp, accepted) and partial.is_dir()
            and any(partial.iterdir()))


def set_aside_attempt(run: RunDir, name: str, entry: dict) -> str:
    """Drop the record of an attempt that did not finish from `entry`, the stage's entry found up to date (its files
    are this config's); what to say about it."""
    attempt = entry.pop("attempt", None)
    if attempt is None:
        return ""
    with contextlib.suppress(OSError):  # bookkeeping: a read-only run is still up to date
        run.update_stage(name, entry)
    return f" (the last attempt, {attempt['status']}, was set aside)"


def last_attempt(entry: dict) -> dict:
    """The stage's last attempt: one that did not finish after a finished run (`attempt`), else the entry."""
    return entry.get("attempt", entry)


def write_failure_log(run: RunDir | None, step: str, err: BaseException) -> str | None:
    """The full traceback of `err` in runs/<name>/logs/<step>.log, or in the cache's logs when there is no run
    (or its directory cannot be written); None when no log can be written at all (the CLI prints one line)."""
    import traceback

    from distillery.core.machine import cache_home

    text = f"{_now()} {step} failed\n\n" + "".join(traceback.format_exception(err))
    for place in ([run] if run else []) + [RunDir(cache_home(), "logs-outside-a-run")]:
        try:
            place.real_subdir("logs")  # never through a link into a folder of the user's
            atomic_write_text(place.log_path(step), text)
            return str(place.log_path(step))
        except (OSError, UserError):
            continue
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
