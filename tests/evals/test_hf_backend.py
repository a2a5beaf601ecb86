"""The packed scoring (context once, every continuation beside it under a 4D mask) equals a plain full forward
pass over context + continuation, for every request in a batch of different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.evals.hf_backend import HFModel
from distillery.evals import hf_backend
from distillery.evals.scoring import (Request, build_request, longest_first, packed_length, row_length,
                                      shared_prefix_rows)
from distillery.core.errors import UserError
from tests.fixtures.tiny_lm import build_tiny_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny"))


def full_forward(model, context: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """What the harness computes: one pass over context + continuation, log-probs of the continuation tokens."""
    import torch

    ids = torch.tensor([list(context) + list(continuation)])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    start = len(context) - 1
    return float(sum(logprobs[start + i, t] for i, t in enumerate(continuation)))


REQUESTS = [
    Request((3, 4, 5, 6, 7, 8, 9), ((10,), (11, 12, 13), (14, 15), (16,), (17, 18, 19, 20))),
    Request((30, 31), ((32, 33), (34,), (35, 36, 37), (38,), (39,))),
    Request((40,), ((41,), (42,), (43,), (44,), (45,))),  # every continuation one token
    Request((60, 61, 62), ((63, 64), (65,), (63, 64), (66, 67, 68), (65,))),  # repeated choices, as MathQA has
    Request(tuple(range(50, 90)), ((90, 91), (92, 93), (94,), (95, 96, 97, 98, 99, 100), (101,))),
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_packed_scores_equal_the_full_forward(tiny_dir: Path, batch_size: int) -> None:
    scorer = HFModel(str(tiny_dir))
    got = scorer.loglikelihoods(REQUESTS, batch_size)
    for request, scores in zip(REQUESTS, got):
        expected = [full_forward(scorer.model, request.context, c) for c in request.continuations]
        assert scores == pytest.approx(expected, abs=1e-5)
    repeated = got[3]
    assert repeated[0] == repeated[2] and repeated[1] == repeated[4]  # bit for bit: a tie stays a tie


def test_a_row_holds_the_context_and_each_distinct_choice_but_its_last_token() -> None:
    assert [packed_length(r) for r in REQUESTS] == [7 + 6, 2 + 3, 1, 3 + 3, 40 + 7]
    assert longest_first(REQUESTS) == [4, 0, 3, 1, 2]


def test_text_requests_and_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    """Real text through the tokenizer; a PEFT adapter with non-zero B changes the scores, still exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = HFModel(str(tiny_dir))
    adapted = HFModel(str(tiny_dir), adapter=tmp_path / "adapter")
    request = build_request(base.encode, "Question: what is 1 + 1 ?\nAnswer:", [" 1", " 2", " 33", " 4", " none"])
    assert request.continuations[2] == tuple(base.encode(" 33"))
    base_scores = base.loglikelihoods([request], 2)[0]
    adapted_scores = adapted.loglikelihoods([request], 2)[0]
    assert adapted_scores != pytest.approx(base_scores, abs=1e-3)
    expected = [full_forward(adapted.model, request.context, c) for c in request.continuations]
    assert adapted_scores == pytest.approx(expected, abs=1e-5)


