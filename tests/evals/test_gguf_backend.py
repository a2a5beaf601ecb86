"""GGUF scoring through llama-cpp-python: the bundled SmolLM2 Q4_1 GGUF, and GGUFs that do not load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from distillery.evals.gguf_backend import GGUFLoadError, GGUFModel
from distillery.core.models import BUNDLED


def bundled_gguf() -> Path:
    package, filename = BUNDLED["SmolLM2-135M-Instruct"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (just setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def test_a_file_that_is_not_a_gguf_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "model-Q8_0.gguf"
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(GGUFLoadError, match="not a GGUF file"):
        GGUFModel(path)


def test_a_truncated_gguf_is_a_load_error(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    path = tmp_path / "model-Q4_1.gguf"
    path.write_bytes(bundled_gguf().read_bytes()[:4096])
    with pytest.raises(GGUFLoadError, match="llama.cpp cannot load"):
        GGUFModel(path)


def test_a_context_llama_cpp_cannot_make_is_named_as_such_not_as_a_file_that_does_not_load(tmp_path: Path) -> None:
    """From a review: a context too large for memory (16M tokens: a 386 GB cache for SmolLM2) was "cannot load
    <file>", blaming the GGUF. Run under an address-space limit (inherited by llama.cpp's child process), so that the
    allocation fails at once whatever the machine's overcommit policy."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    script = ("from pathlib import Path\nfrom distillery.evals.gguf_backend import GGUFContextError, GGUFModel\n"
              f"try:\n    GGUFModel(Path({str(bundled_gguf())!r}), n_ctx=1 << 24)\nexcept GGUFContextError as err:\n"
              "    print(err)\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(["bash", "-c", f"ulimit -v 8000000 && exec {sys.executable!r} -c \"$0\"", script],
                            capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "but could not make a context of 16,777,216 tokens for it" in result.stdout, result.stdout + result.stderr


def test_target_log_probabilities_match_a_float64_log_softmax() -> None:
    """The scorer's float32 exponentials summed in float64 against the whole float64 log-softmax, on rows wide as
    a real vocabulary with logits far from 0 (a row's maximum is what keeps exp from overflowing), across blocks."""
    import numpy as np

    from distillery.evals.gguf_backend import log_softmax_rows
    from distillery.export.verify import log_softmax

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((70, 49152)) * 4 + rng.uniform(-200, 200, (70, 1))).astype(np.float32)
    rows[::2, 7] += 30  # a confident row: most of the mass on one token
    targets = [7 if k % 3 else int(rng.integers(49152)) for k in range(70)]
    exact = log_softmax(rows.astype(np.float64))[np.arange(70), targets]
    assert np.abs(np.array(log_softmax_rows(rows, targets, block=16)) - exact).max() < 1e-6


