"""Ollama Modelfile beside each GGUF, its TEMPLATE derived from the training chat template.

A Jinja chat template cannot be translated to Go's text/template in general, but every template we train with
(ChatML, qa, ko_qa, alpaca, r1, Llama-3, ...) is a fixed text between turns. So the training template is
rendered on conversations whose contents are unique markers, and the text between the markers gives the
pieces: what opens the prompt (with and without a system message), what goes between a user turn and the
answer (the generation prompt), and between an answer and the next user turn. `render_parts` renders a
conversation from those pieces exactly as the Go template does, and `template_parts` refuses a template
whose pieces do not reproduce the Jinja rendering (or that raises an error on such a conversation, as templates
that refuse a system turn do). `write_modelfile` then writes the Modelfile without TEMPLATE and says why: the
GGUFs are verified and kept either way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError
from distillery.core.unseen import holds_control

SYS, U1, A1, U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"


@dataclass(frozen=True)
class TemplateParts:
    start_system: str  # before the system prompt
    system_to_user: str  # after the system prompt, before the first user turn
    start_no_system: str  # before the first user turn when there is no system prompt (may hold a default one)
    user_to_answer: str  # after a user turn: the generation prompt (assistant header)
    answer_to_user: str  # after an answer, before the next user turn


def _render(template: str, messages: list[dict[str, str]], tokenizer: Any, generation_prompt: bool) -> str:
    """The template's text for `messages`; an error the template raises (a role it refuses) is a UserError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:
        roles = "/".join(m["role"] for m in messages)
        raise UserError(f"the chat template cannot render a {roles} conversation ({type(err).__name__}: {err}), so "
                        "no Ollama TEMPLATE can be derived from it.") from None


def _between(text: str, left: str, right: str) -> str:
    start = text.index(left) + len(left) if left else 0
    return text[start: text.index(right, start)]


def template_parts(template: str, tokenizer: Any) -> TemplateParts:
    """The fixed pieces of a chat template; a UserError when they do not reproduce it exactly."""
    sys_u = [{"role": "system", "content": SYS}, {"role": "user", "content": U1}]
    full = _render(template, sys_u + [{"role": "assistant", "content": A1}, {"role": "user", "content": U2}],
                   tokenizer, True)
    no_sys = _render(template, sys_u[1:], tokenizer, True)
    try:
        parts = TemplateParts(
            start_system=_between(full, "", SYS),
            system_to_user=_between(full, SYS, U1),
            start_no_system=_between(no_sys, "", U1),
            user_to_answer=_between(full, U1, A1),
            answer_to_user=_between(full, A1, U2),
        )
    except ValueError:
        raise UserError("the chat template does not place system, user and assistant turns in order, so no Ollama "
                        "TEMPLATE can be derived from it.") from None
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        if render_parts(parts, system, turns) != _render(template, messages, tokenizer, True):
            raise UserError("the chat template renders turns differently depending on their content or position, "
                            "so no Ollama TEMPLATE can reproduce it; write the Modelfile's TEMPLATE by hand.")
    return parts


def render_parts(parts: TemplateParts, system: str | None, turns: list[dict[str, str]]) -> str:
    """A conversation (ending with a user turn) rendered from the pieces, the way the Go template does."""
    text = parts.start_system + system + parts.system_to_user if system else parts.start_no_system
    for i, turn in enumerate(turns):
        last = i == len(turns) - 1
        if turn["role"] == "user":
            text += turn["content"] + parts.user_to_answer
        elif turn["role"] == "assistant":
            text += turn["content"] + ("" if last else parts.answer_to_user)
    return text


def without_leading_bos(parts: TemplateParts, bos_token: str | None) -> TemplateParts:
    """The pieces without the BOS text a template (R1's, Llama 3's) opens with: Ollama's tokenizer adds the BOS
    the GGUF asks for, and llama.cpp strips the same text from a rendered prompt for the same reason."""
    if not bos_token:
        return parts
    return replace(parts, start_system=parts.start_system.removeprefix(bos_token),
                   start_no_system=parts.start_no_system.removeprefix(bos_token))


