"""The YAML config: one pydantic model per stage section, unknown keys forbidden, `--set` overrides.

    run:      name, root, seed
    model:    the base model every stage uses
    ingest:   data sources, dedup, eval split          -> distillery/stages/ingest.py
    format:   template and length budget               -> distillery/stages/format.py
    finetune: LoRA and trainer settings                -> distillery/stages/finetune.py
    export:   16-bit merge, GGUF types, verification   -> distillery/stages/export.py (+ distillery/export/)
    evaluate: held-out and MathQA scores of every artifact -> distillery/stages/evaluate.py
    distill:  teacher, verifiers, sandbox              -> distillery/stages/distill.py
    push:     Hub repository and what to upload        -> commands/push.py (the `push` command)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from distillery.sources import SOURCES
from distillery.training.settings import FinetuneConfig
from distillery.core.errors import UserError
from distillery.core.userinput import UserPath, parse_yaml, read_yaml_file, require_file

# Keys whose values are secrets: `hf_token`, `api_key`, `password` — not `max_tokens` or `api_key_env` (a name).
SECRET_KEYS = re.compile(r"(^|_)(token|api_key|key|secret|password)$", re.IGNORECASE)

# One member per registered source kind (distillery/sources/__init__.py), told apart by `kind`.
SourceConfig = Annotated[Union[tuple(source.params for source in SOURCES.values())], Field(discriminator="kind")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it


# One plain directory name: no separator, never `.` or `..` (which would put the run into the root or its
# parent), not hidden, short enough for every file system.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class RunConfig(Section):
    name: str = Field("demo", description="Run name, one plain directory name (letters, digits, _ . -, starting "
                      "with a letter or digit, at most 100): artifacts go to <root>/<name>/.")
    root: UserPath = Field("runs", description="Directory that holds all runs (created when missing).")
    seed: StrictInt = Field(42, ge=0, le=2**32 - 1, description="Seed for sampling, splitting and training "
                            "(0 to 2^32-1, numpy's range).")

    @field_validator("name")
    @classmethod
    def _plain_directory_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError("a run name is one plain directory name: 1 to 100 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit (so not '.', '..' or a path)")
        return name

    @field_validator("root")
    @classmethod
    def _root_is_a_directory(cls, root: str) -> str:
        if "\0" in root:
            raise ValueError("holds a null byte, which no path can: set run.root to a directory")
        if not root.strip():
            raise ValueError("is empty: set run.root to the directory that holds the runs, e.g. runs")
        if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in Path(root).parts):
            raise ValueError("has a name longer than 255 bytes, which file systems do not take: set run.root to a "
                             "directory with shorter names")
        if len(os.path.abspath(root).encode("utf-8", "surrogateescape")) > MAX_ROOT_BYTES:
            raise ValueError(f"is longer than {MAX_ROOT_BYTES} bytes, and the run's files lie below it (a path has "
                             "at most 4,096): set run.root to a shorter path")
        existing = nearest_existing(Path(root))
        if not existing.is_dir():
            raise ValueError(f"{existing} is a file, not a directory; set run.root to a directory (it is created "
                             "when missing)")
        return root


MAX_ROOT_BYTES = 3072  # room below it for <name>/<stage>/<file> within Linux's 4,096-byte paths


def nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing parent."""
    return next(p for p in (path, *path.parents) if os.path.exists(p))


class ModelConfig(Section):
    path: UserPath = Field(
        "bundled:SmolLM2-135M-Instruct",
        description="A local HF directory, a Hub id, or a bundled offline model: bundled:SmolLM2-135M-Instruct "
                    "(the demo), bundled:tiny-qwen2-r1 (R1-Distill-Qwen's tokenizer and template, random weights).",
    )
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code (needed by some architectures).")


class DecontaminateConfig(Section):
    enabled: bool = Field(True, description="Check every training record against the evaluation sets: evaluate.data "
                          "(when it is a local file, or a Hub dataset already in the local cache), the held-out split "
                          "and the `against` files (docs/ingest.md, Decontamination).")
    against: list[str] = Field(default_factory=list, description="More evaluation sets: local jsonl/json/csv/parquet "
                               "files (or directories, globs) of records with `messages` or of MathQA rows (`Problem`).")
    word_ngram: int = Field(13, ge=1, description="Words in the n-grams compared (13, as GPT-3 and Llama 2 did).")
    char_ngram: int = Field(25, ge=1, description="Characters in the n-grams of Hangul text, spaces and symbols "
                            "removed (25: about 13 English words in Korean).")
    action: Literal["drop", "keep"] = Field("drop", description="drop: contaminated training records go to "
                                            "dropped.jsonl; keep: they stay and are only reported.")


class IngestConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1, description="Data sources, each with a unique name and a kind.")
    dedupe: bool = Field(True, description="Drop records whose content repeats one already kept (across sources).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of records held out for evaluation (fixed-seed).")
    workers: int | None = Field(None, ge=1, description="Processes reading files in parallel; default: one per core "
                                "when the input files total 16 MB or more, else 1. The output is the same either way.")
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Any]) -> list[Any]:
        names = [s.name for s in sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(repeated)}")
        return sources


class FormatConfig(Section):
    template: Literal["qa", "ko_qa", "alpaca", "r1", "chat"] = Field(
        "qa", description="qa, ko_qa, alpaca, r1 (<think> reasoning kept) or chat (the model's own chat template)."
    )
    max_length: int = Field(1024, ge=16, le=1 << 22, description="Token budget of prompt + completion (at most 4,194,304); longer examples are counted, not cut.")
    system_prompt: str | None = Field(None, description="Added as a system message when a record has none.")
    distilled: Literal["add", "replace"] = Field(
        "add", description="With distill on: add (the teacher's traces join the records they came from) or replace "
                           "(a distilled record trains on its traces only, as R1-style distillation does).")


# Each section below belongs to one stage; its owner extends it. A section with `enabled: false` is
# skipped by `distillery run`.


class TeacherConfig(Section):
    kind: Literal["gguf", "hf", "openai"] = Field(
        "gguf", description="gguf (llama-cpp-python), hf (transformers) or openai (any chat-completions HTTP endpoint)."
    )
    path: UserPath | None = Field(
        "bundled:SmolLM2-135M-Instruct",
        description="gguf: a .gguf file or bundled:<name>; hf: a local HF directory or Hub id.",
    )
    url: str | None = Field(None, description="openai: base URL, e.g. http://localhost:8000/v1 (…/chat/completions is added); "
                                              "default: $OPENAI_BASE_URL.")
    model: str | None = Field(None, description="openai: the model name the endpoint serves; default: $OPENAI_MODEL.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the key (may be unset for local servers).")
    context_length: int = Field(4096, ge=256, description="gguf: llama.cpp context window (n_ctx).")
    timeout_s: float = Field(120.0, gt=0, le=86400, description="openai: seconds one request may take in all (connecting, waiting, "
                                                      "reading the whole reply); then it is abandoned and retried.")
    max_retry_wait_s: float = Field(60.0, ge=0, le=86400, description="openai: longest wait before a retry that a retried "
                                                             "status's Retry-After header gets; a longer one is cut to this (and logged).")

    @model_validator(mode="after")
    def _needs_location(self) -> "TeacherConfig":
        if self.kind in ("gguf", "hf") and not self.path:
            raise ValueError(f"teacher kind {self.kind} needs path")
        return self


class SandboxConfig(Section):
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock limit of one run of untrusted code (CPU seconds too); then everything it started is killed.")
    memory_mb: int = Field(1024, ge=64, description="Memory of every process of one run together (a cgroup, else a watchdog), and of each alone (RLIMIT_AS).")
    file_size_mb: int = Field(8, ge=1, description="Everything one run writes, together (the size of its tmpfs working directory; RLIMIT_FSIZE too).")
    max_processes: int = Field(16, ge=1, description="Processes (threads) one run may have at once (a cgroup's pids.max, else RLIMIT_NPROC).")
    max_output_kb: int = Field(256, ge=1, description="stdout + stderr kept before the run is stopped.")
    isolation: Literal["required", "best-effort"] = Field(
        "required", description="required: run dataset code only behind mount and network namespaces and a new root "
        "that hides your files; where the machine refuses namespaces the stage stops and says how to allow them. "
        "best-effort: run it there anyway, with only an audit hook that refuses writes outside its directory (the "
        "code can read every file your user can).")


