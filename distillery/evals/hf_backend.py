"""Log-likelihoods and generation with a transformers model (base, base + PEFT adapter, or merged).

Scoring reads each context once: one row holds the context and all its distinct continuations (each without
its last token, which predicts nothing), a 4D attention mask keeps the continuations from seeing each other,
and logits are computed only from the column where the batch's shortest context ends. The numbers are those of one forward
pass over context + continuation, which is what lm-evaluation-harness computes (per choice, five times over).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from distillery.evals.scoring import Request, batches, distinct, longest_first, row_length, shared_prefix_rows
from distillery.core.cpu_attention import use_native_gqa
from distillery.core.cpu_linear import pack_linears
from distillery.core.errors import UserError

log = logging.getLogger(__name__)
# Positions per teacher-forced batch of held-out sequences. On a CPU two rows of 512 (activations that stay in
# cache) scored the demo's held-out set in 9.5 s where one batch of 4096 took 13.6 s (MKL; through oneDNN, rows of
# 256-1024 in batches of 512-2048 positions all take 8.6-10 s); a GPU wants larger batches.
TOKEN_BUDGET = {"cpu": 1024, "cuda": 4096}
PACKED_WIDTH = 512  # positions per packed row of held-out sequences, at least (the longest sequence sets more)


def resolve_dtype(dtype: str) -> str:
    """auto: bfloat16 on a CUDA GPU that has it, float32 everywhere else. Not bfloat16 on a CPU, even one that
    computes it natively: on the demo it scored the held-out set of an artifact in 8.8 s where float32 took 14.7 s
    (through MKL; 11-12 s through oneDNN now), but moved the adapter's loss by 0.03 (2.006 -> 2.033), a seventh of
    what training changed."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


