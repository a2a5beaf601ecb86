"""Test tiers (torchtune-style markers):

- unit (default): CPU, offline, seconds, on fixtures the tests write themselves;
- integration: the real demo model (SmolLM2-135M) through a real stage (Unsloth, PEFT, TRL, llama.cpp);
- slow: integration tests that take more than about a minute.

`pytest -m "not integration"` runs the fast tier only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs the real demo model through a real stage")
    config.addinivalue_line("markers", "slow: an integration test that takes more than about a minute")


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