class DistillConfig(Section):
    enabled: bool = Field(False, description="Generate verified teacher traces and add them to the training data.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    tasks: dict[str, Literal["math_mc", "numeric", "codeio_output", "codeio_input"]] = Field(
        default_factory=lambda: {"math_mc": "math_mc", "code_io_output": "codeio_output", "code_io_input": "codeio_input"},
        description="Record task -> verifier. Only train records of these tasks are sent to the teacher "
                    "(e.g. add `qa: numeric` for GSM-style questions).",
    )
    max_prompts: int | None = Field(8, ge=1, description="Prompts sent to the teacher, spread evenly over the tasks; null: all.")
    samples_per_prompt: int = Field(1, ge=1, description="K: teacher samples per prompt (rejection sampling keeps the verified ones).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(512, ge=1, description="Most tokens the teacher writes per turn.")
    concurrency: int = Field(4, ge=1, description="Prompts in flight at once for the openai teacher (local teachers run one at a time).")
    retries: int = Field(3, ge=0, description="openai: retries of a failed request (connection errors, timeouts, HTTP 408, 409, 429, 500, 502, 503, 504), after the server's Retry-After or a backoff.")
    revise: bool = Field(True, description="CodeI/O++: after a failed first turn, show the teacher the verifier's feedback and ask once more.")
    keep: Literal["verified", "all"] = Field("verified", description="verified: rejection sampling (only checked traces); all: every trace, marked in meta.")
    system_prompt: str = Field(
        "Think through the problem step by step inside <think> and </think>, then state the final answer.",
        description="Instruction sent to the teacher before each prompt (not part of the training data).",
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    logprobs: int | None = Field(None, ge=1, le=64, description="k: also store the teacher's top-k log-probs on every "
                                 "token of each kept trace (train.logprobs.safetensors), for finetune.objective kd; "
                                 "the teacher must share the student's tokenizer. null: off.")


DEFAULT_VERIFY_PROMPTS = [
    "What is 12 + 7? Answer with the number.",
    "Translate into English: 오늘 날씨가 정말 좋네요.",
    "Write a Python function that returns the square of a number.",
    "In one sentence, what is a prime number?",
]


class VerifyConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_VERIFY_PROMPTS), min_length=1,
                               description="Fixed user prompts the merged model and every GGUF are compared on.")
    new_tokens: int = Field(16, ge=0, description="Greedy tokens the 16-bit GGUF adds to each prompt; their "
                            "positions are compared too (the answer regime, not only the prompt).")
    max_kl: float = Field(0.02, gt=0, description="Bound on the mean KL(merged HF || 16-bit GGUF) in nats.")
    min_top1: float = Field(0.9, ge=0, le=1, description="Least top-1 agreement of the 16-bit GGUF with the merged model.")
    quant_max_kl: float = Field(1.0, gt=0, description="Bound on the mean KL of each quantized GGUF: catches a broken "
                                "file, not quantization loss (reported per type).")


SHARD_SIZE = re.compile(r"(\d+) ?([GMK]i?B)", re.IGNORECASE)
SHARD_UNITS = {unit.lower(): unit for unit in ("GB", "MB", "KB", "GiB", "MiB", "KiB")}  # 5gb is 5GB, never bits


class ExportConfig(Section):
    enabled: bool = Field(True, description="Merge, convert and quantize to GGUF in `distillery run`.")
    dtype: Literal["auto", "bf16", "fp16"] = Field("auto", description="Merged weights; auto: the base's own 16-bit type.")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard of the merged model: a whole number "
                                "and a unit (GB, MB, KB, GiB, MiB, KiB), e.g. 5GB.")
    outtype: Literal["f16", "bf16", "q8_0"] = Field("f16", description="What llama.cpp's converter writes; every "
                                                    "quantization starts from it.")
    quantizations: list[str] = Field(default_factory=lambda: ["q8_0", "q4_k_m"], min_length=1,
                                     description="GGUF types to write (q4_k_m, q5_k_m, q6_k, q8_0, f16, iq2_xxs, ...).")
    imatrix: UserPath | None = Field(None, description="llama-imatrix output (GGUF or .dat); required for i-quants.")
    keep_intermediate: bool = Field(False, description="Keep the converter's output even when not in quantizations.")
    model_name: str | None = Field(None, description="File name stem: <model_name>-<QUANT>.gguf, one plain file name "
                                   "(default: the base model's name).")
    min_free_disk_gb: float = Field(1.0, ge=0, description="Free disk to leave beyond what the export needs.")
    threads: int = Field(0, ge=0, description="CPU threads for quantizing and verifying; 0: all cores.")
    base_16bit: UserPath | None = Field(None, description="For a base published quantized (e.g. a bnb-4bit QLoRA base): "
                                   "its original 16-bit weights, a local directory or a Hub id in the local cache, "
                                   "which the adapter is merged into and checked against (default: the 16-bit names "
                                   "Unsloth maps the base to).")
    verify: VerifyConfig = Field(default_factory=VerifyConfig)

    @field_validator("model_name")
    @classmethod
    def _plain_file_stem(cls, name: str | None) -> str | None:
        if name is not None and not RUN_NAME.fullmatch(name):
            raise ValueError("the GGUF files' name stem is one plain file name: 1 to 100 letters, digits, '_', '.' or "
                             "'-', starting with a letter or digit (not a path or a Hub id: `Qwen2.5-7B-ko`, not "
                             "`Qwen/Qwen2.5-7B-ko`)")
        return name

    @field_validator("max_shard_size")
    @classmethod
    def _a_size(cls, size: str) -> str:
        """Read here as both writers read it (the streamed merge's parse_size and transformers' save_pretrained,
        which takes only a whole number and a unit): 'banana' failed mid-export as an unexpected error."""
        found = SHARD_SIZE.fullmatch(size.strip())
        if not found or int(found.group(1)) == 0:
            raise ValueError("a shard size is a whole number above 0 and a unit (GB, MB, KB, GiB, MiB or KiB), e.g. "
                             "5GB or 500MB")
        return found.group(1) + SHARD_UNITS[found.group(2).lower()]

    @field_validator("quantizations")
    @classmethod
    def _known_quants(cls, names: list[str]) -> list[str]:
        from distillery.export.gguf import parse_quant

        return list(dict.fromkeys(parse_quant(name).value for name in names))


