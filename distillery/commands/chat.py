"""`distillery chat`: talk to an exported GGUF through llama-cpp-python, formatted by the chat template stored
in the GGUF (the training template), stopping at its EOS. One answer with --prompt, else an interactive loop
that streams each answer and keeps the conversation. The model runs in a child process (export/llama_child.py);
the conversation (input, output) stays in this one."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator


from distillery.core.chat_render import (TEMPLATE_ERRORS, Chat, ChatRenderer, TemplateRefused, TemplateTooCostly,
                                         describe)
from distillery.core.console import printable
from distillery.export.llama_child import MAX_CONTEXT, GGUFLoadError, LlamaChild
from distillery.config import DistilleryConfig
from distillery.core.errors import UserError
from distillery.core.rundir import RunDir
from distillery.core.unseen import for_terminal
from distillery.core.userinput import is_usable_file
from distillery.stage import artifact

PREFERRED = "Q4_K_M"


def find_gguf(cfg: DistilleryConfig, choice: str | None = None) -> Path:
    """--gguf (a path, a file name in the run's gguf/ or a type like q8_0), else the run's Q4_K_M, else the first."""
    gguf_dir = artifact(RunDir(cfg.run.root, cfg.run.name), "export", "gguf")
    available = sorted(p for p in gguf_dir.glob("*.gguf") if is_usable_file(p)) if gguf_dir.is_dir() else []
    if choice:
        for candidate in (Path(choice), gguf_dir / choice):
            if is_usable_file(candidate):
                return candidate
        by_type = [p for p in available if p.stem.upper().endswith("-" + choice.upper())]
        if by_type:
            return by_type[0]
        names = ", ".join(p.name for p in available) or "none"
        raise UserError(f"--gguf {choice}: no such file or type; the run's GGUFs ({gguf_dir}): {names}.")
    if not available:
        raise UserError(f"no GGUF in {gguf_dir}: run `distillery export` (just export-gguf) first.")
    return next((p for p in available if p.stem.upper().endswith("-" + PREFERRED)), available[0])


def stream_answer(llama: LlamaChild, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                  seed: int) -> Iterator[str]:
    """Pieces of the assistant's answer as llama.cpp generates them (in its child process)."""
    return llama.stream(_stream_chat, messages, max_tokens, temperature, seed)


class ChatTemplateFailed(Exception):
    """The GGUF's chat template raised on the conversation (its own words, or the error its code ran into)."""


def _stream_chat(state: dict[str, Any], emit: Any, messages: list[dict[str, str]], max_tokens: int,
                 temperature: float, seed: int) -> None:
    """In the llama.cpp child: emit each piece of the streamed chat completion (the template renders first)."""
    from jinja2 import TemplateError

    try:
        chunks = state["llm"].create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                     temperature=temperature, seed=seed, stream=True)
    except (TemplateError, *TEMPLATE_ERRORS, MemoryError) as err:
        if "context window" in str(err):  # llama-cpp-python's own ValueError: answer() tells it apart
            raise
        raise ChatTemplateFailed(describe(err)[:300]) from None
    for chunk in chunks:
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            emit(piece)


CONTEXT = 4096  # llama.cpp's context for a chat by default (--context): the conversation and the answer
MIN_CONTEXT = 64


class ContextFull(Exception):
    """The conversation does not fit llama.cpp's context (llama-cpp-python shortens an answer to what is left)."""


def answer(llama: LlamaChild, console: Any, messages: list[dict[str, str]], max_tokens: int, temperature: float,
           seed: int, renderer: ChatRenderer | None = None) -> str:
    """Stream one answer to the console and return it; ContextFull before any of it when the conversation does not
    fit the context. With a `renderer`, the GGUF's template first renders the conversation within its budget."""
    if renderer is not None:
        render_within_budget(renderer, llama, messages)
    text = ""
    try:
        for piece in stream_answer(llama, messages, max_tokens, temperature, seed):
            text += piece
            console.out(for_terminal(piece), end="", highlight=False)  # a model can write an escape sequence
    except ChatTemplateFailed as err:
        raise UserError(f"{llama.path.name}: its chat template (tokenizer.chat_template) failed on this "
                        f"conversation: {err}. Chat with a GGUF that `distillery export` wrote.") from None
    except ValueError as err:  # llama-cpp-python: 'Requested tokens (n) exceed context window of m'
        if "context window" not in str(err) or text:
            raise
        raise ContextFull(str(err)) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM mid-answer: what follows starts on a line of its own
        console.out("")
        raise
    console.out("")
    return text


