"""The run directory contract: exact contents, up-to-date reruns, --force, failures that leave nothing half-written."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable
from pathlib import Path

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.runner import first_out_of_date, plan, run_stage


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    rows = [chat(f"What is {i} + {i}?", f"{2 * i}") for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {"run": {"name": "t", "root": "runs"},
              "ingest": {"eval_fraction": 0.2,
                         "sources": [{"name": "toy", "kind": "hf", "files": "data.jsonl", "format": "messages"}]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp_path


def test_run_directory_contents_and_manifest(project: Path) -> None:
    status, result, _ = run_stage("ingest", load_config("config.yaml"))
    assert status == "done" and result.metrics["train"] + result.metrics["eval"] == 20
    run = project / "runs" / "t"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "ingest", "manifest.json"]
    assert sorted(p.name for p in (run / "ingest").iterdir()) == [
        "dropped.jsonl", "eval.jsonl", "report.json", "report.md", "train.jsonl"]
    entry = json.loads((run / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "complete" and len(entry["fingerprint"]) == 64
    assert set(entry["outputs"]) == {"dropped.jsonl", "eval.jsonl", "report.json", "report.md", "train.jsonl"}
    assert all(len(o["sha256"]) == 64 for o in entry["outputs"].values())
    assert str(Path("data.jsonl")) in entry["inputs"]["files"]


def test_rerun_is_a_noop_and_force_redoes(project: Path) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    train = project / "runs/t/ingest/train.jsonl"
    mtime = train.stat().st_mtime_ns
    assert run_stage("ingest", cfg)[0] == "up to date"
    assert train.stat().st_mtime_ns == mtime
    assert run_stage("ingest", cfg, force=True)[0] == "done"
    assert train.stat().st_mtime_ns != mtime


def test_changed_input_or_config_reruns(project: Path) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    with open(project / "data.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(chat("new?", "yes")) + "\n")
    assert run_stage("ingest", cfg)[0] == "done"
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.3"]))[0] == "done"


def test_first_out_of_date_names_the_stage_a_run_would_redo(project: Path) -> None:
    """What push asks before uploading an export: is it the one this config makes?"""
    cfg = load_config("config.yaml")
    assert first_out_of_date("ingest", cfg) == "ingest"  # never ran
    run_stage("ingest", cfg)
    assert first_out_of_date("ingest", cfg) is None
    assert first_out_of_date("format", cfg) == "format"
    assert first_out_of_date("format", load_config("config.yaml", ["ingest.eval_fraction=0.3"])) == "ingest"
    with open(project / "data.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(chat("new?", "yes")) + "\n")
    assert first_out_of_date("ingest", cfg) == "ingest"


def test_tampered_output_is_not_trusted(project: Path) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    (project / "runs/t/ingest/train.jsonl").write_text("", encoding="utf-8")
    assert run_stage("ingest", cfg)[0] == "done"


def test_a_run_copied_without_its_file_times_is_up_to_date_and_a_same_size_edit_is_not(project: Path) -> None:
    """`cp -r` or `rsync -r` gives every file a new modification time: the contents decide then (a copied run
    of a long finetune must not train again), and the new times are recorded (hashed once)."""
    import os
    import shutil

    run_stage("ingest", load_config("config.yaml"))
    shutil.copytree(project / "runs/t", project / "runs/copy", copy_function=shutil.copyfile)  # no times
    copied = load_config("config.yaml", ["run.name=copy"])
    train = project / "runs/copy/ingest/train.jsonl"
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))
    assert run_stage("ingest", copied)[0] == "up to date"
    recorded = json.loads((project / "runs/copy/manifest.json").read_text())["stages"]["ingest"]["outputs"]
    assert recorded["train.jsonl"]["mtime_ns"] == train.stat().st_mtime_ns
    text = train.read_text(encoding="utf-8")
    train.write_text(text.replace("What", "Wh4t", 1), encoding="utf-8")  # the same size, other bytes
    assert run_stage("ingest", copied)[0] == "done"


def test_failure_keeps_previous_artifacts_and_leaves_no_partial(project: Path) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    before = (project / "runs/t/ingest/train.jsonl").read_bytes()
    with open(project / "data.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(UserError, match="line 21"):
        run_stage("ingest", cfg)
    run = project / "runs/t"
    assert (run / "ingest/train.jsonl").read_bytes() == before
    assert not (run / ".ingest.partial").exists()
    entry = json.loads((run / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "complete" and entry["attempt"]["status"] == "failed"  # the files are the last run's
    assert "line 21" in entry["attempt"]["error"]


def test_a_failed_attempt_with_another_config_keeps_the_finished_run_up_to_date(project: Path) -> None:
    """Config A finished; config B failed. The manifest said `failed` with B's fingerprint although the stage's
    directory still held A's files, so going back to A redid the stage (for finetune: the training). A's entry now
    stays, B's attempt beside it; a first attempt that fails is still the entry itself."""
    cfg = load_config("config.yaml")
    assert run_stage("ingest", cfg)[0] == "done"
    (project / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    for name in ("t", "u"):
        with pytest.raises(UserError, match="bad.jsonl: line 1 is not valid JSON"):
            run_stage("ingest", load_config("config.yaml", ["ingest.sources.0.files=bad.jsonl", f"run.name={name}"]))
    entry = json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "complete" and entry["attempt"]["status"] == "failed"
    assert run_stage("ingest", cfg)[0] == "up to date"
    assert json.loads((project / "runs/u/manifest.json").read_text())["stages"]["ingest"]["status"] == "failed"


def test_plan_runs_upstream_first(project: Path) -> None:
    cfg = load_config("config.yaml")
    assert plan("format", cfg) == ["ingest", "format"]
    assert plan("finetune", cfg) == ["ingest", "format", "finetune"]


def test_a_resumable_stage_keeps_its_checkpoints_through_a_user_error(project: Path, monkeypatch) -> None:
    """A UserError after the second checkpoint (as a CUDA out-of-memory error in training is): the partial
    directory stays, and the same command resumes from it; a changed config starts over."""
    import distillery.runner as runner
    from distillery.stage import Stage, StageResult

    seen: list[list[str]] = []

    def train(ctx) -> StageResult:
        checkpoints = sorted(p.name for p in ctx.out.glob("checkpoint-*"))
        seen.append(checkpoints)
        if not checkpoints:
            for step in (1, 2):
                (ctx.out / f"checkpoint-{step}").mkdir()
            raise UserError("CUDA ran out of memory: lower finetune.batch_size")
        (ctx.out / "adapter.txt").write_text("trained")
        return StageResult(metrics={"resumed_from": checkpoints[-1]})

    fake = Stage(name="ingest", run=train, outputs={"adapter": "adapter.txt"}, sections=("ingest",), resumable=True)
    monkeypatch.setattr(runner, "load_stage", lambda name: fake)
    cfg = load_config("config.yaml")
    with pytest.raises(UserError, match="out of memory"):
        run_stage("ingest", cfg)
    assert (project / "runs/t/.ingest.partial/checkpoint-2").is_dir()
    status, result, _ = run_stage("ingest", cfg)
    assert status == "done" and result.metrics == {"resumed_from": "checkpoint-2"}
    assert seen == [[], ["checkpoint-1", "checkpoint-2"]]
    with pytest.raises(UserError):  # another config: nothing of the old partial directory is resumed
        (project / "runs/t/.ingest.partial").mkdir()
        (project / "runs/t/.ingest.partial/checkpoint-9").mkdir()
        run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.3"]), force=True)
    assert seen[-1] == []


def test_force_discards_a_resumable_stages_partial_directory(project: Path, monkeypatch) -> None:
    """--force on an unchanged config starts over: the kept partial directory (checkpoints, a suspect GGUF)
    is not resumed from."""
    import distillery.runner as runner
    from distillery.stage import Stage, StageResult

    seen: list[list[str]] = []

    def train(ctx) -> StageResult:
        seen.append(sorted(p.name for p in ctx.out.iterdir()))
        if not seen[-1]:
            (ctx.out / "checkpoint-1").mkdir()
            raise UserError("CUDA ran out of memory")
        (ctx.out / "adapter.txt").write_text("trained")
        return StageResult()

    fake = Stage(name="ingest", run=train, outputs={"adapter": "adapter.txt"}, sections=("ingest",), resumable=True)
    monkeypatch.setattr(runner, "load_stage", lambda name: fake)
    cfg = load_config("config.yaml")
    with pytest.raises(UserError):
        run_stage("ingest", cfg)
    assert (project / "runs/t/.ingest.partial/checkpoint-1").is_dir()
    with pytest.raises(UserError):
        run_stage("ingest", cfg, force=True)
    assert seen == [[], []]


def test_a_forced_upstream_that_writes_other_outputs_makes_the_stages_below_out_of_date(project: Path,
                                                                                      monkeypatch) -> None:
    """`finetune --force` that trains another adapter must not leave export "up to date" with the old one."""
    from distillery.stages import ingest

    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    run_stage("format", cfg)
    assert run_stage("ingest", cfg, force=True)[0] == "done"
    assert run_stage("format", cfg)[0] == "up to date"  # the same outputs again: nothing below changes
    original = ingest.split
    monkeypatch.setattr(ingest, "split", lambda rows, kept, fraction: original(rows, kept, 0.5))  # same config
    assert run_stage("ingest", cfg, force=True)[0] == "done"
    assert run_stage("format", cfg)[0] == "done"


def test_a_run_recorded_before_upstream_outputs_were_kept_stays_up_to_date_until_its_upstream_reruns(
        project: Path, monkeypatch) -> None:
    """Upgrading Distillery must not redo a finished distill (teacher calls cost money) or finetune; an upstream
    forced after the upgrade still makes it out of date."""
    from distillery.stages import ingest

    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    run_stage("format", cfg)
    manifest_path = project / "runs/t/manifest.json"

    def as_older_versions_wrote_it() -> None:
        manifest = json.loads(manifest_path.read_text())
        del manifest["stages"]["format"]["inputs"]["upstream_outputs"]
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    as_older_versions_wrote_it()
    assert run_stage("format", cfg)[0] == "up to date"
    assert "upstream_outputs" in json.loads(manifest_path.read_text())["stages"]["format"]["inputs"]  # kept now
    original = ingest.split
    monkeypatch.setattr(ingest, "split", lambda rows, kept, fraction: original(rows, kept, 0.5))
    assert run_stage("ingest", cfg, force=True)[0] == "done"
    assert run_stage("format", cfg)[0] == "done"
    as_older_versions_wrote_it()
    time.sleep(1.1)  # manifest times have whole seconds
    assert run_stage("ingest", cfg, force=True)[0] == "done"  # before the digests were read: only times tell
    assert run_stage("format", cfg)[0] == "done"


def test_operational_settings_leave_a_stage_up_to_date_and_a_run_recorded_before_them_too(project: Path,
                                                                                          monkeypatch) -> None:
    """A stage's operational settings (distill's timeouts, retries, concurrency) change how it runs, not what it
    writes: raising distill.teacher.timeout_s after 'did not answer' must resume the prompts already answered, not
    ask the teacher for every one again. A run recorded when they were still in the fingerprint stays up to date."""
    import dataclasses

    import distillery.runner as runner
    from distillery.stage import Stage, StageResult

    def write(ctx) -> StageResult:
        (ctx.out / "out.txt").write_text("written")
        return StageResult()

    whole = Stage(name="ingest", run=write, outputs={"out": "out.txt"}, sections=("ingest",), resumable=True)
    operational = dataclasses.replace(whole, operational=("ingest.eval_fraction",))
    stage = {"now": whole}
    monkeypatch.setattr(runner, "load_stage", lambda name: stage["now"])
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    recorded = json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]["fingerprint"]
    stage["now"] = operational  # the same settings, read by a version that leaves eval_fraction out
    assert run_stage("ingest", load_config("config.yaml"))[0] == "up to date"
    assert json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]["fingerprint"] == recorded
    # an operational setting changed after the upgrade: still the run the older version recorded
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.3"]))[0] == "up to date"
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.4", "ingest.dedupe=false"]))[0] == "done"
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.2", "ingest.dedupe=false"]))[0] == "up to date"


