"""llama-cpp-python built once per machine for a named x86-64 level, not for the CPU it happens to be built on.

PyPI has only llama-cpp-python's sources; pip compiles them with llama.cpp's default, `GGML_NATIVE=ON`
(`-march=native`). Such a build is tied to the machine that compiled it: when pip's wheel cache hands it to a CPU
with fewer instruction sets it dies with SIGILL, and on a CPU with AMX it segfaults in the first quantized matmul
(ggml-org/llama.cpp issue 20824: GCC 12 drops the stores that build ggml's AMX tile configuration on the stack,
so the tiles are configured with no rows). So `just setup` builds it here instead, for a CPU level (`PROFILES`):

- `x86-64-v4-amx` (the default where the CPU has AMX and every v4 flag): v4 plus AMX-INT8/BF16, with
  llama_amx_tile_config.patch applied to llama.cpp (the tile configuration a static constant): quantized weights
  go to ggml's AMX buffer, and a Q8_0 prompt is read 1.8x (the demo model) to 3x (1.78B) faster than by v4
  (bench/export.py --builds-at);
- `x86-64-v4` (the default on other CPUs with every one of its flags): v3 plus AVX-512 (F, CD, VL, DQ, BW, VBMI,
  VNNI, BF16), without AMX: on AVX-512 CPUs prompt processing runs at native speed;
- `x86-64-v3` (the default elsewhere): AVX2, FMA, F16C, BMI2 and nothing newer: runs on every x86-64 CPU since
  2013-2015 (Intel Haswell, AMD Zen 1), no AVX-512 and no AMX code at all;
- `native`: llama.cpp's default (patched too on an AMX CPU), for comparison (bench/export.py) or for a user who
  wants it on their own machine.

`just setup` ends with a self-check (llama_check.py) that decodes a quantized GGUF in a child process. Where
setup chose the AMX level and it cannot be compiled here or fails that check, `install` puts the x86-64-v4 build
in its place.

Only the libraries the Python binding loads are built (libllama, libggml*): no multimodal library
(LLAVA_BUILD=OFF) and no llama.cpp `common` library with its HTTP client (see llama_build.cmake), which
halves the compile. `DISTILLERY_LLAMA_CMAKE_ARGS` adds CMake arguments (e.g. `-DGGML_CUDA=ON`).

Wheels go to <DISTILLERY_HOME>/wheels/<name>-<version>-<profile>-<key>/, keyed by everything that went into
the build (the version, the CMake arguments, the patch, the machine type, and for `native` the CPU's flags): a
wheel is reused only where it was built for, and pip's own wheel cache is never involved.

    python -m distillery.export.llama_build build     # compile once (a no-op when the wheel is cached)
    python -m distillery.export.llama_build install   # install the cached wheel into this Python environment
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError, exit_code, stop_on_sigterm
from distillery.core.machine import cache_home, cpu_flags, cpuinfo_field, current_umask, file_lock

DISTRIBUTION = "llama-cpp-python"
VERSION = "0.3.36"  # the [llama] extra in pyproject.toml pins the same version
HOOK = Path(__file__).with_name("llama_build.cmake")
X86_64_V3 = ("avx2", "fma", "f16c", "bmi2")
X86_64_V4 = X86_64_V3 + ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni",
                         "avx512_bf16")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
NO_AMX = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
AMX = ("-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON", "-DGGML_AMX_BF16=ON")
V3_ARGS = ("-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
           "-DGGML_BMI2=ON")
V4_ARGS = (*V3_ARGS, "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON")
PROFILES: dict[str, tuple[str, ...]] = {
    "x86-64-v3": (*V3_ARGS, "-DGGML_AVX512=OFF", *NO_AMX),
    "x86-64-v4": (*V4_ARGS, *NO_AMX),
    "x86-64-v4-amx": (*V4_ARGS, *AMX),
    "native": ("-DGGML_NATIVE=ON",),
}
REQUIRED_FLAGS = {"x86-64-v3": X86_64_V3, "x86-64-v4": X86_64_V4, "x86-64-v4-amx": X86_64_V4 + AMX_FLAGS, "native": ()}
# Applied to the sources of the builds that compile ggml's AMX code (`patched`).
PATCH = Path(__file__).with_name("llama_amx_tile_config.patch")
# Flags that tell which llama.cpp code a CPU can run; printed when llama.cpp fails on it.
RELEVANT_FLAGS = X86_64_V4 + ("avx_vnni", *AMX_FLAGS)
REBUILD = ("`just setup` installs a build for this CPU's level (unset DISTILLERY_LLAMA_CPU if you set it; "
           "DISTILLERY_LLAMA_CPU=x86-64-v3 is the most portable)")


def describe_cpu() -> str:
    """'AMD EPYC: avx2 fma ... amx_int8' — the model and the flags that matter to llama.cpp's kernels."""
    flags = cpu_flags()
    present = [f for f in RELEVANT_FLAGS if f in flags]
    return (f"{cpuinfo_field('model name') or platform.machine()}: "
            f"{' '.join(present) or 'none of ' + ', '.join(RELEVANT_FLAGS[:4])}")