def open_gguf(path: Path, context: int = CONTEXT, renderer: ChatRenderer | None = None) -> LlamaChild:
    """The GGUF loaded for chat, its chat template first rendered once within a budget (core/chat_render.py: one
    that loops for ever or builds gigabytes hung chat or ended it as a MemoryError), by `renderer` or one of its own;
    the renderer's child starts importing while the model loads."""
    with contextlib.nullcontext(renderer) if renderer else ChatRenderer() as renderer:
        try:
            llama = LlamaChild(path, "chatting with", n_ctx=context)
        except GGUFLoadError as err:
            if context > CONTEXT and "context" in str(err):
                raise UserError(f"{err}: --context {context} asks for a key/value cache of that many tokens; pass a "
                                f"smaller --context (the default is {CONTEXT}).") from None
            raise UserError(f"{err}. Chat with a GGUF that `distillery export` wrote (--gguf: a file in the run's "
                            "export/gguf/ or a type like q8_0).") from None
        try:
            probe_template(renderer, llama)
        except BaseException:
            llama.close()
            raise
    return llama


def probe_template(renderer: ChatRenderer, llama: LlamaChild) -> None:
    """A GGUF chat template that takes more than its budget on one short message is refused as the model loads; one
    that raises on it is left to the real conversation, which says so (a template may refuse this message and not
    the user's)."""
    render_within_budget(renderer, llama, [{"role": "user", "content": "Hello"}], "one short message")


def render_within_budget(renderer: ChatRenderer, llama: LlamaChild, messages: list[dict[str, str]],
                         what: str = "this conversation") -> None:
    """The conversation rendered by the GGUF's template in the renderer's child first, within its budget, before
    llama.cpp renders it with none: a template that loops or builds gigabytes only on a longer message (the probe's
    "Hello" passed) hung the chat. One that raises is left to llama.cpp, which says so."""
    template = llama.metadata.get("chat_template")
    if not template:
        return
    try:
        renderer.render([Chat(messages, True)], template, {"bos_token": "", "eos_token": ""})
    except TemplateTooCostly as err:
        raise UserError(f"{llama.path.name}: its chat template (tokenizer.chat_template) took more than "
                        f"{err.budget()} to render {what}: it is broken or hostile. Chat with a GGUF that "
                        "`distillery export` wrote.") from None
    except TemplateRefused:
        pass


def check_sampling(max_tokens: int, temperature: float, context: int = CONTEXT) -> None:
    """llama-cpp-python reads --max-tokens 0 or below as 'until the context is full' and samples garbage at a
    negative, infinite or NaN temperature, all without a word: each is refused before the model loads, as is a
    context too small for a chat template and an answer."""
    if not MIN_CONTEXT <= context <= MAX_CONTEXT:
        raise UserError(f"--context {context}: llama.cpp's context holds the conversation and the answer; pass from "
                        f"{MIN_CONTEXT} to {MAX_CONTEXT:,} tokens, e.g. --context {CONTEXT} (the default).")
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: an answer is at least 1 token; pass the most tokens an answer "
                        "may have, e.g. --max-tokens 256.")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature {temperature}: a temperature is a finite number, 0 or more (0 is greedy, "
                        "0.7 samples).")


