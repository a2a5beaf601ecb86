"""What the teacher is asked, and how its answers become one r1-style training trace.

Teacher prompt: the configured system instruction plus a per-verifier answer format, then the record's
conversation without its reference answer. A second turn (CodeI/O++) adds the first answer and the verifier's
feedback. The training trace keeps the record's own prompt and ends in
`<think>\\n{reasoning}\\n</think>\\n\\n{final answer}`, where the reasoning of a revised sample is turn 1, its
feedback, turn 2 and its feedback, in that order.
"""

from __future__ import annotations

ANSWER_FORMATS = {
    "math_mc": "Finish with one line: The answer is (x), where x is the letter of the correct option.",
    "numeric": "Finish with one line: The answer is N, where N is the final number.",
    "codeio_output": 'Finish with the final answer as JSON: {"output": <your output>}.',
    "codeio_input": 'Finish with the final answer as JSON: {"input": {<variable>: <value>, ...}}.',
}
REVISE = "{feedback}\nPlease reconsider your reasoning and answer again in the same format."


def question(record: dict) -> list[dict[str, str]]:
    """The record's conversation up to (not including) its reference answer."""
    messages = [dict(m) for m in record["messages"]]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def teacher_messages(record: dict, verifier: str, system_prompt: str) -> list[dict[str, str]]:
    """The first-turn request: instruction + answer format as the system message, then the question."""
    messages = question(record)
    instruction = f"{system_prompt}\n{ANSWER_FORMATS[verifier]}".strip()
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}"
        return messages
    return [{"role": "system", "content": instruction}, *messages]


def revision_messages(first: list[dict[str, str]], answer: str, feedback: str) -> list[dict[str, str]]:
    """The second-turn request: the first answer and the verifier's feedback appended."""
    return [*first, {"role": "assistant", "content": answer},
            {"role": "user", "content": REVISE.format(feedback=feedback)}]


def reasoning_of(text: str) -> str:
    """The teacher's reasoning: inside its <think> block when it wrote one (the answer after it is replaced by the
    checked final answer), else the whole text."""
    if "</think>" in text:
        return text.split("</think>", 1)[0].replace("<think>", "").strip()
    return text.replace("<think>", "").strip()


def trace_content(turns: list[tuple[str, str]], canonical: str) -> str:
    """The assistant message of a training trace from (teacher text, feedback) turns and the final answer.

    A single verified turn needs no feedback line; a revised one keeps every turn with its feedback.
    """
    if len(turns) == 1:
        reasoning = reasoning_of(turns[0][0])
    else:
        reasoning = "\n\n".join(f"{reasoning_of(text)}\n\nFeedback: {feedback}" for text, feedback in turns)
    return f"<think>\n{reasoning}\n</think>\n\n{canonical}".rstrip()
