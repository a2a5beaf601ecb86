"""A pytest plugin (pyproject's addopts: -p tests.xdist_crash): xdist's file-scoped scheduling, minus a rerun.

When a worker dies natively, pytest-xdist 3.8's `--dist loadfile` puts the test that crashed it back in the queue
with the rest of its file, so the next worker crashes on it again, until --max-worker-restart is spent and every
test left is lost. Here the crashed test counts as done: it is reported as failed (crashed) once, and only the
tests after it in its file go to a fresh worker. (`--dist load` drops it correctly, but splits a file's tests
across workers, which builds every module fixture, a whole pipeline run for some, once per worker.)
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler.loadfile import LoadFileScheduling


class CrashOnceLoadFile(LoadFileScheduling):
    def remove_node(self, node: Any) -> str | None:
        crashed = next((nodeid for unit in self.assigned_work.get(node, {}).values()
                        for nodeid, done in unit.items() if not done), None)
        for unit in self.assigned_work.get(node, {}).values():
            if crashed in unit:
                unit[crashed] = True
        super().remove_node(node)
        return crashed


@pytest.hookimpl(trylast=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return CrashOnceLoadFile(config, log) if config.getoption("dist") == "loadfile" else None
