"""Running lm-evaluation-harness 0.4.13's own `mathqa` task on a local MathQA file (the reference we match).

Used by the identity test and bench/evaluate.py, never by the pipeline. The task is the harness's installed
mathqa.yaml, included unchanged; only where the data comes from is overridden (a local json file, offline).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

TASK = "mathqa_local"


def write_task(directory: Path, data_file: Path) -> None:
    """A task yaml that includes the harness's mathqa.yaml and reads `data_file` as its test split."""
    import lm_eval.tasks

    mathqa_yaml = Path(lm_eval.tasks.__file__).parent / "mathqa" / "mathqa.yaml"
    (directory / f"{TASK}.yaml").write_text(
        f"include: {mathqa_yaml}\n"
        f"task: {TASK}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data_file}\n"
        "training_split: null\n"
        "validation_split: null\n"
        "test_split: test\n",
        encoding="utf-8")


def run_harness(model_path: str, data_file: Path, limit: int, batch_size: int = 8,
                dtype: str = "float32") -> list[dict[str, Any]]:
    """Per-item harness results in item order: {doc_id, loglikelihoods, acc, acc_norm}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), data_file.resolve())
        model = HFLM(pretrained=model_path, dtype=dtype, batch_size=batch_size, device="cpu")
        home_cache, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, Path(tmp) / "datasets"
        try:  # the harness reads the data file through datasets, whose Arrow copy would stay in the user's cache
            out = lm_eval.simple_evaluate(model=model, tasks=[TASK], num_fewshot=0, limit=limit, log_samples=True,
                                          task_manager=TaskManager(include_path=tmp, include_defaults=False))
        finally:
            datasets.config.HF_DATASETS_CACHE = home_cache
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [{"doc_id": s["doc_id"], "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
             "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])} for s in samples]