def go_literal(text: str) -> str:
    """Text placed verbatim in a Go template (only `{{` would be read as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: TemplateParts) -> str:
    """The Ollama TEMPLATE (Go text/template over .System and .Messages) for these pieces. No `{{-` trim
    markers: they would also eat the newlines that belong to the template's literal text."""
    g = go_literal
    return (
        f"{{{{ if .System }}}}{g(parts.start_system)}{{{{ .System }}}}{g(parts.system_to_user)}"
        f"{{{{ else }}}}{g(parts.start_no_system)}{{{{ end }}}}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq .Role "user" }}}}{{{{ .Content }}}}{g(parts.user_to_answer)}'
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{{{{ if not $last }}}}{g(parts.answer_to_user)}'
        "{{ end }}{{ end }}{{ end }}"
    )


def stop_tokens(parts: TemplateParts, eos_token: str | None) -> list[str]:
    """EOS, plus the text that opens the next user turn (ChatML `<|im_start|>user`, qa `### Question:`), so a
    model that runs past its EOS still stops before writing the user's turn."""
    stops = [eos_token] if eos_token else []
    next_user = parts.answer_to_user.replace(eos_token, "") if eos_token else parts.answer_to_user
    lines = [line.strip() for line in next_user.splitlines() if line.strip()]
    if lines and lines[0] not in stops:
        stops.append(lines[0])
    return [stop for stop in stops if quotable(stop)]


def quotable(text: str) -> bool:
    """Whether `text` can stand in a Modelfile's double quotes: no quote, backslash or control character. A
    tokenizer's EOS text is the model's to choose, and one holding `"` and a line break would end the PARAMETER
    line and write Modelfile lines of its own (an ADAPTER, another FROM)."""
    return not (holds_control(text) or '"' in text or "\\" in text)


def build_modelfile(gguf_name: str, template: str, tokenizer: Any, eos_token: str | None) -> str:
    """Modelfile text: FROM the GGUF beside it, TEMPLATE, PARAMETER stop for each stop string."""
    from distillery.core.vocab import adds_bos

    parts = template_parts(template, tokenizer)
    parts = without_leading_bos(parts, tokenizer.bos_token) if adds_bos(tokenizer) else parts
    if '"""' in go_template(parts):
        raise UserError('the chat template contains """, which a Modelfile TEMPLATE cannot hold.')
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(parts)}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(parts, eos_token)]
    return "\n".join(lines) + "\n"


def modelfile_without_template(gguf_name: str, eos_token: str | None) -> str:
    """Modelfile text with FROM and the EOS stop only: Ollama picks the template itself (see write_modelfile)."""
    lines = [f"FROM ./{gguf_name}", ""] + ([f'PARAMETER stop "{eos_token}"'] if eos_token and quotable(eos_token) else [])
    return "\n".join(lines) + "\n"


NO_TEMPLATE_ADVICE = ("The Modelfiles have no TEMPLATE: Ollama then uses one of its built-in templates only when the "
                      "GGUF's chat template (its tokenizer.chat_template metadata) nearly equals it, and otherwise "
                      "sends the bare prompt. Add a TEMPLATE by hand before `ollama create`; llama.cpp and "
                      "`distillery chat` use the GGUF's own template and are not affected.")


def write_modelfile(gguf_path: Path, template: str, tokenizer: Any, eos_token: str | None) -> str | None:
    """`<model>-<QUANT>.Modelfile` beside `<model>-<QUANT>.gguf`. A template no Ollama TEMPLATE can reproduce
    still gets a Modelfile, without TEMPLATE; the return value is then why (None when it has one)."""
    try:
        text, why = build_modelfile(gguf_path.name, template, tokenizer, eos_token), None
    except UserError as err:
        text, why = modelfile_without_template(gguf_path.name, eos_token), f"{err} {NO_TEMPLATE_ADVICE}"
    gguf_path.with_suffix(".Modelfile").write_text(text, encoding="utf-8")
    return why
