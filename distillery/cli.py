"""`distillery <stage>` for every stage and `distillery run` for all of them in order.

Each command takes the YAML config (`-c`, default configs/demo.yaml), any number of `--set key=value`
overrides, and `--force`. A stage first brings its upstream stages up to date (a no-op when they are).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import click
import typer
from rich.traceback import Traceback

from dotenv import load_dotenv

from distillery.config import load_config
from distillery.core.console import console, printable, setup_logging, summary_table
from distillery.core.errors import StageFailed, Terminated, UserError, stop_on_sigterm
from distillery.runner import STAGES, pipeline_stages, plan, run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Distillery: raw data -> fine-tuned model -> GGUF in llama.cpp, one YAML config.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: --set finetune.max_steps=20")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
DEFAULT_CONFIG = Path("configs/demo.yaml")


def execute(target: str | None, config: Path, sets: list[str] | None, force: bool, verbose: bool) -> None:
    """Run `target` (with its upstream chain) or, with None, every built stage; print a summary table."""
    _with_config(target or "run", config, sets, verbose, lambda cfg: run_stages(cfg, target, force))


def run_stages(cfg: Any, target: str | None, force: bool) -> None:
    from distillery.core.rundir import RunDir

    with RunDir(cfg.run.root, cfg.run.name).exclusive():
        run_held_stages(cfg, target, force)


def run_held_stages(cfg: Any, target: str | None, force: bool) -> None:
    names = pipeline_stages(cfg) if target is None else plan(target, cfg)
    rows = []
    started = time.time()
    for name in names:
        # --force redoes the named stage; upstream stages are only redone when they changed.
        status, result, seconds = run_stage(name, cfg, force=force and (target is None or name == target))
        headline = "; ".join(f"{k} {v}" for k, v in (result.summary if result else [])[:4])
        artifacts = f"{cfg.run.root}/{cfg.run.name}/{name}/"
        rows.append((name, status, f"{seconds:.1f}s", artifacts, headline))
    console.print(summary_table(f"run {cfg.run.name} ({time.time() - started:.1f}s)", rows,
                                ("stage", "status", "time", "artifacts", "result")))
    if "evaluate" in names:
        show_heldout(cfg)
    if target is None and "export" in names:
        from distillery.commands.chat import answer_held_out

        answer_held_out(cfg, console)


def show_heldout(cfg: Any) -> None:
    """The end of `distillery run` and `distillery evaluate`: what fine-tuning changed on the held-out data, per task
    and artifact, with the chart where the finished stage keeps it."""
    import json

    from distillery.core.rundir import RunDir
    from distillery.stage import artifact
    from distillery.stages.evaluate import print_heldout

    run = RunDir(cfg.run.root, cfg.run.name)
    path = artifact(run, "evaluate", "heldout")
    scored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if scored:
        print_heldout(console, scored, artifact(run, "evaluate", "heldout_plot"))


@contextlib.contextmanager
def reported_errors(command: str, verbose: bool) -> Iterator[dict[str, Any]]:
    """Every way a command can end, as one message and an exit code: 2 for the user's mistakes, 1 for a native
    crash or a bug (with the log holding the traceback), 130 for Ctrl-C, 143 for SIGTERM. The body stores the
    loaded config in the yielded dict, so that an unexpected error outside a stage can still be logged into the
    run."""
    where: dict[str, Any] = {}
    try:
        yield where
    except (typer.Exit, click.exceptions.Abort):
        raise
    except UserError as err:
        console.print(f"[bold red]error:[/] {printable(str(err))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        if command in STAGES or command == "run":
            console.print(f"[yellow]{how}[/]: finished stages are kept; run the same command to continue.")
        else:  # chat, push: nothing to continue
            console.print(f"[yellow]{how}[/]")
        raise typer.Exit(128 + signal.SIGTERM if terminated else 130) from None
    except Exception as err:  # noqa: BLE001 - reported in one line; the traceback goes to the log
        report_unexpected(where, command, err, verbose)
        raise typer.Exit(1) from None


def report_unexpected(where: dict[str, Any], command: str, err: Exception, verbose: bool) -> None:
    """Log and report an unexpected error; should that fail too (a full disk, a broken terminal), still one line."""
    try:
        failure = err if isinstance(err, StageFailed) else StageFailed(command, err, log_failure(where, command, err))
        report_failure(failure, verbose)
    except Exception as also:  # noqa: BLE001 - the report of an error must never end in a traceback of its own
        cause = err.cause if isinstance(err, StageFailed) else err
        print(f"error: {command} failed with an unexpected {type(cause).__name__}: {first_line(cause)}; reporting it "
              f"failed too ({type(also).__name__}: {first_line(also)}).", file=sys.stderr)


def log_failure(where: dict[str, Any], command: str, err: BaseException) -> str | None:
    """Write the traceback into the run's logs/ (or the cache's, before a config was loaded)."""
    from distillery.core.rundir import RunDir
    from distillery.runner import write_failure_log

    cfg = where.get("cfg")
    return write_failure_log(RunDir(cfg.run.root, cfg.run.name) if cfg is not None else None, command, err)


def report_failure(failure: StageFailed, verbose: bool) -> None:
    """One line: which stage or command, what happened, and where the full traceback is."""
    from distillery.core.isolation import NativeCrash

    cause = failure.cause
    if verbose:
        console.print(Traceback.from_exception(type(cause), cause, cause.__traceback__, show_locals=False))
    if isinstance(cause, NativeCrash):
        console.print(f"[bold red]error:[/] {failure.step} failed: {printable(str(cause))} Log: {failure.log}",
                      soft_wrap=True)
        return
    text = first_line(cause)
    where = f"written to {failure.log}" if failure.log else "which could not be written to a log file"
    console.print(f"[bold red]error:[/] {failure.step} failed with an unexpected {type(cause).__name__}"
                  f"{': ' + printable(text) if text else ''}. This is a bug in Distillery, not a problem with your data "
                  f"or config; please report it with the full traceback, {where} (-v shows it here).",
                  soft_wrap=True)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _stage_command(stage: str, help_text: str) -> None:
    def command(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, force: ForceOpt = False,
                verbose: VerboseOpt = False) -> None:
        execute(stage, config, set_, force, verbose)

    command.__doc__ = help_text
    app.command(name=stage)(command)


STAGE_HELP = {
    "ingest": "Read every data source into normalized records, dedupe, split train/eval, report.",
    "distill": "Have a teacher model write reasoning traces; keep those that check out (and its top-k log-probs).",
    "format": "Render records into prompt/completion pairs through a template; token-length report.",
    "finetune": "Train a LoRA adapter or every weight with Unsloth (or the hf backend); resumes after a kill.",
    "evaluate": "Score the held-out data by task, and MathQA, on the base, the adapter, the merged model and each GGUF.",
    "export": "Merge to 16-bit, convert and quantize to GGUF, verify.",
}
for _stage in STAGES:
    _stage_command(_stage, STAGE_HELP[_stage])


@app.command("run")
def run_all(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, force: ForceOpt = False,
            verbose: VerboseOpt = False) -> None:
    """Run every built stage in order (each skipped when up to date)."""
    execute(None, config, set_, force, verbose)


def _with_config(command: str, config: Path, sets: list[str] | None, verbose: bool, action) -> None:
    """Load the config (and .env), run `action(cfg)`; every error is reported as `execute` reports it."""
    setup_logging(verbose)
    load_dotenv(Path(".env"))  # the working directory's; variables already set win
    with reported_errors(command, verbose) as where:
        where["cfg"] = load_config(config, sets or [])
        action(where["cfg"])


@app.command("push")
def push_command(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
                 dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded and write "
                                                       "the model card; upload nothing.")] = False,
                 verbose: VerboseOpt = False) -> None:
    """Upload the merged model and/or GGUFs to the Hugging Face Hub with a model card (token: HF_TOKEN)."""
    from distillery.commands.push import push

    _with_config("push", config, set_, verbose, lambda cfg: push(cfg, console, dry_run=dry_run))


@app.command("chat")
def chat_command(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
                 prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this one prompt "
                                                               "and exit (else: an interactive chat).")] = None,
                 gguf: Annotated[Optional[str], typer.Option("--gguf", help="A GGUF path, a file in the run's "
                                                             "export/gguf/, or a type (q8_0); default Q4_K_M.")] = None,
                 system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
                 max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest answer.")] = 256,
                 temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
                 context: Annotated[int, typer.Option("--context", help="llama.cpp's context in tokens: the "
                                                      "conversation and the answer.")] = 4096,
                 verbose: VerboseOpt = False) -> None:
    """Chat with the exported GGUF in llama.cpp (its embedded chat template), streaming the answer."""
    from distillery.commands.chat import chat

    _with_config("chat", config, set_, verbose,
                 lambda cfg: chat(cfg, console, gguf, prompt, system, max_tokens, temperature, context))


def main() -> None:
    stop_on_sigterm()
    app()
