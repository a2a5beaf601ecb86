"""A GGUF loaded by llama-cpp-python in a child process: everything that runs llama.cpp goes through here.

llama.cpp can crash natively (a segfault on a CPU it was not built for, see export/llama_build.py). In a child
process (core/isolation.py) that crash is a `NativeCrash` naming the file, what was being done, the signal
and what to try, instead of the silent death of the pipeline, the chat or the test run.

    with LlamaChild(path, "verifying", n_ctx=512, logits_all=True) as llama:
        llama.metadata["chat_template"]
        ids = llama.tokenize(["text"], add_bos=False, special=True)
        scores = llama.call(my_function, args)   # my_function(state, emit, *args) with state["llm"] the Llama

Callers put what they run on the model in module-level functions of their own module, taking the loaded
`llama_cpp.Llama` from `state["llm"]`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from distillery.core.isolation import Child
from distillery.core.userinput import is_usable_file

# tokens a llama.cpp context may hold: it keeps n_ctx in 32 bits (2**32 wraps to 0, "the model's own")
MAX_CONTEXT = 1 << 24
LIBRARY = "llama.cpp"


class GGUFLoadError(Exception):
    """llama.cpp refused the file (not a GGUF, truncated, unknown architecture): an error it reported itself."""


class GGUFContextError(GGUFLoadError):
    """The model loaded, but llama.cpp could not make a context of the size asked for (its key/value cache)."""


class GGUFDecodeError(Exception):
    """llama.cpp refused a batch of tokens (no room left in its context, a token outside the vocabulary)."""


DECODE_FAILURES = {1: "no room for them in its context of {n_ctx} cells",
                   -1: "the batch is invalid (a token id outside the GGUF's vocabulary of {n_vocab}?)"}


def decode_failure(code: int, llm: Any, tokens: int, first: int) -> GGUFDecodeError:
    """What llama_decode's return code `code` means, as a GGUFDecodeError (llama-cpp-python says only the number).
    The context is the one asked for (llama.cpp rounds its own up to a multiple of 256 cells)."""
    why = DECODE_FAILURES.get(code, "llama_decode returned {code}")
    return GGUFDecodeError(f"llama.cpp could not decode {tokens} tokens from position {first}: "
                           + why.format(n_ctx=len(llm.input_ids), n_vocab=llm.n_vocab(), code=code))


def has_gguf_magic(path: Path) -> bool:
    if not is_usable_file(Path(path)):  # a FIFO or a device would block the read, or never end it
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def crash_hint() -> str:
    """What to try after llama.cpp crashed: check the runtime on this CPU, then rebuild or suspect the file."""
    from distillery.export.llama_build import REBUILD, describe_cpu, installed_build

    build = installed_build().get("profile", "unknown (not installed by `just setup`)")
    return (f"CPU {describe_cpu()}; installed llama.cpp build: {build}. Run `.venv/bin/python -m "
            f"distillery.export.llama_check` (seconds): if it fails too, this llama-cpp-python does not run on this CPU: "
            f"{REBUILD}; if it passes, the GGUF file itself may be damaged: rewrite it with `just export-gguf --force`.")


class LlamaChild:
    """A llama_cpp.Llama on `path`, living in a child process; `doing` names the work in crash messages."""

    def __init__(self, path: Path | str, doing: str, n_ctx: int = 2048, logits_all: bool = False,
                 threads: int | None = None, hint: str | None = None, vocab_only: bool = False, sequences: int = 1):
        from distillery.core.machine import usable_cores
        from distillery.export.llama_build import check_installed_build

        check_installed_build()
        self.path = Path(path)
        if not is_usable_file(self.path):  # llama.cpp would wait forever on a FIFO
            raise GGUFLoadError(f"llama.cpp cannot load {self.path}: not a regular file")
        # stderr kept from the terminal: a crash's last words go into its NativeCrash (and chat's log), not 80 lines of
        # a debugger's backtrace (ggml attaches gdb when it aborts, unless GGML_NO_BACKTRACE is set: _load sets it)
        self._child = Child(LIBRARY, f"{doing} {self.path}", hint=crash_hint() if hint is None else hint,
                            capture_stderr=True)
        # n_threads_batch too: llama-cpp-python's default for prompt processing is multiprocessing.cpu_count(), the
        # host's cores, not the container's. vocab_only: the tokenizer of a GGUF without its weights. sequences:
        # how many sequence ids the context holds (with_sequences).
        threads = threads or usable_cores()
        params = {"n_ctx": n_ctx, "logits_all": logits_all, "n_threads": threads, "n_threads_batch": threads,
                  "vocab_only": vocab_only, "sequences": sequences}
        try:
            self.metadata: dict[str, Any] = self._child.call(_load, str(self.path), params)
        except BaseException:
            self._child.close()
            raise

    @property
    def pid(self) -> int:
        return self._child.pid

    def call(self, fn: Callable[..., Any], *args: Any, on_event: Callable[[Any], None] | None = None) -> Any:
        """fn(state, emit, *args) in the child, with the model at state["llm"]."""
        return self._child.call(fn, *args, on_event=on_event)

    def stream(self, fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
        return self._child.stream(fn, *args)

    def tokenize(self, texts: list[str], add_bos: bool, special: bool) -> list[list[int]]:
        return self._child.call(_tokenize, texts, add_bos, special)

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> "LlamaChild":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _load(state: dict[str, Any], emit: Callable[[Any], None], path: str, params: dict[str, Any]) -> dict[str, Any]:
    """Load the GGUF (quietly, every layer offloaded where llama.cpp has a GPU backend) and return its metadata."""
    from jinja2 import TemplateError
    from llama_cpp import Llama

    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # read by ggml when it aborts (a failed GGML_ASSERT)
    sequences = params.pop("sequences", 1)
    try:
        llm = Llama(model_path=path, verbose=False, n_gpu_layers=-1, **params)
        if "chat_template.default" in llm._chat_handlers:
            # the GGUF's own (training) template, rendered by Jinja: llama-cpp-python would otherwise swap a template
            # equal to its ChatML, Mistral or Llama 3 string for a built-in formatter that renders other text (its
            # ChatML adds an empty system turn)
            llm.chat_format = "chat_template.default"
        if sequences > 1:
            with_sequences(llm, sequences)
    except (ValueError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else repr(err)
        if "llama_context" in first:  # llama-cpp-python's "Failed to create llama_context", after the model loaded
            raise GGUFContextError(f"llama.cpp loaded {path} but could not make a context of {params.get('n_ctx', 0):,} "
                                   f"tokens for it ({first}): its key/value cache may not fit in memory") from None
        raise GGUFLoadError(f"llama.cpp cannot load {path}: {first}") from None
    except TemplateError as err:  # llama-cpp-python compiles the GGUF's chat template when it loads
        raise GGUFLoadError(f"llama.cpp cannot load {path}: its chat template (tokenizer.chat_template) is not valid "
                            f"Jinja: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    state["llm"] = llm
    return gguf_metadata(llm)


def with_sequences(llm: Any, sequences: int) -> None:
    """Give the loaded model a context that holds `sequences` sequence ids in one unified KV cache, where sequences
    share the cells of a common prompt (llama_memory_seq_cp tags them, nothing is copied). llama-cpp-python
    (pinned) has no such argument: its context is made again, the first one freed before."""
    import contextlib

    from llama_cpp import _internals

    llm._ctx.close()
    llm.context_params.n_seq_max = sequences
    llm.context_params.kv_unified = True
    llm._ctx = llm._stack.enter_context(contextlib.closing(
        _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)))


def gguf_metadata(llm: Any) -> dict[str, Any]:
    """The chat template and EOS stored in a loaded GGUF (the token's id and its text), and what it is."""
    meta = llm.metadata
    eos_id = int(meta.get("tokenizer.ggml.eos_token_id", llm.token_eos()))
    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "eos_token_id": eos_id,
        "eos_token": llm.detokenize([eos_id], special=True).decode("utf-8", errors="replace"),
        "architecture": meta.get("general.architecture"),
        "file_type": meta.get("general.file_type"),
        "n_vocab": llm.n_vocab(),
    }


def _tokenize(state: dict[str, Any], emit: Callable[[Any], None], texts: list[str], add_bos: bool,
              special: bool) -> list[list[int]]:
    llm = state["llm"]
    return [llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special) for text in texts]


def greedy_decode(state: dict[str, Any], emit: Callable[[Any], None], prompt: str, tokens: int) -> str:
    """Evaluate `prompt` as one batch (matrix-matrix kernels), then generate `tokens` greedily one at a time
    (matrix-vector kernels): the two kinds of work a CPU build can crash in."""
    llm = state["llm"]
    llm.eval(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
    out = []
    for _ in range(tokens):
        token = llm.sample(temp=0.0)
        out.append(token)
        llm.eval([token])
    return llm.detokenize(out).decode("utf-8", errors="replace")
