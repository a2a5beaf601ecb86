"""Format: normalized records -> prompt/completion pairs through one chat template.

Steps, in order:
1. pick the template: a named one (distillery/templates/<name>.jinja: qa, ko_qa, alpaca, r1) or the model's own (chat);
2. render each record twice with the tokenizer's `apply_chat_template`: the conversation without its last
   (assistant) turn plus the generation prompt = the prompt, the whole conversation = prompt + completion,
   so the completion (the only part trained on) is exact by construction, and it ends with EOS;
   A record whose text holds a special token's text (`<|im_end|>`, `<｜end▁of▁sentence｜>`) is dropped first
   (dropped.jsonl): tokenized, that text would be the control token itself, an end of turn in the middle of an
   answer, and a hostile row or teacher reply could write whole turns of its own;
3. count tokens with the model's tokenizer and report what `max_length` would truncate, never cutting silently;
4. write train.jsonl, eval.jsonl, dropped.jsonl, chat_template.jinja (stored later in the adapter and the GGUF),
   template.json, stats.json, report.md and lengths.png.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator


from distillery.config import DistilleryConfig, FormatConfig
from distillery.core.chat_render import Chat, ChatRenderer, TemplateRefused, TemplateTooCostly
from distillery.core.console import markdown_table, printable, summary_table
from distillery.core.errors import UserError
from distillery.core.plots import figure
from distillery.core.models import load_tokenizer, local_model_files, model_config, resolve_model_path, text_config
from distillery.core.records import read_jsonl, read_jsonl_numbered, record_problem, write_jsonl
from distillery.core.unseen import unseen_pattern
from distillery.core.vocab import adds_bos
from distillery.training.tokens import split_tokens
from distillery.stage import Stage, StageContext, StageResult, load_stage

log = logging.getLogger(__name__)

OUTPUTS = {"train": "train.jsonl", "eval": "eval.jsonl", "dropped": "dropped.jsonl", "chat_template": "chat_template.jinja",
           "template": "template.json", "stats": "stats.json", "lengths_plot": "lengths.png", "report": "report.md",
           "teacher": "train.teacher.safetensors"}
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def model_files(cfg: DistilleryConfig) -> list[Path]:
    """The model's tokenizer, chat template and config, when model.path is a local directory."""
    return local_model_files(cfg.model.path)


def upstream(cfg: DistilleryConfig) -> tuple[str, ...]:
    """Ingest's records, plus the distill stage's verified traces when distillation is on."""
    distill = getattr(cfg, "distill", None)
    return ("ingest", "distill") if distill is not None and distill.enabled else ("ingest",)


def load_records(ctx: StageContext, split: str) -> list[dict]:
    """The records of one split from every upstream stage (distill contributes train records only); with
    format.distilled: replace, an ingest record the teacher answered gives way to its traces."""
    by_stage = {stage: list(read_records(ctx.upstream(stage, split), stage)) for stage in upstream(ctx.cfg)
                if split in load_stage(stage).outputs}
    if ctx.cfg.format.distilled == "replace" and "distill" in by_stage:
        answered = {r["meta"]["distill"]["from_id"] for r in by_stage["distill"]}
        by_stage["ingest"] = [r for r in by_stage["ingest"] if r["id"] not in answered]
    return [record for records in by_stage.values() for record in records]


