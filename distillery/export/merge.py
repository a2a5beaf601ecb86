"""The 16-bit merge: LoRA adapter + the base model's original 16-bit weights -> one HF directory, in memory that
does not grow with the model.

- `read_finetune` checks the finetune stage left an adapter and reads its summary.json (backend, base model);
- `merge_adapter` streams (`stream_merge`): the base's safetensors are read tensor by tensor (memory-mapped),
  scale·B·A (DoRA: rescaled by the magnitude vector) is added in fp32, row block by row block, and rounded once
  to the target dtype, and every tensor is written straight into its output shard. Peak memory is one tensor in
  16 bits plus one fp32 row block, whatever the model's size. Adapters the stream does not cover (modules_to_save,
  per-module rank/alpha patterns, biases, a base pre-quantized in 4 bits) fall back to loading the whole model:
  PEFT's merge_and_unload on the hf backend, Unsloth's save_pretrained_merged on the unsloth backend — in a child
  process, since importing Unsloth patches transformers for the whole process. A base stored only as
  pytorch_model*.bin is refused before anything is written (`refuse_pickled_base`: the exact check reads
  safetensors), with the command that converts it in place.
  The base is always its original 16-bit weights, never a dequantized 4-bit copy: for a base published
  quantized (a bnb-4bit QLoRA base) export finds them first (`original_16bit`: export.base_16bit, else
  Unsloth's 4-bit -> 16-bit name mapping) and merges into and checks against them. The tokenizer (training chat
  template, EOS) and a generation config whose eos is the training EOS go beside the shards;
- `check_merge` proves it tensor by tensor in a second streamed pass: every base tensor is there, every untargeted
  one is byte-identical to the base, every targeted one equals W + scale·B·A within one 16-bit step, and the
  adapter changed something;
- `verify_merge` (small models only: it loads base and base+adapter) also checks the merged model's next-token
  distributions against base+adapter run unmerged by PEFT.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from distillery.core.errors import UserError
from distillery.core.models import torch_dtype
from distillery.core.summaries import FinetuneSummary, read_finetune_summary

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# verify_merge: KL(base+adapter || merged) must stay below this share of KL(base+adapter || base).
MAX_MERGE_KL_RATIO = 0.5
ROW_BLOCK_ELEMENTS = 1 << 24  # fp32 elements per row block of a merged tensor (64 MiB)
# One step of the 16-bit type at a value's magnitude is at most |x| * this.
STEP = {"bf16": 2.0**-7, "fp16": 2.0**-10}
# The spacing of the subnormal numbers: below the smallest normal value a 16-bit type's step is this absolute
# spacing, not a share of the value (fp16's subnormals start at 6.1e-5, where small weights live).
SUBNORMAL_STEP = {"bf16": 2.0**-133, "fp16": 2.0**-24}
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
HEADER_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def read_finetune(adapter: Path, summary_path: Path, model: Path | None = None) -> FinetuneSummary:
    """finetune's summary, after checking it left what it trained: the adapter, or (method full) the model."""
    if model is not None and summary_path.is_file() and read_finetune_summary(summary_path).method == "full":
        if not (model / "config.json").is_file() or not list(model.glob("*.safetensors")):
            raise UserError(f"no trained model in {model} (finetune.method: full writes config.json and "
                            "safetensors there): rerun `distillery finetune --force`.")
        return read_finetune_summary(summary_path)
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise UserError(f"no LoRA adapter in {adapter} (missing {', '.join(missing)}): run `distillery finetune` "
                        "(just finetune) first.")
    return read_finetune_summary(summary_path)


def merged_dtype_name(requested: str, base_model: str) -> str:
    """auto: the base's own 16-bit dtype (config.json), bf16 when it is stored in 32 bits."""
    if requested != "auto":
        return requested
    return stored_dtype(Path(base_model)) or "bf16"


# ---- the adapter --------------------------------------------------------------------------------------------


