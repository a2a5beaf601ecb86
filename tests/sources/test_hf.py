"""hf: local json/jsonl/csv/parquet in every layout, MathQA split as lm-eval splits it, the Hub offline."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from distillery.sources import SourceReport, hf
from distillery.sources.hf import HFDatasetParams
from distillery.core.errors import UserError

MATHQA_ROW = {"Problem": "a train covers 60 km in 1.5 hours . what is its speed ?", "Rationale": '"60 / 1.5 = 40 answer : b"',
              "options": "a ) 38 , b ) 40 , c ) 42.5 , d ) 45 , e ) 90", "correct": "b",
              "annotated_formula": "divide(60, 1.5)", "linear_formula": "divide(n0,n1)|", "category": "physics"}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read(**fields: Any) -> tuple[list[dict], SourceReport]:
    report = SourceReport("src")
    return list(hf.read(HFDatasetParams(name="src", kind="hf", **fields), report)), report


def test_columns_map_gsm_instructions_into_user_and_assistant(tmp_path: Path) -> None:
    rows = [{"INSTRUCTION": "What is 2 + 3?", "RESPONSE": "2 + 3 = 5\n#### 5", "SOURCE": "grade-school-math"},
            {"INSTRUCTION": "  ", "RESPONSE": "x", "SOURCE": "grade-school-math"}]
    records, report = read(files=str(write_jsonl(tmp_path / "gsm.jsonl", rows)))
    assert records[0]["task"] == "qa" and records[0]["messages"] == [
        {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
    assert records[0]["meta"]["line"] == 1
    assert dict(report.dropped) == {"empty INSTRUCTION": 1} and report.dropped_rows[0]["line"] == 2


def test_numbers_become_their_text_and_lists_objects_and_booleans_are_dropped(tmp_path: Path) -> None:
    rows = [{"INSTRUCTION": "Legs of a spider?", "RESPONSE": 8}, {"INSTRUCTION": "Pi?", "RESPONSE": 3.14},
            {"INSTRUCTION": "Pick two.", "RESPONSE": ["a", "b"]}, {"INSTRUCTION": "Map?", "RESPONSE": {"x": 1}},
            {"INSTRUCTION": "Green sky?", "RESPONSE": False}]
    records, report = read(files=str(write_jsonl(tmp_path / "v.jsonl", rows)))
    assert [r["messages"][1]["content"] for r in records] == ["8", "3.14"]
    assert [(d["reason"], d["line"]) for d in report.dropped_rows] == [
        ("non-text RESPONSE (list)", 3), ("non-text RESPONSE (object)", 4), ("non-text RESPONSE (boolean)", 5)]
    alpaca = {"instruction": "Sort.", "input": [3, 1], "output": "1, 3"}
    _, report = read(files=str(write_jsonl(tmp_path / "a.jsonl", [alpaca])), format="alpaca")
    assert dict(report.dropped) == {"non-text input (list)": 1}


def test_mathqa_options_are_split_like_lm_evaluation_harness(tmp_path: Path) -> None:
    records, _ = read(files=str(write_jsonl(tmp_path / "mathqa.jsonl", [MATHQA_ROW])), format="mathqa")
    record = records[0]
    assert record["task"] == "math_mc" and record["choices"] == ["38", "40", "42.5", "45", "90"] and record["label"] == 1
    assert record["messages"][0]["content"].endswith("Options:\na) 38\nb) 40\nc) 42.5\nd) 45\ne) 90")
    assert record["messages"][1]["content"] == "60 / 1.5 = 40 answer : b\nThe answer is (b) 40."
    # an option holding ", " is cut at it, exactly as the harness's lazy expression does (same choices, same scores)
    assert hf.split_mathqa_options("a ) 1 , 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6") == ["1", "3", "4", "5", "6"]


def test_mathqa_rows_it_cannot_parse_are_dropped(tmp_path: Path) -> None:
    rows = [{**MATHQA_ROW, "options": "a ) 1 , b ) 2"}, {**MATHQA_ROW, "correct": "f"},
            {**MATHQA_ROW, "correct": "bc"},  # a substring of "abcde", not a letter: it was trained as answer b
            {**MATHQA_ROW, "options": "a ) " * 65536}]  # the harness's expression: quadratic, 146 s
    records, report = read(files=str(write_jsonl(tmp_path / "m.jsonl", rows)), format="mathqa")
    assert not records and dict(report.dropped) == {"options not parseable": 1, "correct is not a-e": 2,
                                                    "options longer than 1,000 characters": 1}


def test_decomposition_from_json_and_jsonl(tmp_path: Path) -> None:
    row = {"question": "Who was president when the Eiffel Tower was built?",
           "sub_questions": ["When was the Eiffel Tower built?", "Who was president of France then?"]}
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([row]), encoding="utf-8")
    from_json, _ = read(files=str(as_json), format="decomposition")
    from_jsonl, _ = read(files=str(write_jsonl(tmp_path / "d.jsonl", [row])), format="decomposition")
    assert from_json[0]["messages"] == from_jsonl[0]["messages"] and from_json[0]["task"] == "decompose"
    assert from_json[0]["messages"][1]["content"] == ("1. When was the Eiffel Tower built?\n"
                                                      "2. Who was president of France then?")
    assert from_json[0]["meta"]["index"] == 0


def test_messages_sharegpt_and_alpaca(tmp_path: Path) -> None:
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    alpaca = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    got_messages, _ = read(files=str(write_jsonl(tmp_path / "m.jsonl", [messages])), format="messages")
    got_sharegpt, _ = read(files=str(write_jsonl(tmp_path / "s.jsonl", [sharegpt])), format="sharegpt")
    got_alpaca, _ = read(files=str(write_jsonl(tmp_path / "a.jsonl", [alpaca])), format="alpaca")
    assert got_messages[0]["messages"] == messages["messages"]
    assert got_sharegpt[0]["messages"] == messages["messages"][1:]
    assert got_alpaca[0]["messages"] == [{"role": "user", "content": "Translate to French.\n\ncat"},
                                         {"role": "assistant", "content": "chat"}]


def test_rows_with_distinct_unknown_roles_are_one_reason_and_each_value_is_kept_cut_in_its_drop(tmp_path: Path) -> None:
    """Each role's repr was its own reason: 3,000 hostile rows made a 6,000-line table and a 6 MB report."""
    rows = [{"messages": [{"role": f"r{i}" + "Z" * 2000, "content": "x"}, {"role": "assistant", "content": "y"}]}
            for i in range(300)]
    rows.append({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]})
    records, report = read(files=str(write_jsonl(tmp_path / "m.jsonl", rows[:300])), format="messages")
    assert records == [] and report.dropped == {"unknown role in role": 300}
    assert report.dropped_rows[7]["reason"] == "unknown role in role, 'r7" + "Z" * 38 + "'"
    _, report = read(files=str(write_jsonl(tmp_path / "s.jsonl", rows[300:])), format="sharegpt")
    assert report.dropped_rows[0]["reason"] == "unknown role in from, 'robot'"