@pytest.mark.parametrize("name, override", [
    ("ingest", "ingest.workers=1"), ("finetune", "finetune.logging_steps=5"), ("finetune", "finetune.save_total_limit=4"),
    ("finetune", "finetune.report_to=tensorboard"), ("export", "export.threads=1"),
    ("export", "export.min_free_disk_gb=5"), ("evaluate", "evaluate.gguf_threads=1"), ("evaluate", "evaluate.batch_size=2")])
def test_settings_of_speed_and_logging_leave_the_stage_up_to_date(project: Path, name: str, override: str) -> None:
    """From a review: a number of reading processes, logging steps, kept checkpoints, a tracker or threads reran
    the stage and every one below it (retraining the model for ingest.workers)."""
    from distillery.runner import without_operational
    from distillery.stage import load_stage

    stage = load_stage(name)

    def fingerprinted(cfg) -> dict:
        dump = cfg.model_dump(mode="json")
        return without_operational({section: dump[section] for section in stage.sections}, stage.operational_of(cfg))

    assert fingerprinted(load_config("config.yaml")) == fingerprinted(load_config("config.yaml", [override]))
    if name == "ingest":
        assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
        assert run_stage("ingest", load_config("config.yaml", [override]))[0] == "up to date"


def test_a_setting_outside_the_stages_sections_that_it_reads_makes_it_out_of_date(project: Path, monkeypatch) -> None:
    """evaluate reads distill.sandbox (its code_io checks) and format.max_length (its scoring window) outside its
    own sections: changing one left it 'up to date'. A run recorded before they counted stays up to date."""
    import dataclasses

    import distillery.runner as runner
    from distillery.stage import Stage, StageResult

    def write(ctx) -> StageResult:
        (ctx.out / "out.txt").write_text("written")
        return StageResult()

    before = Stage(name="ingest", run=write, outputs={"out": "out.txt"}, sections=("ingest",))
    stage = {"now": before}
    monkeypatch.setattr(runner, "load_stage", lambda name: stage["now"])
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    stage["now"] = dataclasses.replace(before, also_reads=("distill.sandbox", "format.max_length"))
    assert run_stage("ingest", load_config("config.yaml"))[0] == "up to date"  # recorded before they counted
    assert run_stage("ingest", load_config("config.yaml", ["distill.sandbox.timeout_s=9"]))[0] == "done"
    assert run_stage("ingest", load_config("config.yaml", ["distill.sandbox.timeout_s=9"]))[0] == "up to date"
    assert run_stage("ingest", load_config("config.yaml", ["distill.sandbox.timeout_s=9",
                                                           "format.max_length=512"]))[0] == "done"


