"""What this machine's CPU is: /proc/cpuinfo read for the llama.cpp build and for training's precision choice."""

from __future__ import annotations

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