def test_csv_and_parquet_files(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([{"q": "One?", "a": "1"}, {"q": "Two?", "a": "2"}])
    frame.to_csv(tmp_path / "qa.csv", index=False)
    frame.to_parquet(tmp_path / "qa.parquet")
    columns = {"user": "q", "assistant": "a"}
    from_csv, _ = read(files=str(tmp_path / "qa.csv"), columns=columns)
    from_parquet, _ = read(files=str(tmp_path / "qa.parquet"), columns=columns)
    assert [r["messages"] for r in from_csv] == [r["messages"] for r in from_parquet]
    assert from_csv[1]["meta"]["row"] == 3  # the CSV line, header included


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path: Path) -> None:
    (tmp_path / "qa.csv").write_text("INSTRUCTION,RESPONSE\nLegs of a spider?,8\nBlank?,\nSay None,None\n"
                                     "Zip code?,090210\nSay NA,NA\n", encoding="utf-8")
    records, report = read(files=str(tmp_path / "qa.csv"))
    assert [r["messages"][1]["content"] for r in records] == ["8", "None", "090210", "NA"]
    assert dict(report.dropped) == {"empty RESPONSE": 1} and report.dropped_rows[0]["row"] == 3


def test_parquet_list_columns_are_lists_in_every_conversation_layout(tmp_path: Path) -> None:
    """pandas reads a Parquet list column as numpy arrays, which the layouts took for no conversation at all."""
    import pandas as pd

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    layouts = {"messages": {"messages": turns},
               "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
               "decomposition": {"question": "Who?", "sub_questions": ["When?", "Where?"]}}
    for fmt, row in layouts.items():
        pd.DataFrame([row]).to_parquet(tmp_path / f"{fmt}.parquet")
        records, report = read(files=str(tmp_path / f"{fmt}.parquet"), format=fmt)
        assert len(records) == 1 and not report.dropped, fmt
    assert records[0]["messages"][1]["content"] == "1. When?\n2. Where?"