class HeldoutConfig(Section):
    enabled: bool = Field(True, description="Score format's held-out split per task for every artifact.")
    limit: int | None = Field(500, ge=1, description="Held-out items per task whose loss is scored (all when unset).")
    generate: int | None = Field(50, ge=0, description="Of those, items per task also answered and scored by the "
                                 "task's metric (all when unset; 0: loss only).")
    max_new_tokens: int = Field(256, ge=1, le=1 << 20, description="The longest generated answer (at most 1,048,576).")
    samples: int = Field(1, ge=1, le=64, description="Answers per item: 1 is greedy; k > 1 (at most 64) samples at "
                         "`temperature` and reports pass@k for the tasks scored by correctness.")
    temperature: float = Field(0.6, ge=0.01, le=100, description="Sampling temperature when samples > 1.")
    top_p: float = Field(0.95, gt=0, le=1, description="When samples > 1, each token is drawn from the fewest most "
                         "likely tokens whose probability reaches this (1: all); the same rule for every artifact.")
    max_quant_loss_increase: float = Field(0.1, ge=0, description="A GGUF fails when its held-out loss on a task "
                                           "exceeds the merged model's (or the adapter's) by more than this share "
                                           "and by more than 0.01 nats a token.")
    max_quant_drop: float = Field(0.05, ge=0, description="A GGUF fails when a task's main metric (0-1; chrF/100) "
                                  "falls below the merged model's (or the adapter's) by more than this.")


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="Evaluate in `distillery run`.")
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    data: UserPath | None = Field("regisss/math_qa", description="MathQA: a local jsonl/json/csv/parquet file or a "
                                  "Hub dataset id; null: no MathQA, only the held-out data.")
    split: str = Field("test", description="Split of a Hub dataset to score.")
    limit: int | None = Field(None, ge=1, description="Score only the first N items (all when unset).")
    num_fewshot: int = Field(0, ge=0, description="Solved examples before each question (lm-eval's sampler, seed 1234).")
    fewshot_data: UserPath | None = Field(None, description="Where few-shot examples come from: a local file or Hub id; "
                                     "default: `data` (its fewshot_split for a Hub id).")
    fewshot_split: str = Field("train", description="Split of a Hub dataset the few-shot examples come from.")
    batch_size: int = Field(8, ge=1, description="MathQA items per forward pass (each item's 5 choices share its "
                            "context) and held-out answers generated at once (k samples of an item are k); held-out "
                            "loss batches are bounded by positions instead (rows of 512 holding shared prefixes once).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights of the HF artifacts; auto: bfloat16 on a CUDA GPU that has it, else float32.")
    artifacts: Literal["auto"] | list[Literal["base", "adapter", "merged", "gguf"]] = Field(
        "auto", description="What to score: auto = every artifact the run has; or a list of base, adapter, merged, gguf "
                            "(adapter: what finetune trained, the whole model for method: full, which auto then "
                            "scores once instead of again as merged).")
    mode: Literal["loglikelihood", "generative"] = Field(
        "loglikelihood", description="loglikelihood (lm-eval's scoring) or generative (<think> reasoning, then a letter).")
    max_new_tokens: int = Field(512, ge=1, le=1 << 20, description="Generative mode: the most tokens a reply may have (at most 1,048,576).")
    gguf_threads: int | None = Field(None, ge=1, description="llama.cpp threads (default: all cores).")

    @field_validator("artifacts")
    @classmethod
    def _some_artifact(cls, artifacts: Any) -> Any:
        if artifacts == "auto":
            return artifacts
        if not artifacts:
            raise ValueError("an empty list scores nothing: name at least one of base, adapter, merged, gguf, or use "
                             "auto (every artifact the run has)")
        return list(dict.fromkeys(artifacts))  # one named twice is scored once


