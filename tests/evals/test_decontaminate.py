"""The overlap check itself: normalization, the three kinds of n-gram, boilerplate, the Hub cache look-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.core.records import make_record
from distillery.evals.decontaminate import (EvaluationSet, Index, Sizes, against_set, find_contaminated,
                                            hub_cache_files, ngrams, words_and_hangul)

SIZES = Sizes(words=13, chars=25)
TEMPLATE = ("You are given a question that requires some input and output variables as follows. Can you predict "
            "the output without writing any code? Please reason and put your final answer in json.\n\n{}")


def record(i: int, user: str, answer: str = "ok", task: str = "qa") -> tuple[int, dict]:
    return i, make_record("s", task, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], {})


def test_words_fold_width_case_and_punctuation() -> None:
    assert words_and_hangul("  The ＡＢＣ,  of\tit —  “x_y”!\n") == (["the", "abc", "of", "it", "x", "y"], "")
    assert words_and_hangul("한강  공원에서,\u3000AI 자전거를 3대!") == (["한강", "공원에서", "ai", "자전거를", "3대"],
                                                                "한강공원에서자전거를3대")


def test_word_and_hangul_ngrams_and_whole_short_paragraphs() -> None:
    words = " ".join(f"w{i}" for i in range(15))
    assert len([g for g in ngrams([words], SIZES) if isinstance(g, tuple)]) == 3
    # Hangul words only, spaces removed: an English instruction around them adds nothing
    korean = "Translate this. 가나다라마 바사아자차 카타파하가 나다라마바 사아자차카 타파하"
    joined = "가나다라마바사아자차카타파하가나다라마바사아자차카타파하"
    assert ngrams([korean], SIZES) == [joined[i:i + 25] for i in range(len(joined) - 24)]
    # a paragraph too short for an n-gram is compared whole from 8 words (or 14 Hangul characters); below, not at all
    assert ngrams(["Translate this.\n\nWhat is the sum of two and two, my friend?", "Four."], SIZES) == [
        (None, "whatisthesumoftwoandtwomyfriend")]
    assert ngrams(["오늘은 날씨가 정말 좋아서 공원에 갔어요."], SIZES) == [(None, "오늘은날씨가정말좋아서공원에갔어요")]
    assert ngrams(["What is 2 + 2?", "7", "네, 맞아요."], SIZES) == []


def test_an_edited_copy_is_found_and_a_template_shared_by_many_records_is_not() -> None:
    item = ("a shopkeeper sold an article offering a discount of 5 % and earned a profit of 31.1 % . what would "
            "have been the percentage of profit earned if no discount had been offered ?")
    index = Index([EvaluationSet("test", [("test:1", [item]), ("test:2", [TEMPLATE.format("is 7 prime?")])])], SIZES)
    edited = item.replace("5 %", "6 %").replace("a shopkeeper sold", "  Suppose a trader sold").upper()
    records = [record(0, edited)] + [record(i, TEMPLATE.format(f"is {i} even?"), task="code") for i in range(1, 30)]
    found = find_contaminated(index, records)
    assert list(found) == [0]  # the template's n-grams are shared by 29 training records: boilerplate
    assert found[0].set == "test" and found[0].item == "test:1" and found[0].gram.startswith('13-gram "')


def test_an_item_copied_whole_into_many_records_is_found_in_every_one() -> None:
    """Distilled traces repeat their problem in each sampled answer: 14 or more copies made every n-gram of the item
    boilerplate and none was dropped. A template's item, held whole by no record (its own question differs), still
    counts as boilerplate."""
    item = ("a shopkeeper sold an article offering a discount of 5 % and earned a profit of 31.1 % . what would "
            "have been the percentage of profit earned if no discount had been offered ?")
    index = Index([EvaluationSet("test", [("test:1", [item]), ("test:2", [TEMPLATE.format("is 7 prime?")])])], SIZES)
    copies = [record(i, "Problem: " + item.title(), f"Attempt {i}: the answer is {i}.") for i in range(40)]
    templated = [record(40 + i, TEMPLATE.format(f"is {i} even?"), task="code") for i in range(30)]
    found = find_contaminated(index, copies + templated)
    assert sorted(found) == list(range(40))
    assert {(o.item, o.gram) for o in found.values()} == {("test:1", "the whole text")}


def test_characters_that_show_nothing_do_not_split_a_word() -> None:
    """A zero-width space, a soft hyphen, a word joiner or a BOM inside a word made it two: every n-gram changed."""
    assert words_and_hangul("sho\u200bpkeeper dis\u00adcount pro\u2060fit \ufeffsold") == (
        ["shopkeeper", "discount", "profit", "sold"], "")
    assert words_and_hangul("한\u200b강 공원") == (["한강", "공원"], "한강공원")


def test_in_a_small_source_an_ngram_shared_by_most_records_of_a_task_is_boilerplate() -> None:
    index = Index([EvaluationSet("held-out", [("r9", [TEMPLATE.format("sort a list")])])], SIZES)
    records = [record(i, TEMPLATE.format(f"task number {i}"), task="code") for i in range(4)]
    assert find_contaminated(index, records) == {}
    assert list(find_contaminated(index, records[:1])) == [0]  # one record alone: nothing to tell it from


def test_a_hub_dataset_is_read_only_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert hub_cache_files("someone/math_qa", "test") == []
    repo = tmp_path / "datasets--someone--math_qa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    for name in ("data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet", "test/0.jsonl",
                 "README.md"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text("x")
    assert [p.relative_to(snapshot).as_posix() for p in hub_cache_files("someone/math_qa", "test")] == [
        "data/test-00000-of-00001.parquet", "test/0.jsonl"]


def test_an_against_parquet_file_of_records_is_read_by_their_messages(tmp_path: Path) -> None:
    import pandas as pd

    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    pd.DataFrame([{"messages": messages}]).to_parquet(tmp_path / "held.parquet")
    assert against_set(tmp_path / "held.parquet").items == [("held.parquet:0", ["What is 2 + 2?", "4"])]