def test_missing_column_lists_what_the_file_has(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"x.jsonl: no column INSTRUCTION, RESPONSE .* It has: question, answer"):
        read(files=str(path))


def test_a_json_row_without_a_column_is_dropped_and_only_a_file_without_it_is_refused(tmp_path: Path) -> None:
    rows = [{"INSTRUCTION": "q1"}, {"INSTRUCTION": "q2", "RESPONSE": "a2"}, {"RESPONSE": "a3"}]
    records, report = read(files=str(write_jsonl(tmp_path / "x.jsonl", rows)))
    assert [r["meta"]["line"] for r in records] == [2]
    assert [(d["reason"], d["line"]) for d in report.dropped_rows] == [("missing RESPONSE", 1), ("missing INSTRUCTION", 3)]
    with pytest.raises(UserError, match=r"y.jsonl: no column RESPONSE .* It has: INSTRUCTION, answer\."):
        read(files=str(write_jsonl(tmp_path / "y.jsonl", [{"INSTRUCTION": "q1"}, {"INSTRUCTION": "q2", "answer": "a"}])))


def test_a_jsonl_line_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"INSTRUCTION": "q", "RESPONSE": "a"}, "{oops"])
    with pytest.raises(UserError, match=r"x.jsonl: line 2 is not valid JSON"):
        read(files=str(path))