def validate_hub_id(repo_id: str, what: str, example: str) -> None:
    """A ValueError saying `what` (and the Hub's reason) when `repo_id` is not an id the Hub takes."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} ({str(err).split(': ')[0]}): write it as {example}") from None


class PushConfig(Section):
    repo_id: str | None = Field(None, description="Hub repository, e.g. my-org/kanana-8b-ko-qa.")
    private: bool = Field(True, description="Create the repository private (the default) or public.")
    upload: list[Literal["merged", "gguf"]] = Field(default_factory=lambda: ["merged", "gguf"], min_length=1,
                                                    description="What to upload: the merged 16-bit model, the GGUFs.")
    gguf_types: list[str] | None = Field(None, description="Only these GGUF types, each one the export writes "
                                         "(default: every exported one).")
    license: str = Field("apache-2.0", description="License in the model card (a Hub license id: apache-2.0, mit, "
                         "llama3, other).")
    tags: list[str] = Field(default_factory=list, description="Extra model card tags.")
    datasets: list[str] = Field(default_factory=list, description="Extra Hub dataset ids for the model card.")
    commit_message: str = Field("Upload model from Distillery", description="The Hub commit message.")

    @field_validator("repo_id")
    @classmethod
    def _a_hub_repository_id(cls, repo_id: str | None) -> str | None:
        """Checked as the Hub checks it: a bad id failed only at the upload, told to check the network and token."""
        if repo_id is not None:
            validate_hub_id(repo_id, "not a Hugging Face Hub repository id", "your-name/model-name")
        return repo_id

    @field_validator("datasets")
    @classmethod
    def _hub_dataset_ids(cls, datasets: list[str]) -> list[str]:
        """Checked as the Hub checks repository ids: a bad one went into the card's front matter, refused only after
        the repository was created."""
        for dataset in datasets:
            validate_hub_id(dataset, f"{dataset[:80]!r} is not a Hugging Face Hub dataset id", "owner/name")
        return datasets

    @field_validator("tags")
    @classmethod
    def _card_tags(cls, tags: list[str]) -> list[str]:
        """A tag is one short line of the card's front matter: no line break or control character, 1-128 characters."""
        for tag in tags:
            if not 0 < len(tag) <= 128 or not tag.strip() or any(not c.isprintable() for c in tag):
                raise ValueError(f"{tag[:80]!r} is not a tag: a tag is 1 to 128 printable characters, on one line, not only "
                                 "spaces")
        return tags

    @field_validator("license")
    @classmethod
    def _a_hub_license_id(cls, license: str) -> str:
        """The card's front matter takes it as it is: a line break and '---' made it no license id."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", license):
            raise ValueError("a Hub license id is lowercase letters, digits, '.', '+' and '-', e.g. apache-2.0, mit, "
                             "llama3 or other (huggingface.co/docs/hub/repositories-licenses)")
        return license

    @field_validator("gguf_types")
    @classmethod
    def _known_gguf_types(cls, names: list[str] | None) -> list[str] | None:
        from distillery.export.gguf import parse_quant

        return None if names is None else list(dict.fromkeys(parse_quant(name).value for name in names))


class DistilleryConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig
    format: FormatConfig = Field(default_factory=FormatConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    push: PushConfig = Field(default_factory=PushConfig)

    @model_validator(mode="after")
    def _cross_stage_checks(self) -> "DistilleryConfig":
        """Settings of two stages that cannot go together, refused when the config loads: found by the later stage,
        they stopped a run after the earlier ones had worked for nothing."""
        if self.finetune.objective == "multiple_choice" and not any(
            getattr(s, "format", None) == "mathqa" for s in self.ingest.sources
        ):
            raise ValueError("finetune.objective=multiple_choice needs an ingest source with format: mathqa")
        if self.finetune.objective == "kd" and not (self.distill.enabled and self.distill.logprobs):
            raise ValueError("finetune.objective kd trains on the teacher's top-k log-probs, which only distill "
                             "writes: set distill.enabled: true and distill.logprobs: 20 (a teacher that shares the "
                             "student's tokenizer), or use objective: sft")
        if self.evaluate.enabled and not self.evaluate.heldout.enabled and self.evaluate.data is None:
            raise ValueError(f"evaluate would have nothing to score: {HELDOUT_OFF_NO_DATA}, or evaluate.enabled: false")
        return self

    @model_validator(mode="after")
    def _pushed_types_are_exported(self) -> "DistilleryConfig":
        exported = self.export.quantizations + ([self.export.outtype] if self.export.keep_intermediate else [])
        missing = [name for name in self.push.gguf_types or [] if name not in exported]
        if missing:
            raise ValueError(f"push.gguf_types: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                             f"written by the export (export.quantizations: {', '.join(self.export.quantizations)}); "
                             "add it to export.quantizations or drop it from push.gguf_types")
        return self


# Why evaluate has nothing to score when the held-out split is switched off (the config check and the stage's own).
HELDOUT_OFF_NO_DATA = ("evaluate.heldout.enabled is false and evaluate.data is not set. Set heldout.enabled: true "
                       "(the run's held-out split) or evaluate.data (MathQA)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`finetune.lora.r=8` -> (["finetune", "lora", "r"], 8); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set finetune.max_steps=20")
    key, value = text.split("=", 1)
    return key.strip().split("."), parse_yaml(value, f"--set {text}") if value.strip() else ""


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set a dotted key in the raw config; list items are addressed by index (ingest.sources.0.path)."""
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)] if is_index(key) and int(key) < len(node) else None
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if node is None:
            raise UserError(f"--set {'.'.join(keys)}: there is no {'.'.join(keys[: i + 1])} to set it in.")
    last = keys[-1]
    if not isinstance(node, (dict, list)):
        raise UserError(f"--set {'.'.join(keys)}: {'.'.join(keys[:-1])} is a value ({node!r}), not a section with "
                        f"keys: set {'.'.join(keys[:-1])}=VALUE itself.")
    if isinstance(node, list):
        if not (is_index(last) and int(last) < len(node)):
            raise UserError(f"--set {'.'.join(keys)}: index {last} is out of range.")
        node[int(last)] = value
    else:
        node[last] = value