def chosen_profile() -> str:
    """DISTILLERY_LLAMA_CPU, else on x86-64 the highest level whose every flag this CPU has (x86-64-v4-amx,
    x86-64-v4, else x86-64-v3), and llama.cpp's native default elsewhere (arm64)."""
    profile = os.environ.get("DISTILLERY_LLAMA_CPU", "").strip()
    if profile:
        if profile not in PROFILES:
            raise UserError(f"DISTILLERY_LLAMA_CPU={profile}: unknown; use one of {', '.join(PROFILES)}.")
        return profile
    if platform.machine() not in ("x86_64", "AMD64"):
        return "native"
    for level in ("x86-64-v4-amx", "x86-64-v4"):
        if set(REQUIRED_FLAGS[level]) <= cpu_flags():
            return level
    return "x86-64-v3"


def required_flags(profile: str) -> list[str]:
    """The CPU flags a build of `profile` uses: its level's, or for native the relevant ones of this CPU."""
    if profile == "native":
        return [flag for flag in RELEVANT_FLAGS if flag in cpu_flags()]
    return list(REQUIRED_FLAGS[profile])


def check_installed_build() -> None:
    """Refuse, before llama.cpp is loaded, a build that uses instructions this CPU lacks (a .venv moved or shared
    between machines): it would die with SIGILL, or worse, at the first matrix product."""
    record = installed_build()
    flags = cpu_flags()
    missing = [flag for flag in record.get("required_flags", []) if flags and flag not in flags]
    if missing:
        raise UserError(f"the installed llama.cpp was built for {record.get('profile')} and this CPU lacks "
                        f"{', '.join(missing)} ({describe_cpu()}): this .venv was set up on another machine. Run "
                        "`just setup` here; it builds llama.cpp for this CPU.")


def patched(profile: str) -> bool:
    """Whether a build of `profile` compiles ggml's AMX code, and so gets PATCH: the AMX level, and native on an
    AMX CPU."""
    return profile == "x86-64-v4-amx" or (profile == "native" and "amx_tile" in cpu_flags())


def cmake_args(profile: str) -> list[str]:
    extra = os.environ.get("DISTILLERY_LLAMA_CMAKE_ARGS", "").split()
    return [*PROFILES[profile], "-DLLAVA_BUILD=OFF", "-DGGML_CCACHE=OFF", f"-DCMAKE_PROJECT_INCLUDE={HOOK}", *extra]


def check_cpu_supports(profile: str) -> None:
    flags = cpu_flags()
    missing = [f for f in REQUIRED_FLAGS[profile] if flags and f not in flags]
    if missing:
        raise UserError(f"this CPU lacks {', '.join(missing)}, which the {profile} build of llama.cpp needs "
                        f"({describe_cpu()}). Unset DISTILLERY_LLAMA_CPU or set it to x86-64-v3.")


