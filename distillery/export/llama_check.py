"""Does the installed llama.cpp run on this CPU? The last step of `just setup`, and the first thing to run when
llama.cpp crashed.

    python -m distillery.export.llama_check [--gguf FILE]

Loads a small quantized GGUF (default: the bundled SmolLM2-135M Q4_1, whose quantized matmuls are the ones an
unsuitable build crashes in) in a child process, decodes a prompt and a few tokens greedily, and prints what it
got; the default model must answer "Paris" (a build that computes wrong numbers fails too). When the child
crashes or fails: what failed, the CPU's relevant flags, the installed build and the remedy; exit code 1. A --gguf
that is not a file, or not a GGUF, is bad input: one line naming it, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from distillery.export.llama_build import REBUILD, describe_cpu, installed_build
from distillery.export.llama_child import GGUFLoadError, LlamaChild, greedy_decode, has_gguf_magic
from distillery.core.errors import UserError
from distillery.core.isolation import NativeCrash
from distillery.core.userinput import require_file

# The bundled model's ChatML; it continues with " Paris." at every quantization.
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"
EXPECTED = "Paris"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_HINT = "Pass the path of a .gguf file, e.g. one under runs/<name>/export/gguf/."


def check(path: Path, prompt: str = PROMPT, tokens: int = 3) -> dict[str, Any]:
    """Decode `prompt` and `tokens` greedy tokens from `path` in a child process: {text, seconds, metadata}."""
    started = time.time()
    with LlamaChild(path, "decoding a few tokens of", n_ctx=256, hint="") as llama:
        text = llama.call(greedy_decode, prompt, tokens)
        return {"text": text, "seconds": time.time() - started, "architecture": llama.metadata["architecture"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.export.llama_check", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help=f"the GGUF to decode (default: the bundled {DEFAULT_MODEL} Q4_1, "
                        f"whose answer must hold {EXPECTED!r})")
    parser.add_argument("--no-remedy", action="store_true", help="on failure, leave out the remedy (setup's own "
                        "fallback to another build runs the check so)")
    args = parser.parse_args(argv)
    if args.gguf is not None:
        try:
            require_file(args.gguf, "--gguf", GGUF_HINT)
            if not has_gguf_magic(args.gguf):
                raise UserError(f"--gguf: {args.gguf} is not a GGUF file (it does not start with the GGUF magic "
                                f"bytes). {GGUF_HINT}")
        except UserError as err:
            print(f"llama.cpp self-check: {err}", file=sys.stderr)
            return 2
    build = installed_build().get("profile", "not installed by `just setup`")
    try:
        from distillery.core.models import bundled_gguf

        path = args.gguf or bundled_gguf(DEFAULT_MODEL)
        result = check(path)
        if args.gguf is None and EXPECTED not in result["text"]:
            raise UserError(f"{path.name} decoded {result['text']!r}, where every quantization of it answers "
                            f"{EXPECTED!r}: this build computes wrong numbers")
    except (NativeCrash, GGUFLoadError, UserError, ImportError) as err:
        print(f"llama.cpp self-check FAILED: {err}", file=sys.stderr)
        print(f"  CPU: {describe_cpu()}", file=sys.stderr)
        print(f"  installed llama-cpp-python build: {build}", file=sys.stderr)
        if not args.no_remedy:
            print(f"  remedy: {REBUILD}; on a CPU with AMX, DISTILLERY_LLAMA_CPU=x86-64-v4 has no AMX code, and a build "
                  "of your own with AMX needs distillery/export/llama_amx_tile_config.patch (ggml-org/llama.cpp issue "
                  "20824).", file=sys.stderr)
        return 1
    print(f"llama.cpp self-check: ok ({build} build, {path.name} decoded {result['text']!r} in "
          f"{result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