def fresh_eval(model: GGUFModel, context: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """The continuation's log-likelihood from a fresh cache: the context, then the continuation, no rewinding.

    (Decoded in the same two steps as the scorer: llama.cpp's CPU kernels round differently for large and small
    batches, so one pass over everything differs by up to a few tenths on long continuations.)"""
    return model.llama.call(_fresh_eval, context, continuation)


def _fresh_eval(state: dict, emit, context: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """In the llama.cpp child: nothing kept from before (keep 0), every row from the context's last on."""
    from distillery.evals.gguf_backend import decode, log_softmax_rows

    start, picked = len(context) - 1, []
    decode(state["llm"], list(context), 0, start, lambda at, rows: picked.extend(log_softmax_rows(rows, [continuation[0]])))
    decode(state["llm"], list(continuation[:-1]), len(context), len(context),
           lambda at, rows: picked.extend(log_softmax_rows(rows, list(continuation[1:]))))
    return sum(picked)


@pytest.mark.integration
def test_gguf_scores_follow_the_hf_model_it_was_made_from(demo_model_path: str, shared_file) -> None:
    """Rewinding the KV cache per choice equals a fresh pass; the demo HF model is this GGUF dequantized, so the
    tokens are the same and the log-likelihoods close (Q4_1 weights and llama.cpp's 8-bit activations vs fp32)."""
    pytest.importorskip("llama_cpp")
    from distillery.evals import mathqa
    from distillery.evals.hf_backend import HFModel
    from distillery.evals.scoring import build_request

    items = mathqa.load_items(str(shared_file("data/mathqa/test.jsonl")), "test", 6, mathqa.LoadReport())
    contexts = mathqa.build_contexts(items, 0, [], False)
    gguf, hf = GGUFModel(bundled_gguf(), threads=2), HFModel(demo_model_path, "float32")
    g_requests = [build_request(gguf.encode, c, mathqa.continuations(i)) for i, c in zip(items, contexts)]
    h_requests = [build_request(hf.encode, c, mathqa.continuations(i)) for i, c in zip(items, contexts)]
    assert g_requests == h_requests  # one tokenizer, read from the GGUF by both
    g_scores = gguf.loglikelihoods(g_requests, 8)
    for request, scores in list(zip(g_requests, g_scores))[:2]:
        fresh = [fresh_eval(gguf, request.context, c) for c in request.continuations]
        assert scores == pytest.approx(fresh, abs=1e-4)  # rewinding the cache leaves nothing of the previous choice
    h_scores = hf.loglikelihoods(h_requests, 8)
    diffs = [abs(a - b) for gs, hs in zip(g_scores, h_scores) for a, b in zip(gs, hs)]
    assert max(diffs) < 1.0 and sum(diffs) / len(diffs) < 0.3, diffs
    agree = sum(mathqa.predictions(i, g) == mathqa.predictions(i, h) for i, g, h in zip(items, g_scores, h_scores))
    assert agree >= len(items) // 2, agree


@pytest.mark.integration
def test_a_held_out_sequence_longer_than_2048_tokens_is_scored(tmp_path: Path, tiny_r1_path: str) -> None:
    """format.max_length 2100 (R1-style traces): evaluate gives llama.cpp a context that holds the whole sequence
    and the longest answer after it (evaluate.gguf_context), not a fixed 2048 that such a sequence overflows. On
    the tiny R1 model's GGUF (2,080 positions of the demo model took 23 s on one core)."""
    pytest.importorskip("llama_cpp")
    from tests.stages.test_evaluate import load_config_dict
    from distillery.export.gguf import convert_to_gguf
    from distillery.stages.evaluate import Artifact, load_model

    cfg = load_config_dict({"ingest": {"sources": [{"name": "x", "kind": "hf", "files": "x.jsonl"}]},
                            "format": {"max_length": 2100}}, tmp_path)
    convert_to_gguf(Path(tiny_r1_path), tmp_path / "tiny-F16.gguf", "f16", "tiny")
    model = load_model(Artifact("q", "gguf", tmp_path / "tiny-F16.gguf"), cfg)
    try:
        tokens = [1000 + (7 * i) % 20000 for i in range(2080)]
        score = model.completion_logprobs([tokens], [2060], 8)[0]
        assert -20 * 30 < score < 0  # 20 scored tokens, each a finite log-probability
    finally:
        model.close()


def test_what_llama_cpp_cannot_decode_is_an_error_that_says_why() -> None:
    """llama-cpp-python's bare 'llama_decode returned 1' becomes a GGUFDecodeError naming what ran out, and ids past
    the vocabulary are refused before llama.cpp sees them."""
    pytest.importorskip("llama_cpp")
    from distillery.evals.gguf_backend import GGUFDecodeError

    model = GGUFModel(bundled_gguf(), n_ctx=256, threads=2, answers_at_once=1)
    try:
        with pytest.raises(GGUFDecodeError, match="no room for them in its context of 256 cells"):
            model.completion_logprobs([[1000 + i for i in range(400)]], [390], 8)
        assert model.completion_logprobs([[1000, 1001, 1002]], [1], 8)[0] < 0  # the model still answers after it
        model.check_vocabulary(49151)
        with pytest.raises(GGUFDecodeError, match="vocabulary of 49152 tokens, but the training tokenizer's ids reach"):
            model.check_vocabulary(50000)
    finally:
        model.close()


def bos_of(state: dict, emit) -> tuple[int, str]:
    """In the llama.cpp child: the BOS token's id and text."""
    llm = state["llm"]
    return llm.token_bos(), llm.detokenize([llm.token_bos()], special=True).decode()


def prompt_tokens_of_an_answer(state: dict, emit, prompt: str) -> list[int]:
    """The tokens gguf_backend._generate puts before the answer (llama.cpp's own input_ids after the call)."""
    from distillery.evals.gguf_backend import _generate

    llm = state["llm"]
    _generate(state, emit, [prompt], 1)
    return [int(t) for t in llm.input_ids[:llm.n_tokens]]