class HFModel:
    """A causal LM and its tokenizer; `adapter` wraps the base model in a PEFT adapter."""

    def __init__(self, model_path: str, dtype: str = "float32", adapter: Path | None = None,
                 trust_remote_code: bool = False):
        import torch
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = hf_device()
        self.dtype = resolve_dtype(dtype)
        tokenizer_path = str(adapter) if adapter and (adapter / "tokenizer_config.json").is_file() else model_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, self.dtype), device_map=self.device,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError, StrictDataclassError) as err:
            raise UserError(f"cannot load the model {model_path}: {str(err).splitlines()[0]}. "
                            "Check model.path (a local HF directory or a Hub id).") from None
        if adapter is not None:
            from peft import PeftModel

            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"{adapter} has no adapter_config.json: run `distillery finetune` again.")
            model = PeftModel.from_pretrained(model, str(adapter))
            if self.dtype == "float32":
                # W + s*BA in fp32 is the adapter's function (the demo's held-out loss agrees to 1e-6) and runs
                # without the LoRA branches (13% faster). Not in 16 bits: rounding would drop a small update.
                model = model.merge_and_unload()
        # float32 on a CPU through oneDNN instead of MKL: 1.4x for scoring, 4x for generation here; other dtypes and
        # devices are left as they are (core/cpu_linear.py)
        pack_linears(model)
        use_native_gqa(model)  # a masked batch's attention without a copy of the keys per query head
        self.model = model.eval()
        self.torch = torch

    def encode(self, text: str) -> list[int]:
        """The harness's tok_encode: the tokenizer's own default special tokens."""
        return self.tokenizer.encode(text)

    def loglikelihoods(self, requests: list[Request], batch_size: int,
                       progress: Callable[[int], None] = lambda n: None) -> list[list[float]]:
        """For each request, the summed log-probability of each continuation given the context."""
        results: list[list[float]] = [[] for _ in requests]
        with self.torch.inference_mode():
            for batch in batches(longest_first(requests), batch_size):
                for index, scores in zip(batch, self._score_batch([requests[i] for i in batch])):
                    results[index] = scores
                progress(len(batch))
        return results

    def _score_batch(self, requests: list[Request]) -> list[list[float]]:
        torch = self.torch
        choices = [distinct(r.continuations) for r in requests]
        ids, positions, mask, first, reads = self._pack(requests, choices)
        # Logits only from the first column that predicts a continuation token on: the lm_head is a fifth of a
        # small model's work per position. The model's own forward applies it (and any logit scaling or
        # soft-capping its architecture has).
        keep = torch.arange(first, ids.shape[1], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=layer_masks(self.model.config, mask, positions),
                            position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        rows, columns, targets = (torch.tensor(values, device=self.device) for values in zip(*reads))
        token_logprobs = logprobs[rows, columns - first, targets].cpu()
        scores, at = [], 0
        for request, unique in zip(requests, choices):
            score_of = {}
            for continuation in unique:
                score_of[continuation] = float(token_logprobs[at:at + len(continuation)].sum())
                at += len(continuation)
            scores.append([score_of[continuation] for continuation in request.continuations])
        return scores

    def _pack(self, requests: list[Request], choices: list[list[tuple[int, ...]]],
              ) -> tuple[Any, Any, Any, int, list[tuple[int, int, int]]]:
        """One row per request: its context, then its distinct continuations (`choices`) without their last
        token (`layout`). Returns ids, positions, the mask, the first column whose logits are needed, and (row,
        column, target) for each continuation token in order: the logits at (row, column) predict `target`."""
        ids, positions, mask, offsets = self.layout(
            [(list(request.context), [list(c[:-1]) for c in unique]) for request, unique in zip(requests, choices)])
        reads: list[tuple[int, int, int]] = []
        for row, (request, unique) in enumerate(zip(requests, choices)):
            n = len(request.context)
            for continuation, start in zip(unique, offsets[row]):
                # the context's last token predicts the first continuation token, each token the next one
                columns = [n - 1, *range(start, start + len(continuation) - 1)]
                reads += [(row, column, target) for column, target in zip(columns, continuation)]
        first = min(len(r.context) for r in requests) - 1
        return ids, positions, mask, first, reads

    def layout(self, rows: list[tuple[list[int], list[list[int]]]]) -> tuple[Any, Any, Any, list[list[int]]]:
        """Rows of (prefix, segments): the prefix, then each segment positioned right after the prefix, attending
        to the prefix and to itself only (a 4D mask and position ids); rows are right-padded. The model computes
        for each segment exactly what it would for prefix + segment alone, without repeating the prefix. Returns
        ids, positions, the boolean mask, and the column where each row's segments begin."""
        torch = self.torch
        width = max(len(prefix) + sum(map(len, segments)) for prefix, segments in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        offsets: list[list[int]] = []
        for row, (prefix, segments) in enumerate(rows):
            n = len(prefix)
            ids[row, :n] = torch.tensor(prefix, dtype=torch.long)
            positions[row, :n] = torch.arange(n)
            mask[row, :n, :n] = causal[:n, :n]
            start, offsets = n, offsets + [[]]
            for segment in segments:
                end = start + len(segment)
                ids[row, start:end] = torch.tensor(segment, dtype=torch.long)
                positions[row, start:end] = torch.arange(n, n + len(segment))
                mask[row, start:end, :n] = True
                mask[row, start:end, start:end] = causal[:len(segment), :len(segment)]
                offsets[-1].append(start)
                start = end
        return ids.to(self.device), positions.to(self.device), mask[:, None].to(self.device), offsets

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> list[str]:
        """Greedy completions of chat-formatted prompts (left-padded batches)."""
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts: list[str] = []
        with self.torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                          **decoding_rule(0.0, 1.0))
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                progress(len(chunk))
        return texts

    def completion_logprobs(self, token_lists: list[list[int]], starts: list[int], batch_size: int,
                            progress: Callable[[int], None] = lambda n: None) -> list[float]:
        """For each token list, the summed log-probability of its tokens from `start` on, each given all before it
        (teacher forcing). Batches are bounded by positions (TOKEN_BUDGET), not by `batch_size`, which only
        generation reads."""
        return self._score(token_lists, starts, progress, set())[0]

    def score_and_generate(self, token_lists: list[list[int]], starts: list[int], answer: list[int],
                           max_new_tokens: int, batch_size: int, eos_id: int, samples: int = 1,
                           temperature: float = 0.0, top_p: float = 1.0,
                           progress: Callable[[int], None] = lambda n: None) -> tuple[list[float], dict[int, list[str]]]:
        """completion_logprobs, and for the lists in `answer` (indices) `samples` continuations of their prompt
        (the tokens before `start`), generated from the prompt's keys and values the scoring pass computed."""
        results, caches = self._score(token_lists, starts, progress, set(answer))
        replies = self.generate_ids([token_lists[i][:starts[i]] for i in answer], max_new_tokens, batch_size, eos_id,
                                    samples, temperature, top_p, progress, [caches.get(i) for i in answer], keys=answer)
        return results, dict(zip(answer, replies))

    def _score(self, token_lists: list[list[int]], starts: list[int], progress: Callable[[int], None],
               keep: set[int]) -> tuple[list[float], dict[int, Any]]:
        """Scores as completion_logprobs says, and the prompt cache (`prompt_cache`) of each list in `keep`. The
        lists go into rows that hold a shared prefix once (`shared_prefix_rows`), batches of at most TOKEN_BUDGET
        positions, and the lm_head is applied only where a scored token is predicted (a quarter of the demo's
        positions; the vocabulary times every position would not fit)."""
        torch = self.torch
        if not token_lists:
            return [], {}
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = base.get_decoder()
        width = max(PACKED_WIDTH, max(map(len, token_lists)) - 1)
        rows = sorted(shared_prefix_rows(token_lists, starts, width), key=lambda r: -row_length(r, token_lists))
        results, caches = [0.0] * len(token_lists), {}
        with torch.inference_mode():
            for batch in batches(rows, max(1, TOKEN_BUDGET[self.device] // width)):
                ids, positions, mask, offsets = self.layout(
                    [(token_lists[r.members[0]][:r.prefix], [token_lists[i][r.prefix:-1] for i in r.members])
                     for r in batch])
                out = decoder(input_ids=ids, attention_mask=layer_masks(base.config, mask, positions),
                              position_ids=positions, use_cache=any(i in keep for r in batch for i in r.members))
                reads: list[tuple[int, int, int, int]] = []  # (list, row, column, target): the column predicts it
                for row, (shared, offset) in enumerate(zip(batch, offsets)):
                    for index, start in zip(shared.members, offset):
                        tokens, first = token_lists[index], max(1, starts[index])
                        # token k is predicted by position k - 1, which sits at column start + (k - 1 - prefix)
                        reads += [(index, row, start + k - 1 - shared.prefix, tokens[k])
                                  for k in range(first, len(tokens))]
                        if index in keep:
                            columns = [*range(shared.prefix), *range(start, start + first - 1 - shared.prefix)]
                            caches[index] = prompt_cache(out.past_key_values, row, columns)
                for (index, *_), logprob in zip(reads, self._target_logprobs(base, out.last_hidden_state, reads)):
                    results[index] += logprob
                progress(sum(len(r.members) for r in batch))
        return results, caches

    def _target_logprobs(self, base: Any, hidden: Any, reads: list[tuple[int, int, int, int]],
                         chunk: int = 512) -> list[float]:
        """log p(target) at each read's (row, column), in float64; the lm_head (and any logit soft-capping) over
        `chunk` positions at a time, which bounds the vocabulary-wide logits in memory."""
        torch = self.torch
        head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
        picked: list[float] = []
        for at in range(0, len(reads), chunk):
            _, rows, columns, targets = zip(*reads[at:at + chunk])
            logits = head(hidden[torch.tensor(rows), torch.tensor(columns)]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), torch.tensor(targets)]
            picked += logprobs.double().cpu().tolist()
        return picked

    def generate_ids(self, id_lists: list[list[int]], max_new_tokens: int, batch_size: int, eos_id: int,
                     samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                     progress: Callable[[int], None] = lambda n: None,
                     caches: list[Any] | None = None, keys: list[int] | None = None) -> list[list[str]]:
        """`samples` completions of each token list (`decoding_rule`), stopping at `eos_id`; the prompts are given
        as the ids training used, so nothing is tokenized twice. Batched by length, at most `batch_size` sequences
        a call (k samples of a list are k: memory is bounded by batch_size whatever k is): a batch is left-padded
        to its longest prompt. `caches[i]`, when given (`prompt_cache`), holds the keys and values of all but the
        last token of list i: a batch whose lists all have one decodes only its last column. `keys[i]` names list
        i for its samples' generators (default: i), as a GGUF's answers name it: the item's place among all."""
        torch = self.torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
        texts: list[list[str]] = [[] for _ in id_lists]
        per_call = max(1, batch_size // samples)  # lists a call
        with torch.inference_mode():
            for start in range(0, len(order), per_call):
                batch = order[start:start + per_call]
                chunk = [id_lists[i] for i in batch]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in chunk], device=self.device)
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.device)
                cached = [caches[i] for i in batch] if caches else []
                reuse = bool(cached) and all(c is not None for c in cached) and width > 1
                for first in range(0, samples, batch_size):  # samples of one list past batch_size: in turns
                    count = min(batch_size, samples - first)
                    past = batch_cache(cached, width - 1, count, self.model.config) if reuse else None
                    rows = [(keys[i] if keys else i, first + k) for i in batch for k in range(count)]
                    rule = decoding_rule(temperature, top_p, rows)
                    decoded = self._sample(ids, mask, past, count, max_new_tokens, eos_id, pad, rule)
                    for k, index in enumerate(batch):
                        texts[index] += decoded[k * count:(k + 1) * count]
                progress(len(chunk))
        return texts

    def _sample(self, ids: Any, mask: Any, past: Any, count: int, max_new_tokens: int, eos_id: int, pad: int,
                rule: dict[str, Any]) -> list[str]:
        """`count` continuations of each row of `ids` (row by row), by `rule` (decoding_rule)."""
        out = self.model.generate(input_ids=ids.repeat_interleave(count, 0),
                                  attention_mask=mask.repeat_interleave(count, 0), past_key_values=past,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad, **rule)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


