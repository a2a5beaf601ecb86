"""What this machine is: /proc/cpuinfo read for the llama.cpp build and for training's precision choice,
/proc/meminfo for the memory checks before export and full fine-tuning, and the cores this process may use (its
affinity and its cgroups' CPU quota) for llama.cpp's threads and ingest's workers; this process's umask, and
where Distillery keeps what it caches on this machine.

The standard library only: `just setup` compiles llama.cpp with this module (export/llama_build.py) while pip is
still installing everything else."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Iterator

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cache_home() -> Path:
    """DISTILLERY_HOME, or ~/.cache/distillery when it is unset or empty (an empty one is no directory: `Path("")`
    would be whatever directory the command runs in); a `~` in it (quoted in a script or .env) is the home
    directory, and a relative one is taken from the directory the command runs in."""
    return Path(os.environ.get("DISTILLERY_HOME") or Path.home() / ".cache" / "distillery").expanduser().absolute()


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


@contextlib.contextmanager
def file_lock(path: Path, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
    """An exclusive flock on `path` (created) while the block runs: jobs that build one cache entry take turns.
    `waiting` is called once when another job holds it."""
    import fcntl

    try:  # writable where it can be (NFS emulates an exclusive flock with a write lock); the umask sets its mode
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared cache: flock needs no write access
        handle = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def cpuinfo_field(*names: str) -> str:
    """The first /proc/cpuinfo line's value whose key starts with one of `names` ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(names)), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, arm64 `Features`)."""
    return set(cpuinfo_field("flags", "Features").split())


def cpu_bf16_native() -> bool:
    """bf16 in hardware (AMX / AVX512-BF16, Arm BF16); without it CPU bf16 is emulated and slower than fp32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16", "bf16"})


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's cpuset or `taskset`), not the machine's, and
    no more than its CPU quota (`docker --cpus`, a Kubernetes CPU limit): a thread per host core under a 4-core
    quota spends most of its time throttled."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota_cores()
    return min(cores, quota) if quota else cores


def own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy: {"": path} for v2, {"memory": path, "pids": path, ...} for v1."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def cpu_quota_cores(root: Path = CGROUP_ROOT) -> int | None:
    """The tightest CPU quota of this process's cgroup and its parents, in whole cores (rounded up): cgroup v2's
    `cpu.max`, else v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`; None where none is set or readable."""
    paths = own_cgroups()
    if "" in paths and (root / "cgroup.controllers").is_file():
        quotas = [_v2_quota(d / "cpu.max") for d in _lineage(root, paths[""])]
    elif "cpu" in paths:
        quotas = [_v1_quota(d) for d in _lineage(root / "cpu", paths["cpu"])]
    else:
        return None
    limits = [q for q in quotas if q]
    return math.ceil(min(limits)) if limits else None


def _lineage(root: Path, path: str) -> list[Path]:
    """A cgroup's directory and each parent's, up to the hierarchy's root."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
