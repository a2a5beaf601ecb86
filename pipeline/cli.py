"""`distillery <stage>` for every stage and `distillery run` for all of them in order.

Each command takes the YAML config (`-c`, default configs/demo.yaml), any number of `--set key=value`
overrides, and `--force`. A stage first brings its upstream stages up to date (a no-op when they are).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import load_config, load_dotenv
from pipeline.console import console, setup_logging, summary_table
from pipeline.errors import UserError
from pipeline.runner import STAGES, pipeline_stages, plan, run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Distillery: raw data -> fine-tuned model -> GGUF in llama.cpp, one YAML config.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: --set finetune.max_steps=20")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
DEFAULT_CONFIG = Path("configs/demo.yaml")


def execute(target: str | None, config: Path, sets: list[str] | None, force: bool, verbose: bool) -> None:
    """Run `target` (with its upstream chain) or, with None, every built stage; print a summary table."""
    setup_logging(verbose)
    load_dotenv()
    try:
        cfg = load_config(config, sets or [])
        if target is None:
            names = pipeline_stages(cfg)
        else:
            names = plan(target, cfg)
        rows = []
        started = time.time()
        for name in names:
            # --force redoes the named stage; upstream stages are only redone when they changed.
            status, result, seconds = run_stage(name, cfg, force=force and (target is None or name == target))
            headline = "; ".join(f"{k} {v}" for k, v in (result.summary if result else [])[:4])
            where = f"{cfg.run.root}/{cfg.run.name}/{name}/"
            rows.append((name, status, f"{seconds:.1f}s", where, headline))
        console.print(summary_table(f"run {cfg.run.name} ({time.time() - started:.1f}s)", rows,
                                    ("stage", "status", "time", "artifacts", "result")))
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command to continue.")
        raise typer.Exit(130) from None


def _stage_command(stage: str, help_text: str) -> None:
    def command(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, force: ForceOpt = False,
                verbose: VerboseOpt = False) -> None:
        execute(stage, config, set_, force, verbose)

    command.__doc__ = help_text
    app.command(name=stage)(command)


STAGE_HELP = {
    "ingest": "Read every data source into normalized records, dedupe, split train/eval, report.",
    "distill": "Generate and verify reasoning traces with a teacher model.",
    "format": "Render records into prompt/completion pairs through a template; token-length report.",
    "finetune": "Train LoRA adapters with Unsloth (or the hf backend); resumes after a kill.",
    "evaluate": "Score MathQA on the base model, the adapter, the merged model and GGUFs.",
    "export": "Merge to 16-bit, convert and quantize to GGUF, verify.",
}
for _stage in STAGES:
    _stage_command(_stage, STAGE_HELP[_stage])


@app.command("run")
def run_all(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, force: ForceOpt = False,
            verbose: VerboseOpt = False) -> None:
    """Run every built stage in order (each skipped when up to date)."""
    execute(None, config, set_, force, verbose)


def main() -> None:
    # typer maps `set_` to --set via the Option declaration; the command line is otherwise standard.
    try:
        app()
    except UserError as err:  # raised outside execute(), e.g. while parsing
        console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
