"""The run directory, the contract between stages:

    runs/<name>/config.yaml      resolved config, secrets removed
    runs/<name>/manifest.json    per stage: status, fingerprint, inputs, outputs with sha256, metrics, timings
    runs/<name>/<stage>/...      each stage's artifacts and a human-readable report
    runs/<name>/logs/<stage>.log the full traceback of a stage that failed with an unexpected error

A stage writes into `runs/<name>/.<stage>.partial/`; only a finished stage is renamed into place, so a
later stage never reads a half-written artifact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from distillery.core.errors import UserError
from distillery.core.machine import current_umask

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hex sha256 of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` (without importing them); 'absent' where not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it over `path`; with the permissions a file the
    user makes gets (mkstemp's are the owner's alone: a shared run's manifest.json was unreadable to the group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def same_file(handle: int, path: Path) -> bool:
    """Whether the open file `handle` is what `path` names now (not one removed, or replaced, since it was opened)."""
    try:
        named = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(handle)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def describe_outputs(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under `directory` with its size, mtime and sha256, keyed by relative path."""
    outputs = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        outputs[str(path.relative_to(directory))] = {
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": sha256_file(path),
        }
    return outputs


def unwritable(path: Path, reason: str) -> UserError:
    return UserError(f"cannot write the run directory {path} ({reason}): set run.root to a directory you can write "
                     "to.")