def test_an_input_file_that_cannot_be_read_is_named(project: Path) -> None:
    """Hashing the inputs (the fingerprint) met EIO from a file the system will not read (here /proc/self/mem
    behind a link; for a normal user any file without read permission): an 'unexpected' OSError, exit 1."""
    (project / "data.jsonl").unlink()
    (project / "data.jsonl").symlink_to("/proc/self/mem")
    with pytest.raises(UserError, match=r"data.jsonl cannot be read \(Input/output error\): check the file and its "
                                        r"permissions, or take it out of the config"):
        run_stage("ingest", load_config("config.yaml"))


def test_an_input_that_is_not_a_regular_file_is_named_before_it_is_hashed(tmp_path: Path) -> None:
    """export.imatrix set to a pipe blocked the fingerprint's hash for good, holding the run; /dev/zero never ended."""
    import os

    from distillery.runner import input_digest

    os.mkfifo(tmp_path / "imatrix.dat")
    for path in (tmp_path / "imatrix.dat", Path("/dev/zero"), tmp_path):
        with pytest.raises(UserError, match=r"is not a regular file \(a pipe, a device or a folder\)"):
            input_digest(path)


def resumable_stub(monkeypatch: pytest.MonkeyPatch, seen: list, fail_when: Callable[[Any], bool]) -> None:
    """The ingest stage replaced by a resumable one that records what its partial directory held when it started,
    leaves progress there, and fails (as running out of memory would) where `fail_when(ctx)` says."""
    from distillery import runner
    from distillery.stage import Stage, StageResult

    def run(ctx: Any) -> StageResult:
        seen.append(sorted(p.name for p in ctx.out.iterdir()))
        (ctx.out / "progress").write_text("half", encoding="utf-8")
        if fail_when(ctx):
            raise UserError("out of memory")
        (ctx.out / "done.txt").write_text(str(ctx.cfg.ingest.eval_fraction), encoding="utf-8")
        return StageResult()

    stub = Stage(name="ingest", run=run, outputs={"done": "done.txt"}, sections=("ingest",), resumable=True)
    monkeypatch.setattr(runner, "load_stage", lambda name: stub)