# Bytes per value of each safetensors dtype; floats load in the evaluation's dtype, the rest (bitsandbytes' packed
# 4-bit and 8-bit weights, their quantization state) as stored.
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = ("F64", "F32", "F16", "BF16")


def loaded_bytes(model_dir: Path, dtype: str) -> int | None:
    """What a model directory's weights take once loaded in `dtype` (resolve_dtype's name), from its safetensors
    headers (no weight read); None without safetensors."""
    import math

    from distillery.export.merge import base_tensors

    tensors = base_tensors(model_dir)
    if not tensors:
        return None
    size = 4 if dtype == "float32" else 2
    return sum(math.prod(entry["shape"]) * (size if entry["dtype"] in FLOATS else STORED_BYTES.get(entry["dtype"], 4))
               for _, _, entry in tensors)


def hf_device() -> str:
    """On a CUDA machine the HF artifacts run there; everything else (and every test here) runs on the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_memory(device: str) -> int | None:
    """Bytes free where the HF artifacts run: the GPU's, or the memory this process may still take."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    from distillery.core.machine import available_memory

    return available_memory()


def decoding_rule(temperature: float, top_p: float, rows: list[tuple[int, int]] = ()) -> dict[str, Any]:
    """generate's settings for the rule a GGUF's answers follow too (gguf_answers.pick): greedy at temperature 0,
    else softmax(logits / temperature) cut to the top_p nucleus, each row drawn with the generator of its (list,
    sample) in `rows` (seeded_sampling); nothing from the model's generation_config (a repetition penalty, a
    top-k), so that every artifact of a run answers by the same rule."""
    if temperature <= 0:
        return {"do_sample": False, "repetition_penalty": 1.0}
    if not rows:
        raise ValueError("sampling needs the (list, sample) of each row: its generator")
    from transformers import LogitsProcessorList

    return {"do_sample": False, "repetition_penalty": 1.0,
            "logits_processor": LogitsProcessorList([seeded_sampling(temperature, top_p, rows)])}


