"""What this machine is: /proc/cpuinfo read for the llama.cpp build and for training's precision choice, and
/proc/meminfo for the memory checks before export and full fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path


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
    """The cores this process may run on (its affinity: a container's cpuset or `taskset`), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
