"""Params models of every data-source kind, in one place so the config schema can build its union
without importing any reader (readers import pandas, datasets, ... lazily)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distillery.sources.registry import SourceParams


class AIHubExcelParams(SourceParams):
    """AI-Hub Korean-English parallel corpus workbooks (dataSetSn=126) or any workbook with two text columns."""

    kind: Literal["aihub_excel"]
    path: str | list[str] = Field(description="A workbook, a list of them, a directory or a glob (.xlsx/.xlsm/.xls).")
    sheet: str | int | None = Field(None, description="Sheet name or 0-based index; default: the first sheet.")
    source_column: str = Field("원문", description="Column holding the Korean text.")
    target_column: str = Field("번역문", description="Column holding the English text.")
    direction: Literal["ko_en", "en_ko", "both"] = Field("ko_en", description="Which way to translate; both yields two records a row.")
    instruction_ko_en: str = Field("Translate the following Korean text into English.\n\n{text}", description="User prompt for ko->en; {text} is the source sentence.")
    instruction_en_ko: str = Field("Translate the following English text into Korean.\n\n{text}", description="User prompt for en->ko.")
    header_search_rows: int = Field(20, ge=1, description="How many top rows to search for the header row.")


class HFDatasetParams(SourceParams):
    """A Hugging Face dataset from the Hub or local json/jsonl/csv/parquet files, mapped into messages."""

    kind: Literal["hf"]
    dataset: str | None = Field(None, description="Hub dataset id, e.g. qwedsacf/grade-school-math-instructions.")
    config_name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    files: str | list[str] | None = Field(None, description="Local json/jsonl/csv/parquet file(s), a directory or a glob.")
    format: Literal["columns", "mathqa", "decomposition", "messages", "sharegpt", "alpaca"] = Field(
        "columns", description="How rows become messages: a column mapping, or one of the known layouts."
    )
    columns: dict[Literal["system", "user", "assistant"], str] = Field(
        default_factory=lambda: {"user": "INSTRUCTION", "assistant": "RESPONSE"},
        description="For format=columns: which column becomes which role.",
    )
    task: str = Field("qa", description="The record task for format=columns/messages/sharegpt/alpaca.")
    timeout_s: float = Field(10.0, gt=0, description="How long to wait for the Hub before failing (no long hangs offline).")


class CodeIOParams(SourceParams):
    """hkust-nlp/CodeIO records: raw (problem, refcode, ios) or the released SFT records (CodeI/O++)."""

    kind: Literal["codeio"]
    path: str | list[str] = Field(description="JSONL file(s), a directory or a glob.")
    format: Literal["raw", "sft"] = Field("raw", description="raw: problem_description/refcode/ios; sft: prompt/turn_1/feedback_1/turn_2/feedback_2.")
    tasks: list[Literal["output", "input"]] = Field(
        default_factory=lambda: ["output", "input"], description="For raw records: which prediction prompts to make."
    )
    ios_per_record: int = Field(1, ge=1, description="For raw records: how many of the `ios` pairs become prompts.")
