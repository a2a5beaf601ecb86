"""Chat templates rendered in a child process, within a memory and CPU-time budget.

A chat template is code that comes with a model (tokenizer_config.json or chat_template.jinja). The Jinja sandbox
transformers renders it in keeps it away from the system, not from looping for hours (three nested
`range(99999)`) or building a string of gigabytes (`'A' * 8000000000`). format renders every record through the
model's template, so it does that here: a template past its budget is a `TemplateTooCostly`, not a hung or
swapping machine, and one that raises (Gemma's `raise_exception` on a system message, a TypeError in its code) is
a `TemplateRefused` naming the conversation. The text is transformers' own: `render_jinja_template` with the
tokenizer's special tokens, as `apply_chat_template(tokenize=False)` calls it.

    with ChatRenderer() as renderer:
        texts = renderer.render([Chat(messages, add_generation_prompt=True), ...], template,
                                tokenizer.special_tokens_map)
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Callable

from distillery.core.isolation import Child, ChildTimeout, NativeCrash, limit_growth

CHUNK = 512  # conversations per call; each call gets the whole budget again
CPU_SECONDS = 30.0  # per call: real templates render 512 conversations in well under a second
MEMORY_BYTES = 2 << 30  # per call, beyond what the child already holds
STARTUP_S = 120.0  # the first call also waits for the child's imports (seconds on a busy machine)
MODULE = "transformers.utils.chat_template_utils"


@dataclass(frozen=True)
class Chat:
    messages: list[dict[str, str]]
    add_generation_prompt: bool = False


class TemplateRefused(Exception):
    """The template raised on conversation `index` (of those given to `render`); `reason` is in its words."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index, self.reason = index, reason


class TemplateTooCostly(Exception):
    """The template ran past its budget (`what`: "time" or "memory") on conversations first..last."""

    def __init__(self, what: str, first: int, last: int):
        super().__init__(what, first, last)
        self.what, self.first, self.last = what, first, last

    def budget(self) -> str:
        return f"{CPU_SECONDS:g} s of CPU time" if self.what == "time" else f"{MEMORY_BYTES / (1 << 30):g} GB of memory"


class ChatRenderer:
    """One child, started at once (its imports overlap the caller's work); a chunk that overruns its budget ends it
    (the next call starts another)."""

    def __init__(self) -> None:
        self._child: Child | None = self._start()
        self._started = False

    def render(self, chats: list[Chat], template: str, special_tokens: dict[str, Any],
               progress: Callable[[int], None] = lambda n: None) -> list[str]:
        """Each conversation rendered by `template`, with the tokenizer's special tokens (bos_token, eos_token...)
        as its variables."""
        texts: list[str] = []
        for first in range(0, len(chats), CHUNK):
            chunk = chats[first:first + CHUNK]
            texts += self._render_chunk(chunk, first, template, dict(special_tokens))
            progress(len(chunk))
        return texts

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None

    def __enter__(self) -> "ChatRenderer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _start() -> Child:
        return Child("the chat template", "rendering conversations", preload=(MODULE,))

    def _render_chunk(self, chunk: list[Chat], first: int, template: str, special_tokens: dict[str, Any]) -> list[str]:
        if self._child is None:
            self._child, self._started = self._start(), False
        timeout = CPU_SECONDS * 3 + (0 if self._started else STARTUP_S)
        jobs = [(chat.messages, chat.add_generation_prompt) for chat in chunk]
        try:
            texts = self._child.call(render_in_child, template, special_tokens, jobs, CPU_SECONDS, MEMORY_BYTES,
                                    timeout_s=timeout)
            self._started = True
            return texts
        except TemplateRefused as err:
            raise TemplateRefused(first + err.index, err.reason) from None
        except (MemoryError, TemplateTooCostly, ChildTimeout, NativeCrash) as err:
            self.close()
            if isinstance(err, NativeCrash) and err.exitcode not in (-signal.SIGXCPU, -signal.SIGKILL):
                raise
            out_of_time = isinstance(err, ChildTimeout) or getattr(err, "exitcode", None) == -signal.SIGXCPU
            what = "time" if out_of_time else "memory"  # SIGKILL: the kernel's OOM killer
            raise TemplateTooCostly(what, first, first + len(chunk) - 1) from None


TEMPLATE_ERRORS = (TypeError, ValueError, ArithmeticError, LookupError, RecursionError)  # what Jinja code raises


def describe(err: Exception) -> str:
    """A template's own words (raise_exception's message), or the kind of error its code ran into and where."""
    from jinja2 import TemplateError

    return str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}"


def render_in_child(state: dict, emit: Callable, template: str, special_tokens: dict[str, Any],
                    jobs: list[tuple[list[dict[str, str]], bool]], cpu_seconds: float, memory_bytes: int) -> list[str]:
    """In the child: each (messages, add_generation_prompt) rendered, within a fresh budget for the whole list."""
    import importlib

    from jinja2 import TemplateError

    render_jinja_template = importlib.import_module(MODULE).render_jinja_template
    limit_growth(memory_bytes, cpu_seconds)
    texts = []
    for index, (messages, add_generation_prompt) in enumerate(jobs):
        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                                add_generation_prompt=add_generation_prompt, **special_tokens)
        except (TemplateError, *TEMPLATE_ERRORS) as err:
            raise TemplateRefused(index, describe(err)) from None
        except MemoryError:
            raise TemplateTooCostly("memory", index, index) from None
        texts.append(rendered[0])
    return texts
