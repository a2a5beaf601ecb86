"""How a generated answer to a held-out record is scored, by the record's task.

| task | checker | metrics |
| --- | --- | --- |
| translate_* | sacrebleu, corpus level | chrF++ (character n-grams plus word bigrams: tokenisation-free, fair to Korean) and BLEU (tokeniser by the target language, the task name's last part: char for ko, ja and th, zh for zh, 13a otherwise) |
| math: at least half the references end in `#### <answer>` or hold `\\boxed{}`, or a task named math/gsm (a word of its name: `gsm8k`, `math_word`), and at least half the references have an answer math-verify can read | math-verify (reasoning/answers.py) | accuracy |
| math_mc (MathQA options) with choices and a label | the option stated after any reasoning, as distill's math_mc verifier reads it | accuracy |
| code_io_output, code_io_input whose records carry CodeI/O's meta | CodeI/O's own verifiers; input prediction runs the reference code in the sandbox | accuracy |
| anything else (CodeI/O++'s `code_io` included) | exact match after whitespace and case normalisation, and chrF++ | exact_match, chrf (named in the results) |

Each task has one main metric on a 0-1 scale (`main_metric`), which the quant bound compares.
"""

from __future__ import annotations

import re
from typing import Any

from distillery.reasoning.answers import after_reasoning

TRANSLATION_PREFIX = "translate_"


MATH_NAME = re.compile(r"(?:^|[_.-])(?:math|gsm)(?:\d+k?)?(?:$|[_.-])", re.IGNORECASE)  # gsm8k, math_word; not aftermath
CODEIO_VERIFIERS = {"code_io_output": "codeio_output", "code_io_input": "codeio_input"}


def kind_of(task: str, records: list[dict[str, Any]], references: list[str]) -> str:
    """translation | math | option | codeio | text, from the task's name and its records. A checker is chosen only
    where every record carries what it reads (math_mc's choices and label, CodeI/O's meta); text otherwise. A task
    is math when at least half its references end in a GSM-style `#### <answer>` line (not a markdown heading) or
    hold a `\\boxed{}` answer, or a word of its name is math/gsm, and at least half have an answer to compare."""
    from distillery.reasoning.answers import answer_region, candidates
    from distillery.reasoning.verifiers import why_uncheckable

    if task.startswith(TRANSLATION_PREFIX):
        return "translation"
    if task == "math_mc":
        return "option" if all(why_uncheckable("math_mc", record) is None for record in records) else "text"
    if task in CODEIO_VERIFIERS:
        checkable = all(why_uncheckable(CODEIO_VERIFIERS[task], record) is None for record in records)
        return "codeio" if checkable else "text"
    marked = sum(gsm_final(r) or "\\boxed{" in r for r in references)
    answerable = sum(bool(candidates(answer_region(r))) for r in references)
    if (2 * marked >= len(references) or MATH_NAME.search(task)) and 2 * answerable >= len(references):
        return "math"
    return "text"


def gsm_final(reference: str) -> bool:
    """Whether the reference's last line is a GSM-style `#### <answer>` (a `####` heading above text is not)."""
    from distillery.reasoning.answers import GSM_FINAL

    lines = reference.strip().splitlines()
    return bool(lines) and GSM_FINAL.fullmatch(lines[-1].strip()) is not None


def bleu_tokenizer(task: str) -> str:
    """sacrebleu's tokeniser for the task's target language (`translate_en_ko` -> ko): 13a splits on spaces and
    punctuation, which Korean, Japanese and Thai words and Chinese text do not delimit."""
    target = task.rsplit("_", 1)[-1].lower()
    return {"ko": "char", "ja": "char", "th": "char", "zh": "zh"}.get(target, "13a")


def normalized(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def check_item(kind: str, record: dict[str, Any], reference: str, reply: str, limits: Any) -> dict[str, Any]:
    """One reply's verdict: {"correct": bool | None, "how": ...} (None where correctness is not the metric)."""
    if kind == "math":
        from distillery.reasoning.answers import check_math

        checked = check_math(reply, reference)
        return {"correct": checked.correct, "how": checked.how, "answer": checked.predicted,
                **({"error": checked.error} if checked.error else {})}
    if kind == "option":
        from distillery.evals.generative import extract_letter

        letter = extract_letter(reply, record.get("choices") or [])
        return {"correct": letter is not None and "abcde".index(letter) == record.get("label"), "how": "letter",
                "answer": letter}
    if kind == "codeio":
        from distillery.reasoning.verifiers import VERIFIERS

        verdict = VERIFIERS[CODEIO_VERIFIERS[record["task"]]](record, after_reasoning(reply), limits)
        # why it failed, and how the sandboxed run ended: a record whose reference code never returns shows as such
        sandbox = verdict.details.get("sandbox", {}).get("status")
        return {"correct": verdict.ok, "how": record["task"], "answer": verdict.answer,
                **({"error": verdict.feedback} if not verdict.ok else {}), **({"sandbox": sandbox} if sandbox else {})}
    if kind == "text":
        return {"correct": normalized(after_reasoning(reply)) == normalized(reference), "how": "exact match"}
    return {"correct": None, "how": "chrF++/BLEU"}


def corpus_metrics(kind: str, task: str, references: list[str], replies: list[str],
                   verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """A task's metrics over its items: chrF++/BLEU for translation, accuracy for the checked kinds, exact match
    and chrF++ for the rest; `metric` names the main one."""
    import sacrebleu

    answers = [after_reasoning(r).strip() for r in replies]
    if kind == "translation":
        tokenizer = bleu_tokenizer(task)
        chrf = sacrebleu.corpus_chrf(answers, [references], word_order=2).score
        bleu = sacrebleu.corpus_bleu(answers, [references], tokenize=tokenizer).score
        return {"chrf": round(chrf, 3), "bleu": round(bleu, 3), "bleu_tokenizer": tokenizer, "metric": "chrf"}
    accuracy = sum(bool(v["correct"]) for v in verdicts) / len(verdicts) if verdicts else float("nan")
    if kind == "text":
        chrf = sacrebleu.corpus_chrf(answers, [references], word_order=2).score
        return {"exact_match": round(accuracy, 4), "chrf": round(chrf, 3), "metric": "chrf",
                "checker": "exact match and chrF++ (no task-specific checker)"}
    checker = {"math": "math-verify", "option": "option letter", "codeio": "CodeI/O verifier"}[kind]
    return {"accuracy": round(accuracy, 4), "metric": "accuracy", "checker": checker}


def sample_metrics(kind: str, task: str, references: list[str], replies: list[list[str]],
                   verdicts: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """corpus_metrics over each item's answers: with one answer an item, its metrics; with k sampled answers, the
    metrics of each of the k answer sets averaged (the expected metric of one sampled answer: DeepSeek-R1's pass@1
    when the metric is accuracy), so that no single draw decides the number or the quant check."""
    runs = [corpus_metrics(kind, task, references, [r[s] for r in replies], [v[s] for v in verdicts])
            for s in range(len(replies[0]))]
    if len(runs) == 1:
        return runs[0]
    averaged = {key: round(sum(run[key] for run in runs) / len(runs), 4) if isinstance(value, float) else value
                for key, value in runs[0].items()}
    return {**averaged, "averaged_over": len(runs)}


def main_metric(scores: dict[str, Any]) -> float | None:
    """The task's main metric on a 0-1 scale (chrF is 0-100)."""
    name = scores.get("metric")
    if name is None or scores.get(name) is None:
        return None
    value = scores[name]
    return value / 100 if name == "chrf" else value