def read_records(path: Path, stage: str) -> Iterator[dict]:
    """The records of an upstream stage's file; one that is not as that stage writes them (a role holding a turn
    marker, a message without text: edited or damaged since) is a UserError naming its line."""
    for line, record in read_jsonl_numbered(path):
        problem = record_problem(record)
        if problem:
            raise UserError(f"{path}: line {line} has {problem}, which {stage} never writes (the file was edited or "
                            f"damaged since): `distillery {stage} --force` writes it again.")
        yield record


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the text of any of the tokenizer's special tokens (EOS, turn markers, padding); None when
    it has none. Added tokens that are not special (R1's `<think>`) are text a record may hold."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = {token.content for token in added if token.special} | set(tokenizer.all_special_tokens)
    texts.discard("")
    return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None


def without_special_token_text(records: list[dict], pattern: re.Pattern[str] | None, split: str,
                               ) -> tuple[list[dict], list[dict]]:
    """The records none of whose messages or choices hold a special token's text, and a dropped row (id, source,
    split, reason) for each of the others."""
    kept, dropped = [], []
    for record in records:
        texts = [m["content"] for m in record["messages"]] + list(record.get("choices") or [])
        found = next((match for text in texts if pattern and (match := pattern.search(text))), None)
        if found is None:
            kept.append(record)
            continue
        dropped.append({"id": record["id"], "source": record.get("source"), "split": split,
                        "reason": f"contains {found.group()!r}, a special token of the model: as text it would be "
                                  "tokenized as that control token, not as text"})
    return kept, dropped


def check_system_prompt(fmt: FormatConfig, pattern: re.Pattern[str] | None) -> None:
    """format.system_prompt joins every record after the records' special-token check: text of a special token in
    it would be that control token in every training example (an end of turn, a turn of its own)."""
    found = pattern.search(fmt.system_prompt) if pattern and fmt.system_prompt else None
    if found:
        raise UserError(f"format.system_prompt contains {found.group()!r}, a special token of the model: as text it "
                        "would be tokenized as that control token in every training example. Remove it from "
                        "system_prompt (the template writes the turn markers itself).")


def load_template(name: str, tokenizer: Any) -> str:
    """The Jinja chat template for `name`; `chat` is the model's own. A named template opens with the BOS for a
    tokenizer that adds one itself (R1-Distill-Qwen, Llama 3, Kanana), as those models' own templates do: the
    text is tokenized without the tokenizer's additions (training/tokens.py), and the model was pretrained, and
    runs in llama.cpp (which adds the BOS the GGUF asks for), with a BOS first."""
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("format.template: chat needs the model's chat template, and this tokenizer has none. "
                            "Use qa, ko_qa, alpaca or r1.")
        return tokenizer.chat_template
    template = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    return "{{- bos_token -}}\n" + template if adds_bos(tokenizer) else template



def with_think(content: str) -> str:
    """R1 training text always opens with a reasoning block; an answer without one gets an empty block, and
    reasoning that only closes (as R1 writes it after a generation prompt that opened it) gets its opening tag."""
    if content.lstrip().startswith(THINK_OPEN):
        return content
    if THINK_CLOSE in content and THINK_OPEN not in content:
        return f"{THINK_OPEN}\n{content}"
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{content}"


UNSEEN = unseen_pattern()


def has_reasoning(answer: str) -> bool:
    """Whether an answer brings reasoning of its own: an opened or closed think block with text in it."""
    if THINK_CLOSE not in answer:
        return False
    inside = answer.split(THINK_CLOSE, 1)[0].replace(THINK_OPEN, "")
    return bool(UNSEEN.sub("", inside).strip())  # a zero-width space or a BOM alone is no reasoning


def prepare_messages(record: dict, fmt: FormatConfig) -> list[dict[str, str]]:
    """The record's messages with the configured system prompt and, for r1, the reasoning block."""
    messages = [dict(m) for m in record["messages"]]
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError(f"format: record {record['id']} ({record.get('source')}) does not end with an assistant "
                        "message, so there is nothing to train on. Check that source's column mapping.")
    if fmt.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    if len(messages) < 2:
        raise UserError(f"format: record {record['id']} ({record.get('source')}) is an answer with no question before "
                        "it, so there is no prompt to train it after. Check that source's column mapping, or set "
                        "format.system_prompt.")
    if fmt.template == "r1":
        messages[-1]["content"] = with_think(messages[-1]["content"])
    return messages


def render_rows(records: list[dict], fmt: FormatConfig, template: str, tokenizer: Any,
                renderer: ChatRenderer) -> list[dict[str, Any]]:
    """Each record -> {"prompt", "completion", ...}: the conversation without its answer (plus the generation
    prompt) and the whole of it, rendered by the template in the renderer's child, then cut apart."""
    conversations = [prepare_messages(record, fmt) for record in records]
    chats = [chat for messages in conversations for chat in (Chat(messages[:-1], True), Chat(messages))]
    try:
        texts = renderer.render(chats, template, tokenizer.special_tokens_map)
    except TemplateRefused as err:
        raise refused(records[err.index // 2], chats[err.index].messages, fmt, err.reason) from None
    except TemplateTooCostly as err:
        raise too_costly(records[err.first // 2], records[err.last // 2], fmt, err) from None
    return [cut(record, messages, texts[2 * i], texts[2 * i + 1], fmt, tokenizer.eos_token)
            for i, (record, messages) in enumerate(zip(records, conversations))]


def render(record: dict, fmt: FormatConfig, template: str, tokenizer: Any, renderer: ChatRenderer) -> dict[str, Any]:
    """One record -> {"prompt", "completion"} with completion = the last assistant turn, ending in EOS."""
    return render_rows([record], fmt, template, tokenizer, renderer)[0]


def refused(record: dict, messages: list[dict[str, str]], fmt: FormatConfig, reason: str) -> UserError:
    """A template that refuses a record (a model's own that raises, as Gemma's does for a system message and
    Mistral's for roles that do not alternate, or one that is not valid Jinja), in the template's own words."""
    roles = ", ".join(m["role"] for m in messages)
    system = " or unset format.system_prompt" if fmt.system_prompt else ""
    return UserError(f"format.template {fmt.template}: the chat template refused record {record['id']} "
                     f"({record.get('source')}; roles {roles}): {reason}. Use template qa, ko_qa, alpaca or r1{system}.")


def too_costly(first: dict, last: dict, fmt: FormatConfig, err: TemplateTooCostly) -> UserError:
    where = f"record {first['id']}" if first is last else f"records {first['id']} to {last['id']}"
    origin = "the model's chat template (its tokenizer files)" if fmt.template == "chat" else "the chat template"
    return UserError(f"format.template {fmt.template}: {origin} took more than {err.budget()} rendering {where}, "
                     "where a chat template needs milliseconds and a few MB: it is broken or hostile. Use template "
                     "qa, ko_qa, alpaca or r1, or a model whose template is sound.")


def cut(record: dict, messages: list[dict[str, str]], prompt: str, full: str, fmt: FormatConfig,
        eos: str | None) -> dict[str, Any]:
    """The record's row from its two renderings: completion = the last assistant turn, ending in EOS."""
    if not full.startswith(prompt):
        raise UserError(f"format.template {fmt.template}: rendering record {record['id']} without its answer is not a "
                        "prefix of rendering it with the answer, so the completion cannot be cut exactly. "
                        "Use qa, ko_qa, alpaca or r1.")
    completion = full[len(prompt):].rstrip()
    answer = messages[-1]["content"].strip()
    if answer not in completion:
        hint = " (it deletes <think> reasoning: use template: r1)" if THINK_OPEN in answer else ""
        raise UserError(f"format.template {fmt.template}: the template drops part of the answer of record "
                        f"{record['id']}{hint}.")
    if eos and not completion.endswith(eos):
        completion += eos
    row = {"id": record["id"], "source": record["source"], "task": record["task"], "prompt": prompt,
           "completion": completion}
    if "choices" in record:
        row["choices"], row["label"] = record["choices"], record["label"]
    row["meta"] = record.get("meta", {})
    return row


# The teacher's tokens may start a few tokens before format's completion does (a generation prompt that opens
# the reasoning block makes `<think>` part of the prompt); they are looked for from this far before it.
BEFORE_COMPLETION = 8


def find_tokens(ids: list[int], tokens: list[int], from_position: int) -> int | None:
    """Where `tokens` occur in `ids`, at or after from_position; None if they do not."""
    n = len(tokens)
    for start in range(max(0, from_position), len(ids) - n + 1):
        if ids[start] == tokens[0] and ids[start:start + n] == tokens:
            return start
    return None


def align_teacher(rows: list[dict], tokenizer: Any, ctx: StageContext) -> dict[str, Any] | None:
    """Distill's teacher log-probs placed on the training tokens: row i's top-k rows describe its tokens from
    starts[i] on, exactly as training tokenizes the row (training/tokens.py). A trace whose tokens are not found
    whole (a template that changes the text) trains on cross-entropy only, and is counted."""
    import numpy as np

    from distillery.core.topk import TopK, load_sequences, save_sequences, sequence

    if "distill" not in upstream(ctx.cfg) or not ctx.upstream("distill", "logprobs").is_file():
        return None
    distilled = [r["id"] for r in read_jsonl(ctx.upstream("distill", "train"))]
    arrays, metadata = load_sequences(ctx.upstream("distill", "logprobs"), len(distilled))
    by_id = {record_id: i for i, record_id in enumerate(distilled)}
    placed: list[TopK | None] = []
    starts, unaligned = [], 0
    for row in rows:
        scored = sequence(arrays, by_id[row["id"]]) if row["id"] in by_id else None
        start = None
        if scored is not None:
            ids, prompt_len = split_tokens(tokenizer, row["prompt"], row["completion"])
            start = find_tokens(ids, scored.tokens.tolist(), prompt_len - BEFORE_COMPLETION)
            if start is None and len(scored.tokens) > 1:  # the EOS may render differently
                scored = TopK(scored.tokens[:-1], scored.ids[:-1], scored.logprobs[:-1])
                start = find_tokens(ids, scored.tokens.tolist(), prompt_len - BEFORE_COMPLETION)
            unaligned += start is None
        placed.append(scored if start is not None else None)
        starts.append(-1 if start is None else start)
    path = ctx.out / OUTPUTS["teacher"]
    save_sequences(path, placed, metadata, {"starts": np.asarray(starts, dtype=np.int64)})
    return {"k": metadata["k"], "teacher": metadata.get("teacher"), "rows": sum(p is not None for p in placed),
            "unaligned": unaligned, "tokens": sum(len(p.tokens) for p in placed if p is not None),
            "bytes": path.stat().st_size}


def token_lengths(rows: list[dict], tokenizer: Any) -> list[tuple[int, int]]:
    """(prompt tokens, total tokens) per row, tokenized as the trainer will (training/tokens.py)."""
    pairs = [split_tokens(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return [(prompt_len, len(ids)) for ids, prompt_len in pairs]


def length_stats(lengths: list[tuple[int, int]], max_length: int) -> dict[str, Any]:
    """Summary of token lengths and how many examples `max_length` would cut or empty."""
    if not lengths:
        return {"examples": 0}
    totals = sorted(t for _, t in lengths)
    completions = sorted(t - p for p, t in lengths)

    def pct(values: list[int], q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "examples": len(lengths),
        "total_tokens": {"mean": round(sum(totals) / len(totals), 1), "p50": pct(totals, 0.5),
                         "p95": pct(totals, 0.95), "max": totals[-1]},
        "completion_tokens": {"mean": round(sum(completions) / len(completions), 1), "max": completions[-1]},
        "over_max_length": sum(t > max_length for t in totals),
        "completion_lost": sum(p >= max_length for p, _ in lengths),
        "max_length": max_length,
    }


def save_length_plot(lengths: list[tuple[int, int]], max_length: int, path: Path) -> None:
    with figure(path, (6, 3.5)) as (fig, ax):
        ax.hist([t for _, t in lengths], bins=40, color="#4878d0")
        ax.axvline(max_length, color="#d65f5f", linestyle="--", label=f"max_length {max_length}")
        ax.set_xlabel("tokens (prompt + completion)")
        ax.set_ylabel("examples")
        ax.set_title("Training example lengths")
        ax.legend()


def check_special_tokens(tokenizer: Any, model_path: str, trust_remote_code: bool) -> None:
    """An EOS to end every completion with, and special tokens the model has embeddings for: a tokenizer without
    an EOS trained answers that never end; an id past the embeddings failed inside training (a device-side
    assert on a GPU)."""
    if tokenizer.eos_token is None:
        raise UserError(f"model.path: {model_path}'s tokenizer has no EOS token (eos_token in tokenizer_config.json): "
                        "every completion ends with it, so that the model learns to stop. Set it there.")
    vocab = getattr(text_config(model_config(model_path, trust_remote_code)), "vocab_size", None)
    for role in ("eos", "bos", "pad"):
        token, token_id = getattr(tokenizer, f"{role}_token"), getattr(tokenizer, f"{role}_token_id")
        if isinstance(vocab, int) and token_id is not None and not 0 <= token_id < vocab:
            raise UserError(f"model.path: {model_path}'s {role.upper()} token {token!r} has id {token_id}, and the "
                            f"model has embeddings for ids 0 to {vocab - 1} (config.json vocab_size): the tokenizer "
                            "is not this model's. Use the model's own tokenizer files.")


def format_splits(ctx: StageContext, template: str, tokenizer: Any, specials: re.Pattern | None,
                  renderer: ChatRenderer, stats: dict[str, Any]) -> tuple[list[tuple[int, int]], list[dict]]:
    """train.jsonl and eval.jsonl written, their length stats put in `stats`; (every row's lengths, dropped)."""
    fmt, all_lengths, dropped = ctx.cfg.format, [], []
    for split in ("train", "eval"):
        records, split_dropped = without_special_token_text(load_records(ctx, split), specials, split)
        if split == "train" and split_dropped and not records:
            raise UserError(f"format: every train record holds a special token's text ({split_dropped[0]['reason']}"
                            f"; record {split_dropped[0]['id']}): nothing is left to train on. Clean the sources.")
        dropped += split_dropped
        rows = render_rows(records, fmt, template, tokenizer, renderer)
        lengths = token_lengths(rows, tokenizer)
        all_lengths += lengths
        stats[split] = length_stats(lengths, fmt.max_length)
        if fmt.template == "r1":
            stats[split]["no_reasoning"] = sum(not has_reasoning(r["messages"][-1]["content"]) for r in records)
        write_jsonl(ctx.out / OUTPUTS[split], rows)
        if split == "train" and (teacher := align_teacher(rows, tokenizer, ctx)) is not None:
            stats["teacher_logprobs"] = teacher
    return all_lengths, dropped


def run(ctx: StageContext) -> StageResult:
    with ChatRenderer() as renderer:  # its child imports while the tokenizer loads
        return format_with(ctx, renderer)


def format_with(ctx: StageContext, renderer: ChatRenderer) -> StageResult:
    fmt = ctx.cfg.format
    model_path = resolve_model_path(ctx.cfg.model.path)
    tokenizer = load_tokenizer(model_path, ctx.cfg.model.trust_remote_code)
    check_special_tokens(tokenizer, model_path, ctx.cfg.model.trust_remote_code)
    template = load_template(fmt.template, tokenizer)
    stats: dict[str, Any] = {"template": fmt.template, "eos_token": tokenizer.eos_token}
    specials = special_token_pattern(tokenizer)
    check_system_prompt(fmt, specials)
    all_lengths, dropped = format_splits(ctx, template, tokenizer, specials, renderer, stats)
    write_jsonl(ctx.out / OUTPUTS["dropped"], dropped)
    stats["dropped_special_token_text"] = len(dropped)
    stats["model_context"], stats["past_model_context"] = past_model_context(model_path, all_lengths, fmt, ctx)
    (ctx.out / OUTPUTS["chat_template"]).write_text(template, encoding="utf-8")
    meta = {"name": fmt.template, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
            "model": model_path}
    (ctx.out / OUTPUTS["template"]).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (ctx.out / OUTPUTS["stats"]).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    save_length_plot(all_lengths, fmt.max_length, ctx.out / OUTPUTS["lengths_plot"])
    (ctx.out / OUTPUTS["report"]).write_text(render_report(stats), encoding="utf-8")
    print_report(ctx, stats)
    train = stats["train"]
    return StageResult(
        metrics={"train_examples": train["examples"], "over_max_length": train.get("over_max_length", 0),
                 "completion_lost": train.get("completion_lost", 0), "dropped": len(dropped)},
        summary=[("examples", str(train["examples"])), ("template", fmt.template),
                 ("over max_length", str(train.get("over_max_length", 0)))],
    )


def past_model_context(model_path: str, lengths: list[tuple[int, int]], fmt: FormatConfig,
                       ctx: StageContext) -> tuple[int | None, int]:
    """The model's context (max_position_embeddings) and how many examples, cut at format.max_length, are longer:
    those train on positions the model never saw. Said, not refused: a model with RoPE scaling may be meant to."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=ctx.cfg.model.trust_remote_code)
    except (OSError, ValueError):  # no config.json the format stage can read: the finetune stage names it
        return None, 0
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int) or fmt.max_length <= context:
        return context, 0
    past = sum(min(total, fmt.max_length) > context for _, total in lengths)
    if past:
        ctx.console.print(f"[yellow]past the model's context[/]: {past} examples are longer than the "
                          f"{context:,} positions of {printable(model_path)} (max_position_embeddings) and format.max_length "
                          f"{fmt.max_length:,} keeps them: they train on positions the model never saw. Lower "
                          f"format.max_length to {context:,} unless the model is meant to be extended.")
    return context, past


def _rows(stats: dict) -> list[tuple[str, ...]]:
    rows = []
    for split in ("train", "eval"):
        s = stats[split]
        if s["examples"]:
            rows.append((split, str(s["examples"]), str(s["total_tokens"]["mean"]), str(s["total_tokens"]["p95"]),
                         str(s["total_tokens"]["max"]), str(s["over_max_length"]), str(s["completion_lost"])))
    return rows


HEADERS = ("split", "examples", "mean tokens", "p95", "max", "over max_length", "completion lost")


def print_report(ctx: StageContext, stats: dict) -> None:
    ctx.console.print(summary_table(f"format ({stats['template']}, max_length {ctx.cfg.format.max_length})",
                                    _rows(stats), HEADERS))
    teacher = stats.get("teacher_logprobs")
    if teacher:
        ctx.console.print(f"teacher top-{teacher['k']} log-probs on {teacher['rows']} train examples "
                          f"({teacher['tokens']:,} tokens, {teacher['bytes']:,} bytes)"
                          + (f"; {teacher['unaligned']} not found in their tokens (cross-entropy only)"
                             if teacher["unaligned"] else "") + ".")
    if stats["dropped_special_token_text"]:
        listed = ctx.run.stage_dir("format") / OUTPUTS["dropped"]  # where it is once the stage is done
        ctx.console.print(f"[yellow]{stats['dropped_special_token_text']} records dropped: their text holds a special "
                          f"token's text (reasons in {printable(str(listed))}).[/]")
    bare = stats["train"].get("no_reasoning", 0)
    if bare:
        ctx.console.print(f"[yellow]{bare} of {stats['train']['examples']} train answers hold no reasoning: the r1 "
                          "template gives each an empty <think> block, and the model learns to answer without "
                          "thinking. For reasoning in the training text, add a teacher's verified traces "
                          "(distill.enabled: true, docs/distill.md).[/]")
    lost = stats["train"].get("completion_lost", 0)
    over = stats["train"].get("over_max_length", 0)
    if over:
        ctx.console.print(f"[yellow]{over} train examples exceed format.max_length and would be truncated; "
                          f"{lost} would lose their whole completion. Raise format.max_length or drop them.[/]")


def render_report(stats: dict) -> str:
    lines = [f"# Format report ({stats['template']}, EOS {stats['eos_token']!r})", "", *markdown_table(HEADERS, _rows(stats))]
    if stats.get("dropped_special_token_text"):
        lines += ["", f"Dropped {stats['dropped_special_token_text']} records whose text holds a special token's text "
                      f"({OUTPUTS['dropped']})."]
    if stats["train"].get("no_reasoning"):
        lines += ["", f"{stats['train']['no_reasoning']} of {stats['train']['examples']} train answers hold no "
                      "reasoning: the r1 template gives each an empty <think> block (distill adds reasoning)."]
    if stats.get("past_model_context"):
        lines += ["", f"{stats['past_model_context']} examples are longer than the model's context "
                      f"({stats['model_context']:,} positions): lower format.max_length unless the model is meant "
                      "to be extended."]
    return "\n".join(lines) + f"\n\nLength histogram: {OUTPUTS['lengths_plot']}\n"


STAGE = Stage(name="format", run=run, outputs=OUTPUTS, sections=("model", "format"), upstream=upstream,
              packages=("transformers", "tokenizers", "Jinja2"), model_files=model_files)
