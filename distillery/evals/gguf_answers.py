"""Answers generated side by side in llama.cpp, in the child process that holds the GGUF (gguf_backend.py).

Each answer is a sequence id of its own in llama.cpp's unified KV cache, and every decode takes one token of each
answer still going: on the demo's Q8_0, 6 rows cost 36 ms a step where one row costs 13 ms, and on a model whose
weights do not fit the CPU's cache the gain grows with the rows (a decode reads every weight once).

Prompts reach `Answers.add` as sequence 0's cache (the scorer has just decoded them). Their cells are saved as
llama.cpp's sequence state (bytes) and the cache is left to the scorer: other sequences' cells in the cache move
sequence 0's log-probabilities (up to 0.8 nats an item on the demo with llama-cpp-python 0.3.36; llama.cpp's CPU
kernels round differently for other cache and batch shapes), and a held-out score must not depend on which items
are answered. When the sequence ids or the context's cells are taken, `generate` empties the cache, restores every
pending prompt into its own sequence (a further sample of the same prompt shares its cells), generates, and
empties the cache again.

Greedy at temperature 0; else each token is drawn (`pick`) from softmax(logits / temperature) cut to its top_p
nucleus, by a generator of the answer's own (`answer_generator`: seeded by the item and the sample); the HF
artifacts' answers follow the same rule with a torch generator of their own (hf_backend.seeded_sampling): every
artifact answers by one rule, and an answer does not depend on which others are generated beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distillery.export.llama_child import GGUFDecodeError, decode_failure


class Answers:
    """Pending prompts and the answers generated for them: `finish()` gives {key: one token list per sample}."""

    def __init__(self, llm: Any, max_new_tokens: int, eos_id: int, temperature: float, top_p: float,
                 emit: Callable[[int], None]):
        self.llm, self.max_new_tokens, self.eos_id = llm, max_new_tokens, eos_id
        self.temperature, self.top_p, self.emit = temperature, top_p, emit
        self.slots = llm.context_params.n_seq_max - 1
        self.pending: list[Prompt] = []
        self.replies: dict[int, list[list[int]]] = {}

    def add(self, key: int, prompt_length: int, logits: Any, samples: int) -> bool:
        """Save sequence 0 (`prompt_length` cells; `logits` the row after them) for `samples` answers to list `key`;
        returns whether the cache was emptied (pending answers generated first)."""
        prompt = Prompt(key, prompt_length, save_sequence(self.llm, 0), logits, samples)
        emptied = bool(self.pending) and (self.samples_pending() + samples > self.slots
                                          or self.cells(self.pending + [prompt]) > self.llm.n_ctx())
        if emptied:
            self.generate()
        self.pending.append(prompt)
        return emptied

    def samples_pending(self) -> int:
        return sum(p.samples for p in self.pending)

    def cells(self, prompts: list["Prompt"]) -> int:
        return sum(p.length + p.samples * self.max_new_tokens for p in prompts)

    def generate(self) -> None:
        """Every pending answer up to its EOS or max_new_tokens, in turns of at most `slots` sequences."""
        import numpy as np

        empty_cache(self.llm)
        streams = [Answer(p.key, sample, 0, p.length, p.logits, answer_generator(p.key, sample))
                   for p in self.pending for sample in range(p.samples)]
        for turn in range(0, len(streams), self.slots):
            self.generate_turn(streams[turn:turn + self.slots])
        for key in dict.fromkeys(a.key for a in streams):
            self.replies[key] = [a.tokens for a in sorted((a for a in streams if a.key == key), key=lambda a: a.sample)]
            self.emit(1)
        self.pending = []

    def generate_turn(self, streams: list["Answer"]) -> None:
        """Restore each stream's prompt into a sequence of its own (one restore per prompt, samples share its
        cells), then one decode per token position for every stream still going; the cache is emptied after."""
        states = {p.key: p.state for p in self.pending}
        first_seq: dict[int, int] = {}
        for seq, answer in enumerate(streams, 1):
            answer.seq = seq
            if answer.key in first_seq:
                self.llm._ctx.kv_cache_seq_cp(first_seq[answer.key], seq, 0, -1)
            else:
                restore_sequence(self.llm, states[answer.key], seq)
                first_seq[answer.key] = seq
        active = streams
        while active:
            for answer in active:
                token = pick(answer.logits, self.temperature, self.top_p, answer.rng)
                answer.done = token == self.eos_id
                if not answer.done:
                    answer.tokens.append(token)
                    answer.done = len(answer.tokens) >= self.max_new_tokens
            active = [a for a in active if not a.done]
            if active:
                rows = decode_step(self.llm, [(a.tokens[-1], a.position, a.seq) for a in active])
                for answer, row in zip(active, rows):
                    answer.logits, answer.position = row, answer.position + 1
        empty_cache(self.llm)

    def finish(self) -> dict[int, list[list[int]]]:
        if self.pending:
            self.generate()
        return self.replies


@dataclass
class Prompt:
    key: int  # the list it is the prompt of
    length: int
    state: Any  # its cells, as llama.cpp's sequence state
    logits: Any  # the row after it: the first token's
    samples: int


@dataclass
class Answer:
    key: int
    sample: int
    seq: int  # its sequence id in llama.cpp's KV cache
    position: int  # where its next token goes
    logits: Any  # the row its next token is picked from
    rng: Any
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def empty_cache(llm: Any) -> None:
    """Every sequence's cells freed (the buffer is left as it is: nothing reads a free cell)."""
    import llama_cpp

    llama_cpp.llama_memory_seq_rm(llm._ctx.memory, -1, -1, -1)