def test_a_forced_run_that_failed_is_resumed_by_the_same_config_not_called_up_to_date(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished stage, then `--force` that fails after leaving work to resume (checkpoints): the plain command
    goes on from that work; it must not call the stage up to date because the earlier run's files are still there."""
    seen: list = []
    resumable_stub(monkeypatch, seen, lambda ctx: ctx.force)
    cfg = load_config("config.yaml")
    assert run_stage("ingest", cfg)[0] == "done"
    with pytest.raises(UserError, match="out of memory"):
        run_stage("ingest", cfg, force=True)
    assert run_stage("ingest", cfg)[0] == "done" and seen == [[], [], ["progress"]]
    entry = json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "complete" and "attempt" not in entry


def test_an_attempt_of_another_config_resumes_and_going_back_sets_it_aside(project: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Finished with A; B interrupted: B again resumes from B's partial directory (the attempt, not A's entry,
    says what it belongs to), and A again is up to date, the record of B's attempt set aside."""
    seen: list = []
    other = ["ingest.eval_fraction=0.3"]
    resumable_stub(monkeypatch, seen, lambda ctx: ctx.cfg.ingest.eval_fraction == 0.3 and len(seen) == 2)
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    with pytest.raises(UserError):
        run_stage("ingest", load_config("config.yaml", other))
    manifest = project / "runs/t/manifest.json"
    assert json.loads(manifest.read_text())["stages"]["ingest"]["attempt"]["status"] == "failed"
    assert run_stage("ingest", load_config("config.yaml", other))[0] == "done" and seen[2] == ["progress"]
    resumable_stub(monkeypatch, seen, lambda ctx: True)  # B's files in place; A fails, then back to B
    with pytest.raises(UserError):
        run_stage("ingest", load_config("config.yaml"))
    assert json.loads(manifest.read_text())["stages"]["ingest"]["attempt"]["status"] == "failed"
    assert run_stage("ingest", load_config("config.yaml", other))[0] == "up to date"
    assert "attempt" not in json.loads(manifest.read_text())["stages"]["ingest"]


def test_finetune_is_fingerprinted_on_the_only_distill_settings_it_reads(tmp_path: Path) -> None:
    """Every distill setting was in finetune's fingerprint: raising distill.concurrency retrained the model."""
    from distillery.config import load_config
    from distillery.core.rundir import RunDir
    from distillery.runner import fingerprint
    from distillery.stage import load_stage

    run = RunDir(tmp_path, "t")
    run.update_stage("format", {"status": "complete", "fingerprint": "f" * 64, "outputs": {}})

    def finetune_fp(*overrides: str) -> str:
        cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", [f"run.root={tmp_path}", "run.name=t", *overrides])
        return fingerprint(load_stage("finetune"), cfg, run)[0]

    same = finetune_fp()
    for override in ("distill.concurrency=8", "distill.retries=9", "distill.teacher.timeout_s=30", "distill.enabled=true",
                     "distill.max_tokens=77", "distill.teacher.url=http://localhost:9/v1",
                     "distill.teacher.path=./another-teacher"):  # the teacher counts for on_policy only (below)
        assert finetune_fp(override) == same, override
    assert finetune_fp("finetune.max_steps=21") != same


# ---- run directories that are not what they seem (from an adversarial review) ------------------------------


def test_a_run_inside_another_run_is_refused_and_a_stage_never_replaces_one(project: Path) -> None:
    """A run made inside another run's stage folder was deleted without a word when that stage ran again."""
    from distillery.core.rundir import RunDir

    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    with pytest.raises(UserError, match="lies inside the run"):
        with RunDir(project / "runs/t", "format").exclusive():
            pass
    assert not (project / "runs/t/format").exists()
    nested = project / "runs/t/ingest"  # one made before this check: the stage that would replace it refuses
    (nested / "manifest.json").write_text(json.dumps({"stages": {"ingest": {"status": "complete"}}}))
    with pytest.raises(UserError, match="holds another Distillery run"):
        run_stage("ingest", cfg, force=True)
    assert (nested / "manifest.json").is_file() and (nested / "train.jsonl").is_file()


@pytest.mark.parametrize("manifest", ['{"name": "My PWA", "start_url": "/"}', "not json", "[]", '{"stages": []}',
                                      '{"stages": {"ingest": "x"}}', ""])
def test_a_manifest_distillery_did_not_write_is_one_message_and_nothing_is_written(project: Path, manifest: str) -> None:
    from distillery.core.rundir import RunDir

    folder = project / "runs" / "webapp"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest)
    (folder / "index.html").write_text("<html></html>")
    with pytest.raises(UserError, match="manifest.json: it .*Distillery"):
        with RunDir(project / "runs", "webapp").exclusive():
            pass
    with pytest.raises(UserError, match="manifest.json: it"):
        run_stage("ingest", load_config("config.yaml", ["run.name=webapp"]))
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "manifest.json"]


def test_links_in_the_run_directory_are_replaced_as_links_and_what_they_point_to_is_kept(project: Path) -> None:
    """A stage folder or a partial folder that is a symbolic link to a folder of the user's: the stage runs, the
    link goes, the user's folder stays as it was; a leftover `.ingest.old` file does not stop the next run."""
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    run = project / "runs/t"
    mine = project / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for link in ("ingest", ".ingest.partial"):
        target = run / link
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        target.symlink_to(mine)
        assert run_stage("ingest", cfg, force=True)[0] == "done"
        assert not (run / "ingest").is_symlink() and (run / "ingest/train.jsonl").is_file()
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
        assert not any(p.name.endswith((".old", ".partial")) for p in run.iterdir())
    (run / ".ingest.old").write_text("a file where the old folder goes")
    assert run_stage("ingest", cfg, force=True)[0] == "done"


