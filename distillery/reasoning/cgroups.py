"""A cgroup for one sandbox run: a hard bound on the memory (tmpfs files included) and the number of processes
of everything the run starts, however many processes it forks.

cgroup v2 where the memory and pids controllers are delegated to our own cgroup, else cgroup v1 (separate memory
and pids hierarchies, as on many VMs and older container hosts); creating either needs write access to our
cgroup (root, or a delegated systemd scope). `ResourceGroup.create` returns None where neither is possible: the
caller then watches the run's memory itself (reasoning/sandbox.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from distillery.core.machine import CGROUP_ROOT, own_cgroups


class ResourceGroup:
    """One cgroup per hierarchy that limits the run (v2: one directory; v1: a memory and a pids directory)."""

    def __init__(self, directories: list[Path], kind: str):
        self.directories, self.kind = directories, kind

    @classmethod
    def create(cls, name: str, memory_bytes: int, max_processes: int) -> "ResourceGroup | None":
        for make in (cls._v2, cls._v1):
            try:
                group = make(name, memory_bytes, max_processes)
            except OSError:
                group = None
            if group is not None:
                return group
        return None

    @classmethod
    def _v2(cls, name: str, memory_bytes: int, max_processes: int) -> "ResourceGroup | None":
        path = own_cgroups().get("")
        parent = CGROUP_ROOT / (path or "/").lstrip("/")
        if path is None or not (CGROUP_ROOT / "cgroup.controllers").is_file():
            return None
        if not {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()):
            return None
        directory = parent / name
        directory.mkdir()
        group = cls([directory], "cgroup-v2")
        try:
            write(directory / "memory.max", memory_bytes)
            if (directory / "memory.swap.max").exists():
                write(directory / "memory.swap.max", 0)
            write(directory / "pids.max", max_processes)
        except OSError:
            group.remove()
            raise
        return group

    @classmethod
    def _v1(cls, name: str, memory_bytes: int, max_processes: int) -> "ResourceGroup | None":
        paths = own_cgroups()
        if "memory" not in paths or "pids" not in paths:
            return None
        memory = CGROUP_ROOT / "memory" / paths["memory"].lstrip("/") / name
        pids = CGROUP_ROOT / "pids" / paths["pids"].lstrip("/") / name
        if not memory.parent.is_dir() or not pids.parent.is_dir():
            return None
        memory.mkdir()
        group = cls([memory], "cgroup-v1")
        try:
            pids.mkdir()
            group.directories.append(pids)
            write(memory / "memory.limit_in_bytes", memory_bytes)
            if (memory / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no escape into swap
                write(memory / "memory.memsw.limit_in_bytes", memory_bytes)
            write(pids / "pids.max", max_processes)
        except OSError:
            group.remove()
            raise
        return group

    def add(self, pid: int) -> None:
        for directory in self.directories:
            write(directory / "cgroup.procs", pid)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.directories:
            try:
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return found

    def out_of_memory(self) -> bool:
        """Whether the kernel had to kill or refuse memory inside the group."""
        directory = self.directories[0]
        try:
            if self.kind == "cgroup-v2":
                events = dict(line.split() for line in (directory / "memory.events").read_text().splitlines())
                return int(events.get("oom_kill", 0)) > 0 or int(events.get("max", 0)) > 0
            # v1: a kill by the group's OOM killer shows in oom_control (Linux 4.13+), a refused charge in failcnt
            control = dict(line.split() for line in (directory / "memory.oom_control").read_text().splitlines())
            return int(control.get("oom_kill", 0)) > 0 or int((directory / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the group until it is empty (or the timeout passes)."""
        kill_file = self.directories[0] / "cgroup.kill"
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:
            if self.kind == "cgroup-v2" and kill_file.exists():
                write(kill_file, 1)
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for directory in self.directories:
            for _ in range(50):  # a cgroup whose last process just died can be busy for a moment
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")
