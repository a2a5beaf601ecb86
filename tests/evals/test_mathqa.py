"""MathQA data and metrics as lm-evaluation-harness 0.4.13 defines them, on rows the tests write."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from distillery.evals import mathqa
from distillery.evals.scoring import build_request, encode_pair
from distillery.core.errors import UserError

ROW = {"Problem": "what is 1 + 1 ?", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) none of these", "correct": "b"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_parse_item_splits_options_like_the_harness() -> None:
    item = mathqa.parse_item(ROW, "x:1")
    assert item.choices == ("1", "2", "3", "4", "none of these")
    assert item.label == 1


@pytest.mark.parametrize("change, reason", [
    ({"options": "1, 2, 3"}, "options not parseable"),
    ({"correct": "f"}, "not one of a-e"),
    ({"correct": None}, "not one of a-e"),  # "" and "ab" are substrings of "abcde": both were read as answer a
    ({"correct": "ab"}, "not one of a-e"),
    ({"correct": "bc"}, "not one of a-e"),
    ({"Problem": " "}, "empty Problem"),
])
def test_unscoreable_rows_are_rejected_with_the_reason(change: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mathqa.parse_item({**ROW, **change}, "x:1")


def test_load_items_skips_and_reports_bad_rows_by_line(tmp_path: Path) -> None:
    slow = "a ) " * 65536  # 256 KB on which the harness's expression took 146 s of one core
    path = write_rows(tmp_path / "test.jsonl", [ROW, {**ROW, "options": "garbled"}, {**ROW, "options": slow}, ROW, ROW])
    report = mathqa.LoadReport()
    items = mathqa.load_items(str(path), "test", 2, report)
    assert [i.id for i in items] == ["test.jsonl:1", "test.jsonl:4"]
    assert report.skipped == [{"id": "test.jsonl:2", "reason": "options not parseable into 5 choices: 'garbled'"},
                              {"id": "test.jsonl:3", "reason": "options longer than 1,000 characters"}]


def test_a_problem_longer_than_any_is_skipped_before_contexts_are_built(tmp_path: Path) -> None:
    """A 30 MB few-shot Problem, copied into every context that drew it, grew evaluate past 2.8 GB; when every row
    is skipped, the message gives the first reason (it said only which columns are needed, and they were there)."""
    path = write_rows(tmp_path / "pool.jsonl", [ROW, {**ROW, "Problem": "x" * 200_000}])
    report = mathqa.LoadReport()
    assert len(mathqa.load_items(str(path), "test", None, report)) == 1
    assert report.skipped[0]["reason"] == "200,017 characters of problem and options, more than any MathQA item"
    path = write_rows(tmp_path / "lists.jsonl", [{**ROW, "options": ["1", "2", "3", "4", "5"]}])
    with pytest.raises(UserError, match=r"no scoreable MathQA item \(read 1, skipped 1; the first: options "):
        mathqa.load_items(str(path), "test", None, mathqa.LoadReport())


def test_missing_file_and_empty_data_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        mathqa.load_items(str(tmp_path / "nope.jsonl"), "test", None, mathqa.LoadReport())
    with pytest.raises(UserError, match=r"evaluate.data: .*a{300}\.jsonl does not exist"):  # was an OSError: exit 1
        mathqa.load_items(str(tmp_path / ("a" * 300 + ".jsonl")), "test", None, mathqa.LoadReport())
    path = write_rows(tmp_path / "bad.jsonl", [{"question": "no mathqa columns"}])
    with pytest.raises(UserError, match="no scoreable MathQA item"):
        mathqa.load_items(str(path), "test", None, mathqa.LoadReport())


def test_a_directory_or_a_file_of_another_suffix_is_named_as_such(tmp_path: Path) -> None:
    """A directory was said not to exist; a .txt file was read as Parquet and failed on its magic bytes."""
    with pytest.raises(UserError, match=r"evaluate.data: .* is a directory\. Point it at a MathQA jsonl"):
        mathqa.load_items(str(tmp_path), "test", None, mathqa.LoadReport())
    path = write_rows(tmp_path / "test.txt", [ROW])
    with pytest.raises(UserError, match=r"test.txt is read by its suffix, which is not one of \.jsonl, \.json, "
                                        r"\.csv, \.parquet\. Rename it"):
        mathqa.load_items(str(path), "test", None, mathqa.LoadReport())
    with pytest.raises(UserError, match=r"^evaluate.fewshot_data: .*nope.jsonl does not exist"):
        mathqa.load_items(str(tmp_path / "nope.jsonl"), "train", None, mathqa.LoadReport(), mathqa.FEWSHOT_KEYS)


def items(n: int) -> list[mathqa.Item]:
    return [mathqa.Item(f"t:{i}", f"problem {i}", ("1", "22", "333", "4", "5"), i % 5) for i in range(n)]


def test_zero_shot_context_and_continuations() -> None:
    item = items(1)[0]
    assert mathqa.build_contexts([item], 0, [], False) == ["Question: problem 0\nAnswer:"]
    assert mathqa.continuations(item) == [" 1", " 22", " 333", " 4", " 5"]


def test_few_shot_draws_like_the_harness_sampler() -> None:
    """One Random(1234) drawing k examples per item in order; examples end with the right answer and a blank line."""
    pool, targets = items(10), items(3)
    contexts = mathqa.build_contexts(targets, 2, pool, same_split=False)
    rnd = random.Random(1234)
    for target, context in zip(targets, contexts):
        shots = rnd.sample(pool, 2)
        expected = "".join(f"Question: {s.problem}\nAnswer: {s.choices[s.label]}\n\n" for s in shots)
        assert context == expected + f"Question: {target.problem}\nAnswer:"


def test_few_shot_from_the_scored_split_never_shows_the_item_itself() -> None:
    pool = items(4)
    for item, context in zip(pool, mathqa.build_contexts(pool, 3, pool, same_split=True)):
        assert context.count(f"Question: {item.problem}\n") == 1 and context.endswith(f"{item.problem}\nAnswer:")


def test_an_empty_choice_is_kept_scored_and_never_the_normalised_pick() -> None:
    """Test item 1041's options end in `e ) `: the harness keeps the empty choice, scores " " and divides its
    log-likelihood by 0 characters with numpy (-inf), so only acc can pick it."""
    item = mathqa.parse_item({**ROW, "options": "a ) 3 / 4 , b ) 1  1 / 5 ] , c ) 1  2 / 5 ] , d ) 1  3 / 4 ] , e ) "},
                             "test.jsonl:1042")
    assert item.choices == ("3 / 4", "1  1 / 5 ]", "1  2 / 5 ]", "1  3 / 4 ]", "")
    assert mathqa.continuations(item)[4] == " "
    assert mathqa.predictions(item, [-9.0, -8.0, -7.0, -6.0, -0.5]) == (4, 3)  # -0.6 per character wins
    assert mathqa.predictions(item, [-0.1, -8.0, -7.0, -6.0, 0.0])[1] == 4  # 0 / 0 is nan, numpy's argmax takes it


def test_predictions_acc_norm_divides_by_characters_and_ties_go_first() -> None:
    item = items(1)[0]  # choice lengths 1, 2, 3, 1, 1
    assert mathqa.predictions(item, [-3.0, -4.0, -4.5, -9.0, -3.0]) == (0, 2)


def test_stderr_is_the_sample_standard_error() -> None:
    values = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert mathqa.mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mathqa.mean_stderr([1.0]) is None
    result = mathqa.aggregate([{"acc": 1, "acc_norm": 0}, {"acc": 0, "acc_norm": 0}])
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.0 and result["acc_stderr"] == pytest.approx(0.5)


def char_encode(text: str) -> list[int]:
    """A tokenizer that merges ' x' into one token, like BPE merges a space into the next word."""
    tokens, i = [], 0
    while i < len(text):
        if text[i] == " " and i + 1 < len(text):
            tokens.append(1000 + ord(text[i + 1]))
            i += 2
        else:
            tokens.append(ord(text[i]))
            i += 1
    return tokens


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding() -> None:
    context, continuation = encode_pair(char_encode, "Answer: ", "5")
    assert context == char_encode("Answer:")
    assert continuation == [1000 + ord("5")]  # " 5" is one token: encoded together, not separately
    request = build_request(char_encode, "Q:", [" 12", " 3"])
    assert request.context == tuple(char_encode("Q:"))
    assert request.continuations == ((1000 + ord("1"), ord("2")), (1000 + ord("3"),))


def test_a_hub_mathqa_evaluated_once_is_read_from_the_cache_offline(tmp_path, monkeypatch) -> None:
    """evaluate.data as a Hub id was refused under HF_HUB_OFFLINE even when the dataset was in the cache."""
    import datasets

    from distillery.evals.mathqa import load_hub_split
    from tests.sources.test_hf import cached_hub_dataset

    row = {"Problem": "what is 2 + 2 ?", "options": "a ) 3 , b ) 4 , c ) 5 , d ) 6 , e ) 7", "correct": "b",
           "Rationale": "", "annotated_formula": "", "linear_formula": "", "category": "general"}
    cached_hub_dataset(tmp_path / "datasets", "distillery-test/mathqa-toy", [row])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_hub_split("distillery-test/mathqa-toy", "train")[0]["correct"] == "b"
    with pytest.raises(UserError, match="evaluate.data distillery-test/mathqa-toy: no split 'test'"):
        load_hub_split("distillery-test/mathqa-toy", "test")