def test_batched_generation_equals_one_at_a_time(tiny_dir: Path) -> None:
    scorer = HFModel(str(tiny_dir))
    prompts = ["<|user|>short\n<|assistant|>", "<|user|>a much longer question here\n<|assistant|>"]
    together = scorer.generate(prompts, max_new_tokens=6, batch_size=2)
    alone = [scorer.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and all(isinstance(t, str) for t in together)


# Held-out sequences as token lists and where each one's scored part starts: two share a 6-token prefix past one's
# start (the prefix stops before it), two share 3 tokens, one shares nothing, one is longer than the row width.
SYSTEM = [1, 2, 3, 4, 5, 6]
SEQUENCES = [SYSTEM + [7, 8, 20, 21, 22], SYSTEM + [7, 9, 30, 31], SYSTEM[:3] + list(range(40, 50)),
             [50, 51, 52], SYSTEM + [7, 8, 60, 61, 62, 63], list(range(70, 100))]
STARTS = [8, 4, 10, 1, 8, 20]


def test_held_out_rows_hold_a_shared_prefix_once_and_stay_within_their_width() -> None:
    rows = shared_prefix_rows(SEQUENCES, STARTS, width=24)
    assert sorted(i for row in rows for i in row.members) == list(range(len(SEQUENCES)))
    for row in rows:
        first = SEQUENCES[row.members[0]]
        assert all(SEQUENCES[i][:row.prefix] == first[:row.prefix] and row.prefix <= STARTS[i] - 1 for i in row.members)
        assert row_length(row, SEQUENCES) <= 24 or row.members == (5,)  # longer than the width: a row of its own
    together = next(row for row in rows if 0 in row.members)
    assert set(together.members) >= {0, 4} and together.prefix >= 3  # the system prompt is read once for both
    alone = [r.members for r in shared_prefix_rows(SEQUENCES, STARTS, width=1)]
    assert alone == [(i,) for i in sorted(range(6), key=SEQUENCES.__getitem__)]


@pytest.mark.parametrize("width,budget", [(512, 1024), (12, 12)])  # all in one batch; a row per batch
def test_held_out_scores_and_answers_equal_a_plain_forward_however_the_rows_are_packed(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, width: int, budget: int) -> None:
    monkeypatch.setattr(hf_backend, "PACKED_WIDTH", width)
    monkeypatch.setattr(hf_backend, "TOKEN_BUDGET", {"cpu": budget, "cuda": budget})
    scorer = HFModel(str(tiny_dir))
    expected = [full_forward(scorer.model, tuple(s[:start]), tuple(s[start:])) for s, start in zip(SEQUENCES, STARTS)]
    assert scorer.completion_logprobs(SEQUENCES, STARTS, 8) == pytest.approx(expected, abs=1e-5)
    scores, answers = scorer.score_and_generate(SEQUENCES, STARTS, [0, 2, 4], 5, 8, eos_id=-1)
    assert scores == pytest.approx(expected, abs=1e-5)
    fresh = scorer.generate_ids([SEQUENCES[i][:STARTS[i]] for i in (0, 2, 4)], 5, 8, eos_id=-1)
    assert [answers[0], answers[2], answers[4]] == fresh  # from the keys and values the packed pass gathered
    assert scorer.completion_logprobs([], [], 8) == []


def windowed_model(tiny_dir: Path, path: Path, kind: str) -> Path:
    """The tiny model's tokenizer with a 2-layer model whose attention sees 4 positions back: Mistral (every layer)
    or Qwen2 with use_sliding_window (layer 0 full, layer 1 windowed: one mask per kind)."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, sliding_window=4)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**shape)) if kind == "mistral" else \
        Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_a_sliding_window_is_kept_in_packed_rows(tiny_dir: Path, tmp_path: Path, kind: str) -> None:
    """transformers passes a ready 4D mask to every layer unchanged: the packed scores match a plain forward (where
    transformers applies the window itself) only if the window is applied to the packed mask too."""
    scorer = HFModel(str(windowed_model(tiny_dir, tmp_path / kind, kind)))
    assert scorer.model.config.sliding_window == 4 and max(map(len, SEQUENCES)) > 8
    expected = [full_forward(scorer.model, tuple(s[:start]), tuple(s[start:])) for s, start in zip(SEQUENCES, STARTS)]
    assert scorer.completion_logprobs(SEQUENCES, STARTS, 8) == pytest.approx(expected, abs=1e-5)
    got = scorer.loglikelihoods(REQUESTS, 3)
    for request, scores in zip(REQUESTS, got):
        assert scores == pytest.approx([full_forward(scorer.model, request.context, c) for c in request.continuations],
                                       abs=1e-5)


def test_unknown_model_path_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load the model"):
        HFModel(str(tmp_path))


def test_answers_follow_the_evaluation_rule_not_the_models_generation_config(tiny_dir: Path, tmp_path: Path) -> None:
    """A generation_config's repetition penalty or top-k (Qwen2.5 Instruct ships both) would make the HF artifacts
    answer by another rule than the GGUFs (gguf_answers.pick)."""
    import shutil

    import torch

    penalised = tmp_path / "penalised"
    shutil.copytree(tiny_dir, penalised)
    (penalised / "generation_config.json").write_text('{"repetition_penalty": 5.0, "top_k": 2, "eos_token_id": 256}')
    scorer, plain = HFModel(str(penalised)), HFModel(str(tiny_dir))
    prompts = [SEQUENCES[i][:STARTS[i]] for i in (0, 2, 4)]
    answers = scorer.generate_ids(prompts, 16, 8, eos_id=-1)
    assert answers == plain.generate_ids(prompts, 16, 8, eos_id=-1)
    with torch.inference_mode():  # the configured penalty does change these answers
        ids = torch.tensor([prompts[0]])
        by_config = scorer.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    assert scorer.tokenizer.decode(by_config[0, len(prompts[0]):], skip_special_tokens=True) != answers[0][0]


def test_samples_past_the_batch_size_are_drawn_in_turns_of_at_most_batch_size_sequences(tiny_dir: Path) -> None:
    """k samples of each list used to make one call of lists x k rows (64 samples of 8 lists at once asked a 135M
    model for 210 GB); every call now holds at most batch_size sequences, and each list still gets its k."""
    scorer = HFModel(str(tiny_dir))
    rows, generate = [], scorer.model.generate
    scorer.model.generate = lambda **kw: rows.append(kw["input_ids"].shape[0]) or generate(**kw)
    prompts = [SEQUENCES[i][:STARTS[i]] for i in (0, 2, 4)]
    answers = scorer.generate_ids(prompts, 6, 2, eos_id=-1, samples=5, temperature=1.5)
    assert [len(a) for a in answers] == [5, 5, 5] and max(rows) == 2 and sum(rows) == 15
    assert all(len(set(a)) > 1 for a in answers)  # samples, not one answer repeated


def test_sampled_answers_are_the_same_on_every_run_and_leave_the_random_state_alone(tiny_dir: Path) -> None:
    import torch

    scorer = HFModel(str(tiny_dir))
    prompts = [SEQUENCES[i][:STARTS[i]] for i in (0, 2)]
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = scorer.generate_ids(prompts, 12, 8, eos_id=-1, samples=3, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another caller's state: the answers do not depend on it
    assert scorer.generate_ids(prompts, 12, 8, eos_id=-1, samples=3, temperature=1.5) == first
    assert len({tuple(answers) for answers in first}) == 2 and len(set(first[0])) > 1  # they are samples


def test_a_lists_samples_do_not_depend_on_the_batch_size(tiny_dir: Path) -> None:
    """From a review: the sampled answers changed with evaluate.batch_size (every one of 12), which is meant to
    change only the speed, and a rerun with another batch size kept the other answers as 'up to date'. Each answer
    has its own generator now (its list and sample), as a GGUF's has."""
    scorer = HFModel(str(tiny_dir))
    prompts = [SEQUENCES[i][:STARTS[i]] for i in (0, 2, 4)]
    by_size = [scorer.generate_ids(prompts, 10, size, eos_id=-1, samples=3, temperature=1.2, top_p=0.9)
               for size in (1, 2, 8)]
    assert by_size[0] == by_size[1] == by_size[2]
    assert all(len(set(answers)) > 1 for answers in by_size[0])  # samples, not one answer repeated
    # and not on which other items are answered: an item's generators are named by its place among all items
    every = scorer.score_and_generate(SEQUENCES, STARTS, [0, 1, 2], 10, 8, -1, 3, 1.2, 0.9)[1]
    fewer = scorer.score_and_generate(SEQUENCES, STARTS, [1, 2], 10, 8, -1, 3, 1.2, 0.9)[1]
    assert fewer == {1: every[1], 2: every[2]}


def test_the_nucleus_is_the_one_a_ggufs_answers_are_drawn_from() -> None:
    """HF rows are drawn by torch (seeded_sampling), a GGUF's by numpy (gguf_answers.pick): one rule, the same
    tokens kept for every top_p, a probability at the edge included."""
    import numpy as np
    import torch

    from distillery.evals.gguf_answers import pick
    from distillery.evals.hf_backend import nucleus

    class Seen:  # records the candidates pick draws from
        def choice(self, kept, p=None):
            self.kept = set(np.atleast_1d(kept).tolist()) if p is not None and np.ndim(kept) else set(np.flatnonzero(p))
            return int(np.atleast_1d(kept)[0]) if np.ndim(kept) else 0

    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.standard_normal((3, 3000)) * 3, [np.log([0.5, 0.25, 0.25]).tolist() + [-1e9] * 2997]])
    for top_p in (0.1, 0.5, 0.75, 0.9, 0.999):
        probs = nucleus(torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=-1), top_p)
        for row, kept in zip(logits, probs):
            seen = Seen()
            pick(row, 1.0, top_p, seen)
            assert set(torch.nonzero(kept).flatten().tolist()) == seen.kept, top_p