@dataclass
class LoraDelta:
    """One adapted weight: delta = scale * B @ A (embeddings: its transpose); DoRA: rescaled rows (magnitude)."""

    a: Any
    b: Any
    scale: float
    embedding: bool = False
    magnitude: Any = None

    def rows(self, start: int, stop: int) -> Any:
        """delta[start:stop] in fp32."""
        if self.embedding:  # lora_embedding_A is (r, vocab), B is (hidden, r): delta = (B @ A).T = A.T @ B.T
            return self.scale * (self.a[:, start:stop].T @ self.b.T)
        return self.scale * (self.b[start:stop] @ self.a)


def read_adapter(adapter_dir: Path) -> tuple[dict[str, LoraDelta] | None, str]:
    """{weight name in the base: its delta}, or (None, why) when the adapter needs the whole-model merge."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    check_adapter_config(config, adapter_dir)
    unstreamed = why_whole_model(config)
    if unstreamed:
        return None, unstreamed
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    try:
        tensors = {key: value.float() for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    except (SafetensorError, OSError) as err:
        raise not_finetunes_adapter(adapter_dir, f"adapter_model.safetensors cannot be read ({err})") from None
    deltas: dict[str, LoraDelta] = {}
    for key, value in tensors.items():
        for a_name, b_name, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_name):
                module = key[: -len(a_name)].removeprefix("base_model.model.")
                magnitude = tensors.get(key[: -len(a_name)] + ".lora_magnitude_vector")
                if magnitude is None:
                    magnitude = tensors.get(key[: -len(a_name)] + ".lora_magnitude_vector.weight")
                up = tensors.get(key[: -len(a_name)] + b_name)
                check_pair(key, value, up, config["r"], adapter_dir)
                deltas[module + ".weight"] = LoraDelta(value, up, scale, embedding, magnitude)
    if not deltas:
        return None, "the adapter holds no LoRA weights"
    return deltas, ""


def why_whole_model(config: dict[str, Any]) -> str:
    """Why an adapter (its adapter_config.json) is merged with the whole model loaded, not streamed; "" when it
    streams."""
    unsupported = [key for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                   if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(str(config.get("peft_type")))
    return f"the adapter uses {', '.join(unsupported)}" if unsupported else ""


def not_finetunes_adapter(adapter_dir: Path, why: str) -> UserError:
    return UserError(f"{adapter_dir}: {why}: it is not the adapter finetune wrote. Run `distillery finetune --force` "
                     "to train it again.")


def check_adapter_config(config: Any, adapter_dir: Path) -> None:
    """adapter_config.json as PEFT writes it: a positive integer rank and a finite number for alpha."""
    if not isinstance(config, dict):
        raise not_finetunes_adapter(adapter_dir, "adapter_config.json is not a JSON object")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise not_finetunes_adapter(adapter_dir, f"adapter_config.json's r is {rank!r}, not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise not_finetunes_adapter(adapter_dir, f"adapter_config.json's lora_alpha is {alpha!r}, not a number")


def check_pair(key: str, down: Any, up: Any, rank: int, adapter_dir: Path) -> None:
    """A LoRA pair of the config's rank (A: r rows, B: r columns), with finite values."""
    import torch

    if up is None:
        raise not_finetunes_adapter(adapter_dir, f"{key} has no B matrix beside it")
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != rank or up.shape[1] != rank:
        raise not_finetunes_adapter(adapter_dir, f"{key} is {tuple(down.shape)} and its B {tuple(up.shape)}, not of "
                                    f"the rank {rank} adapter_config.json gives")
    if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
        raise not_finetunes_adapter(adapter_dir, f"{key} or its B holds NaN or inf")


# ---- the base -----------------------------------------------------------------------------------------------


