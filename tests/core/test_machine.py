"""The cores a process may use: its affinity, and no more than the CPU quota of its cgroup or of any parent
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), read from cgroup trees the tests write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distillery.core import machine


def v2_tree(root: Path, quotas: dict[str, str]) -> Path:
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for path, value in quotas.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(value + "\n")
    return root


def test_the_tightest_v2_quota_of_the_cgroup_and_its_parents_in_whole_cores(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(machine, "own_cgroups", lambda: {"": "/kube/pod/container"})
    root = v2_tree(tmp_path, {".": "max 100000", "kube": "max 100000", "kube/pod": "250000 100000",
                              "kube/pod/container": "max 100000"})
    assert machine.cpu_quota_cores(root) == 3  # 2.5 cores of the pod's quota: 3 threads, not the host's count
    (root / "kube/pod/container/cpu.max").write_text("150000 100000\n")
    assert machine.cpu_quota_cores(root) == 2
    (root / "kube/pod/cpu.max").write_text("max 100000\n")
    (root / "kube/pod/container/cpu.max").write_text("max 100000\n")
    assert machine.cpu_quota_cores(root) is None
    for unreadable in ("100000 0", "", "1 2 3", "\u200b"):  # a zero period, empty, too many fields, invisible
        (root / "kube/pod/container/cpu.max").write_text(unreadable)
        assert machine.cpu_quota_cores(root) is None


def test_a_v1_quota_and_none_where_nothing_is_readable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(machine, "own_cgroups", lambda: {"cpu": "/docker/abc", "cpuacct": "/docker/abc"})
    group = tmp_path / "cpu" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("400000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: no quota
    assert machine.cpu_quota_cores(tmp_path) == 4
    (group / "cpu.cfs_quota_us").write_text("garbage\n")
    assert machine.cpu_quota_cores(tmp_path) is None
    monkeypatch.setattr(machine, "own_cgroups", lambda: {})
    assert machine.cpu_quota_cores(tmp_path) is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_usable_cores_is_the_affinity_capped_by_the_quota(monkeypatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(machine, "cpu_quota_cores", lambda: None)
    assert machine.usable_cores() == affinity
    monkeypatch.setattr(machine, "cpu_quota_cores", lambda: 1)
    assert machine.usable_cores() == 1
    monkeypatch.setattr(machine, "cpu_quota_cores", lambda: affinity + 8)
    assert machine.usable_cores() == affinity