def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path: Path) -> None:
    """datasets' Dataset.to_json writes JSON Lines, under whatever name it is given."""
    rows = [{"INSTRUCTION": "q1", "RESPONSE": "a1"}, {"INSTRUCTION": "q2", "RESPONSE": "a2"}]
    path = write_jsonl(tmp_path / "rows.json", rows)
    records, _ = read(files=str(path))
    assert [r["meta"]["line"] for r in records] == [1, 2]
    path.write_text("".join(json.dumps(r, indent=1) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.json: not valid JSON \(line 5: Extra data\)\. .*name it \.jsonl"):
        read(files=str(path))


def test_json_and_csv_with_a_byte_order_mark_are_read_and_other_encodings_named(tmp_path: Path) -> None:
    rows = [{"INSTRUCTION": "안녕하세요를 영어로?", "RESPONSE": "Hello"}]
    (tmp_path / "bom.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8-sig")
    assert len(read(files=str(tmp_path / "bom.json"))[0]) == 1
    for name, text in (("ko.json", json.dumps(rows, ensure_ascii=False)), ("ko.csv", "INSTRUCTION,RESPONSE\n안녕,Hello\n")):
        (tmp_path / name).write_text(text, encoding="cp949")
        with pytest.raises(UserError, match=rf"{name} is not UTF-8 text \(byte \d+ cannot be decoded\)\. Save it as UTF-8"):
            read(files=str(tmp_path / name))


def test_dataset_and_files_are_exclusive() -> None:
    with pytest.raises(UserError, match="set exactly one of `dataset:`"):
        read()


def test_hub_offline_fails_fast_and_says_how_to_use_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set.*set `files:` to the local"):
        read(dataset="qwedsacf/grade-school-math-instructions")


def test_hub_unreachable_fails_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one fake: the Hub's network call, raising what an unplugged machine raises."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    seen = {}

    def no_network(self, repo_id: str, timeout: float | None = None, **_: Any) -> None:
        seen["timeout"] = timeout
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"dataset regisss/math_qa: the Hugging Face Hub cannot be reached .*"
                                        r"hf download regisss/math_qa --repo-type dataset"):
        read(dataset="regisss/math_qa", format="mathqa", timeout_s=3)
    assert seen["timeout"] == 3 and time.perf_counter() - started < 3


def cached_hub_dataset(cache: Path, repo_id: str, rows: list[dict]) -> None:
    """What loading `repo_id` from the Hub once leaves in the datasets cache: its rows prepared as Arrow under
    <cache>/<owner>___<name>/default/<version>/<revision> (made here by datasets' own json builder: the Hub, the
    one thing this machine cannot reach, is what is left out)."""
    from datasets.packaged_modules.json.json import Json

    source = cache.parent / "hub-rows.jsonl"
    write_jsonl(source, rows)
    builder = Json(cache_dir=str(cache), dataset_name=repo_id.split("/")[1], repo_id=repo_id, hash="0123abcd",
                   data_files={"train": str(source)})
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir).parents[1]  # .../default-<hash of the local data files>
    prepared.rename(prepared.with_name("default"))