def local_base(base_model: str) -> Path:
    """The base as a local directory: itself, or its snapshot in the Hugging Face cache (finetune downloaded it)."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any way of not being in the cache
        raise UserError(f"the base model {base_model} is not in the local Hugging Face cache ({type(err).__name__}); "
                        "run `distillery finetune` where it can be downloaded, or set model.path to a local "
                        "directory.") from None


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own bound on a header


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}; a UserError
    naming the file when it is not one (a file cut short, or one whose first 8 bytes claim a header of a petabyte:
    reading that was a MemoryError)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"its first 8 bytes give a header of {size:,} bytes")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as err:
        raise damaged_weights(path, str(err)) from None
    if not isinstance(header, dict) or not all(is_tensor_entry(entry) for name, entry in header.items()
                                               if name != "__metadata__"):
        raise damaged_weights(path, "its header does not list tensors with a dtype, a shape and offsets")
    return header


def is_tensor_entry(entry: Any) -> bool:
    def naturals(value: Any) -> bool:
        return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and naturals(entry.get("shape"))
            and naturals(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2)


def damaged_weights(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file ({why}): the model is damaged or was cut short. "
                     "Download or write it again.")


def base_tensors(base: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, shard, header entry) of every tensor of the base, in the order of its shards and files."""
    files = sorted(base.glob("*.safetensors"))
    found = []
    for path in files:
        for name, entry in safetensors_header(path).items():
            if name != "__metadata__":
                found.append((name, path, entry))
    return found


def why_not_streamable(base: Path) -> str:
    """Why the base cannot be streamed ("" when it can): no 16-bit safetensors, or weights quantized already."""
    if not list(base.glob("*.safetensors")):
        return f"{base} has no safetensors files"
    config = json.loads((base / "config.json").read_text(encoding="utf-8")) if (base / "config.json").is_file() else {}
    if config.get("quantization_config"):
        return f"{base} is stored quantized ({config['quantization_config'].get('quant_method', '?')})"
    dtypes = {entry["dtype"] for _, _, entry in base_tensors(base)}
    if not dtypes <= set(SAFETENSORS_DTYPES):
        return f"{base} stores {', '.join(sorted(dtypes - set(SAFETENSORS_DTYPES)))} tensors"
    return ""


def refuse_pickled_base(base: Path) -> None:
    """A base stored only as pytorch_model*.bin: the merge and its tensor-by-tensor check read safetensors, so it
    is converted once, in place (which keeps the fine-tune valid: its fingerprint does not cover the files)."""
    if list(base.glob("*.safetensors")) or not list(base.glob("pytorch_model*.bin")):
        return
    code = (f"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained({str(base)!r}, dtype='auto').save_pretrained({str(base)!r})")
    raise UserError(f"the base model {base} stores its weights only as pytorch_model*.bin (pickles); the export "
                    "merges and checks safetensors, tensor by tensor. Convert it once, in place (this adds "
                    "model.safetensors beside the .bin files, which stay, and the fine-tune stays valid): "
                    f"python -c {shlex.quote(code)} Then run `distillery export` again.")


def quantization_method(base: Path) -> str:
    """The quant_method of a base stored quantized (e.g. bitsandbytes), "" for one in 16 or 32 bits."""
    config = base / "config.json"
    quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") if config.is_file() else None
    return str(quantization.get("quant_method", "?")) if quantization else ""


def original_16bit(base_model: str, base_16bit: str | None = None) -> Path:
    """The weights the adapter is merged into and checked against, as a local directory: the base itself, or for
    a base published quantized its original 16-bit weights (`base_16bit`, else the names Unsloth maps it to,
    the first in the local Hugging Face cache)."""
    base = local_base(base_model)
    method = quantization_method(base)
    if not method:
        return base
    if base_16bit:
        found = cached_model(base_16bit)
        if found is None:
            raise UserError(f"export.base_16bit: {base_16bit} is neither a directory nor in the local Hugging Face "
                            f"cache: download it (`huggingface-cli download {base_16bit}`) or point "
                            "export.base_16bit at a directory of its safetensors.")
        return same_model(base, found, "export.base_16bit")
    candidates = unsloth_16bit_names(base_model)
    for name in candidates:
        found = cached_model(name)
        if found is not None:
            return same_model(base, found, f"Unsloth's 16-bit name for {base_model}")
    known = f"its 16-bit originals ({', '.join(candidates)}) are not" if candidates else "no 16-bit original is known"
    raise UserError(f"the base {base_model} is stored quantized ({method}) and the adapter goes into its original "
                    f"16-bit weights, but {known} in the local Hugging Face cache. Download one "
                    "(`huggingface-cli download <id>`) or set export.base_16bit to a local directory or Hub id.")