def test_the_run_s_own_folders_are_never_written_through_a_link(project: Path, monkeypatch) -> None:
    """push wrote its model card over a README.md of the user's through a linked `push/`; a failed stage's
    traceback went into a linked `logs/`. push refuses; the traceback goes to the cache's logs instead."""
    from distillery.core import machine
    from distillery.core.rundir import RunDir
    from distillery.runner import write_failure_log

    run = RunDir(project / "runs", "t")
    run.path.mkdir(parents=True)
    mine = project / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my readme")
    (run.path / "push").symlink_to(mine)
    with pytest.raises(UserError, match="not a directory of the run"):
        run.real_subdir("push")
    (run.path / "logs").symlink_to(mine)
    monkeypatch.setattr(machine, "cache_home", lambda: project / "cache")
    where = write_failure_log(run, "ingest", RuntimeError("boom"))
    assert where == str(project / "cache/logs-outside-a-run/logs/ingest.log")
    assert sorted(p.name for p in mine.iterdir()) == ["README.md"] and (mine / "README.md").read_text() == "my readme"


def test_a_run_that_cannot_be_written_is_still_up_to_date(project: Path, monkeypatch) -> None:
    """A copied, read-only run: recording the copied files' new times is bookkeeping, not a reason to fail."""
    import os

    from distillery.core.rundir import RunDir

    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    os.utime(project / "runs/t/ingest/train.jsonl")

    def read_only(*args: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(RunDir, "update_stage", read_only)
    assert run_stage("ingest", cfg)[0] == "up to date"


def test_what_a_killed_run_left_goes_when_the_stage_is_found_up_to_date(project: Path) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    left = project / "runs/t/.ingest.partial/.shards-123"
    left.mkdir(parents=True)
    (left / "0.jsonl").write_text("{}\n")
    assert run_stage("ingest", cfg)[0] == "up to date"
    assert not (project / "runs/t/.ingest.partial").exists()


def test_a_command_refused_because_another_holds_the_run_leaves_that_run_s_new_directory(project: Path,
                                                                                        monkeypatch) -> None:
    """Two commands making the same new run: the one refused removed the directory the other had just made and
    locked (it had not existed when the refused one looked)."""
    import fcntl
    import os

    from distillery.core import rundir

    held, real_open = [], os.open

    def the_other_command_locks_first(path, flags, *args):
        if str(path).endswith("new-run") and not held:
            held.append(real_open(path, flags))
            fcntl.flock(held[0], fcntl.LOCK_EX)
        return real_open(path, flags, *args)

    monkeypatch.setattr(rundir.os, "open", the_other_command_locks_first)
    try:
        with pytest.raises(UserError, match="in use by another"):
            with rundir.RunDir(project / "runs", "new-run").exclusive():
                pass
        assert (project / "runs/new-run").is_dir()
    finally:
        for fd in held:
            os.close(fd)


def test_a_folder_holding_a_folder_named_manifest_json_is_not_a_run_and_keeps_its_files(project: Path) -> None:
    """A manifest.json that was a folder counted as a run with no stages: the folder's `ingest/` went, replaced by
    the stage's outputs, and the stage then failed as a bug."""
    from distillery.core.rundir import RunDir

    folder = project / "runs" / "mine"
    (folder / "manifest.json").mkdir(parents=True)
    (folder / "ingest").mkdir()
    (folder / "ingest" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match=r"mine/manifest.json: it is not a file \(a folder, a device or a broken "
                                        r"link\)\. If .* is a Distillery run, its manifest is damaged"):
        with RunDir(project / "runs", "mine").exclusive():
            pass
    with pytest.raises(UserError, match="manifest.json: it is not a file"):
        run_stage("ingest", load_config("config.yaml", ["run.name=mine"]))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["ingest", "ingest/keep.txt",
                                                                             "manifest.json"]


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda e: e.update(outputs="x"), "outputs: Input should be a valid dictionary"),
    (lambda e: e["outputs"].update({"train.jsonl": {}}), "outputs.train.jsonl.bytes: Field required"),
    (lambda e: e.update(attempt={}), "attempt.status: Field required"),
    (lambda e: e.update(attempt="x"), "attempt: Input should be a valid dictionary"),
    (lambda e: e.update(inputs="x"), "inputs: Input should be a valid dictionary"),
    (lambda e: e.update(summary="abc"), "summary: Input should be a valid list"),
    (lambda e: e.update(started=5), "started: Input should be a valid string"),
    (lambda e: e["inputs"].update(upstream_outputs=[]), "inputs.upstream_outputs: Input should be a valid dictionary"),
])
def test_a_manifest_entry_of_the_wrong_shape_is_a_damaged_manifest(project: Path, edit, problem: str) -> None:
    """A hand-edited entry (the right JSON, a field of another type) ended the next command as a bug: an
    AttributeError, KeyError or TypeError wherever the runner read that field first."""
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    path = project / "runs/t/manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["stages"]["ingest"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"manifest.json: the entry of stage 'ingest' is damaged \({problem}\)\. If "):
        run_stage("ingest", cfg)


@pytest.mark.parametrize("field", ["fingerprint", "status"])
def test_a_status_or_fingerprint_of_another_type_only_runs_the_stage_again(project: Path, field: str) -> None:
    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    path = project / "runs/t/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stages"]["ingest"][field] = 5
    path.write_text(json.dumps(manifest))
    assert run_stage("ingest", cfg)[0] == "done"


def test_a_disk_that_fills_as_a_finished_stage_is_recorded_is_the_users_to_fix(project: Path, monkeypatch) -> None:
    """The last write of a stage, its manifest entry, met a full disk outside the check for one: "a bug", exit 1."""
    import errno

    from distillery.core.rundir import RunDir

    real = RunDir.update_stage

    def full_when_complete(self: RunDir, stage: str, entry: dict) -> None:
        if entry.get("status") == "complete":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, stage, entry)

    with monkeypatch.context() as patched:
        patched.setattr(RunDir, "update_stage", full_when_complete)
        with pytest.raises(UserError, match=r"^the disk is full \(No space left on device under .*runs/t\)\. Free "
                                            r"some space and run the same command again"):
            run_stage("ingest", load_config("config.yaml"))
    assert json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]["status"] == "failed"
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"