def test_a_hub_dataset_read_once_is_read_from_the_cache_offline_or_without_a_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs promise that a Hub dataset, once downloaded, works offline; ingest refused it whenever the Hub
    could not be reached (HF_HUB_OFFLINE on a cluster node), before datasets could look in its cache."""
    import datasets
    import huggingface_hub

    cache, switch = tmp_path / "datasets", datasets.config.HF_HUB_OFFLINE  # as datasets' import found HF_HUB_OFFLINE
    cached_hub_dataset(cache, "distillery-test/gsm-toy", [{"INSTRUCTION": "What is 2 + 3?", "RESPONSE": "5"},
                                                           {"INSTRUCTION": "What is 4 + 4?", "RESPONSE": "8"}])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # what HF_DATASETS_CACHE sets at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records, report = read(dataset="distillery-test/gsm-toy")
    assert [r["messages"][1]["content"] for r in records] == ["5", "8"] and report.read == 2

    def no_network(self, repo_id: str, timeout: float | None = None, **_: Any) -> None:
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    assert len(read(dataset="distillery-test/gsm-toy")[0]) == 2 and datasets.config.HF_HUB_OFFLINE is switch
    with pytest.raises(UserError, match=r"dataset distillery-test/other: the Hugging Face Hub cannot be reached .*"
                                        r"and it is not in the local Hugging Face cache"):
        read(dataset="distillery-test/other")


def test_a_dataset_id_that_names_a_local_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` reads a local folder named like the id before the Hub or its cache: `dataset: ..` read the files
    of the parent folder, `owner/name` a folder of that name under the working directory."""
    (tmp_path / "owner" / "name").mkdir(parents=True)
    write_jsonl(tmp_path / "owner" / "name" / "rows.jsonl", [{"INSTRUCTION": "q", "RESPONSE": "a"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"dataset '\.\.' is not a Hugging Face Hub dataset id"):
        read(dataset="..")
    with pytest.raises(UserError, match=r"dataset owner/name: a local file or folder of that name is in the working"):
        read(dataset="owner/name")


@pytest.mark.parametrize("task", ["[/x]", "$\\frac{a}$", "a|b", "../up", "", "overall", "x" * 65])
def test_a_task_name_that_would_break_evaluates_tables_is_refused(task: str) -> None:
    """A task names a row of evaluate's console table (rich markup), report.md (a markdown table) and chart
    (matplotlib mathtext); `overall` is the row of all tasks together."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task"):
        HFDatasetParams(name="src", kind="hf", files="x.jsonl", task=task)
    assert HFDatasetParams(name="src", kind="hf", files="x.jsonl", task="gsm8k.v2-ko_en").task == "gsm8k.v2-ko_en"


def test_conversations_whose_turns_are_out_of_order_are_dropped_not_fatal_to_format(tmp_path: Path) -> None:
    """[human, gpt, gpt] or [gpt] alone reached format, whose template raised for the whole stage (with advice
    that did not apply); such rows are dropped at ingest with their reason, as LLaMA-Factory drops them."""
    turns = {"ok": [("human", "Hi"), ("gpt", "Hello!")], "two_answers": [("human", "Hi"), ("gpt", "a"), ("gpt", "b")],
             "answer_only": [("gpt", "a")], "system_late": [("human", "Hi"), ("system", "s"), ("gpt", "a")],
             "system_first": [("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello!")]}
    rows = [{"conversations": [{"from": role, "value": text} for role, text in conversation]}
            for conversation in turns.values()]
    records, report = read(files=str(write_jsonl(tmp_path / "s.jsonl", rows)), format="sharegpt")
    assert [r["meta"]["line"] for r in records] == [1, 5]
    assert [(d["reason"], d["line"]) for d in report.dropped_rows] == [
        ("turns out of order (after an optional system turn: user, assistant, user, ...)", line) for line in (2, 3, 4)]


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff"])
def test_a_lone_surrogate_escape_is_refused_naming_the_line(tmp_path: Path, escape: str) -> None:
    """json reads "\\ud800" as a character no UTF-8 text can hold (orjson refuses it): ingest ended with a
    TypeError far from the line. A pair ("\\ud83d\\ude00", an emoji) is text."""
    path = write_jsonl(tmp_path / "x.jsonl", ['{"INSTRUCTION": "q \\ud83d\\ude00", "RESPONSE": "a"}',
                                              '{"INSTRUCTION": "q %s", "RESPONSE": "a"}' % escape])
    with pytest.raises(UserError, match=r"x.jsonl: line 2 is not valid JSON \(the escape \\u(d800|dfff) is half of a "
                                        r"UTF-16 surrogate pair, not a character\)"):
        read(files=str(path))


def test_a_file_that_is_no_table_shows_a_bounded_part_of_its_first_line() -> None:
    """A CSV's header is its first line, whatever the file holds (a secret behind a symbolic link, a megabyte)."""
    columns = [f"c{i}:" + "x" * 100 for i in range(30)]
    with pytest.raises(UserError) as refused:
        hf.check_columns(columns, HFDatasetParams(name="src", kind="hf", files="x.csv"), "x.csv")
    assert len(str(refused.value)) < 1200 and "(and 10 more)" in str(refused.value)


@pytest.mark.parametrize("columns, why", [({}, "needs a column for user and assistant"),
                                          ({"user": "INSTRUCTION"}, "needs a column for assistant"),
                                          ({"system": "S", "assistant": "A"}, "needs a column for user"),
                                          ({"user": "Q", "assistant": "Q"}, "'Q' is the column of two roles")])
def test_a_columns_mapping_that_makes_no_conversation_is_a_config_error(columns: dict, why: str) -> None:
    """`columns: {}` ingested records with no messages; {user: Q, assistant: Q} taught the model to echo."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(why)):
        HFDatasetParams(name="src", kind="hf", files="x.jsonl", columns=columns)


def test_text_is_cleaned_as_a_workbook_cell_is_and_the_note_says_so(tmp_path: Path) -> None:
    """NUL, escapes and a BOM went into training text, and an answer of zero-width characters was kept; excel's
    cells lose them (clean_text)."""
    rows = [{"INSTRUCTION": "\ufeffWhat is\x00 2+2?\x1b[2J", "RESPONSE": "4\u200b"},
            {"INSTRUCTION": "Say nothing.", "RESPONSE": "\u200b\u2060\u3164"},
            {"INSTRUCTION": "Keep\tthis\nas is: \u202eright-to-left", "RESPONSE": "ok"}]
    records, report = read(files=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert [r["messages"][0]["content"] for r in records] == ["What is 2+2?[2J", "Keep\tthis\nas is: \u202eright-to-left"]
    assert records[0]["messages"][1]["content"] == "4"
    assert report.dropped == {"empty RESPONSE": 1}
    assert report.notes == [f"{tmp_path / 'c.jsonl'}: control characters (U+0000 U+001B) removed from 1 row(s)"]


def test_a_turn_is_text_a_number_or_openai_text_parts(tmp_path: Path) -> None:
    def conversation(content: Any) -> dict:
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}

    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    rows = [conversation(7), conversation(parts), conversation(image), conversation(["a", "b"]), conversation(True)]
    records, report = read(files=str(write_jsonl(tmp_path / "m.jsonl", rows)), format="messages")
    assert [r["messages"][0]["content"] for r in records] == ["7", "Hello, world"]
    assert report.dropped == {"non-text content part": 1, "non-text content (list)": 1, "non-text content (boolean)": 1}
    assert "non-text content part, image_url" in {row["reason"] for row in report.dropped_rows}


def test_column_names_are_matched_as_written_whatever_their_normal_form_or_invisible_ends(tmp_path: Path) -> None:
    """A CSV saved on macOS has its Korean header decomposed (NFD): `no column 질문, 답변 ... It has: 질문, 답변`."""
    import unicodedata

    header = ",".join(unicodedata.normalize("NFD", name) for name in ("질문", "답변 "))
    (tmp_path / "nfd.csv").write_text(f"{header}\n서울은 어디?,한국\n", encoding="utf-8")
    records, _ = read(files=str(tmp_path / "nfd.csv"), columns={"user": "질문", "assistant": "\u200b답변"})
    assert records[0]["messages"] == [{"role": "user", "content": "서울은 어디?"}, {"role": "assistant", "content": "한국"}]
    (tmp_path / "other.csv").write_text("질문,대답\u200b\nq,a\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no column 답변 \(format: columns\). It has: 질문, 대답\. Set"):
        read(files=str(tmp_path / "other.csv"), columns={"user": "질문", "assistant": "답변"})


def test_a_csv_quote_left_open_is_one_message_and_rows_name_the_line_they_start_on(tmp_path: Path) -> None:
    """From a review: a quote never closed took the 198 lines after it into one answer without a word; and a row's
    `row` counted rows, not lines, so blank lines and quoted line breaks sent the user to the wrong line."""
    lines = ["INSTRUCTION,RESPONSE", "q1,a1", 'q2,"a2 has a stray quote', *[f"q{k},a{k}" for k in range(3, 200)]]
    (tmp_path / "open.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"open.csv: line 3 opens a quoted field \(\"\) that never closes: it runs to "
                                        r"the end of the file \(line 200\)"):
        read(files=str(tmp_path / "open.csv"))
    (tmp_path / "lines.csv").write_text('INSTRUCTION,RESPONSE\n\n\nq1,a1\n"q2\nspans",a2\nq3,a3\n', encoding="utf-8")
    records, _ = read(files=str(tmp_path / "lines.csv"))
    assert [(r["messages"][0]["content"], r["meta"]["row"]) for r in records] == [("q1", 4), ("q2\nspans", 5), ("q3", 7)]


def test_a_table_of_only_a_header_without_the_columns_is_refused_at_its_header(tmp_path: Path) -> None:
    """From a review: a CSV (or Parquet) of only a header missing the needed columns was taken without a word: the
    columns were checked at the first row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "w.csv").write_text("foo,bar\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"w.csv: no column INSTRUCTION, RESPONSE \(format: columns\). It has: foo, bar"):
        read(files=str(tmp_path / "w.csv"))
    pq.write_table(pa.table({"foo": pa.array([], pa.string())}), tmp_path / "w.parquet")
    with pytest.raises(UserError, match=r"w.parquet: no column INSTRUCTION, RESPONSE \(format: columns\). It has: foo"):
        read(files=str(tmp_path / "w.parquet"))


def test_a_hostile_part_type_is_the_detail_of_one_fixed_reason(tmp_path: Path) -> None:
    """From a review: each message part's `type` went into the drop reason, so 3,000 rows of 2 KB types made a
    6 MB report (one reason row each); the reason is fixed text, the type (cut) its detail."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "x" * 2000 + str(k), "text": "q"}]},
                          {"role": "assistant", "content": "a"}]} for k in range(50)]
    _, report = read(files=str(write_jsonl(tmp_path / "parts.jsonl", rows)), format="messages")
    assert dict(report.dropped) == {"non-text content part": 50}
    assert all(len(row["reason"]) <= 80 for row in report.dropped_rows), report.dropped_rows[0]


def test_a_column_repeated_in_a_csv_or_parquet_header_is_refused(tmp_path: Path) -> None:
    """pandas took the first RESPONSE (renaming the other RESPONSE.1), pyarrow the last: silently, differently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("INSTRUCTION,RESPONSE,RESPONSE\nq,a1,a2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv: the column RESPONSE appears 2 times \(columns 2, 3\)\. Rename"):
        read(files=str(tmp_path / "d.csv"))
    table = pa.Table.from_arrays([pa.array(["q"]), pa.array(["a1"]), pa.array(["a2"])],
                                 names=["INSTRUCTION", "RESPONSE", "RESPONSE\u200b"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"d\.parquet: the column RESPONSE appears 2 times \(columns 2, 3\)"):
        read(files=str(tmp_path / "d.parquet"))


def test_a_csv_is_read_in_chunks_and_a_json_lines_file_named_json_streams(tmp_path: Path, monkeypatch) -> None:
    """A 213 MB CSV took 766 MB before its first row, and JSON Lines named .json was read whole (466 MB)."""
    from distillery.core import records

    (tmp_path / "d.csv").write_text("INSTRUCTION,RESPONSE\n" + "".join(f"q{i},0{i}\n" for i in range(8)), encoding="utf-8")
    got, _ = read(files=str(tmp_path / "d.csv"))
    assert [r["messages"][1]["content"] for r in got] == [f"0{i}" for i in range(8)]
    with open(tmp_path / "d.csv", "a", encoding="utf-8") as handle:
        handle.write("q,a,too many\n")
    rows = hf.read_csv(tmp_path / "d.csv")
    assert [next(rows)[1]["RESPONSE"] for _ in range(8)] == [f"0{i}" for i in range(8)]  # before the last line is read

    def read_whole(*args: Any) -> str:
        raise AssertionError("read whole")

    monkeypatch.setattr(records, "read_utf8", read_whole)
    lines = write_jsonl(tmp_path / "lines.json", [{"INSTRUCTION": f"q{i}", "RESPONSE": "a"} for i in range(3)])
    assert len(read(files=str(lines))[0]) == 3


def test_a_json_row_with_two_keys_that_are_one_column_is_dropped(tmp_path: Path) -> None:
    rows = [{"INSTRUCTION": "q", "RESPONSE": "a1", "RESPONSE\u200b": "a2"}, {"INSTRUCTION": "q2", "RESPONSE": "a"}]
    records, report = read(files=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [r["messages"][1]["content"] for r in records] == ["a"] and report.read == 2
    assert report.dropped == {"a column named twice": 1}
    assert report.dropped_rows[0]["reason"] == "a column named twice, 'RESPONSE'"