def wheel_dir(profile: str) -> Path:
    """Where the wheel for `profile` (with this machine's arguments) is kept."""
    key = {"version": VERSION, "profile": profile, "cmake": [a for a in cmake_args(profile) if "PROJECT_INCLUDE" not in a],
           "hook": HOOK.read_text(encoding="utf-8"), "machine": platform.machine()}
    if patched(profile):
        key["patch"] = PATCH.read_text(encoding="utf-8")
    if profile == "native":
        key["cpu"] = sorted(cpu_flags())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_home() / "wheels" / f"{DISTRIBUTION}-{VERSION}-{profile}-{digest}"


def cached_wheel(profile: str) -> Path | None:
    wheels = sorted(wheel_dir(profile).glob("*.whl"))
    return wheels[0] if wheels else None


def fetch_sdist(version: str = VERSION) -> Path:
    """The llama-cpp-python sdist of `version`, downloaded once into <DISTILLERY_HOME>/sdists/."""
    target_dir = cache_home() / "sdists"
    existing = sorted(target_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if existing:
        return existing[0]
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-cache-dir",
               "--disable-pip-version-check", f"{DISTRIBUTION}=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise UserError(f"could not download the {DISTRIBUTION}=={version} sources (network is needed once, at "
                            f"setup): {' | '.join(tail)}")
        final = target_dir / archives[0].name
        os.replace(archives[0], final)
    return final


def build(profile: str) -> Path:
    """The wheel for `profile`: from the cache, else compiled now (a few minutes) and cached. Setups that need
    the same build at once (two clones on one machine, a job array) take turns: one compiles, the others wait for
    its wheel."""
    check_cpu_supports(profile)
    wheel = cached_wheel(profile)
    if wheel is not None:
        say(f"llama-cpp-python {VERSION} ({profile}): cached build {wheel.parent}")
        return wheel
    target = wheel_dir(profile)
    target.parent.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        say(f"llama-cpp-python {VERSION} ({profile}): another setup is compiling it; waiting for it")

    with file_lock(target.parent / f".{target.name}.lock", waiting):
        wheel = cached_wheel(profile)
        if wheel is not None:
            return wheel
        for left in target.parent.glob(f".{target.name}.tmp-*"):  # a compile killed outright (-9, the OOM killer)
            shutil.rmtree(left, ignore_errors=True)
        return compile_wheel(profile, target)


def compile_wheel(profile: str, target: Path) -> Path:
    sdist = fetch_sdist()
    log_path = target.parent / f"{target.name}.log"
    say(f"llama-cpp-python {VERSION}: compiling for {profile} (once per machine, a few minutes; log: {log_path})")
    started = time.time()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the cached wheel from the machine's other users
    try:
        source = patched_sources(sdist, tmp / "src") if patched(profile) else sdist
        env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args(profile)),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
               "--verbose", str(source), "-w", str(tmp)]
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"CMAKE_ARGS={env['CMAKE_ARGS']}\n$ {' '.join(cmd)}\n")
            log.flush()
            returncode = run_as_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        shutil.rmtree(tmp / "src", ignore_errors=True)
        built = sorted(tmp.glob("*.whl"))
        if returncode != 0 or not built:
            tail = "\n  ".join(log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:])
            raise UserError(f"compiling llama-cpp-python {VERSION} for {profile} failed (exit {returncode}); "
                            f"the whole log is {log_path}. Its end:\n  {tail}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"llama-cpp-python {VERSION} ({profile}): compiled in {time.time() - started:.0f} s")
    return sorted(target.glob("*.whl"))[0]


def run_as_group(cmd: list[str], **popen: Any) -> int:
    """Run `cmd` in a process group of its own and wait; stopped (Ctrl-C, SIGTERM), the whole group goes with it:
    pip, CMake and every compiler it started, which would otherwise compile on for minutes."""
    process = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        return process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def patched_sources(sdist: Path, into: Path) -> Path:
    """The sdist unpacked into `into` with PATCH applied by `git apply` (which looks for no repository above
    `into`); returns the source tree."""
    import tarfile

    into.mkdir(parents=True)
    with tarfile.open(sdist) as archive:  # the "data" filter (no links out, no devices) from Python 3.11.4 on
        archive.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    root = next(path for path in into.iterdir() if path.is_dir())
    try:
        done = subprocess.run(["git", "apply", str(PATCH)], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "GIT_CEILING_DIRECTORIES": str(into)})
    except FileNotFoundError:
        raise UserError(f"git is needed to apply {PATCH.name} to llama.cpp: install git, or set "
                        "DISTILLERY_LLAMA_CPU=x86-64-v4 (no AMX code, no patch).") from None
    if done.returncode != 0:
        raise UserError(f"{PATCH.name} does not apply to llama-cpp-python {VERSION}'s llama.cpp: "
                        f"{' '.join(done.stderr.split())[:300]}. Set DISTILLERY_LLAMA_CPU=x86-64-v4 (no AMX code, "
                        "no patch).")
    return root


