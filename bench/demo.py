"""The demo's wall time: `distillery run` on the demo config in a fresh run directory, then again unchanged.

    .venv/bin/python bench/demo.py [--config configs/demo.yaml | configs/tiny-r1.yaml]

What `just demo` does after setup (the demo model is already materialised in the cache): every stage from
ingest to evaluate and the held-out answer through llama.cpp. Targets (issues 3, 7 and 24), on 2 CPU cores: the
whole demo < 3 min after setup (it was < 10 min), its finetune stage < 5 min, the held-out scoring of every
artifact <= 30 s, a second run with nothing changed < 10 s. There is no baseline to divide by; the figures are
absolute times against those targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import figure

ROOT = Path(__file__).resolve().parents[1]


def timed_run(config: Path, root: Path) -> tuple[float, str]:
    command = [sys.executable, "-m", "distillery", "run", "-c", str(config), "--set", f"run.root={root}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()
    config = Path(args.config)
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        first, output = timed_run(config, Path(tmp))
        manifest = json.loads(next(Path(tmp).glob("*/manifest.json")).read_text())
        results = next(Path(tmp).glob("*/evaluate/results.json"), None)
        heldout = json.loads(results.read_text())["heldout"] if results else {}
        second, rerun_output = timed_run(config, Path(tmp))
    stages = {name: entry["seconds"] for name, entry in manifest["stages"].items()}
    print(output[-4000:])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("stage seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in stages.items()))
    print(f"first run {first:.0f} s, second run {second:.1f} s")
    up_to_date = rerun_output.count("up to date") >= len(stages)
    if config.name != "demo.yaml":  # another config: one figure, its whole run (the stage times are printed above)
        figure(f"{config.stem} ({config.name}), fresh run directory", f"{first / 60:.1f} min", "-", "< 8 min")
        return 0
    figure(f"demo ({config.name}), fresh run directory", f"{first / 60:.1f} min", "-", "< 3 min")
    if heldout.get("seconds"):
        spent = sum(heldout["seconds"].values())
        figure(f"demo held-out scoring ({heldout['items']} records, {heldout['generated']} answered, "
               f"{len(heldout['seconds'])} artifacts)", f"{spent:.0f} s", "-", "<= 30 s")
    figure("demo finetune stage", f"{stages['finetune'] / 60:.1f} min", "-", "< 5 min")
    figure("demo again, nothing changed", f"{second:.1f} s, {'every stage up to date' if up_to_date else 'NOT up to date'}",
           "-", "< 10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