def cached_model(name: str) -> Path | None:
    try:
        return local_base(name)
    except UserError:
        return None


def same_model(base: Path, original: Path, source: str) -> Path:
    """`original`, refused when it is quantized too or its shape differs from the quantized base's."""
    if quantization_method(original) or not list(original.glob("*.safetensors")):
        raise UserError(f"{source}: {original} is not 16-bit safetensors weights (it is quantized, or has no "
                        "safetensors files); point export.base_16bit at the original 16-bit model.")
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    try:
        shapes = [json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (base, original)]
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: {original} needs a readable config.json beside its safetensors, as the base "
                        f"{base} has one ({type(err).__name__}): use the original model's whole directory.") from None
    differ = [k for k in keys if shapes[0].get(k) != shapes[1].get(k)]
    if differ:
        raise UserError(f"{source}: {original} is another model than the base {base} (its {', '.join(differ)} "
                        "differ); point export.base_16bit at the base's original 16-bit weights.")
    return original


def unsloth_16bit_names(name: str) -> list[str]:
    """The 16-bit models Unsloth's name mapping gives for a 4-bit model name, then the name without its
    -bnb-4bit suffix (Unsloth's convention)."""
    import re

    stripped = re.sub(r"(-unsloth)?-bnb-4bit$", "", name, flags=re.IGNORECASE)
    names = []
    for key, values in unsloth_mapper().items():
        values = values.get("16", ()) if isinstance(values, dict) else values
        family = {key.lower(), *(v.lower() for v in values)}
        if name.lower() in family or stripped.lower() in family:
            names += [v for v in values if "4bit" not in v.lower()]
    return list(dict.fromkeys([*names, *([stripped] if stripped != name else [])]))