def save_sequence(llm: Any, seq: int) -> Any:
    """A sequence's cells in the KV cache, as llama.cpp's sequence state (bytes)."""
    import ctypes

    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, seq)
    buffer = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buffer, size, seq)
    return buffer


def restore_sequence(llm: Any, state: Any, seq: int) -> None:
    import llama_cpp

    if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, state, len(state), seq) == 0:
        raise GGUFDecodeError(f"llama.cpp could not restore a prompt of {len(state)} bytes into sequence {seq} of "
                              f"{Path(llm.model_path).name} (its context may be too small for the answers)")


SAMPLING_SEED = 1234  # sampled answers are the same on every run


def answer_generator(key: int, sample: int) -> Any:
    """The random generator of one sampled answer: the `sample`-th of list `key`, whatever is generated with it."""
    import numpy as np

    return np.random.default_rng((SAMPLING_SEED + sample, key))


def row_seed(key: int, sample: int) -> int:
    """A 32-bit seed for the `sample`-th answer of list `key` (a torch CPU generator keeps 32 bits of its seed), mixed
    as numpy mixes answer_generator's."""
    import numpy as np

    return int(np.random.SeedSequence((SAMPLING_SEED + sample, key)).generate_state(1)[0])


def pick(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """The next token: the most likely at temperature 0; else drawn from softmax(logits / temperature) cut to its
    nucleus, the fewest most likely tokens whose probability reaches top_p (as transformers' top_p does). Only the
    likeliest 1,024 are sorted, unless they hold less than top_p."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p >= 1:
        return int(rng.choice(len(probs), p=probs))
    head = np.argpartition(-probs, min(1024, len(probs) - 1))[:1024]
    candidates = head if probs[head].sum() >= top_p else np.arange(len(probs))
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    reached = int(np.searchsorted(np.cumsum(probs[order]), top_p - 1e-9))  # a sum equal to top_p reaches it
    kept = order[:reached + 1]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


def decode_step(llm: Any, entries: list[tuple[int, int, int]]) -> Any:
    """One decode of (token, position, sequence id) entries, logits for every one; returns a copy of the rows."""
    import numpy as np

    submit(llm, [(token, position, seq, True) for token, position, seq in entries])
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(entries), llm.n_vocab())).copy()


def submit(llm: Any, entries: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode of (token, position, sequence id, logits wanted) entries, at most n_batch of them, through
    llama-cpp-python's own batch (pinned version: its `eval` asks only for every row's logits or the last's)."""
    fields = llm._batch.batch
    fields.n_tokens = len(entries)
    for j, (token, position, seq, logits) in enumerate(entries):
        fields.token[j], fields.pos[j], fields.n_seq_id[j] = token, position, 1
        fields.seq_id[j][0] = seq
        fields.logits[j] = logits
    try:
        llm._ctx.decode(llm._batch)
    except RuntimeError as err:  # 'llama_decode returned N'
        code = str(err).rsplit(" ", 1)[-1]
        raise decode_failure(int(code) if code.lstrip("-").isdigit() else 0, llm, len(entries),
                             entries[0][1] if entries else 0) from None