def undecodable(text: str) -> str | None:
    """Where `text` holds a byte that was not UTF-8 (Python keeps it as a lone surrogate: a terminal in Latin-1 or
    CP949), as words for a message; None for UTF-8 text. llama.cpp takes only UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        return f"{byte} at character {err.start + 1}"
    return None


def check_text(prompt: str | None, system: str | None) -> None:
    for option, text in (("--prompt", prompt), ("--system", system)):
        where = undecodable(text or "")
        if where:
            raise UserError(f"{option} is not UTF-8 text ({where}): set your terminal's encoding to UTF-8 (e.g. "
                            "LANG=C.UTF-8) and pass it again.")


def chat(cfg: DistilleryConfig, console: Any, gguf: str | None, prompt: str | None, system: str | None,
         max_tokens: int, temperature: float, context: int = CONTEXT) -> None:
    check_sampling(max_tokens, temperature, context)
    check_text(prompt, system)
    path = find_gguf(cfg, gguf)
    console.print(f"[dim]{printable(str(path))} (llama.cpp, chat template from the GGUF)[/]")
    messages = [{"role": "system", "content": system}] if system else []
    with ChatRenderer() as renderer, open_gguf(path, context, renderer) as llama:
        if prompt is not None:
            messages.append({"role": "user", "content": prompt})
            try:
                answer(llama, console, messages, max_tokens, temperature, cfg.run.seed, renderer)
            except ContextFull as err:
                raise UserError(f"--prompt does not fit llama.cpp's context of {context} tokens ({err}): shorten "
                                "it or pass a larger --context.") from None
            return
        console.print("[dim]Type a message; an empty line, /exit or Ctrl-D ends the chat.[/]")
        while (text := read_message(console)) is not None:
            messages.append({"role": "user", "content": text})
            reply = answer_within_context(llama, console, messages, bool(system), max_tokens, temperature,
                                          cfg.run.seed, context, renderer)
            if reply is not None:
                messages.append({"role": "assistant", "content": reply})


def read_message(console: Any) -> str | None:
    """The user's next message; None when they end the chat. One that is not UTF-8 (a terminal in Latin-1 or CP949)
    is refused with a warning and asked for again: the conversation goes on."""
    while True:
        try:
            text = console.input("[bold]you>[/] ")
        except EOFError:
            return None
        except UnicodeDecodeError as err:  # stdin decoding strictly (surrogateescape gives undecodable's case)
            where = f"byte 0x{err.object[err.start]:02x}" if err.start < len(err.object) else "a cut character"
        else:
            if not text.strip() or text.strip() in ("/exit", "/quit"):
                return None
            where = undecodable(text)
            if not where:
                return text
        console.print(f"[yellow]that message is not UTF-8 text ({where}): set your terminal's encoding to UTF-8 and "
                      "send it again[/]")


def answer_within_context(llama: LlamaChild, console: Any, messages: list[dict[str, str]], system: bool,
                          max_tokens: int, temperature: float, seed: int, context: int = CONTEXT,
                          renderer: ChatRenderer | None = None) -> str | None:
    """The answer to the last message, dropping the oldest exchanges while the conversation does not fit the
    context; None (and the message taken back) when the message alone does not fit."""
    while True:
        console.out("model> ", end="", highlight=False)
        try:
            return answer(llama, console, messages, max_tokens, temperature, seed, renderer)
        except ContextFull:
            console.out("")
            if len(messages) <= 1 + system:
                messages.pop()
                console.print(f"[yellow]that message does not fit llama.cpp's context of {context} tokens: send a "
                              "shorter one (or chat again with a larger --context)[/]")
                return None
            del messages[system:system + 2]  # the oldest exchange
            console.print("[dim](the conversation outgrew llama.cpp's context: its oldest exchange was dropped)[/]")


def held_out_question(cfg: DistilleryConfig) -> tuple[str, str] | None:
    """The shortest held-out user question of the run and its reference answer: of ingest's eval records, those
    format kept (it drops one whose text holds a special token's: that question, chatted, would be turns of its
    own, as llama.cpp's chat reads special tokens in it)."""
    from distillery.core.records import read_jsonl

    run = RunDir(cfg.run.root, cfg.run.name)
    path, formatted = artifact(run, "ingest", "eval"), artifact(run, "format", "eval")
    if not (path.is_file() and formatted.is_file()):
        return None
    kept = {row["id"] for row in read_jsonl(formatted)}
    pairs = [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in read_jsonl(path)
             if r["id"] in kept and len(r["messages"]) >= 2 and r["messages"][-2]["role"] == "user"]
    return min(pairs, key=lambda qa: len(qa[0])) if pairs else None


def answer_held_out(cfg: DistilleryConfig, console: Any, max_tokens: int = 96) -> None:
    """End of `distillery run`: the fine-tuned GGUF answers one question it never trained on."""
    qa = held_out_question(cfg)
    if qa is None:
        return
    question, reference = qa
    console.rule("[bold]one held-out question, answered by the fine-tuned GGUF in llama.cpp")
    console.print(f"[bold]question:[/] {printable(question)}\n"
                  f"[bold]reference answer:[/] {printable(reference)}")
    chat(cfg, console, None, question, None, max_tokens, 0.0)