def unsloth_mapper() -> dict[str, Any]:
    """Unsloth's table of 4-bit names -> 16-bit names, read from its source as data: importing unsloth patches
    transformers for the whole process. Empty where unsloth is not installed or the table moved."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("unsloth")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "mapper.py"
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__INT_TO_FLOAT_MAPPER" for t in node.targets):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return {}


# ---- streaming safetensors out ------------------------------------------------------------------------------


def element_size(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def plan_shards(tensors: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of `tensors` (name, shape, dtype) per output shard: in order, each shard under max_shard_bytes."""
    shards: list[list[int]] = [[]]
    size = 0
    for index, (_, shape, dtype) in enumerate(tensors):
        nbytes = math.prod(shape) * element_size(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards


class ShardWriter:
    """Write one safetensors file tensor by tensor: the header (every name, dtype, shape and offset) first, then
    each tensor's bytes as it comes, so that only one tensor is ever in memory."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], str]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {"dtype": HEADER_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.expected = [(name, offset_of(header[name])) for name, _, _ in tensors]
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.written = 0

    def write(self, name: str, blocks: Any) -> None:
        """The tensor `name`, given as consecutive row blocks (tensors of its dtype)."""
        import torch

        expected_name, (start, stop) = self.expected[self.written]
        if name != expected_name:
            raise RuntimeError(f"ShardWriter: got {name} where {expected_name} was planned")
        written = 0
        for block in blocks:
            data = block.contiguous().view(-1).view(dtype=torch.uint8).numpy()
            self.handle.write(memoryview(data))
            written += data.nbytes
        if written != stop - start:
            raise RuntimeError(f"ShardWriter: {name} has {written} bytes where {stop - start} were planned")
        self.written += 1

    def close(self) -> None:
        self.handle.close()


def offset_of(entry: dict[str, Any]) -> tuple[int, int]:
    return entry["data_offsets"][0], entry["data_offsets"][1]


def parse_size(text: str) -> int:
    """'5GB', '100MB', '2GiB' or a number of bytes, as transformers' max_shard_size reads them."""
    text = str(text).strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# ---- the streamed merge -------------------------------------------------------------------------------------


def row_blocks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive row ranges of at most ROW_BLOCK_ELEMENTS elements."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def merged_rows(rows: Any, delta: LoraDelta, start: int, stop: int) -> Any:
    """W[start:stop] + delta[start:stop] in fp32, given W's rows [start:stop] (DoRA: each row rescaled to its
    learned magnitude)."""
    import torch

    block = rows.float() + delta.rows(start, stop)
    if delta.magnitude is not None:
        block *= (delta.magnitude[start:stop] / torch.linalg.norm(block, dim=1)).unsqueeze(1)
    return block


def tensor_blocks(source: Any, name: str, delta: LoraDelta | None, dtype: Any) -> Iterator[Any]:
    """The merged tensor `name` in `dtype`, row block by row block, read from `source` (a safe_open handle):
    only one block of it is ever in memory."""
    sliced = source.get_slice(name)
    shape = sliced.get_shape()
    if not shape:  # a scalar
        yield source.get_tensor(name).to(dtype)
        return
    for start, stop in row_blocks(shape[0], math.prod(shape[1:])):
        rows = sliced[start:stop]
        yield (rows if delta is None else merged_rows(rows, delta, start, stop)).to(dtype)


def stream_merge(base: Path, deltas: dict[str, LoraDelta], out: Path, dtype: str, max_shard_size: str) -> None:
    """Merge `deltas` into the base's safetensors, tensor by tensor, into sharded safetensors in `out`."""
    from safetensors import safe_open

    target = torch_dtype(dtype)
    tensors = base_tensors(base)
    layout = [(name, tuple(entry["shape"]), dtype) for name, _, entry in tensors]
    shards = plan_shards(layout, parse_size(max_shard_size))
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    handles: dict[Path, Any] = {}
    for number, indices in enumerate(shards, 1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(out / filename, [layout[i] for i in indices])
        try:
            for i in indices:
                name, path, entry = tensors[i]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                writer.write(name, tensor_blocks(handles[path], name, deltas.get(name), target))
                weight_map[name] = filename
                total += math.prod(entry["shape"]) * element_size(dtype)
        finally:
            writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for name in model_json_files(base):
        shutil.copy(base / name, out / name)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def model_json_files(base: Path) -> list[str]:
    """The base's JSON files a merged directory copies: config, generation config; not the weights' index (the
    merge writes its own) nor the tokenizer's (the training tokenizer comes from the adapter)."""
    return sorted(name for name in os.listdir(base) if name.endswith(".json")
                  and not name.startswith(("model.safetensors", "tokenizer", "special_tokens")))


def streamed_copy(source: Path, out: Path, dtype: str, max_shard_size: str = "5GB") -> None:
    """A saved model's safetensors rewritten in `dtype` tensor by tensor (a merge with nothing to add)."""
    stream_merge(source, {}, out, dtype, max_shard_size)


def merge_adapter(summary: FinetuneSummary, adapter_dir: Path, out_dir: Path, dtype: str, max_shard_size: str,
                  trust_remote_code: bool = False, replaced_base: bool = False) -> dict[str, Any]:
    """Merge into 16-bit weights and save to `out_dir` (written beside it, renamed when complete).
    `replaced_base`: summary.base_model is the 16-bit original of a base published quantized; a whole-model merge
    then goes onto it with PEFT (Unsloth's would find a base of its own)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    base = local_base(summary.base_model)
    deltas, why = read_adapter(adapter_dir)
    why = why or why_not_streamable(base)
    if not why and set(deltas) - {name for name, _, _ in base_tensors(base)}:
        why = "the adapter changes weights the base's files do not hold (tied embeddings?)"
    if not why:
        stream_merge(base, deltas, tmp, dtype, max_shard_size)
        method = "streamed"
    else:
        name, merge = WHOLE_MODEL_MERGES["hf" if replaced_base else summary.backend]
        merge(str(base), adapter_dir, tmp, dtype, max_shard_size, trust_remote_code)
        method = f"{name} (whole model: {why})"
    finish_merged_dir(tmp, adapter_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"backend": summary.backend, "method": method, "dtype": dtype, "seconds": round(time.time() - started, 2),
            "bytes": size, "shards": len(list(out_dir.glob("*.safetensors")))}


def _merge_with_peft(base_model: str, adapter_dir: Path, out: Path, dtype: str, max_shard_size: str,
                     trust_remote_code: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype(dtype),
                                                trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)


def _merge_with_unsloth(base_model: str, adapter_dir: Path, out: Path, dtype: str, max_shard_size: str,
                        trust_remote_code: bool) -> None:
    """Unsloth finds the adapter's base itself (the original 16-bit weights of a base published in 4 bits)."""
    from distillery.core.isolation import Child

    with Child("Unsloth", f"merging {adapter_dir} into 16-bit weights",
               hint="If it ran out of memory, merge on a machine with more RAM or set finetune.backend: hf.") as child:
        child.call(unsloth_merge, str(adapter_dir), str(out), dtype, max_shard_size)


def unsloth_merge(state: dict, emit: Any, adapter_dir: str, out: str, dtype: str, max_shard_size: str) -> None:
    """In the merge's child process (core/isolation.py): Unsloth's 16-bit merge of the adapter into its base
    (for a base published in 4 bits it finds the original 16-bit weights)."""
    import unsloth  # noqa: F401  -- before transformers, as Unsloth asks
    from unsloth import FastLanguageModel

    # load_in_4bit=False: the merge goes into the base's original 16-bit weights, never a dequantized copy.
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=adapter_dir, load_in_4bit=False,
                                                         dtype=torch_dtype(dtype))
    model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit", max_shard_size=max_shard_size)


# The training backend -> its whole-model merge, for adapters the streamed merge cannot take.
WHOLE_MODEL_MERGES = {"unsloth": ("unsloth", _merge_with_unsloth), "hf": ("peft", _merge_with_peft)}


def finish_merged_dir(out: Path, adapter_dir: Path) -> None:
    """Tokenizer (the training chat template and EOS) and a generation config that stops at that EOS."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(out)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    try:
        generation = GenerationConfig.from_pretrained(out)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = eos_id
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["eos_token_id"] = eos_id
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ---- the exact check ----------------------------------------------------------------------------------------


def check_merge(base_model: str, adapter_dir: Path, merged: Path) -> dict[str, Any]:
    """Every merged tensor against the base's, row block by row block: untargeted ones byte-identical (in the
    merged dtype), targeted ones within one 16-bit step of W + scale·B·A, and at least one weight changed by the
    adapter. A merge that dropped the adapter (or merged it into other weights, or into a dequantized 4-bit
    copy) fails. Memory: one row block, whatever the model's size."""
    import torch
    from safetensors import safe_open

    base = local_base(base_model)
    deltas, why = read_adapter(adapter_dir)
    if deltas is None:
        return {"passed": None, "skipped": why}
    located = {name: path for name, path, _ in base_tensors(base)}
    handles: dict[Path, Any] = {}
    untargeted = identical = targeted = changed = 0
    worst, worst_name, out_of_range = 0.0, "", set()
    for name, path, _ in base_tensors(merged):
        base_path = located.get(name)
        if base_path is None:
            continue
        for file in (path, base_path):
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
        ours, theirs = handles[path].get_slice(name), handles[base_path].get_slice(name)
        shape = ours.get_shape()
        blocks = row_blocks(shape[0], math.prod(shape[1:])) if shape else [(None, None)]
        same = True
        for start, stop in blocks:
            mine = ours[start:stop] if shape else handles[path].get_tensor(name)
            original = theirs[start:stop] if shape else handles[base_path].get_tensor(name)
            if not bool(torch.isfinite(mine).all()) and bool(torch.isfinite(original).all()):
                out_of_range.add(name)  # past the 16-bit type's range (fp16: 65504)
            if name not in deltas:
                same = same and torch.equal(original.to(mine.dtype), mine)
                continue
            kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(mine.dtype)
            step, smallest = (STEP[kind], SUBNORMAL_STEP[kind]) if kind else (2.0**-23, 2.0**-149)
            expected = merged_rows(original, deltas[name], start, stop)
            error = float(((mine.float() - expected).abs() / (expected.abs() * step).clamp_min(smallest)).max())
            if error > worst:
                worst, worst_name = error, name
            changed += int((mine != original.to(mine.dtype)).sum())
        if name in deltas:
            targeted += 1
        else:
            untargeted += 1
            identical += same
    missing = sorted(set(deltas) - set(located))
    absent = absent_from_merged(set(located), merged)
    passed = (identical == untargeted and targeted == len(deltas) and not missing and not absent and worst <= 1.0
              and changed > 0 and not out_of_range)
    return {"passed": passed, "tensors": untargeted + targeted, "targeted": targeted, "adapted_weights": len(deltas),
            "absent_from_merged": absent, "out_of_range": sorted(out_of_range),
            "untargeted_identical": f"{identical}/{untargeted}", "max_error_in_16bit_steps": round(worst, 3),
            "worst_tensor": worst_name, "weights_changed": changed}