class RunDir:
    """One run's directory and its manifest."""

    def __init__(self, root: Path | str, name: str):
        self.path = Path(root) / name
        self.manifest_path = self.path / "manifest.json"

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The run directory held by this process while it runs stages in it: a second distillery command on the
        same run (another terminal, a scheduler's retry) would delete the partial directory this one writes, or
        publish its own over it. A flock on the directory itself: the kernel lets go when the process ends, however
        it ends, so no stale lock is ever left; a run directory this made is removed again if nothing was written."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # deepest first
        handle = self.locked_directory()
        claimed = False
        try:
            claimed = self.claim()
            yield
        finally:
            # only while empty, and only by the holder of the lock, before letting go of it: a command refused
            # because another one holds the run must not remove the directory that one has just made, and one that
            # takes the lock next must find the directory it locked
            with contextlib.suppress(OSError, UserError):
                if claimed and os.listdir(self.path) == [self.manifest_path.name] and not self.load_manifest()["stages"]:
                    self.manifest_path.unlink()
                for directory in created:
                    directory.rmdir()
            os.close(handle)

    def locked_directory(self) -> int:
        """The run directory, made if needed, opened and flocked; refused when another command holds it. A directory
        its holder removed while this one waited for it (an empty run it had made) is made and locked again."""
        import fcntl

        for _ in range(5):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                handle = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileExistsError:  # a file where the directory goes, or a link to nothing
                if self.path.is_symlink():
                    raise UserError(f"the run directory {self.path} is a symbolic link to {os.readlink(self.path)}, "
                                    "which does not exist: make that folder, or remove the link.") from None
                if os.path.lexists(self.path):
                    raise unwritable(self.path, os.strerror(errno.ENOTDIR)) from None
                continue  # made and removed again by another command meanwhile
            except FileNotFoundError:  # removed by another command between mkdir and open
                continue
            except OSError as err:
                raise unwritable(self.path, err.strerror or str(err)) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                raise UserError(f"the run directory {self.path} is in use by another distillery command, still "
                                "running: wait for it to finish, or give this one a run of its own "
                                "(--set run.name=...).") from None
            if same_file(handle, self.path):
                return handle
            os.close(handle)  # locked a directory that is gone: its holder removed it before letting go
        raise UserError(f"the run directory {self.path} keeps being made and removed by other distillery commands: "
                        "run this one again when they are done.")

    def claim(self) -> bool:
        """Mark the directory as a run (an empty manifest) before anything is written into it; True when this did.
        A directory that holds files but no manifest is not a run: its `ingest/` or `config.yaml` would be replaced
        (a run.name that names a folder of the user's own)."""
        outer = self.enclosing_run()
        if outer is not None:
            raise UserError(f"run.name/run.root: {self.path} lies inside the run {outer}, whose stages replace their "
                            "folders (and would delete this run). Set run.root to a directory outside it.")
        if self.manifest_path.exists():
            self.load_manifest()  # one Distillery wrote, or the user hears what it is
            return False
        if any(self.path.iterdir()):
            raise UserError(f"run.name/run.root: {self.path} already holds files and is not a Distillery run (it has "
                            "no manifest.json): a run there would replace them. Set run.name or run.root to a new "
                            "or empty directory.")
        try:
            atomic_write_text(self.manifest_path, json.dumps({"stages": {}}) + "\n")
        except OSError as err:
            raise unwritable(self.path, err.strerror or str(err)) from None
        return True

    def enclosing_run(self) -> Path | None:
        """The run directory this one lies inside, if any (a folder above it with a run's manifest)."""
        for parent in self.path.resolve().parents:
            if is_run_manifest(parent / "manifest.json"):
                return parent
        return None

    def stage_dir(self, stage: str) -> Path:
        """Where a finished stage's artifacts live."""
        return self.path / stage

    def partial_dir(self, stage: str) -> Path:
        """Where a stage writes while it runs (kept across a kill only for resumable stages)."""
        return self.path / f".{stage}.partial"

    def load_manifest(self) -> dict[str, Any]:
        """The manifest; one that is not a Distillery run's (another program's manifest.json, a damaged file) is a
        UserError naming it."""
        if not os.path.lexists(self.manifest_path):
            return {"stages": {}}
        if not self.manifest_path.is_file():  # a folder there made a run of any folder, and its files went
            raise self.not_a_run("it is not a file (a folder, a device or a broken link)")
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise self.not_a_run(f"it cannot be read as JSON: {type(err).__name__}") from None
        if not run_manifest_shape(manifest):
            raise self.not_a_run("it is not one Distillery wrote: no \"stages\" object of stage entries")
        for stage, entry in manifest["stages"].items():
            if (problem := entry_problem(entry)) is not None:
                raise self.not_a_run(f"the entry of stage {stage!r} is damaged ({problem})")
        return manifest

    def not_a_run(self, why: str) -> UserError:
        return UserError(f"{self.manifest_path}: {why}. If {self.path} is a Distillery run, its manifest is damaged: "
                         "move the run aside and run the stages again in a new one; if it is a folder of yours, set "
                         "run.name or run.root to a new or empty directory.")

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.load_manifest()["stages"].get(stage)

    def update_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Replace a stage's manifest entry atomically."""
        manifest = self.load_manifest()
        manifest["stages"][stage] = entry
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    def log_path(self, step: str) -> Path:
        """runs/<name>/logs/<step>.log: where the full traceback of a failed stage or command goes."""
        return self.path / "logs" / f"{step}.log"

    def save_config(self, config_dump: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config_dump, allow_unicode=True, sort_keys=False))

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        """True when the stage finished with this fingerprint and its outputs are still as it left them."""
        entry = self.stage_entry(stage)
        if not entry or entry.get("status") != "complete" or entry.get("fingerprint") != fingerprint:
            return False
        return not self.changed_outputs(stage, entry)

    def changed_outputs(self, stage: str, entry: dict[str, Any] | None = None) -> list[str]:
        """The files the stage's manifest entry lists that are gone or no longer as it left them (relative paths).
        Size and modification time decide, except that a file whose time alone differs (a run directory copied or
        restored without its times: `cp -r`, `rsync -r`) is compared by its sha256; when that is the one recorded,
        its new time is recorded too, so that a copied run is hashed once, not redone. `entry`: the stage's manifest
        entry when the caller has it."""
        entry = entry if entry is not None else self.stage_entry(stage) or {}
        directory, changed, retimed = self.stage_dir(stage), [], {}
        for rel, info in entry.get("outputs", {}).items():
            path = directory / rel
            stat = path.stat() if path.is_file() else None
            if stat is None or stat.st_size != info["bytes"]:
                changed.append(rel)
            elif stat.st_mtime_ns != info["mtime_ns"]:
                if sha256_file(path) != info["sha256"]:
                    changed.append(rel)
                else:
                    retimed[rel] = {**info, "mtime_ns": stat.st_mtime_ns}
        if retimed and not changed:  # bookkeeping only: a read-only run is still up to date
            with contextlib.suppress(OSError):
                self.update_stage(stage, {**entry, "outputs": {**entry["outputs"], **retimed}})
        return changed

    def replaced_dir(self, stage: str) -> Path:
        """Where a stage's previous artifacts go while its new ones are moved into place (`publish`)."""
        return self.path / f".{stage}.old"

    def remove_replaced(self, stage: str) -> None:
        """The previous artifacts a `publish` could not remove (a folder in them made read-only): named, with the
        fix, before the stage runs again; the run directory itself is writable."""
        replaced = self.replaced_dir(stage)
        try:
            remove_path(replaced)
        except OSError as err:
            raise UserError(f"{replaced} holds the artifacts {stage} replaced last time, and it cannot be removed "
                            f"({err.strerror or err}): make it writable and remove it (`chmod -R u+w {replaced} && "
                            f"rm -rf {replaced}`), then run the command again.") from None

    def publish(self, stage: str) -> Path:
        """Move the partial directory into place, replacing the previous artifacts only now that it is done. What
        stood there goes; a symbolic link put there goes as a link (what it points to is not the run's). Previous
        artifacts that cannot be removed stay aside, with a warning: the new ones are in place."""
        final, partial, replaced = self.stage_dir(stage), self.partial_dir(stage), self.replaced_dir(stage)
        self.remove_replaced(stage)
        try:
            if os.path.lexists(final):
                os.replace(final, replaced)
            os.replace(partial, final)
        except OSError as err:
            raise unwritable(self.path, err.strerror or str(err)) from None
        try:
            remove_path(replaced)
        except OSError as err:
            log.warning("%s: the artifacts it replaced are left in %s, which cannot be removed (%s); remove it "
                        "(`chmod -R u+w %s && rm -rf %s`)", stage, replaced, err.strerror or err, replaced, replaced)
        return final

    def real_subdir(self, name: str) -> Path:
        """runs/<name>/<name>, a directory of the run's own, made if missing: one that is a symbolic link (to a
        folder of the user's, whose files writing there would replace) is refused."""
        directory = self.path / name
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise UserError(f"{directory} is not a directory of the run (a symbolic link or a file): Distillery writes "
                            "only inside the run directory. Remove it (a link's target is kept) and run the command "
                            "again.")
        directory.mkdir(parents=True, exist_ok=True)
        return directory


