"""Tokenizing (context, continuation) pairs the way lm-evaluation-harness does, for any tokenizer, and laying
held-out sequences out in rows that read a shared prefix once (`shared_prefix_rows`).

The harness (HFLM/TemplateLM._encode_pair): trailing spaces of the context move to the continuation; the
whole string is encoded, the context alone is encoded, and the continuation is whatever of the whole follows
the context's token count. The model then reads context tokens + continuation tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Request:
    """One item's shared context tokens and its choices' continuation tokens."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as the harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_tokens = encode(context)
    return context_tokens, whole[len(context_tokens):]


def build_request(encode: Encode, context: str, continuations: Sequence[str]) -> Request:
    """The harness's token split for each choice; the context tokens are the same for all of them."""
    pairs = [encode_pair(encode, context, c) for c in continuations]
    context_tokens = pairs[0][0]
    if any(p[0] != context_tokens for p in pairs) or any(not p[1] for p in pairs):
        raise ValueError("continuations do not share one context tokenization")  # cannot happen for MathQA
    return Request(tuple(context_tokens), tuple(tuple(p[1]) for p in pairs))


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def distinct(continuations: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """Each continuation once, in order. MathQA repeats a choice now and then; scoring the copy separately could
    differ from the original in the last bit and break the tie the harness breaks towards the first."""
    return list(dict.fromkeys(continuations))


def packed_length(request: Request) -> int:
    """Positions a request needs in one packed row: its context, then each distinct continuation without its last
    token (that token predicts nothing, and no position that is read attends to it)."""
    return len(request.context) + sum(len(c) - 1 for c in distinct(request.continuations))


def longest_first(requests: list[Request]) -> list[int]:
    """Request indices by packed length, longest first, so that a batch pads little (and memory peaks at once)."""
    return sorted(range(len(requests)), key=lambda i: -packed_length(requests[i]))


@dataclass(frozen=True)
class SharedRow:
    """Sequences laid out in one row of a teacher-forced batch: the first `prefix` tokens they all share, once,
    then each member's remaining tokens (without its last, which predicts nothing), each seeing the prefix and
    itself only."""

    prefix: int
    members: tuple[int, ...]


def shared_prefix_rows(token_lists: Sequence[Sequence[int]], starts: Sequence[int], width: int) -> list[SharedRow]:
    """The sequences in rows of at most `width` positions (a longer sequence gets a row of its own). Taken in sorted
    order, so that neighbours share their template's system prompt and instruction; a row's prefix stops before
    each member's `start - 1`, the position that predicts its first scored token. Instead of one right-padded row
    per sequence, the demo's held-out set reads 5,630 positions instead of 7,977."""
    from distillery.training.tokens import common_prefix

    rows: list[SharedRow] = []
    members: list[int] = []
    prefix = 0
    for index in sorted(range(len(token_lists)), key=lambda i: list(token_lists[i])):
        own = max(0, starts[index] - 1)
        shared = min(prefix, own, common_prefix(token_lists[members[0]], token_lists[index])) if members else own
        if members and row_length(SharedRow(shared, (*members, index)), token_lists) > width:
            rows.append(SharedRow(prefix, tuple(members)))
            members, shared = [], own
        members.append(index)
        prefix = shared
    if members:
        rows.append(SharedRow(prefix, tuple(members)))
    return rows


def row_length(row: SharedRow, token_lists: Sequence[Sequence[int]]) -> int:
    return row.prefix + sum(len(token_lists[i]) - 1 - row.prefix for i in row.members)
