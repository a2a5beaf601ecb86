"""bundled:tiny-qwen2-r1: the rebuilt DeepSeek-R1-Distill-Qwen tokenizer equals llama.cpp's, the model is the same
on every machine, and the pinned header is checked."""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

import pytest

from distillery.core import tiny_qwen2
from distillery.core.errors import UserError
from distillery.core.models import bundled_gguf
from distillery.export.llama_build import fetch_sdist
from distillery.export.llama_child import LlamaChild

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "<tool_call>", "</tool_call>", "<|EOT|>", "<|vision_pad|>", "<|fim_prefix|>", "<|file_sep|>"]
TEXTS = [
    "오늘 날씨가 정말 좋네요. 커피 대신 녹차로 주세요!", "AI-Hub 한국어-영어 번역(병렬) 말뭉치 1,602,418문장",
    "The quick brown fox jumps over the lazy dog.", "  two leading spaces\n\n\ttab and newlines\r\n",
    "def square(x: int) -> int:\n    return x ** 2  # 제곱\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "If 3x + 7 = 22, then x = 5; 12.5% of 480 is 60. √2 ≈ 1.41421356", "a) 12 , b) 15 , c) 18 , d) 21 , e) 24",
    "<｜User｜>2 + 2?<｜Assistant｜><think>\nadd them\n</think>\n\n4<｜end▁of▁sentence｜>",
    "".join(SPECIALS), "émigré Ünïcödé ｆｕｌｌｗｉｄｔｈ カタカナ 中文 🦙🚀",
]


@pytest.fixture(scope="module")
def header() -> tuple[dict, bytes]:
    return tiny_qwen2.read_header(bundled_gguf("tiny-qwen2-r1"))


@pytest.fixture(scope="module")
def vocab_gguf(header, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r1") / "r1-vocab.gguf"
    path.write_bytes(header[1][:8] + struct.pack("<Q", 0) + header[1][16:])  # tensor_count 0: a vocab-only GGUF
    return path


def llama_cpp_parity_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's own qwen2 tokenizer test cases (text, expected ids), from the llama-cpp-python sdist."""
    with tarfile.open(fetch_sdist()) as sdist:
        def read(suffix: str) -> str:
            member = next(m for m in sdist.getmembers() if m.name.endswith("models/ggml-vocab-qwen2.gguf" + suffix))
            return sdist.extractfile(member).read().decode("utf-8")

        texts = read(".inp").split("\n__ggml_vocab_test__\n")[:-1]
        ids = [[int(t) for t in line.split()] for line in read(".out").split("\n")[: len(texts)]]
    return list(zip(texts, ids))


def test_the_tokenizer_passes_llama_cpps_qwen2_parity_cases(tiny_r1_path: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    cases = llama_cpp_parity_cases()
    assert len(cases) >= 40
    wrong = [(text, ids) for text, ids in cases if tokenizer(text, add_special_tokens=False)["input_ids"] != ids]
    assert wrong == []


def test_the_tokenizer_equals_llama_cpps_on_korean_code_math_and_every_special_token(tiny_r1_path: str,
                                                                                     vocab_gguf: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    texts = TEXTS + SPECIALS
    with LlamaChild(vocab_gguf, "tokenizing with", n_ctx=256, vocab_only=True) as llama:
        expected = llama.tokenize(texts, add_bos=False, special=True)
        with_bos = llama.tokenize(["Hello"], add_bos=True, special=True)[0]
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] == expected
    assert tokenizer("Hello")["input_ids"] == with_bos  # the post-processor adds bos, as the GGUF's add_bos does
    assert [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in SPECIALS] == [1] * len(SPECIALS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (151646, 151643, 151643)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"


def test_the_r1_chat_template_is_the_real_one(tiny_r1_path: str, header) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    assert tokenizer.chat_template == header[0]["tokenizer.chat_template"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 2?"},
                                          {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}], tokenize=False)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>2 + 2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"  # reasoning deleted


def test_the_weights_are_the_same_on_every_machine(header, tmp_path: Path) -> None:
    """A fixed seed: two builds give identical tensors (and the architecture llama.cpp expects of Qwen2)."""
    first, second = tiny_qwen2.build_model(header[0]), tiny_qwen2.build_model(header[0])
    assert all((a == b).all() for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    config = first.config
    assert (config.model_type, config.tie_word_embeddings, config.vocab_size) == ("qwen2", True, 151936)
    assert first.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases


def test_a_changed_header_is_refused(tmp_path: Path) -> None:
    data = bundled_gguf("tiny-qwen2-r1").read_bytes()[: 8 << 20]
    tampered = tmp_path / "model_part_0000"
    tampered.write_bytes(data.replace(b"deepseek-r1-qwen", b"deepseek-r1-qwex", 1))
    with pytest.raises(UserError, match="not the pinned DeepSeek-R1-Distill-Qwen one"):
        tiny_qwen2.read_header(tampered)
