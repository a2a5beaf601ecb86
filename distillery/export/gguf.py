"""GGUF: llama.cpp's converter to one 16-bit (or q8_0) file, llama.cpp's quantizer to each requested type.

- `convert_to_gguf` runs convert_hf_to_gguf.py (export/converter.py) as a subprocess, offline;
- `check_convertible` runs its dry run before a merge, on the base's weights with the training tokenizer;
- `quantize_gguf` calls llama.cpp's `llama_model_quantize` through llama-cpp-python in a child process,
  optionally with an importance matrix (`load_imatrix`: llama-imatrix's GGUF or legacy .dat file);
The checks that every file is the model that was trained live in export/verify.py.

Every file is written to a temporary name beside its target and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from distillery.export.converter import converter_env, converter_script, installed_version
from distillery.core.errors import UserError
from distillery.core.machine import usable_cores
from distillery.core.tether import tethered

log = logging.getLogger(__name__)


class QuantType(str, Enum):
    """GGUF file types: the set Unsloth's save_pretrained_gguf accepts, plus llama.cpp's other i-quants."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q5_K_S = "q5_k_s"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q4_K_M = "q4_k_m"
    Q4_K_S = "q4_k_s"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q3_K_L = "q3_k_l"
    Q3_K_M = "q3_k_m"
    Q3_K_S = "q3_k_s"
    Q2_K = "q2_k"
    Q2_K_S = "q2_k_s"
    IQ4_NL = "iq4_nl"
    IQ4_XS = "iq4_xs"
    IQ3_M = "iq3_m"
    IQ3_S = "iq3_s"
    IQ3_XS = "iq3_xs"
    IQ3_XXS = "iq3_xxs"
    IQ2_M = "iq2_m"
    IQ2_S = "iq2_s"
    IQ2_XS = "iq2_xs"
    IQ2_XXS = "iq2_xxs"
    IQ1_M = "iq1_m"
    IQ1_S = "iq1_s"

    @property
    def needs_imatrix(self) -> bool:
        """i-quants (and q2_k_s) are only worth making with an importance matrix."""
        return self.value.startswith("iq") or self is QuantType.Q2_K_S

    @property
    def llama_ftype_name(self) -> str:
        """The llama_ftype constant in llama_cpp (LLAMA_FTYPE_MOSTLY_Q4_K_M, LLAMA_FTYPE_ALL_F32)."""
        return "LLAMA_FTYPE_ALL_F32" if self is QuantType.F32 else f"LLAMA_FTYPE_MOSTLY_{self.value.upper()}"


# Approximate bits per weight of each type (llama.cpp's quantize table), for the free-disk estimate.
BITS_PER_WEIGHT = {
    "f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5,
    "q5_1": 6.0, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5.0, "q3_k_l": 4.3, "q3_k_m": 3.9,
    "q3_k_s": 3.5, "q2_k": 3.4, "q2_k_s": 3.0, "iq4_nl": 4.5, "iq4_xs": 4.3, "iq3_m": 3.7, "iq3_s": 3.5,
    "iq3_xs": 3.3, "iq3_xxs": 3.1, "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.3, "iq2_xxs": 2.1, "iq1_m": 1.8,
    "iq1_s": 1.6,
}


def parse_quant(name: str) -> QuantType:
    """A quant type by name (any case); a ValueError listing the valid names otherwise."""
    try:
        return QuantType(str(name).strip().lower())
    except ValueError:
        raise ValueError(f"unknown GGUF quant type {name!r}; valid: {', '.join(q.value for q in QuantType)}") from None


def gguf_filename(model_name: str, quant: str) -> str:
    """`<model>-<QUANT>.gguf`, e.g. SmolLM2-135M-Instruct-Q4_K_M.gguf."""
    return f"{model_name}-{quant.upper()}.gguf"


def temp_path(path: Path) -> Path:
    """The name a file is written under until it is complete (never matched by *.gguf globs)."""
    return path.with_name(f".{path.name}.tmp")


def model_architectures(model_dir: Path) -> list[str]:
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return list(config.get("architectures") or [])


