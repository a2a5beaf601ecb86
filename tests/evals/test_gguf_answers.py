"""Answers generated side by side in llama.cpp (evals/gguf_answers.py): held-out scores that do not depend on
which items are answered, answers that are each prompt's own greedy continuation, sampling by one seeded rule."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.evals.gguf_answers import pick
from tests.evals.test_gguf_backend import bundled_gguf

SYSTEM = "<|im_start|>system\nYou are a careful translator.<|im_end|>\n<|im_start|>user\n"
PAIRS = [("Translate into English: 어디가 불편하세요?", "Where does it hurt?"),
         ("Translate into English: 오늘 날씨가 좋네요.", "The weather is nice today."),
         ("Translate into English: 회의는 세 시에 시작합니다.", "The meeting starts at three."),
         ("What is 12 times 7?", "12 times 7 is 84."),
         ("Name a prime number larger than 10.", "11 is a prime number larger than 10."),
         ("Translate into Korean: Thank you very much.", "정말 감사합니다.")]


def sequences(model) -> tuple[list[list[int]], list[int]]:
    """Chat-shaped token lists sharing a system prompt; each one's start is where its answer begins."""
    prompts = [model.encode(f"{SYSTEM}{q}<|im_end|>\n<|im_start|>assistant\n") for q, _ in PAIRS]
    lists = [model.encode(f"{SYSTEM}{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>") for q, a in PAIRS]
    assert all(full[:len(p)] == p for full, p in zip(lists, prompts))
    return lists, [len(p) for p in prompts]


def test_greedy_is_the_most_likely_token_and_the_nucleus_is_the_fewest_reaching_top_p() -> None:
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    rng = np.random.default_rng(0)
    assert pick(logits, 0.0, 0.95, rng) == 1
    drawn = {pick(logits, 1.0, 0.8, rng) for _ in range(400)}
    assert drawn == {1, 3}  # 0.5 + 0.3 reach 0.8; 0.15 and 0.05 are cut
    assert {pick(logits, 1.0, 1.0, rng) for _ in range(400)} == {0, 1, 2, 3}


def test_draws_follow_the_tempered_distribution_and_each_draw_is_new() -> None:
    logits = np.log(np.array([0.1, 0.2, 0.7]))
    rng = np.random.default_rng(1)
    draws = np.array([pick(logits, 1.0, 1.0, rng) for _ in range(6000)])
    assert np.allclose(np.bincount(draws, minlength=3) / len(draws), [0.1, 0.2, 0.7], atol=0.02)
    sharp = np.array([pick(logits, 0.25, 1.0, rng) for _ in range(2000)])  # p^4, renormalised: 0.997 on the last
    assert (sharp == 2).mean() > 0.98
    # one generator per answer: its successive tokens are independent draws, not one number drawn again
    steps = [pick(np.zeros(2), 1.0, 1.0, np.random.default_rng((1234, 7))) for _ in range(8)]
    assert len(set(steps)) == 1  # a fresh generator per token (the old llama-cpp-python sample()) repeats itself
    rng = np.random.default_rng((1234, 7))
    assert len({pick(np.zeros(2), 1.0, 1.0, rng) for _ in range(16)}) == 2


@pytest.mark.integration
def test_scores_do_not_depend_on_which_items_are_answered() -> None:
    pytest.importorskip("llama_cpp")
    from distillery.evals.gguf_backend import GGUFModel

    model = GGUFModel(bundled_gguf(), threads=2, answers_at_once=2)  # 4 answered items: two rounds of answers
    try:
        lists, starts = sequences(model)
        alone = model.completion_logprobs(lists, starts, 8)
        scores, replies = model.score_and_generate(lists, starts, [0, 2, 3, 5], 10, 8, eos_id=-1)
        again = model.completion_logprobs(lists, starts, 8)
    finally:
        model.close()
    assert scores == alone == again  # bit for bit
    assert sorted(replies) == [0, 2, 3, 5] and all(len(r) == 1 and r[0] for r in replies.values())


