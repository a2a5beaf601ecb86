"""export/gguf.py without a model: quant names, the tokenizer shape fix, imatrix files, the comparison maths."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from distillery.export import gguf as gguf_io
from distillery.export import verify
from distillery.export.gguf import QuantType
from distillery.config import ExportConfig
from distillery.core.errors import UserError


def test_quant_names_parse_case_insensitively_and_unknown_ones_list_the_valid_set() -> None:
    assert gguf_io.parse_quant("Q4_K_M") is QuantType.Q4_K_M
    with pytest.raises(ValueError, match=r"unknown GGUF quant type 'q9_k'; valid: f32, f16, bf16, q8_0, .*q4_k_m"):
        gguf_io.parse_quant("q9_k")


def test_export_config_validates_and_dedupes_quantizations() -> None:
    assert ExportConfig(quantizations=["Q8_0", "q4_k_m", "q8_0"]).quantizations == ["q8_0", "q4_k_m"]
    assert ExportConfig().quantizations == ["q8_0", "q4_k_m"] and ExportConfig().outtype == "f16"
    with pytest.raises(ValueError, match="valid: "):
        ExportConfig(quantizations=["q3_z"])


def test_i_quants_need_an_imatrix_and_map_to_llama_cpp_constants() -> None:
    import llama_cpp

    assert QuantType.IQ2_XXS.needs_imatrix and QuantType.Q2_K_S.needs_imatrix and not QuantType.Q4_K_M.needs_imatrix
    for quant in QuantType:
        assert isinstance(getattr(llama_cpp, quant.llama_ftype_name), int), quant
        assert quant.value in gguf_io.BITS_PER_WEIGHT


def test_file_names_follow_model_dash_quant() -> None:
    assert gguf_io.gguf_filename("SmolLM2-135M-Instruct", "q4_k_m") == "SmolLM2-135M-Instruct-Q4_K_M.gguf"


def test_byte_level_fix_only_touches_byte_fallback_bpe() -> None:
    bpe = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}, "pre_tokenizer": {"type": "ByteLevel"},
           "decoder": {"type": "Sequence", "decoders": []}}
    fixed = gguf_io.byte_level_bpe_fix(bpe)
    assert fixed["model"]["byte_fallback"] is False and fixed["decoder"]["type"] == "ByteLevel"
    assert bpe["model"]["byte_fallback"] is True  # the input is not modified
    sentencepiece_like = {**bpe, "pre_tokenizer": {"type": "Metaspace"}}
    assert gguf_io.byte_level_bpe_fix(sentencepiece_like) is None
    assert gguf_io.byte_level_bpe_fix({**bpe, "model": {"type": "BPE", "byte_fallback": False}}) is None


def test_the_fixed_tokenizer_tokenizes_and_decodes_like_the_original(demo_model_path: str, tmp_path: Path) -> None:
    """The claim the fix rests on, checked on the demo tokenizer with Korean, code and odd whitespace."""
    import json

    from tokenizers import Tokenizer

    original_json = json.loads((Path(demo_model_path) / "tokenizer.json").read_text(encoding="utf-8"))
    fixed_json = gguf_io.byte_level_bpe_fix(original_json)
    assert fixed_json is not None
    original = Tokenizer.from_str(json.dumps(original_json))
    fixed = Tokenizer.from_str(json.dumps(fixed_json))
    for text in ["오늘 날씨가 정말 좋네요.", "def f(x):\n\treturn x ** 2  # ▁ sq", "<|im_start|>user\nhi 😀<|im_end|>"]:
        ids = original.encode(text).ids
        assert fixed.encode(text).ids == ids
        assert fixed.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False) or \
            fixed.decode(ids, skip_special_tokens=False) == text


def test_conversion_source_stages_links_and_the_fixed_tokenizer(demo_model_path: str, tmp_path: Path) -> None:
    staging = gguf_io.conversion_source(Path(demo_model_path), tmp_path / "stage")
    assert staging == tmp_path / "stage"
    assert (staging / "model.safetensors").is_symlink() and not (staging / "tokenizer.json").is_symlink()
    assert (Path(demo_model_path) / "tokenizer.json").read_bytes() != (staging / "tokenizer.json").read_bytes()


def test_compare_logprobs_reports_agreement_and_kl() -> None:
    ref = [np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))]
    same = verify.compare_logprobs(ref, ref)
    assert same == {"positions": 2, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0}
    other = [np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]))]
    stats = verify.compare_logprobs(ref, other)
    expected_kl = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)
    assert stats["top1_agreement"] == 0.5 and stats["max_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert stats["mean_kl"] == pytest.approx(expected_kl / 2, rel=1e-5)


def test_legacy_imatrix_is_read_and_normalised_by_calls(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.dat"
    values = np.array([2.0, 4.0, 6.0], dtype="<f4")
    name = b"blk.0.ffn_up.weight"
    path.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3)
                     + values.tobytes())
    loaded = gguf_io.load_imatrix(path)
    assert list(loaded) == ["blk.0.ffn_up.weight"] and loaded["blk.0.ffn_up.weight"].tolist() == [1.0, 2.0, 3.0]


def test_gguf_imatrix_is_read_and_normalised_by_counts(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "imatrix.gguf"
    writer = GGUFWriter(str(path), arch="imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 2)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([[8.0, 4.0]], dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[4.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_io.load_imatrix(path)["blk.0.attn_q.weight"].tolist() == [2.0, 1.0]


def test_a_file_that_is_no_imatrix_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match="export.imatrix"):
        gguf_io.load_imatrix(path)
    lying = tmp_path / "lying.gguf"  # a GGUF header that claims 2**63 tensors, then ends
    lying.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**63 - 1, 0))
    with pytest.raises(UserError, match="lying.gguf is not a readable GGUF imatrix"):
        gguf_io.load_imatrix(lying)
    with pytest.raises(UserError, match=r"export.imatrix: \S+ is not a file"):
        gguf_io.load_imatrix(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        gguf_io.load_imatrix(tmp_path / "missing.dat")


@pytest.mark.integration
def test_the_converter_dry_run_passes_a_model_it_takes_and_writes_nothing(demo_model_path: str, tmp_path: Path) -> None:
    """The demo model with its tokenizer (converted through the byte-level staging copy): no error, no GGUF, no
    staging left behind, the model directory unchanged."""
    from transformers import AutoTokenizer

    base = Path(demo_model_path)
    before = sorted(p.name for p in base.iterdir())
    work = tmp_path / "export"
    work.mkdir()
    gguf_io.check_convertible(base, AutoTokenizer.from_pretrained(base), "f16", work)
    assert list(work.iterdir()) == [] and sorted(p.name for p in base.iterdir()) == before


def test_a_converter_failure_the_model_did_not_cause_stays_an_error_with_its_tail() -> None:
    import subprocess

    done = subprocess.CompletedProcess(["convert"], 1, stdout="", stderr="Traceback ...\nMemoryError: out of memory\n")
    failure = gguf_io.converter_failure(Path("m"), done, None)
    assert type(failure) is RuntimeError and "MemoryError: out of memory" in str(failure)


def tiny_gguf(path: Path) -> Path:
    """A GGUF with two weights as llama-imatrix names them: rows of 4 and 6 values (and a 1-D norm)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((3, 4), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((4, 6), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_imatrix_of_another_model_is_refused_before_quantizing(tmp_path: Path) -> None:
    """llama.cpp skips names it does not find (quietly for k-quants) and stops halfway at a size that differs."""
    model = tiny_gguf(tmp_path / "model.gguf")
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    gguf_io.check_imatrix({"blk.0.attn_q.weight": ones(4), "blk.0.ffn_down.weight": ones(6)}, model, "im.gguf")
    gguf_io.check_imatrix({"blk.0.attn_q.weight": ones(4)}, model, "im.gguf")  # a partial one: llama.cpp warns
    with pytest.raises(UserError, match=r"im.gguf has no entry for any weight of model.gguf \(it has "
                                        r"blk.0.attn_output.weight"):
        gguf_io.check_imatrix({"blk.0.attn_output.weight": ones(4)}, model, "im.gguf")
    with pytest.raises(UserError, match=r"im.gguf has 5 values for blk.0.ffn_down.weight, whose rows hold 6 in "
                                        r"model.gguf \(1 of 2 tensors differ\)"):
        gguf_io.check_imatrix({"blk.0.attn_q.weight": ones(4), "blk.0.ffn_down.weight": ones(5)}, model, "im.gguf")


def test_an_imatrix_that_lies_about_its_sizes_is_refused_at_once(tmp_path: Path) -> None:
    """From an adversarial review: a 20-byte .dat whose negative name length read the same entry again (2^31
    times: hours), and a 16 MB GGUF whose tensors all point at the same bytes (3 GB to read, 'a bug')."""
    looping = tmp_path / "loop.dat"
    looping.write_bytes(struct.pack("<i", 2**31 - 1) + struct.pack("<iii", 0, 1, 0) + struct.pack("<i", -12))
    with pytest.raises(UserError, match="loop.dat is neither a GGUF imatrix nor a legacy .dat imatrix file"):
        gguf_io.load_imatrix(looping)
    negative = tmp_path / "negative.dat"
    negative.write_bytes(struct.pack("<ii", 1, 1) + b"x" + struct.pack("<ii", 1, -1) + b"\0" * 64)
    with pytest.raises(UserError, match="negative.dat is neither"):
        gguf_io.load_imatrix(negative)

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value.encode())) + value.encode()

    tensors = [(f"blk.{i}.attn_q.weight.{kind}", 4096 if kind == "in_sum2" else 1) for i in range(50)
               for kind in ("in_sum2", "counts")]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0) + b"".join(
        text(name) + struct.pack("<IQIQ", 1, n, 0, 0) for name, n in tensors)  # one dim, F32, every one at offset 0
    shared = tmp_path / "shared.gguf"
    shared.write_bytes(head + b"\0" * (-len(head) % 32) + np.ones(4096, dtype="<f4").tobytes())
    with pytest.raises(UserError, match="shared.gguf is not a readable GGUF imatrix .*claim more bytes than the file"):
        gguf_io.load_imatrix(shared)