def byte_level_bpe_fix(tokenizer_json: dict[str, Any]) -> dict[str, Any] | None:
    """The same tokenizer in the shape llama.cpp's converter reads as byte-level BPE, or None when it already is.

    transformers writes a tokenizer loaded from a GGUF (the bundled demo model) as BPE with byte_fallback and a
    SentencePiece-style decoder. The converter then stores it as a SentencePiece ("llama") vocabulary that
    llama.cpp cannot tokenize with. With a ByteLevel pre-tokenizer every byte is in the vocabulary, so
    byte_fallback never fires and the ByteLevel decoder gives the same text: the fix changes nothing in
    tokenization, which the export's verification checks against the HF tokenizer on every prompt.
    """
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and byte_level):
        return None
    fixed = dict(tokenizer_json)
    fixed["model"] = {**model, "byte_fallback": False}
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def conversion_source(model_dir: Path, staging: Path) -> Path:
    """`model_dir`, or a staging copy (links to its files + a fixed tokenizer.json) when the converter would
    misread its tokenizer (see byte_level_bpe_fix)."""
    import json
    import shutil

    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        return model_dir
    fixed = byte_level_bpe_fix(json.loads(tokenizer_path.read_text(encoding="utf-8")))
    if fixed is None:
        return model_dir
    log.info("converting with tokenizer.json in byte-level BPE form (byte_fallback off; same tokens)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name != "tokenizer.json":
            (staging / path.name).symlink_to(path.resolve())
    (staging / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
    return staging


def run_converter(model_dir: Path, outfile: Path, outtype: str, *options: str) -> subprocess.CompletedProcess:
    """llama.cpp's converter on `model_dir` (through the staging copy its tokenizer may need), offline and tied to
    this process."""
    import shutil

    staging = outfile.with_name(f".{outfile.name}.source")
    source = conversion_source(model_dir, staging)
    cmd = tethered(converter_script(), str(source), "--outfile", str(outfile), "--outtype", outtype, *options)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=converter_env())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_to_gguf(model_dir: Path, out_path: Path, outtype: str, model_name: str,
                    log_path: Path | None = None) -> float:
    """Run llama.cpp's converter on an HF directory; returns seconds. A model the converter cannot take is a
    UserError quoting its error; its whole output then goes to `log_path`."""
    import time

    tmp = temp_path(out_path)
    tmp.unlink(missing_ok=True)
    started = time.time()
    done = run_converter(model_dir, tmp, outtype, "--model-name", model_name)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise converter_failure(model_dir, done, log_path)
    os.replace(tmp, out_path)
    return time.time() - started


def check_convertible(base: Path, tokenizer: Any, outtype: str, work: Path, log_path: Path | None = None) -> None:
    """Fail before the merge when the converter could not take the merged model: its dry run (every tensor name
    mapped, the vocabulary and its pre-tokenizer read, no tensor data) on what the merged directory will hold,
    the base's weights and configs with the training tokenizer. A model whose tokenizer llama.cpp does not know
    (a new release's) is refused in seconds, not after a merge that takes minutes at 8B."""
    import shutil

    from distillery.export.merge import model_json_files

    staging = work / ".conversion-check"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for path in base.iterdir():
            if path.name.endswith(".safetensors") or path.name == "model.safetensors.index.json":
                (staging / path.name).symlink_to(path.resolve())
        for name in model_json_files(base):  # copies: the tokenizer below must never write through a link
            shutil.copy(base / name, staging / name)
        tokenizer.save_pretrained(str(staging))
        done = run_converter(staging, staging / "dry-run.gguf", outtype, "--dry-run")
        if done.returncode != 0:
            raise converter_failure(base, done, log_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# What a converter error caused by the model means, and what to do about it (the last one matches any
# NotImplementedError: the converter does not implement something this model has).
MODEL_FAILURES = (
    ("BPE pre-tokenizer was not recognized", "the model's tokenizer (its pre-tokenizer) is not supported by this "
     "llama.cpp version. Use a base model whose tokenizer llama.cpp supports, or a newer llama-cpp-python whose "
     "converter knows it (upgrade it, then run `just setup`)"),
    ("Can not map tensor", "the model has a tensor this llama.cpp version's converter does not know (a modified "
     "architecture?). Use a model llama.cpp supports as it is published, or a newer llama-cpp-python"),
    ("NotImplementedError", "this llama.cpp version's converter does not implement something this model needs. "
     "Use a model llama.cpp supports, or a newer llama-cpp-python"),
)


def last_error_line(output: str) -> str:
    """The converter's exception line (`NotImplementedError: ...`), or its last line when there is none."""
    errors = re.findall(r"^(\w+(?:Error|Exception): .*)$", output, flags=re.MULTILINE)
    lines = output.strip().splitlines()
    return errors[-1].strip() if errors else (lines[-1].strip() if lines else "")


def converter_failure(model_dir: Path, done: subprocess.CompletedProcess, log_path: Path | None) -> Exception:
    """A UserError for a model the converter cannot take (unsupported architecture, unknown tokenizer, ...),
    a RuntimeError for anything else; the converter's whole output is kept in `log_path`."""
    output = done.stderr + ("\n" if done.stderr and done.stdout else "") + done.stdout
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"{' '.join(done.args)}\nexit {done.returncode}\n\n{output}", encoding="utf-8")
    kept = f" Its whole output: {log_path}." if log_path is not None else ""
    unsupported = re.search(r"Model (\S+) is not supported", output)
    if unsupported:
        return UserError(f"llama.cpp's converter does not support the architecture {unsupported.group(1)} "
                         f"(from {model_dir / 'config.json'}), so it cannot be exported to GGUF. Use a model "
                         "llama.cpp supports (`python <venv>/share/llama.cpp/convert_hf_to_gguf.py "
                         f"--print-supported-models` lists them).{kept}")
    error = last_error_line(done.stderr) or last_error_line(output)
    meaning = next((what for pattern, what in MODEL_FAILURES if pattern in error), None)
    if meaning and done.returncode > 0:
        return UserError(f"llama.cpp's converter (llama-cpp-python {installed_version()}) cannot convert {model_dir} "
                         f"to GGUF: {meaning}. The converter said: {error}.{kept}")
    tail = "\n  ".join(output.strip().splitlines()[-8:])
    return RuntimeError(f"llama.cpp's converter failed on {model_dir} (exit {done.returncode}):\n  {tail}")


MAX_IMATRIX_BYTES = 4 << 30  # a 32B model's importance matrix is tens of MB; a mixture of experts', a few GB at most


def load_imatrix(path: Path) -> dict[str, Any]:
    """Importance values per tensor name (float32 arrays) from llama-imatrix's GGUF or legacy .dat file,
    normalised the way llama.cpp's quantize tool does (sums / counts)."""
    if not path.is_file():
        raise UserError(f"export.imatrix: {path} {'is not a file' if path.exists() else 'does not exist'}.")
    size = path.stat().st_size
    if size > MAX_IMATRIX_BYTES:
        raise UserError(f"export.imatrix: {path} is {size / (1 << 30):.1f} GB, more than any importance "
                        f"matrix (at most {MAX_IMATRIX_BYTES >> 30} GB). Compute it again with llama-imatrix.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        try:
            values = _load_gguf_imatrix(path)
        except (ValueError, IndexError, OverflowError, KeyError, struct.error) as err:  # a cut or lying header
            raise UserError(f"export.imatrix: {path} is not a readable GGUF imatrix ({type(err).__name__}: "
                            f"{str(err)[:200]}). Compute it again with llama-imatrix.") from None
    else:
        values = _load_legacy_imatrix(path)
    if not values:
        raise UserError(f"export.imatrix: {path} holds no importance data (expected llama-imatrix output).")
    return values


def _load_gguf_imatrix(path: Path) -> dict[str, Any]:
    import numpy as np
    from gguf import GGUFReader

    listed = GGUFReader(str(path)).tensors
    if sum(int(t.data.nbytes) for t in listed) > path.stat().st_size:  # tensors that share their bytes, to multiply them
        raise ValueError("its tensors claim more bytes than the file holds")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in listed}
    values = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise UserError(f"export.imatrix: {path} has {name} but no {base}.counts: not an imatrix file.")
        per_count = sums.reshape(len(counts), -1)
        values[base] = np.where(counts[:, None] > 0, per_count / np.maximum(counts[:, None], 1), 1.0
                                ).reshape(-1).astype(np.float32)
    return values


def _load_legacy_imatrix(path: Path) -> dict[str, Any]:
    import numpy as np

    data = path.read_bytes()
    try:
        (n_entries,), offset = struct.unpack_from("<i", data, 0), 4
        values = {}
        if n_entries > len(data) // 12:  # an entry takes 12 bytes at least
            raise ValueError("more entries than the file can hold")
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, offset)
            if not 0 <= length <= len(data) - offset - 12:  # a negative length read the same entry again, for hours
                raise ValueError("a name length out of the file")
            name = data[offset + 4: offset + 4 + length].decode("utf-8")
            offset += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            if not 0 <= nval <= (len(data) - offset) // 4:
                raise ValueError("a value count out of the file")
            sums = np.frombuffer(data, dtype="<f4", count=nval, offset=offset)
            offset += 4 * nval
            values[name] = (sums / ncall if ncall > 0 else sums).astype(np.float32)
    except (struct.error, ValueError, UnicodeDecodeError):
        raise UserError(f"export.imatrix: {path} is neither a GGUF imatrix nor a legacy .dat imatrix file.") from None
    if n_entries < 1:
        raise UserError(f"export.imatrix: {path} holds no entries.")
    return values


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[io.StringIO]:
    """Collect what C code writes to file descriptor 2 (llama.cpp prints a line per tensor while quantizing)."""
    captured = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read().decode("utf-8", errors="replace"))