def absent_from_merged(base_names: set[str], merged: Path) -> list[str]:
    """The base's tensors the merged model lacks; a tied lm_head may be dropped (save_pretrained writes it once)."""
    config = merged / "config.json"
    tied = config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tie_word_embeddings", False)
    merged_names = {name for name, _, _ in base_tensors(merged)}
    return sorted(n for n in base_names - merged_names if not (tied and n == "lm_head.weight"))


# ---- a full fine-tune: no merge ------------------------------------------------------------------------------


def stored_dtype(model_dir: Path) -> str | None:
    """The 16-bit dtype a saved model's config.json names (None for fp32, none or no config.json)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"bfloat16": "bf16", "float16": "fp16"}.get(config.get("dtype") or config.get("torch_dtype"))


class TensorFiles:
    """A saved model's tensors by name, read one at a time from its safetensors; each file opened once."""

    def __init__(self, model_dir: Path) -> None:
        self.files = {name: path for name, path, _ in base_tensors(model_dir)}
        self.handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __len__(self) -> int:
        return len(self.files)

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return self.handles[path].get_tensor(name)


def export_trained(model_dir: Path, out_dir: Path, dtype: str, max_shard_size: str) -> dict[str, Any]:
    """A fully fine-tuned model into `out_dir` without a merge: its shards linked (or copied across file
    systems) when already in `dtype`, else rewritten in `dtype` tensor by tensor; the small files are copies,
    since finish_merged_dir rewrites them. `out_dir` appears only when complete."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    if stored_dtype(model_dir) == dtype:
        tmp.mkdir(parents=True)
        for path in model_dir.iterdir():
            if path.suffix == ".safetensors":
                link_or_copy(path, tmp / path.name)
            elif path.is_file():
                shutil.copy(path, tmp / path.name)
        method = "none: the trained model's own shards (full fine-tune)"
    else:
        streamed_copy(model_dir, tmp, dtype, max_shard_size)
        method = f"none: the trained model rewritten in {dtype} (full fine-tune)"
    finish_merged_dir(tmp, model_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"backend": "full", "method": method, "dtype": dtype, "seconds": round(time.time() - started, 2),
            "bytes": size, "shards": len(list(out_dir.glob("*.safetensors")))}


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def check_trained_copy(base_model: str, trained: Path, exported: Path) -> dict[str, Any]:
    """The exported model holds exactly the trained tensors (in its dtype), every one of them, and training
    changed the base: an export of the untrained base, or of half the model, fails. One tensor at a time."""
    import torch

    ours, trained_files, base = TensorFiles(exported), TensorFiles(trained), TensorFiles(local_base(base_model))
    identical = changed = 0
    out_of_range = []
    for name in ours.files:
        mine = ours.get(name)
        theirs = trained_files.get(name) if name in trained_files else None
        if theirs is not None and not bool(torch.isfinite(mine).all()) and bool(torch.isfinite(theirs).all()):
            out_of_range.append(name)  # past the 16-bit type's range (fp16: 65504): inf is "equal" to inf below
        identical += theirs is not None and torch.equal(theirs.to(mine.dtype), mine)
        changed += name in base and not torch.equal(base.get(name).to(mine.dtype), mine)
    missing = sorted(set(trained_files.files) - set(ours.files))
    passed = identical == len(ours) == len(trained_files) and changed > 0 and not out_of_range
    return {"passed": passed, "method": "full", "tensors": len(ours), "identical_to_trained": f"{identical}/{len(ours)}",
            "missing": missing[:10], "changed_from_base": changed, "out_of_range": sorted(out_of_range)}


# ---- the distribution check (small models) ------------------------------------------------------------------


def next_token_logprobs(model, token_lists: Sequence[Sequence[int]]) -> list[Any]:
    """float64 numpy log-probabilities of the next token at every position of each token list."""
    import torch

    results = []
    with torch.no_grad():
        for tokens in token_lists:
            logits = model(torch.tensor([list(tokens)], device=model.device)).logits[0].float()
            results.append(torch.log_softmax(logits.double(), dim=-1).cpu().numpy())
    return results


def load_causal_lm(path: str, dtype: str = "fp32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return model.eval()


def verify_merge(base_model: str, adapter_dir: Path, token_lists: Sequence[Sequence[int]], merged_lp: list[Any],
                 compute_dtype: str = "fp32", trust_remote_code: bool = False) -> dict[str, Any]:
    """Next-token distributions of base and base+adapter (unmerged) against the merged model's (`merged_lp`,
    computed by the caller on the same tokens in the same dtype).

    The merge kept the adapter when the merged model is much closer to base+adapter than the base is: mean
    KL(base+adapter || merged) below half of KL(base+adapter || base). A merge that lost the adapter scores a
    ratio of 1, a merge into other weights more; what remains is the 16-bit rounding of W + BA (a ratio of
    ~0.004 for a strong adapter, ~0.25 after 5 CPU steps on the demo, where the update is near bf16's
    resolution). The largest |log p| change over the whole vocabulary is reported too, but tail tokens make it
    too noisy to decide on.
    """
    import gc

    from peft import PeftModel

    from distillery.export.verify import compare_logprobs

    base = load_causal_lm(str(local_base(base_model)), compute_dtype, trust_remote_code)
    base_lp = next_token_logprobs(base, token_lists)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    adapted_lp = next_token_logprobs(adapted, token_lists)
    del base, adapted
    gc.collect()
    adapter_effect = max(float(abs(a - b).max()) for a, b in zip(adapted_lp, base_lp))
    merge_error = max(float(abs(a - m).max()) for a, m in zip(adapted_lp, merged_lp))
    vs_merged = compare_logprobs(adapted_lp, merged_lp)
    vs_base = compare_logprobs(adapted_lp, base_lp)
    ratio = vs_merged["mean_kl"] / vs_base["mean_kl"] if vs_base["mean_kl"] > 0 else float("inf")
    return {
        "passed": vs_base["mean_kl"] > 0 and ratio < MAX_MERGE_KL_RATIO,
        "compute_dtype": compute_dtype,
        "merge_kl_ratio": round(ratio, 6),
        "max_merge_kl_ratio": MAX_MERGE_KL_RATIO,
        "adapter_effect_max_abs_logprob": round(adapter_effect, 6),
        "merge_error_max_abs_logprob": round(merge_error, 6),
        "merged_vs_base_plus_adapter": vs_merged,
        "base_vs_base_plus_adapter": vs_base,
    }