def is_index(key: str) -> bool:
    """ASCII digits only: str.isdigit() is also true of "²" (int() refuses it) and "٠" (int() reads it as 0)."""
    return key.isascii() and key.isdigit()


def format_validation_error(path: Path, err: ValidationError) -> str:
    """One line per problem: the dotted key, what was wrong, what was expected."""
    lines = [f"{path}: the config is not valid:"]
    for problem in err.errors():
        loc = ".".join(str(part) for part in problem["loc"] if not str(part).startswith("function-after"))
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; docs/config.md lists the keys of each section)")
        else:
            got = problem.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {shortened(got)})"
            lines.append(f"  {loc or '<top>'}: {problem['msg']}{shown}{quoting_hint(problem)}")
    return "\n".join(lines)


def shortened(value: Any, limit: int = 120) -> str:
    """repr(value), a long text cut to its first `limit` characters and its length."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def quoting_hint(problem: dict[str, Any]) -> str:
    """YAML reads 0777, 2024-01-01, yes and 12:30 as a number, a date, true and 750: where text was expected,
    say how to write it as text."""
    got = problem.get("input")
    if problem["type"] != "string_type" or isinstance(got, (dict, list, type(None))):
        return ""
    return "; YAML read it as a number, a date or true/false: quote it to keep it text, e.g. name: \"0777\""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DistilleryConfig:
    """Read, override and validate a YAML config; every problem is a UserError naming the key."""
    path = Path(path)
    require_file(path, "config file", config_hint(path), pipe=True)
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (run, model, ingest, ...).")
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return DistilleryConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(path, err)) from None


def config_hint(path: Path) -> str:
    """Where to find a config: a YAML file inside the directory given, else the presets."""
    inside = sorted(path.glob("*.yaml")) if path.is_dir() else []
    if inside:
        return f"Pass one YAML file in it, e.g. -c {inside[0]}."
    return "Presets are in configs/, e.g. configs/demo.yaml."


def redact(data: Any) -> Any:
    """A copy of a config dump with every secret-looking value replaced, for saving and printing."""
    if isinstance(data, dict):
        return {k: "***" if SECRET_KEYS.search(str(k)) and v else redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