def check_imatrix(imatrix: dict[str, Any], model: Path, source: str) -> None:
    """An importance matrix made for another model is a UserError before any quantization: llama.cpp skips the
    entries whose names it does not find (quietly, for k-quants: the file seems used and is not) and stops halfway
    at one whose size differs from the tensor's rows (ne0, times ne2 and ne3: a 3-D tensor's experts)."""
    import numpy as np
    from gguf import GGUFReader

    rows = {t.name: int(np.prod([t.shape[0], *t.shape[2:]]))
            for t in GGUFReader(str(model)).tensors if len(t.shape) >= 2}
    shared = [name for name in imatrix if name in rows]
    if not shared:
        raise UserError(f"export.imatrix: {source} has no entry for any weight of {model.name} (it has "
                        f"{next(iter(imatrix))}, the model has tensors such as {next(iter(rows), '-')}): it was "
                        "computed for another model. Compute it with llama-imatrix on this model's GGUF, or remove "
                        "export.imatrix.")
    wrong = [(name, imatrix[name].size, rows[name]) for name in shared
             if imatrix[name].size != rows[name] and name != "token_embd.weight"]  # llama.cpp skips that one
    if wrong:
        name, got, want = wrong[0]
        raise UserError(f"export.imatrix: {source} has {got} values for {name}, whose rows hold {want} in "
                        f"{model.name} ({len(wrong)} of {len(shared)} tensors differ): it was computed for another "
                        "model. Compute it with llama-imatrix on this model's GGUF, or remove export.imatrix.")


