"""Held-out scoring (evals/heldout.py, evals/tasks.py): the loss is the log-likelihood a direct forward pass gives,
every artifact reads the same tokens, the f16 GGUF scores like the merged model, and each task has its metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distillery.evals import heldout, tasks

QA = [("What is 6 * 7?", "6 * 7 = 42.\n#### 42"), ("Name a primary colour.", "Red."),
      ("Translate to English: 안녕하세요", "Hello.")]


def eval_rows(tokenizer, pairs=QA, task_of=("qa", "qa", "translate_ko_en")) -> list[dict]:
    """Rows in format's eval.jsonl shape, rendered through the model's own chat template."""
    rows = []
    for k, ((question, answer), task) in enumerate(zip(pairs, task_of)):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        rows.append({"id": f"r{k}", "source": "t", "task": task, "prompt": prompt,
                     "completion": full[len(prompt):].rstrip(), "meta": {}})
    return rows


def write_eval(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_reference_answer_drops_the_eos_the_tail_and_the_reasoning() -> None:
    assert heldout.reference_answer("<think>6*7</think>\n\n42<|im_end|>\n", "<|im_end|>") == "42"
    assert heldout.reference_answer("Hello.<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>") == "Hello."


def kind(task: str, references: list[str], records: list[dict] | None = None) -> str:
    return tasks.kind_of(task, records or [{} for _ in references], references)


def test_each_task_gets_its_checker() -> None:
    mc = {"choices": ["1", "2", "3", "4", "5"], "label": 2}
    codeio = {"task": "code_io_input", "meta": {"refcode": "def f(a): return a", "funcname": "f", "io_input": {"a": 1},
                                                "io_output": 1}}
    assert kind("translate_en_ko", ["안녕"]) == "translation"
    assert kind("qa", ["so 42.\n#### 42"]) == "math" and kind("qa", ["Red."]) == "text"
    assert kind("math_mc", [""], [mc]) == "option" and kind("code_io_input", [""], [codeio]) == "codeio"
    # a markdown heading is not a GSM answer, and one record does not decide for the task
    assert kind("qa", ["#### Step 1\nMix the flour.", "Red."]) == "text"
    assert kind("docs", ["#### 1. Install\nRun it.", "#### 2. Usage\nCall it.", "No heading."]) == "text"
    assert kind("qa", ["so 4.\n#### 4", "Red.", "Blue."]) == "text"
    assert kind("qa", ["so 4.\n#### 4", "so $\\boxed{5}$", "Blue."]) == "math"


def test_a_codeio_verdict_keeps_why_it_failed_and_how_the_sandboxed_run_ended() -> None:
    """A held-out record whose reference code fails scored as a wrong answer with the reason gone: nothing in
    heldout_items.jsonl told a broken record from a wrong reply."""
    from distillery.reasoning.sandbox import Limits

    record = {"task": "code_io_input", "meta": {"refcode": "def f(a):\n    raise ValueError('broken record')",
                                                "funcname": "f", "io_input": {"a": 1}, "io_output": 1}}
    verdict = tasks.check_item("codeio", record, "1", 'So {"input": {"a": 1}}', Limits())
    assert verdict == {"correct": False, "how": "code_io_input", "answer": {"a": 1}, "sandbox": "error",
                       "error": 'Running the code on the predicted input {"a": 1} failed: ValueError: broken record'}
    unanswered = tasks.check_item("codeio", {**record, "task": "code_io_output"}, "1", "no idea", Limits())
    assert unanswered["error"].startswith("No final answer was found") and "sandbox" not in unanswered


def test_a_checker_is_chosen_only_where_the_name_and_the_records_call_for_it() -> None:
    """A word of the name, not a substring, makes a math task, and only with answers to compare; records without
    what a checker reads (CodeI/O++'s `code_io`, a math_mc task of plain pairs) get exact match and chrF++, which
    a reply equal to its reference passes."""
    assert kind("GSM8K", ["so 4.\n#### 4"]) == "math" and kind("Math_word", ["It is 12."]) == "math"
    for name in ("summarize_aftermath", "polymath_bio", "mathematics_essay"):
        assert kind(name, ["A plain prose answer."]) == "text", name
    assert kind("math_proofs", ["By induction on n the claim holds."]) == "text"  # no answer to compare
    assert kind("code_io", ["x"], [{"task": "code_io", "meta": {"where": "a.jsonl:3"}}]) == "text"
    assert kind("code_io_output", ["x"], [{"task": "code_io_output", "meta": {}}]) == "text"
    assert kind("math_mc", ["(c)"], [{"task": "math_mc"}]) == "text"
    same = tasks.check_item("text", {}, "Green tea, please.", "Green tea, please.", None)
    assert same["correct"] is True


def test_bleu_tokenizes_by_the_target_language() -> None:
    """13a splits on spaces: a perfect Japanese or Chinese translation would score BLEU 0 with it."""
    for task, sentence in (("translate_en_ja", "私はりんごが好きです。"), ("translate_en_zh", "我喜欢苹果。")):
        scores = tasks.corpus_metrics("translation", task, [sentence], [sentence], [{}])
        assert scores["bleu"] == 100.0 and scores["bleu_tokenizer"] != "13a", task
    option = tasks.check_item("option", {"label": 2}, "", "<think>hmm</think> The answer is (c)", None)
    assert option["correct"] and option["answer"] == "c"
    text = tasks.check_item("text", {}, "Red.", "  red. ", None)
    assert text == {"correct": True, "how": "exact match"}
    sentence = "The weather in Seoul is very good today."
    scores = tasks.corpus_metrics("translation", "translate_ko_en", [sentence], [sentence], [{}])
    assert scores["chrf"] == 100.0 and scores["bleu"] == 100.0 and scores["bleu_tokenizer"] == "13a"
    assert tasks.corpus_metrics("translation", "translate_en_ko", ["안녕"], ["안녕"], [{}])["bleu_tokenizer"] == "char"
    assert tasks.main_metric({"metric": "chrf", "chrf": 55.0}) == 0.55


def test_items_are_cut_where_training_cuts_them(tmp_path: Path, demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.training.tokens import training_example

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    rows = eval_rows(tokenizer)
    items, empty = heldout.load_items(write_eval(tmp_path / "eval.jsonl", rows), tokenizer, 512, None)
    assert empty == 0 and [i.task for i in items] == ["qa", "qa", "translate_ko_en"]
    for item, row in zip(items, rows):
        trained = training_example(tokenizer, row["prompt"], row["completion"], 512)
        assert item.prompt_ids + item.completion_ids == trained["input_ids"]
        assert len(item.completion_ids) == sum(trained["completion_mask"])
    assert items[0].reference == "6 * 7 = 42.\n#### 42"
    short, empty = heldout.load_items(tmp_path / "eval.jsonl", tokenizer, len(items[0].prompt_ids), None)
    assert empty >= 1  # no completion token within max_length: not scored, counted
    assert len(heldout.load_items(tmp_path / "eval.jsonl", tokenizer, 512, 1)[0]) == 2  # one per task


@pytest.mark.integration
def test_the_loss_is_the_direct_log_likelihood_and_the_f16_gguf_agrees(tmp_path: Path, demo_model_path: str,
                                                                       monkeypatch) -> None:
    """Also: answers generated from the prompt the scoring pass already read (its keys and values, in both
    backends) are the answers a fresh generation gives. The direct log-likelihood is computed in float64, the exact
    value: float32 passes differ from it, and from one another, by up to ~3e-5 of the sum (MKL picks its code path
    per call: the same process's first pass sometimes sums in another order), so the bound is relative."""
    import torch

    from distillery.evals import hf_backend
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.evals.gguf_backend import GGUFModel
    from distillery.evals.hf_backend import HFModel
    from distillery.export import gguf as gguf_io

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    items, _ = heldout.load_items(write_eval(tmp_path / "eval.jsonl", eval_rows(tokenizer)), tokenizer, 512, None)
    hf = HFModel(demo_model_path, "float32")
    pairs = heldout.item_losses(hf, items, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float64).eval()
    for item, (nll, count) in zip(items, pairs):
        ids = torch.tensor([item.prompt_ids + item.completion_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
        start = len(item.prompt_ids)
        direct = -sum(float(logprobs[start - 1 + k, t]) for k, t in enumerate(item.completion_ids))
        assert count == len(item.completion_ids) and nll == pytest.approx(direct, rel=1e-4, abs=1e-4)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    original, reused = hf_backend.batch_cache, []
    monkeypatch.setattr(hf_backend, "batch_cache", lambda rows, *rest: reused.append(len(rows)) or original(rows, *rest))
    logprobs, answered = hf.score_and_generate(*heldout.sequences(items), [0, 2], 24, 2, eos)
    assert reused == [2] and [-x for x in logprobs] == pytest.approx([nll for nll, _ in pairs], rel=1e-4)
    assert [answered[0], answered[2]] == hf.generate_ids([items[0].prompt_ids, items[2].prompt_ids], 24, 2, eos)
    f16 = tmp_path / "m-F16.gguf"
    gguf_io.convert_to_gguf(Path(demo_model_path), f16, "f16", "m")
    gguf = GGUFModel(f16, threads=2)
    try:
        gguf_pairs = heldout.item_losses(gguf, items, batch_size=2)
        replies = gguf.generate_ids([items[0].prompt_ids], 24, 1, eos)
        _, gguf_answered = gguf.score_and_generate(*heldout.sequences(items), [0], 24, 1, eos)
    finally:
        gguf.close()
    ours, theirs = heldout.loss_summary(gguf_pairs), heldout.loss_summary(pairs)
    assert abs(ours["loss"] - theirs["loss"]) < 0.02 and ours["tokens"] == theirs["tokens"]  # export's bound
    assert len(replies) == 1 and isinstance(replies[0][0], str) and gguf_answered == {0: replies[0]}
    assert math.isclose(theirs["ppl"], math.exp(theirs["loss"]), rel_tol=1e-4)


@pytest.mark.integration
def test_an_artifact_is_scored_per_task_with_its_metric(tmp_path: Path, demo_model_path: str) -> None:
    from transformers import AutoTokenizer

    from distillery.evals.hf_backend import HFModel

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    items, _ = heldout.load_items(write_eval(tmp_path / "eval.jsonl", eval_rows(tokenizer)), tokenizer, 512, None)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    scores, rows = heldout.score_artifact(HFModel(demo_model_path, "float32"), items, items, eos, 16, 2, 0.7, 2, None)
    assert set(scores) == {"qa", "translate_ko_en", "overall"}
    assert scores["qa"]["items"] == 2 and scores["qa"]["metric"] == "accuracy" and "pass@2" in scores["qa"]
    assert scores["translate_ko_en"]["metric"] == "chrf" and 0 <= scores["translate_ko_en"]["chrf"] <= 100
    assert scores["overall"]["tokens"] == sum(len(i.completion_ids) for i in items)
    assert all(len(r["replies"]) == 2 and len(r["verdicts"]) == 2 for r in rows)


def test_items_that_share_an_id_are_each_answered_and_scored() -> None:
    """Without ingest's dedupe two held-out records can share an id: one was answered, its reply counted twice
    ('generated: 5' with 4 replies) and the other's row had none."""

    class Answering:  # answers item k with "reply k": what a model returns, by position
        def score_and_generate(self, token_lists, starts, answer, *args):
            return [-1.0] * len(token_lists), {k: [f"reply {k}"] for k in answer}

    items = [heldout.HeldoutItem(item_id, "other", [1, 2], [3], "ref", {}) for item_id in ("a", "dup", "dup")]
    judged: list[int] = []
    scores, rows = heldout.score_artifact(Answering(), items, items[1:], 0, 8, 1, 0.0, 2, None, judged.append)
    assert scores["other"]["generated"] == 2 and rows[0].get("replies") is None
    assert judged == [1, 1]  # each item answered is judged in turn (a CodeI/O input runs in the sandbox: seconds)
    scores, rows = heldout.score_artifact(Answering(), items, items, 0, 8, 1, 0.0, 2, None)
    assert scores["other"]["generated"] == 3
    assert [row["replies"] for row in rows] == [["reply 0"], ["reply 1"], ["reply 2"]]


def test_a_gguf_past_the_bound_is_marked() -> None:
    results = {"merged": {"qa": {"loss": 1.0, "metric": "accuracy", "accuracy": 0.5}},
               "m-Q4_K_M": {"qa": {"loss": 1.05, "metric": "accuracy", "accuracy": 0.5}},
               "m-Q2_K": {"qa": {"loss": 1.3, "metric": "accuracy", "accuracy": 0.3}}}
    kinds = {"merged": "merged", "m-Q4_K_M": "gguf", "m-Q2_K": "gguf"}
    assert heldout.quant_checks(results, kinds, max_loss_increase=0.1, max_drop=0.05) == "merged"
    assert results["m-Q4_K_M"]["qa"]["vs_reference"]["passed"] is True
    check = results["m-Q2_K"]["qa"]["vs_reference"]
    assert check == {"reference": "merged", "loss_increase": 0.3, "metric_drop": 0.2, "passed": False}


def test_sampled_answers_are_scored_as_the_mean_over_samples() -> None:
    """With k samples the metric is the mean of the k answer sets' metrics (R1's pass@1), not the first draw's."""
    right, wrong = {"correct": True}, {"correct": False}
    verdicts = [[right, wrong, wrong, wrong], [right, right, wrong, wrong]]
    scores = tasks.sample_metrics("math", "gsm", ["4", "5"], [["4", "1", "2", "3"], ["5", "5", "0", "0"]], verdicts)
    assert scores["accuracy"] == 0.375 and scores["averaged_over"] == 4
    sentence = "The weather in Seoul is very good today."
    one = tasks.sample_metrics("translation", "translate_ko_en", [sentence], [[sentence]], [[{}]])
    assert one == tasks.corpus_metrics("translation", "translate_ko_en", [sentence], [sentence], [{}])
    two = tasks.sample_metrics("translation", "translate_ko_en", [sentence], [[sentence, "Nothing alike"]], [[{}, {}]])
    half = tasks.corpus_metrics("translation", "translate_ko_en", [sentence], ["Nothing alike"], [{}])["chrf"]
    assert two["chrf"] == pytest.approx((100 + half) / 2, abs=1e-3) and two["bleu_tokenizer"] == "13a"


def test_a_loss_past_what_a_float_holds_is_an_infinite_perplexity_not_a_crash() -> None:
    assert heldout.loss_summary([(800.0 * 3, 3)]) == {"loss": 800.0, "ppl": math.inf, "tokens": 3}


def test_a_reference_loss_of_zero_does_not_let_every_quant_pass() -> None:
    results = {"merged": {"qa": {"loss": 0.0}}, "m-Q8_0": {"qa": {"loss": 0.0}}, "m-Q2_K": {"qa": {"loss": 4.0}}}
    heldout.quant_checks(results, {"merged": "merged", "m-Q8_0": "gguf", "m-Q2_K": "gguf"}, 0.1, 0.05)
    assert results["m-Q8_0"]["qa"]["vs_reference"]["passed"] is True
    assert results["m-Q2_K"]["qa"]["vs_reference"]["passed"] is False


def test_a_task_trained_near_zero_loss_fails_a_quant_only_past_the_absolute_floor() -> None:
    """1e-4 nats more on a loss of 5e-4 is 20% but nothing a user would see; 0.05 more is."""
    results = {"merged": {"label": {"loss": 0.0005}}, "m-Q8_0": {"label": {"loss": 0.0006}},
               "m-Q2_K": {"label": {"loss": 0.0505}}}
    heldout.quant_checks(results, {"merged": "merged", "m-Q8_0": "gguf", "m-Q2_K": "gguf"}, 0.1, 0.05)
    assert results["m-Q8_0"]["label"]["vs_reference"]["passed"] is True
    assert results["m-Q2_K"]["label"]["vs_reference"]["passed"] is False


def test_a_broken_merged_model_is_not_the_reference_that_fails_every_quant() -> None:
    results = {"adapter": {"qa": {"loss": 1.0}, "overall": {"loss": 1.0}},
               "merged": {"qa": {"loss": math.inf}, "overall": {"loss": math.inf}},
               "m-Q8_0": {"qa": {"loss": 1.02}, "overall": {"loss": 1.02}}}
    kinds = {"adapter": "adapter", "merged": "merged", "m-Q8_0": "gguf"}
    assert heldout.quant_checks(results, kinds, 0.1, 0.05) == "adapter"
    assert results["m-Q8_0"]["qa"]["vs_reference"] == {"reference": "adapter", "loss_increase": 0.02, "passed": True}


def test_the_chart_marks_a_broken_loss_instead_of_drawing_no_bar(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from distillery.evals.report import mark_broken_losses, save_heldout_chart

    fig, ax = plt.subplots()
    bars = ax.bar([0, 1, 2], [1.2, 1.4, 1.4])
    mark_broken_losses(ax, bars, [1.2, math.inf, None])
    assert [bar.get_hatch() for bar in bars] == [None, "//", "//"]
    assert [text.get_text() for text in ax.texts] == ["inf", "n/a"]
    plt.close(fig)
    scored = {"merged": {"qa": {"loss": 1.2}}, "m-Q8_0": {"qa": {"loss": math.nan}}}
    save_heldout_chart(scored, tmp_path / "heldout.png")
    assert (tmp_path / "heldout.png").stat().st_size > 0


def test_a_loss_heldout_json_stores_as_null_is_shown_not_a_crash() -> None:
    """`distillery run` ends by reading heldout.json back; a broken GGUF's inf loss is null there (strict JSON)."""
    from distillery.core.records import report_json
    from distillery.evals.report import heldout_rows

    scored = {"base": {"qa": {"items": 2, "loss": 1.5, "metric": "chrf", "chrf": 30.0}, "overall": {"loss": 1.5}},
              "Q4_K_M": {"qa": {"items": 2, "loss": math.inf, "metric": "chrf", "chrf": math.nan,
                                "vs_reference": {"passed": False}}, "overall": {"loss": math.inf}}}
    headers, rows = heldout_rows(json.loads(report_json(scored)))
    assert headers[1:] == ("base", "Q4_K_M")
    assert rows[0][2] == "loss n/a · chrF n/a · ✗ past the quant bound" and rows[0][1] == "loss 1.500 · chrF 30.0"