def seeded_sampling(temperature: float, top_p: float, rows: list[tuple[int, int]]) -> Any:
    """A logits processor that draws each row's next token from softmax(logits / temperature) cut to its top_p
    nucleus (`nucleus`) with a torch generator of the row's own, seeded by its list and sample, and leaves greedy
    search only that token: a list's k-th sample does not depend on what else shares its batch (evaluate.batch_size
    changes only speed) or which other items are answered. One draw a row a step, a finished row's too."""
    import torch
    from transformers import LogitsProcessor

    from distillery.evals.gguf_answers import row_seed

    class SeededSampling(LogitsProcessor):
        def __init__(self) -> None:
            self.generators: list[Any] | None = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self.generators is None:  # on the device the scores come from
                self.generators = [torch.Generator(scores.device).manual_seed(row_seed(key, sample)) for key, sample in rows]
            probs = nucleus(torch.softmax(scores.float() / temperature, dim=-1), top_p)
            chosen = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
            return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)

    return SeededSampling()


def nucleus(probs: Any, top_p: float) -> Any:
    """Each row's probabilities with only its top_p nucleus left (the fewest likeliest tokens whose probability
    reaches top_p, as gguf_answers.pick keeps them), not renormalized (multinomial does not need it)."""
    import torch

    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered  # the probability of the likelier tokens
    return torch.zeros_like(probs).scatter_(-1, order, ordered * (before < top_p - 1e-9))


