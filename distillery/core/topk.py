"""A teacher's top-k log-probabilities per token, kept compactly: int32 token ids and float16 log-probs.

One scored sequence is a `TopK` (the tokens it scored, and for each the teacher's k most likely next tokens with
their log-probs). Many of them go into one safetensors file (memory-mapped when read, no pickle) with the
per-sequence offsets beside them; `encode`/`decode` carry one TopK through a JSON line (distill's progress file).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillery.core.errors import UserError

ID_BYTES, LOGPROB_BYTES, TOKEN_BYTES = 4, 2, 4


@dataclass
class TopK:
    tokens: np.ndarray  # int32 [n]: the scored tokens, in order
    ids: np.ndarray  # int32 [n, k]: the teacher's k most likely tokens at each position
    logprobs: np.ndarray  # float16 [n, k]: their log-probabilities (temperature 1, not renormalised)

    @classmethod
    def of(cls, tokens: list[int] | np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> TopK:
        return cls(np.asarray(tokens, dtype=np.int32), np.asarray(ids, dtype=np.int32),
                   np.asarray(logprobs, dtype=np.float16))

    def encode(self) -> dict:
        def b64(a: np.ndarray) -> str:
            return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")

        return {"k": int(self.ids.shape[1]), "tokens": b64(self.tokens), "ids": b64(self.ids),
                "logprobs": b64(self.logprobs)}

    @classmethod
    def decode(cls, data: dict) -> TopK:
        k = int(data["k"])
        tokens = np.frombuffer(base64.b64decode(data["tokens"]), dtype=np.int32)
        ids = np.frombuffer(base64.b64decode(data["ids"]), dtype=np.int32).reshape(-1, k)
        logprobs = np.frombuffer(base64.b64decode(data["logprobs"]), dtype=np.float16).reshape(-1, k)
        if not (len(tokens) == len(ids) == len(logprobs)):
            raise ValueError("top-k arrays of different lengths")
        return cls(tokens, ids, logprobs)


def top_k_of(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest log-probs of each row (most likely first) and their token ids."""
    k = min(k, log_probs.shape[-1])
    part = np.argpartition(-log_probs, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(log_probs, part, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(values, order, axis=-1)


def bytes_per_token(k: int) -> int:
    return TOKEN_BYTES + k * (ID_BYTES + LOGPROB_BYTES)


def save_sequences(path: Path, sequences: list[TopK | None], metadata: dict, extra: dict | None = None) -> None:
    """One file for many sequences: sequence i is rows offsets[i]:offsets[i+1] (none: an empty range)."""
    from safetensors.numpy import save_file

    k = int(metadata["k"])
    kept = [s for s in sequences if s is not None]
    lengths = [0 if s is None else len(s.tokens) for s in sequences]
    arrays = {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tokens": np.concatenate([s.tokens for s in kept]) if kept else np.zeros(0, np.int32),
        "ids": np.concatenate([s.ids for s in kept]) if kept else np.zeros((0, k), np.int32),
        "logprobs": np.concatenate([s.logprobs for s in kept]) if kept else np.zeros((0, k), np.float16),
        **(extra or {}),
    }
    save_file(arrays, str(path), metadata={key: json.dumps(value) for key, value in metadata.items()})


def load_sequences(path: Path, sequences: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of a file save_sequences wrote, and its metadata; `sequences`: how many it must hold (one per
    record of the file it sits beside)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read as teacher log-probs ({err}); it was cut short or changed: rerun the "
                        "stage that wrote it with --force.") from None
    if not {"offsets", "tokens", "ids", "logprobs"} <= set(arrays):
        raise UserError(f"{path} lacks teacher log-prob arrays; rerun the stage that wrote it with --force.")
    offsets = arrays["offsets"]
    held = len(offsets) - 1
    if held < 0 or (sequences is not None and held != sequences) or (
            held and (int(offsets[0]) != 0 or (np.diff(offsets) < 0).any() or int(offsets[-1]) > len(arrays["tokens"]))):
        wanted = f" for {sequences} records" if sequences is not None else ""
        raise UserError(f"{path} holds {max(held, 0)} sequences of teacher log-probs{wanted}, or offsets that do not fit "
                        "its arrays: it is out of step with the records beside it. Rerun the stage that wrote it "
                        "with --force.")
    return arrays, metadata


def sequence(arrays: dict[str, np.ndarray], i: int) -> TopK | None:
    start, end = int(arrays["offsets"][i]), int(arrays["offsets"][i + 1])
    if start == end:
        return None
    return TopK(arrays["tokens"][start:end], arrays["ids"][start:end], arrays["logprobs"][start:end])