def quantize_gguf(src: Path, dst: Path, quant: QuantType, imatrix: dict[str, Any] | None = None,
                  threads: int = 0) -> float:
    """llama.cpp's quantizer (in a child process): `src` (16-bit or q8_0 GGUF) -> `dst` of type `quant`;
    returns seconds."""
    import time

    from distillery.export.llama_build import check_installed_build
    from distillery.export.llama_child import LIBRARY, crash_hint
    from distillery.core.isolation import Child

    if quant.needs_imatrix and imatrix is None:
        raise UserError(f"export.quantizations: {quant.value} needs an importance matrix: set export.imatrix to a "
                        "llama-imatrix file (or choose a k-quant such as q4_k_m).")
    check_installed_build()  # a build for another CPU: its remedy, not the quantizer dying of SIGILL
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    started = time.time()
    try:
        with Child(LIBRARY, f"quantizing {src} to {quant.value}", hint=crash_hint()) as child:
            status, native_log = child.call(_quantize, str(src), str(tmp), quant, imatrix, threads,
                                            log.isEnabledFor(logging.DEBUG))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if log.isEnabledFor(logging.DEBUG):
        sys.stderr.write(native_log)
    if status != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(native_log.splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's quantizer failed ({src.name} -> {quant.value}, status {status}):\n{tail}")
    os.replace(tmp, dst)
    return time.time() - started


def _quantize(state: dict[str, Any], emit: Any, src: str, tmp: str, quant: QuantType,
              imatrix: dict[str, Any] | None, threads: int, verbose: bool) -> tuple[int, str]:
    """In the child: llama_model_quantize with llama.cpp's log captured; (status, that log)."""
    import ctypes

    import llama_cpp
    import numpy as np

    # llama.cpp logs a line per tensor; through llama-cpp-python's logger only errors, unless --verbose.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.llama_ftype_name)
    params.nthread = threads or usable_cores()  # llama.cpp's 0 counts the machine's cores, not ours
    # Requantizing from a q8_0 intermediate loses a little; llama.cpp refuses it unless asked.
    params.allow_requantize = True
    keep_alive = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(array)
            entries[i].name = name.encode("utf-8")
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(imatrix)].name = None  # the list ends at a null name
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with native_stderr_captured() as native_log:
        status = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    return status, native_log.getvalue()