def test_artifacts_a_stage_replaced_but_could_not_remove_are_named_before_it_runs_again(project: Path,
                                                                                       monkeypatch) -> None:
    """A read-only folder in a stage's previous artifacts: its removal failed after the new ones were in place, the
    stage was recorded as failed, and every later command told the user to change run.root (which was writable)."""
    from distillery.core import rundir

    cfg = load_config("config.yaml")
    run_stage("ingest", cfg)
    real = rundir.remove_path

    def read_only_old(path: Path) -> None:
        if path.name == ".ingest.old" and path.exists():
            raise PermissionError(13, "Permission denied")
        real(path)

    with monkeypatch.context() as patched:
        patched.setattr(rundir, "remove_path", read_only_old)
        assert run_stage("ingest", cfg, force=True)[0] == "done"  # the new artifacts are in place, and recorded
        assert (project / "runs/t/.ingest.old/train.jsonl").is_file()
        with pytest.raises(UserError, match=r"runs/t/\.ingest\.old holds the artifacts ingest replaced last time, and "
                                            r"it cannot be removed \(Permission denied\): make it writable and remove "
                                            r"it \(`chmod -R u\+w .*\.ingest\.old && rm -rf .*\.ingest\.old`\)"):
            run_stage("ingest", cfg, force=True)
    assert run_stage("ingest", cfg, force=True)[0] == "done"
    assert not (project / "runs/t/.ingest.old").exists()


