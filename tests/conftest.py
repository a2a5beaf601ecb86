"""Test tiers (torchtune-style markers):

- unit (default): CPU, offline, seconds, on fixtures the tests write themselves;
- integration: the real demo model (SmolLM2-135M) through a real stage (Unsloth, PEFT, TRL, llama.cpp);
- slow: integration tests that take more than about a minute.

`pytest -m "not integration"` runs the fast tier only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs the real demo model through a real stage")
    config.addinivalue_line("markers", "slow: an integration test that takes more than about a minute")
    pin_this_worker()


def pin_this_worker() -> None:
    """Under several xdist workers, each worker (and every process it starts) runs on its own share of the cores.
    torch, llama.cpp and the training launcher size their thread pools to the cores they may use; two workers
    each spinning two threads on two cores would take turns instead of overlapping their imports, model loads
    and subprocess start-ups with each other's computation."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])


# Seconds each of the longest files took in a full run on 2 cores (2026-12-07); only the order below reads them.
LONGEST_FILES = {"tests/stages/test_finetune.py": 185, "tests/stages/test_distill_kd.py": 180,
                 "tests/stages/test_finetune_ddp.py": 171, "tests/e2e/test_demo.py": 135,
                 "tests/stages/test_export.py": 125, "tests/e2e/test_tiny_r1.py": 124,
                 "tests/stages/test_finetune_full.py": 104, "tests/export/test_llama_child.py": 90,
                 "tests/e2e/test_tiny_chatml.py": 75, "tests/stages/test_distill_server.py": 40,
                 "tests/evals/test_harness_identity.py": 35, "tests/stages/test_evaluate.py": 30,
                 "tests/export/test_streamed_merge.py": 30, "tests/evals/test_heldout.py": 28,
                 "tests/export/test_merge.py": 25, "tests/evals/test_gguf_answers.py": 23,
                 "tests/evals/test_gguf_backend.py": 20, "tests/stages/test_distill.py": 20}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (measured, else guessed from their markers), each file's tests in their own order.
    xdist hands out whole files in this order (`--dist loadfile --no-loadscope-reorder`); its default, the files
    with the most tests first, left the one-test end-to-end files for last, run alone by one worker while the
    other sat idle."""
    weights: dict[str, float] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        cost = 60.0 if item.get_closest_marker("slow") else 5.0 if item.get_closest_marker("integration") else 0.2
        weights[file] = weights.get(file, 0.0) + cost
    weights.update({file: seconds for file, seconds in LONGEST_FILES.items() if file in weights})
    order = {file: rank for rank, file in enumerate(sorted(weights, key=lambda f: -weights[f]))}
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])  # stable: a file keeps its tests' order


@pytest.fixture(scope="session")
def demo_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct as a local HF directory (materialised once per machine)."""
    from distillery.core.models import resolve_model_path

    return resolve_model_path("bundled:SmolLM2-135M-Instruct")


@pytest.fixture
def shared_file():
    """Path of a file in ../shared/, or skip with the reason when a user's clone has no ../shared."""

    def get(relative: str) -> Path:
        path = SHARED / relative
        if not path.is_file():
            pytest.skip(f"{path} is absent (../shared/ exists only beside the project's own checkouts)")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_r1_path() -> str:
    """bundled:tiny-qwen2-r1 (R1-Distill-Qwen's tokenizer and template, random Qwen2 weights) as a local directory."""
    from distillery.core.models import resolve_model_path

    return resolve_model_path("bundled:tiny-qwen2-r1")


@pytest.fixture(scope="session")
def renderer():
    """One chat-template child (core/chat_render.py) for the tests that render records one by one."""
    from distillery.core.chat_render import ChatRenderer

    with ChatRenderer() as one:
        yield one