def _greedy_gaps(state: dict, emit, prompts: list[list[int]], max_new_tokens: int) -> list[list[float]]:
    """In the llama.cpp child: the prompts answered side by side (Answers), then each prompt + its answer decoded
    alone; per answer token, how far its logit is below the best one there (0: the greedy choice)."""
    from distillery.evals.gguf_answers import Answers
    from distillery.evals.gguf_backend import decode

    llm = state["llm"]
    answers = Answers(llm, max_new_tokens, eos_id=-1, temperature=0.0, top_p=1.0, emit=lambda n: None)
    for key, ids in enumerate(prompts):
        last: list = []
        decode(llm, ids, 0, len(ids) - 1, lambda position, rows: last.append(rows[-1].copy()))
        answers.add(key, len(ids), last[-1], 1)
    replies = answers.finish()
    gaps = []
    for key, ids in enumerate(prompts):
        tokens, rows = replies[key][0], []
        decode(llm, ids + tokens[:-1], 0, len(ids) - 1, lambda position, chunk: rows.extend(chunk.copy()))
        gaps.append([float(row.max() - row[token]) for row, token in zip(rows, tokens)])
    return gaps


@pytest.mark.integration
def test_each_answer_side_by_side_is_its_own_prompts_greedy_continuation() -> None:
    """Answers that read another sequence's cells, or a position off by one, would pick tokens far from the best."""
    pytest.importorskip("llama_cpp")
    from distillery.evals.gguf_backend import GGUFModel

    model = GGUFModel(bundled_gguf(), threads=2, answers_at_once=4)
    try:
        lists, starts = sequences(model)
        gaps = model.llama.call(_greedy_gaps, [ids[:start] for ids, start in zip(lists, starts)], 12)
    finally:
        model.close()
    assert len(gaps) == 6 and all(len(g) == 12 for g in gaps)
    assert all(g[0] == 0.0 for g in gaps)  # the first token comes from the prompt's own row
    assert max(max(g) for g in gaps) < 0.3, gaps  # then llama.cpp's batch shapes round differently, no more


@pytest.mark.integration
def test_samples_are_seeded_and_differ_from_each_other() -> None:
    pytest.importorskip("llama_cpp")
    from distillery.evals.gguf_backend import GGUFModel

    model = GGUFModel(bundled_gguf(), threads=2, answers_at_once=2)  # 3 samples: more than the sequence ids
    try:
        lists, starts = sequences(model)
        prompts = [ids[:start] for ids, start in zip(lists, starts)][:2]
        first = model.generate_ids(prompts, 12, 8, -1, samples=3, temperature=0.9, top_p=0.95)
        second = model.generate_ids(prompts, 12, 8, -1, samples=3, temperature=0.9, top_p=0.95)
    finally:
        model.close()
    assert first == second and all(len(samples) == 3 for samples in first)
    assert all(len(set(samples)) > 1 for samples in first), first


def _restore_garbage(state: dict, emit) -> None:
    import ctypes

    from distillery.evals.gguf_answers import restore_sequence

    restore_sequence(state["llm"], (ctypes.c_uint8 * 64)(), 1)  # 64 zero bytes: no state llama.cpp wrote


def test_a_prompt_llama_cpp_cannot_restore_is_a_decode_error_naming_the_gguf() -> None:
    """Evaluate keeps the other artifacts' scores on a GGUFDecodeError (score_one); a plain RuntimeError ended it."""
    pytest.importorskip("llama_cpp")
    from distillery.evals.gguf_backend import GGUFDecodeError, GGUFModel

    model = GGUFModel(bundled_gguf(), n_ctx=256, threads=1, answers_at_once=1)
    try:
        with pytest.raises(GGUFDecodeError, match=f"could not restore a prompt of 64 bytes.*{bundled_gguf().name}"):
            model.llama.call(_restore_garbage)
    finally:
        model.close()