def layer_masks(config: Any, mask: Any, positions: Any) -> Any:
    """The packed rows' 4D mask as each attention layer needs it. transformers hands a ready 4D mask to every layer
    as it is, so a layer with a sliding window (Mistral, Gemma, Qwen2 with use_sliding_window) gets the window
    applied here: a position sees only keys fewer than `sliding_window` positions behind it. Models that mix both
    kinds (`layer_types`) get one mask per kind."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if not window or getattr(config, "use_sliding_window", True) is False:
        return mask
    if kinds and "sliding_attention" not in kinds:
        return mask
    near = (positions[:, :, None] - positions[:, None, :]) < window
    windowed = mask & near[:, None]
    return {"full_attention": mask, "sliding_attention": windowed} if kinds else windowed


def prompt_cache(cache: Any, row: int, columns: list[int]) -> list[tuple[Any, Any]] | None:
    """One sequence's keys and values, layer by layer, gathered from `columns` of a batch's row (its shared prefix
    and its own prompt positions) into a cache of its own; None when a layer is not a plain full-attention cache
    (a sliding window keeps other positions)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    index = torch.tensor(columns, dtype=torch.long, device=cache.layers[0].keys.device)
    # indexing with a tensor copies: the batch's cache can go
    return [(layer.keys[row:row + 1, :, index], layer.values[row:row + 1, :, index]) for layer in cache.layers]


def batch_cache(rows: list[list[tuple[Any, Any]]], width: int, samples: int, config: Any) -> Any:
    """The rows' prompt caches left-padded to `width` positions (zeros there, which the attention mask hides), each
    row repeated `samples` times, as one DynamicCache for generate."""
    from transformers.cache_utils import DynamicCache

    def left_padded(tensors: list[Any]) -> Any:  # one layer's keys (or values) of every row, [1, heads, n, dim] each
        out = tensors[0].new_zeros((len(tensors), tensors[0].shape[1], width, tensors[0].shape[3]))
        for r, tensor in enumerate(tensors):
            out[r, :, width - tensor.shape[2]:] = tensor[0]
        return out.repeat_interleave(samples, 0)

    return DynamicCache(ddp_cache_data=[(left_padded([row[layer][0] for row in rows]),
                                         left_padded([row[layer][1] for row in rows])) for layer in range(len(rows[0]))],
                        config=config)
