"""Evaluation: MathQA data and scoring (lm-evaluation-harness compatible), model back-ends, reports."""