def remove_path(path: Path) -> None:
    """Remove a file, a symbolic link (not what it points to) or a directory tree; nothing there is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def run_manifest_shape(manifest: Any) -> bool:
    """Whether a parsed manifest.json is a Distillery run's: {"stages": {stage: {...}}}."""
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    return isinstance(stages, dict) and all(isinstance(entry, dict) for entry in stages.values())


class OutputRecord(BaseModel):
    """A file a stage wrote, as its manifest entry lists it."""

    model_config = ConfigDict(extra="allow")
    bytes: int
    mtime_ns: int
    sha256: str


class RecordedInputs(BaseModel):
    """What a stage's fingerprint was made of (`runner.fingerprint`); only the parts read back are typed."""

    model_config = ConfigDict(extra="allow")
    config: dict[str, Any] = {}
    upstream: dict[str, str] = {}
    upstream_outputs: dict[str, str] | None = None
    environment: dict[str, str] = {}
    also_reads: dict[str, Any] | None = None


class StageRecord(BaseModel):
    """A stage's manifest entry, or the attempt kept under a finished one: the fields the runner, push and the
    reports read, with the types they read them as (a hand-edited `"outputs": "x"` is a damaged manifest, not an
    AttributeError); a status or fingerprint of another type only makes the stage run again."""

    model_config = ConfigDict(extra="allow")
    inputs: RecordedInputs = RecordedInputs()
    outputs: dict[str, OutputRecord] = {}
    metrics: dict[str, Any] = {}
    summary: list[tuple[Any, Any]] = []
    started: str = ""
    finished: str = ""


class AttemptRecord(StageRecord):
    status: Any  # what the messages about an unfinished attempt name


class StageEntry(StageRecord):
    attempt: AttemptRecord = None  # type: ignore[assignment]  # absent unless an attempt after it did not finish


def entry_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a stage's manifest entry, in one line (the first field pydantic finds), or None."""
    try:
        StageEntry.model_validate(entry)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "the entry"
        return f"{field}: {first['msg'].split(' or instance of ')[0]}"
    return None


def is_run_manifest(path: Path) -> bool:
    try:
        return path.is_file() and run_manifest_shape(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