def install(profile: str) -> Path:
    """Install the cached wheel for `profile` into this environment (replacing any other build of it)."""
    wheel = build(profile)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(wheel)], check=True)
    subprocess.run([*pip, str(wheel)], check=True)  # its own dependencies (numpy, diskcache, jinja2)
    record = build_record_path()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"version": VERSION, "profile": profile, "wheel": str(wheel),
                                  "cmake_args": cmake_args(profile), "required_flags": required_flags(profile)},
                                 indent=2) + "\n", encoding="utf-8")
    say(f"llama-cpp-python {VERSION} ({profile}) installed from {wheel.name}")
    return wheel


def install_checked(profile: str, chosen: bool) -> Path:
    """`install(profile)`; where the AMX build was chosen for this CPU (not asked for) and cannot be built here (an
    old compiler without -mamx-int8, no git for the patch) or fails the self-check (a CPU whose AMX the patch does
    not cover), the x86-64-v4 build in its place."""
    if profile != "x86-64-v4-amx" or not chosen:
        return install(profile)
    try:
        wheel = install(profile)
    except UserError as err:
        say(f"{err}\nllama.cpp's AMX build could not be built here: installing the x86-64-v4 build (no AMX) instead")
        return install("x86-64-v4")
    check = [sys.executable, "-m", "distillery.export.llama_check", "--no-remedy"]
    if subprocess.run(check).returncode == 0:
        return wheel
    say("llama.cpp's AMX build failed its self-check on this CPU: installing the x86-64-v4 build (no AMX) instead")
    return install("x86-64-v4")


def build_record_path() -> Path:
    return Path(sys.prefix) / "share" / "distillery" / "llama-build.json"


def installed_build() -> dict[str, str]:
    """What `install` recorded about the llama-cpp-python in this environment ({} when it did not install it)."""
    try:
        return json.loads(build_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


PROFILE_HELP = ("default: $DISTILLERY_LLAMA_CPU, else on x86-64 x86-64-v4-amx or x86-64-v4 where this CPU has every "
                "one of its flags and x86-64-v3 elsewhere, native on other machines")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.export.llama_build", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "install", "profile"),
                        help="build: compile once into the cache; install: into this environment; profile: print the "
                             "build this machine needs (the level chosen for this CPU and its key)")
    parser.add_argument("--profile", choices=tuple(PROFILES), help=PROFILE_HELP)
    args = parser.parse_args(argv)
    chosen = args.profile is None and not os.environ.get("DISTILLERY_LLAMA_CPU", "").strip()

    def act() -> Path | None:
        profile = args.profile or chosen_profile()
        if args.action == "profile":  # the build this machine needs (native's is keyed by the CPU's flags too)
            print(wheel_dir(profile).name)
            return None
        return build(profile) if args.action == "build" else install_checked(profile, chosen)

    if args.action != "profile":  # setup stops a compile it started in the background with SIGTERM; a dropped
        stop_on_sigterm()          # terminal (SIGHUP) stops it too
        signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
    try:
        return exit_code(act)
    except KeyboardInterrupt:
        say(f"llama-cpp-python: {args.action} stopped")
        return 130
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(map(str, err.cmd[:6]))} ... failed with exit code {err.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