def test_the_manifest_and_config_get_the_permissions_of_the_stage_outputs(project: Path) -> None:
    """They were written through mkstemp, the owner's alone (0600), beside outputs the group could read."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        run_stage("ingest", load_config("config.yaml"))
    finally:
        os.umask(old)
    run = project / "runs/t"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "manifest.json", run / "config.yaml",
                                                               run / "ingest/train.jsonl")}
    assert modes == {"manifest.json": 0o640, "config.yaml": 0o640, "train.jsonl": 0o640}


def test_ctrl_c_as_a_finished_stage_is_published_waits_until_it_is_recorded(project: Path, monkeypatch) -> None:
    """Ctrl-C between the publish of a finished stage and its manifest entry left it recorded as running: the next
    command did the stage again (for finetune, the whole training). The interrupt now comes once both are done."""
    import os
    import signal

    from distillery.core.rundir import RunDir

    real = RunDir.publish

    def interrupted_publish(self: RunDir, stage: str) -> Path:
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, stage)

    cfg = load_config("config.yaml")
    with monkeypatch.context() as patched:
        patched.setattr(RunDir, "publish", interrupted_publish)
        with pytest.raises(KeyboardInterrupt):
            run_stage("ingest", cfg)
    entry = json.loads((project / "runs/t/manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "complete" and entry["attempt"]["status"] == "interrupted"
    assert run_stage("ingest", cfg)[0] == "up to date"


HAMMER = r'''
import collections, sys, time
from distillery.core.errors import UserError
from distillery.core.rundir import RunDir
run, seen, end = RunDir(sys.argv[1], "same"), collections.Counter(), time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        with run.exclusive():
            seen["held" if run.path.is_dir() and run.manifest_path.is_file() else "held a run that is gone"] += 1
    except UserError as err:
        seen["in use" if "is in use by another distillery command" in str(err) else f"refused: {err}"] += 1
    except Exception as err:
        seen[f"{type(err).__name__}: {err}"] += 1
print(dict(seen))
'''


def test_two_commands_taking_and_leaving_one_new_run_never_find_it_gone(tmp_path: Path) -> None:
    """From an adversarial review: the lock was let go before the empty run it made was removed, so the next holder
    ran in a directory being deleted (FileNotFoundError tracebacks, or 'damaged manifest' for a healthy run). Two
    processes take and leave one new run as fast as they can: each either holds it whole or is told it is in use."""
    import ast
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    hammers = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path / "root"), "1.5"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    seen = [ast.literal_eval(h.communicate(timeout=120)[0].strip().splitlines()[-1]) for h in hammers]
    assert all(set(s) <= {"held", "in use"} for s in seen) and all(s.get("held") for s in seen), seen


def test_a_local_model_or_teacher_edited_in_place_is_an_input_of_the_stages_that_read_it(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    """From a review: a local model's chat template edited in place left format 'up to date' (310 rows with the old
    system prompt), and a teacher GGUF copied over at its path left distill's traces. Their describing files (not
    the weights) and a teacher's GGUF are the stages' input files now; a file over 1 GiB is known by its size,
    times and first and last 16 MiB."""
    import os

    import distillery.runner as runner
    from distillery.stage import load_stage

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"):
        (model / name).write_text("{}")
    (tmp_path / "teacher.gguf").write_bytes(b"GGUF" + bytes(100))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "run": {"name": "t", "root": str(tmp_path / "runs")}, "model": {"path": str(model)},
        "ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl"}]},
        "distill": {"enabled": True, "teacher": {"kind": "gguf", "path": str(tmp_path / "teacher.gguf")}}}))
    cfg = load_config(tmp_path / "config.yaml")
    assert {p.name for p in load_stage("format").model_files(cfg)} == {"config.json", "tokenizer.json",
                                                                       "chat_template.jinja"}  # never the weights
    assert load_stage("distill").model_files(cfg) == [tmp_path / "teacher.gguf"]
    template = model / "chat_template.jinja"
    before = runner.input_digest(template)
    template.write_text("{# a pirate #}")
    assert runner.input_digest(template) != before
    monkeypatch.setattr(runner, "LARGE_INPUT_BYTES", 50)
    monkeypatch.setattr(runner, "SAMPLED_BYTES", 8)
    teacher = tmp_path / "teacher.gguf"
    sampled = runner.input_digest(teacher)
    assert sampled.startswith("sampled:") and runner.input_digest(teacher) == sampled
    os.utime(teacher, ns=(1, 1))  # another file copied over it (cp -p keeps its times: then its bytes differ)
    assert runner.input_digest(teacher) != sampled


def test_a_run_recorded_before_new_input_files_or_more_operational_settings_stays_up_to_date(project: Path,
                                                                                           monkeypatch) -> None:
    """An upgrade that counts a local model's describing files, or leaves out more operational settings, must not
    redo a finished stage (a finetune: hours): the recorded inputs are what this version reads. A file it counts
    now that changes after the upgrade, or a setting it reads, makes the stage out of date as before."""
    import dataclasses

    import distillery.runner as runner
    from distillery.stage import Stage, StageResult

    def write(ctx) -> StageResult:
        (ctx.out / "out.txt").write_text("written")
        return StageResult()

    template, tokenizer = project / "chat_template.jinja", project / "tokenizer.json"
    template.write_text("{{ messages }}")
    before = Stage(name="ingest", run=write, outputs={"out": "out.txt"}, sections=("ingest",),
                   operational=("ingest.workers",))
    after = dataclasses.replace(before, operational=("ingest.workers", "ingest.eval_fraction"),
                                model_files=lambda cfg: [path for path in (template, tokenizer) if path.exists()])
    stage = {"now": before}
    monkeypatch.setattr(runner, "load_stage", lambda name: stage["now"])
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    stage["now"] = after
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.5"]))[0] == "up to date"
    assert run_stage("ingest", load_config("config.yaml"))[0] == "up to date"
    template.write_text("{# a pirate #}{{ messages }}")
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    assert run_stage("ingest", load_config("config.yaml"))[0] == "up to date"
    assert run_stage("ingest", load_config("config.yaml", ["ingest.dedupe=false"]))[0] == "done"
    tokenizer.write_text("{}")  # a describing file added to the model since: this version counted the model's files
    assert run_stage("ingest", load_config("config.yaml", ["ingest.dedupe=false"]))[0] == "done"


def test_a_data_file_added_to_a_sources_folder_or_an_against_glob_makes_ingest_out_of_date(project: Path) -> None:
    """From a review: a file added to a source's folder (or matching an `against` glob) was taken for an input file
    that a newer version counts (a local model's describing files), and ingest stayed 'up to date' without it."""
    folder, tests = project / "more", project / "tests"
    folder.mkdir()
    tests.mkdir()
    (folder / "a.jsonl").write_text((project / "data.jsonl").read_text(), encoding="utf-8")
    (tests / "one.jsonl").write_text(json.dumps({"Problem": "What is 1 + 1?"}) + "\n", encoding="utf-8")
    settings = ["ingest.sources.0.files=more", "ingest.decontaminate.against=[tests/*.jsonl]"]
    assert run_stage("ingest", load_config("config.yaml", settings))[0] == "done"
    assert run_stage("ingest", load_config("config.yaml", settings))[0] == "up to date"
    (folder / "b.jsonl").write_text(json.dumps(chat("What is 50 + 50?", "100")) + "\n", encoding="utf-8")
    status, result, _ = run_stage("ingest", load_config("config.yaml", settings))
    assert status == "done" and result.metrics["train"] + result.metrics["eval"] == 21
    (tests / "two.jsonl").write_text(json.dumps({"Problem": "What is 50 + 50 ?"}) + "\n", encoding="utf-8")
    assert run_stage("ingest", load_config("config.yaml", settings))[0] == "done"
    assert run_stage("ingest", load_config("config.yaml", settings))[0] == "up to date"


def test_finetune_counts_distills_teacher_only_where_on_policy_takes_it(project: Path) -> None:
    """From a review: another distill teacher retrained an sft model, which never reads it."""
    from distillery.runner import without_operational
    from distillery.stage import load_stage

    stage = load_stage("finetune")

    def fingerprinted(*overrides: str) -> dict:
        cfg = load_config("config.yaml", list(overrides))
        dump = cfg.model_dump(mode="json")
        return without_operational({section: dump[section] for section in stage.sections}, stage.operational_of(cfg))

    other = "distill.teacher.path=other.gguf"
    assert fingerprinted() == fingerprinted(other)  # sft
    on_policy = ("finetune.objective=on_policy", "finetune.backend=hf", "distill.teacher.kind=hf")
    assert fingerprinted(*on_policy) != fingerprinted(*on_policy, "distill.teacher.path=other")
    named = (*on_policy, "finetune.on_policy.teacher=bundled:SmolLM2-135M-Instruct")
    assert fingerprinted(*named) == fingerprinted(*named, "distill.teacher.path=other")


def carrying_stub(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    """The ingest stage replaced by a resumable one that carries over `whole/` (a folder valid only whole, as
    export's merged model) and `files/*.bin` (files each valid alone, as export's GGUFs) when only
    ingest.eval_fraction changed; it records what its partial directory held when it started."""
    from distillery import runner
    from distillery.stage import Stage, StageResult

    def run(ctx: Any) -> StageResult:
        seen.append(sorted(str(p.relative_to(ctx.out)) for p in ctx.out.rglob("*") if p.is_file()))
        for rel in EVERY_FILE:
            (ctx.out / rel).parent.mkdir(exist_ok=True)
            if not (ctx.out / rel).exists():
                (ctx.out / rel).write_text(rel, encoding="utf-8")
        (ctx.out / "done.txt").write_text(str(ctx.cfg.ingest.eval_fraction), encoding="utf-8")
        return StageResult()

    stub = Stage(name="ingest", run=run, outputs={"done": "done.txt"}, sections=("ingest",), resumable=True,
                 carries_over_when=("ingest.eval_fraction",), carry_over=("whole/*", "files/*.bin"))
    monkeypatch.setattr(runner, "load_stage", lambda name: stub)


EVERY_FILE = ["files/a.bin", "files/b.bin", "whole/config", "whole/weights"]


def test_a_stage_keeps_the_files_its_last_run_left_valid_when_only_a_carried_setting_changed(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Export with another list of GGUF types merged, converted and quantized everything again (minutes each at
    32B). A stage's `carry_over` files of its last finished run, unchanged since, start the new run (hard links);
    any other change starts it from nothing."""
    seen: list = []
    carrying_stub(monkeypatch, seen)
    out = project / "runs/t/ingest"
    assert run_stage("ingest", load_config("config.yaml"))[0] == "done"
    inode = (out / "whole/weights").stat().st_ino
    assert run_stage("ingest", load_config("config.yaml", ["ingest.eval_fraction=0.3"]))[0] == "done"
    assert seen[-1] == EVERY_FILE and (out / "whole/weights").stat().st_ino == inode
    assert ("only ingest.eval_fraction changed since the last run: its files/a.bin, files/b.bin, whole/config, "
            "whole/weights are kept") in " ".join(capsys.readouterr().out.split())
    assert run_stage("ingest", load_config("config.yaml", ["ingest.dedupe=false"]))[0] == "done"
    assert seen[-1] == []  # another setting: nothing kept
    assert not (project / "runs/t/.ingest.carrying").exists()


def test_what_is_carried_over_is_whole_inside_the_run_and_as_the_last_run_left_it(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a review: a merged folder missing a shard (freed by hand, or a kill while linking) was carried and
    taken for a finished merge; a folder moved out and linked back was linked in from outside the run; a manifest
    entry can name any path."""
    from distillery import runner

    seen: list = []
    carrying_stub(monkeypatch, seen)
    out, manifest = project / "runs/t/ingest", project / "runs/t/manifest.json"
    fraction = iter(f"ingest.eval_fraction=0.{n}" for n in range(2, 9))
    assert run_stage("ingest", load_config("config.yaml", [next(fraction)]))[0] == "done"
    (out / "whole/weights").write_text("edited", encoding="utf-8")  # a file changed since: its whole folder stays
    (out / "files/b.bin").unlink()  # one of the single files gone: the others are kept
    assert run_stage("ingest", load_config("config.yaml", [next(fraction)]))[0] == "done"
    assert seen[-1] == ["files/a.bin"]

    outside = project / "elsewhere"
    outside.mkdir()
    os.rename(out / "whole", outside / "whole")
    (out / "whole").symlink_to(outside / "whole")
    data = json.loads(manifest.read_text())
    secret = project / "runs/t/secret.bin"
    secret.write_text("s", encoding="utf-8")
    data["stages"]["ingest"]["outputs"]["files/../../secret.bin"] = {
        "bytes": 1, "mtime_ns": secret.stat().st_mtime_ns, "sha256": "0" * 64}
    manifest.write_text(json.dumps(data))
    assert run_stage("ingest", load_config("config.yaml", [next(fraction)]))[0] == "done"
    assert seen[-1] == ["files/a.bin", "files/b.bin"]  # nothing through the link, nothing outside the stage

    real_link = os.link

    def interrupted(source: Any, target: Any) -> None:
        if str(target).endswith("weights"):
            raise KeyboardInterrupt
        real_link(source, target)

    monkeypatch.setattr(runner.os, "link", interrupted)
    again = [next(fraction)]
    with pytest.raises(KeyboardInterrupt):
        run_stage("ingest", load_config("config.yaml", again))
    monkeypatch.setattr(runner.os, "link", real_link)
    assert run_stage("ingest", load_config("config.yaml", again))[0] == "done"
    assert seen[-1] == []  # resumed from what the interrupted attempt had: no half of whole/, nothing at all
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted([*EVERY_FILE, "done.txt"])


def test_a_set_aside_attempt_of_another_config_is_never_resumed_as_this_one(project: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """From a review: A finished, B failed (its partial directory kept to resume B), A again was up to date and set
    B's attempt aside but kept B's directory; once A was out of date (a published file deleted), A resumed from B's
    directory and published B's files (export: B's merge, and B's checks as A's)."""
    from distillery import runner
    from distillery.stage import Stage, StageResult

    def run(ctx: Any) -> StageResult:
        if not (ctx.out / "merged.txt").exists():
            (ctx.out / "merged.txt").write_text(f"merged by {ctx.cfg.ingest.eval_fraction}", encoding="utf-8")
        if ctx.cfg.ingest.eval_fraction == 0.3:
            raise UserError("verification failed")
        (ctx.out / "done.txt").write_text("done", encoding="utf-8")
        return StageResult()

    stub = Stage(name="ingest", run=run, outputs={"done": "done.txt"}, sections=("ingest",), resumable=True)
    monkeypatch.setattr(runner, "load_stage", lambda name: stub)
    a, b = load_config("config.yaml"), load_config("config.yaml", ["ingest.eval_fraction=0.3"])
    assert run_stage("ingest", a)[0] == "done"
    with pytest.raises(UserError):
        run_stage("ingest", b)
    assert run_stage("ingest", a)[0] == "up to date"
    assert not (project / "runs/t/.ingest.partial").exists()
    (project / "runs/t/ingest/done.txt").unlink()
    assert run_stage("ingest", a)[0] == "done"
    assert (project / "runs/t/ingest/merged.txt").read_text() == "merged by 0.2"
