"""llama.cpp's HF -> GGUF converter, installed beside the venv and run as a subprocess.

The converter (convert_hf_to_gguf.py + its `conversion/` package) needs llama.cpp's own gguf-py, which is
newer than the `gguf` distribution that transformers' GGUF loader uses. Installing gguf-py into the venv would
replace that distribution, so instead:

1. `python -m distillery.export.converter --install` (run by `just setup`) takes the llama-cpp-python sdist of the
   installed version (the same llama.cpp the runtime and quantizer come from; export/llama_build.py downloaded
   it once to compile the runtime),
   extracts vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/, requirements/, LICENSE} into
   <venv>/share/llama.cpp/ (a temp directory renamed into place: idempotent and atomic);
2. the export stage runs the converter with PYTHONPATH=<that>/gguf-py:<that>, offline, so only that child
   process sees llama.cpp's gguf module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from distillery.core.errors import UserError, exit_code
from distillery.core.rundir import atomic_write_text

log = logging.getLogger(__name__)

DISTRIBUTION = "llama-cpp-python"
SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from the sdist's vendor/llama.cpp/ (directories and files).
MEMBERS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "requirements", "LICENSE")
STAMP = "VERSION"
SUPPORTED = "supported-models.json"  # supported_models' cache


def install_dir() -> Path:
    """<venv>/share/llama.cpp (overridable with DISTILLERY_LLAMA_CPP for a non-venv install)."""
    return Path(os.environ.get("DISTILLERY_LLAMA_CPP") or Path(sys.prefix) / "share" / "llama.cpp")  # empty: unset


def runtime_version() -> str:
    """The installed llama-cpp-python version: the converter must come from the same release."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise UserError(f"{DISTRIBUTION} is not installed: run `just setup`.") from None


def installed_version(directory: Path | None = None) -> str | None:
    stamp = (directory or install_dir()) / STAMP
    return stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None


def converter_script() -> Path:
    """The converter script, or a UserError saying how to install it."""
    directory = install_dir()
    script = directory / SCRIPT
    if not script.is_file() or installed_version(directory) is None:
        raise UserError(f"llama.cpp's GGUF converter is not installed in {directory}: run `just setup` "
                        "(or `.venv/bin/python -m distillery.export.converter --install`, which needs network once).")
    return script


def converter_env() -> dict[str, str]:
    """The environment of the converter subprocess: its own gguf-py first, no network."""
    directory = install_dir()
    env = dict(os.environ)
    paths = [str(directory / "gguf-py"), str(directory)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NO_LOCAL_GGUF", None)  # set, it would make the converter skip its own gguf-py
    return env


def extract_converter(sdist: Path, target: Path, version: str) -> None:
    """Extract the converter's files from an sdist into `target`, atomically (temp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            found = set()
            for member in archive.getmembers():
                parts = Path(member.name).parts
                # <sdist root>/vendor/llama.cpp/<member>/...
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in MEMBERS:
                    continue
                if not (member.isfile() or member.isdir()):
                    continue  # no links or devices from an archive
                member.name = str(Path(*parts[3:]))
                # the "data" filter (no links out, no devices) from Python 3.11.4 on; members are checked above
                archive.extract(member, tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                found.add(parts[3])
        missing = [m for m in MEMBERS if m not in found and m != "LICENSE"]
        if missing:
            raise UserError(f"{sdist.name} has no vendor/llama.cpp/{', '.join(missing)}: not a llama-cpp-python sdist "
                            "with llama.cpp's converter.")
        (tmp / STAMP).write_text(version + "\n", encoding="utf-8")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_converter() -> list[str]:
    """Run the installed converter's model listing: proves its imports resolve in this venv; returns the list."""
    done = subprocess.run([sys.executable, str(converter_script()), "--print-supported-models"],
                          capture_output=True, text=True, env=converter_env())
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise UserError("llama.cpp's converter does not start in this environment:\n  " + "\n  ".join(tail))
    names = [line.strip().lstrip("-").strip() for line in (done.stdout + done.stderr).splitlines()]
    return sorted({n for n in names if n.endswith(("ForCausalLM", "LMHeadModel", "Model", "ForConditionalGeneration"))
                   and " " not in n})


def supported_models() -> list[str]:
    """check_converter's list, kept beside the converter (SUPPORTED) for as long as the converter is the same file
    of the same version: listing takes 3 s of CPU, and every export asks."""
    script = converter_script()
    stat = script.stat()
    key = f"{installed_version()} {stat.st_size} {stat.st_mtime_ns}"
    cache = install_dir() / SUPPORTED
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["key"] == key and all(isinstance(name, str) for name in cached["models"]):
            return list(cached["models"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    models = check_converter()
    with contextlib.suppress(OSError):  # a read-only install lists them each time
        atomic_write_text(cache, json.dumps({"key": key, "models": models}) + "\n")
    return models


def install(sdist: Path | None = None, force: bool = False) -> Path:
    """Install the converter of the runtime's llama.cpp version; a no-op when it is already there."""
    version = runtime_version()
    target = install_dir()
    if not force and installed_version(target) == version and (target / SCRIPT).is_file():
        log.info("llama.cpp converter %s already installed in %s", version, target)
        return target
    from distillery.export.llama_build import fetch_sdist

    extract_converter(sdist or fetch_sdist(version), target, version)
    log.info("installed llama.cpp's converter (%s %s) into %s", DISTRIBUTION, version, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.export.converter", description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="install the converter (idempotent)")
    parser.add_argument("--sdist", type=Path, help="use this llama-cpp-python sdist instead of the cached one")
    parser.add_argument("--force", action="store_true", help="reinstall even if the same version is there")
    parser.add_argument("--check", action="store_true", help="run the converter once to check its imports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work() -> None:
        if args.install:
            install(args.sdist, args.force)
        if args.check or args.install:
            (install_dir() / SUPPORTED).unlink(missing_ok=True)
            models = supported_models()  # runs the converter, and keeps its list for the exports
            print(f"llama.cpp converter {installed_version()} in {install_dir()}: ok ({len(models)} architectures)")
        if not (args.install or args.check):
            parser.print_help()

    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
