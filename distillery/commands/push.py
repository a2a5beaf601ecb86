"""`distillery push`: the exported model to the Hugging Face Hub, with a generated model card.

1. check the export stage finished, list what would be uploaded (merged/ files and/or GGUFs + Modelfiles,
   with sizes; only the GGUFs export's summary.json lists, each the file verify.json recorded as passed) and
   render the model card (README.md: front matter base_model, datasets, license, tags; the
   training summary from finetune's summary.json; evaluate's held-out table, with each GGUF's check, and MathQA
   comparison.md, and how many training records ingest dropped as contaminated; how to run it with llama.cpp
   and Ollama);
2. write the card and the plan to runs/<name>/push/ and print the plan;
3. unless --dry-run: create the repository (private by default) and upload everything in one commit. The
   token comes only from HF_TOKEN (environment or .env) and is never printed or written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator


from distillery.config import DistilleryConfig
from distillery.core.console import markdown_table, printable, summary_table
from distillery.core.summaries import read_finetune_summary
from distillery.core.errors import UserError
from distillery.core.models import bundled_name
from distillery.core.rundir import RunDir, atomic_write_text, describe_outputs
from distillery.runner import first_out_of_date
from distillery.stage import artifact

log = logging.getLogger(__name__)

OUTPUTS = {"card": "README.md", "plan": "upload_plan.json"}  # in runs/<name>/push/

# Hub ids of the bundled models (what model.path: bundled:<name> was made from).
BUNDLED_HUB_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_base_model(model_path: str) -> str | None:
    """The base model's Hub id for the card, or None when it is only a local directory."""
    name = bundled_name(model_path)
    if name:
        return BUNDLED_HUB_IDS.get(name)
    if Path(model_path).expanduser().exists() or model_path.count("/") != 1:
        return None
    return model_path


def card_datasets(cfg: DistilleryConfig, run: RunDir) -> list[str]:
    """Hub datasets the run trained on (hf sources with a dataset id, as its ingest recorded them: the config may
    have changed since) plus push.datasets."""
    recorded = ((run.stage_entry("ingest") or {}).get("inputs", {}).get("config", {}).get("ingest", {})
                .get("sources"))
    sources = recorded if isinstance(recorded, list) else [s.model_dump() for s in cfg.ingest.sources]
    found = [source.get("dataset") for source in sources if isinstance(source, dict)]
    return list(dict.fromkeys([d for d in found if isinstance(d, str) and d] + cfg.push.datasets))


def export_dir(run: RunDir) -> Path:
    entry = run.stage_entry("export")
    directory = run.stage_dir("export")
    if not entry or entry.get("status") != "complete" or not directory.is_dir():
        raise UserError(f"nothing to push: the export stage has not finished in {run.path}. Run `distillery export` "
                        "(just export-gguf) first.")
    if "attempt" in entry:  # the files are an earlier export's, the config may be another's
        attempt = entry["attempt"]
        raise UserError(f"the last export in {run.path} did not finish ({attempt['status']}"
                        f"{': ' + attempt['error'] if attempt.get('error') else ''}): run `distillery export` (just "
                        "export-gguf) first, which finishes it or finds the files up to date for this config, then "
                        "push.")
    changed = changed_since_export(run, entry, directory)
    if changed:
        raise UserError(f"{directory / changed[0]} is not as the export left it ({len(changed)} of its files changed, "
                        f"went or came since, by {run.manifest_path}): what was verified is not what would be "
                        "uploaded. Run `distillery export` (just export-gguf) to redo the export, then push.")
    return directory


def changed_since_export(run: RunDir, entry: dict[str, Any], directory: Path) -> list[str]:
    """The export's files (relative paths) that changed or went since it finished, and those that came since
    (a file dropped into merged/ would be uploaded with it), by the manifest's record of its outputs."""
    listed = entry.get("outputs") or {}
    present = (str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file())
    return run.changed_outputs("export", entry) + ([rel for rel in present if rel not in listed] if listed else [])


def refuse_stale_export(cfg: DistilleryConfig, run: RunDir) -> None:
    """The export must be the one this config makes: a config changed since (another learning rate, other data)
    would otherwise get a card of its settings on a model trained with the old ones."""
    stale = first_out_of_date("export", cfg)
    if stale:
        raise UserError(f"the export in {run.path} is not the one this config makes: `distillery export` would run "
                        f"{stale} again (its settings, its input files or what came before it changed since). Run "
                        "`distillery export` (just export-gguf) first, then push; or push with the config it was "
                        "made with. Nothing was uploaded.")


def upload_plan(cfg: DistilleryConfig, run: RunDir) -> list[dict[str, Any]]:
    """Files to upload: {path (local), path_in_repo, bytes}, the card excluded."""
    plan = []
    if "merged" in cfg.push.upload:
        merged = artifact(run, "export", "merged")
        plan += [{"path": str(p), "path_in_repo": str(p.relative_to(merged)), "bytes": p.stat().st_size}
                 for p in sorted(merged.rglob("*")) if p.is_file()]
    if "gguf" in cfg.push.upload:
        for path in selected_ggufs(cfg, verified_ggufs(run)):
            plan.append({"path": str(path), "path_in_repo": path.name, "bytes": path.stat().st_size})
            modelfile = path.with_suffix(".Modelfile")
            if modelfile.is_file():
                plan.append({"path": str(modelfile), "path_in_repo": modelfile.name,
                             "bytes": modelfile.stat().st_size})
    if not plan:
        raise UserError(f"nothing to push from {run.stage_dir('export')}: push.upload={cfg.push.upload} and "
                        f"push.gguf_types={cfg.push.gguf_types} select no file.")
    return plan


def verified_ggufs(run: RunDir) -> dict[str, Path]:
    """{type: GGUF} as export's summary.json lists them, each the file the export verified (its verify.json entry
    passed, with this size). Other files in gguf/ (left by an earlier export) are never uploaded."""
    summary_path, verify_path = artifact(run, "export", "summary"), artifact(run, "export", "verify")
    summary, results = _read_json(summary_path), _read_json(verify_path).get("gguf") or {}
    if summary.get("passed") is not True:
        raise UserError(f"nothing to push: {summary_path} does not record an export that passed verification. Run "
                        "`distillery export --force` (just export-gguf --force).")
    with written_by_its_stage(summary_path):
        files = {str(quant): str(name) for quant, name in (summary.get("files") or {}).items()}
    found = {}
    for quant, name in files.items():
        path = artifact(run, "export", "gguf") / Path(name).name  # a name, never a path out of gguf/
        with written_by_its_stage(verify_path):
            result = dict(results.get(quant) or {})
        if not result.get("passed") or not path.is_file() or path.stat().st_size != result.get("bytes"):
            raise UserError(f"{path} is not the GGUF the export verified (it is missing, or {verify_path} does not "
                            "record it as passed with its size): it changed after the export. Run `distillery "
                            "export --force` (just export-gguf --force) to make and verify it again.")
        found[quant] = path
    return found


def selected_ggufs(cfg: DistilleryConfig, verified: dict[str, Path]) -> list[Path]:
    """The verified GGUFs push.gguf_types asks for (all of them by default); a type the export did not write is
    a UserError."""
    wanted = cfg.push.gguf_types or list(verified)
    missing = [quant for quant in wanted if quant not in verified]
    if missing:
        raise UserError(f"push.gguf_types: {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not "
                        f"exported in this run (it has {', '.join(verified) or 'no GGUF'}): run `distillery export` "
                        "with it in export.quantizations, or drop it from push.gguf_types.")
    return sorted(verified[quant] for quant in wanted)


def _read_json(path: Path) -> dict[str, Any]:
    """A stage's JSON file as a dict ({} when there is none); one edited or cut short is the user's to redo."""
    if not path.is_file():
        return {}
    with written_by_its_stage(path):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return data


@contextlib.contextmanager
def written_by_its_stage(path: Path) -> Iterator[None]:
    """What reading or using a run's file raises when it is not what its stage wrote (edited by hand, cut short by a
    full disk), as a UserError naming it and the stage that writes it again."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:  # UnicodeDecodeError: a ValueError
        stage = path.parent.name
        raise UserError(f"{path} is not what `distillery {stage}` writes ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''}): it was edited or cut short. Run "
                        f"`distillery {stage} --force` to write it again.") from None


def card_data(cfg: DistilleryConfig, run: RunDir, finetune: dict[str, Any], plan: list[dict[str, Any]]) -> Any:
    """The card's front matter (huggingface_hub's ModelCardData): base model, datasets, license, tags."""
    from huggingface_hub import ModelCardData

    ggufs = any(p["path_in_repo"].endswith(".gguf") for p in plan)
    method = "full-finetune" if finetune.get("method") == "full" else "lora"
    tags = ["distillery", method, finetune.get("backend", "peft")] + (["gguf", "llama.cpp"] if ggufs else [])
    return ModelCardData(
        base_model=hub_base_model(str(finetune.get("model_path") or cfg.model.path)),
        datasets=card_datasets(cfg, run) or None, license=cfg.push.license, tags=list(dict.fromkeys(tags + cfg.push.tags)),
        library_name="transformers" if any(p["path_in_repo"] == "config.json" for p in plan) else None)


def training_section(finetune: dict[str, Any]) -> list[str]:
    keys = ("method", "backend", "device", "template", "objective", "max_length", "train_examples", "steps", "load_in_4bit",
            "precision", "optimizer", "first_loss", "last_loss", "train_loss", "tokens_per_s", "train_seconds")
    rows = [(k, finetune[k]) for k in keys if k in finetune]
    if finetune.get("lora"):
        rows.append(("lora", ", ".join(f"{k}={v}" for k, v in finetune["lora"].items() if not isinstance(v, list))))
    return ["## Training", "", *(markdown_table(("setting", "value"), rows) if rows else
                                 ["No finetune summary was found."])]


def decontamination_line(run: RunDir) -> str:
    """How many training records were dropped for overlapping an evaluation set, and which sets were checked
    (from ingest's report)."""
    report = artifact(run, "ingest", "report")
    with written_by_its_stage(report):
        return decontamination_sentence(_read_json(report).get("decontamination"))


def decontamination_sentence(summary: Any) -> str:
    if not summary or not summary.get("enabled"):
        return "The training data was not checked for overlap with the evaluation sets."
    sets = ", ".join(f"{s['set']} ({s['items']} items)" for s in summary["sets"])
    found = "; ".join(f"{n} against {name}" for name, n in summary["contaminated"].items())
    done = "dropped before training" if summary["action"] == "drop" else "found and kept in training"
    line = (f"Decontamination: training records that overlap an evaluation set, {done}: {summary['total']}"
            f"{f' ({found})' if found else ''}. Checked against {sets}, by {summary['word_ngram']}-word and "
            f"{summary['char_ngram']}-character (Hangul) n-grams.")
    return line + "".join(f" Not checked: {reason}." for reason in summary["not_checked"])


def evaluation_table(cfg: DistilleryConfig, run: RunDir) -> str:
    """evaluate's held-out table (with each GGUF's check against the merged model) and MathQA comparison.md, when
    that evaluation is the one this config makes, of this export, as evaluate left it; else why the card has none (a
    comparison.md dropped into evaluate/, or an older evaluation of another model, went into the card as the model's
    scores)."""
    comparison = artifact(run, "evaluate", "comparison_md")
    entry = run.stage_entry("evaluate") or {}
    if entry.get("status") != "complete" or "attempt" in entry:
        return "Not evaluated yet (`distillery evaluate` writes the tables this section shows)."
    if run.changed_outputs("evaluate", entry) or first_out_of_date("evaluate", cfg):
        return ("Not evaluated for this export and config (the last evaluation is of another one, or its files "
                "changed since): `distillery evaluate` writes the tables this section shows.")
    recorded = entry.get("outputs", {})  # files evaluate wrote (changed_outputs checked them): not one dropped in since
    parts = heldout_table(cfg, run) if artifact(run, "evaluate", "heldout").name in recorded else []
    if comparison.name in recorded:
        with written_by_its_stage(comparison):
            parts.append(comparison.read_text(encoding="utf-8").strip())
    return "\n\n".join(parts) or "Not evaluated yet (`distillery evaluate` writes the tables this section shows)."


def heldout_table(cfg: DistilleryConfig, run: RunDir) -> list[str]:
    """The held-out table as evaluate's report shows it (one level down, no chart), or nothing without one."""
    from distillery.evals.report import render_heldout_markdown

    path = artifact(run, "evaluate", "heldout")
    scored = _read_json(path)
    if not scored:
        return []
    reference = _read_json(artifact(run, "evaluate", "results")).get("heldout", {}).get("reference")
    bounds = {"loss": cfg.evaluate.heldout.max_quant_loss_increase, "drop": cfg.evaluate.heldout.max_quant_drop}
    with written_by_its_stage(path):
        return ["\n".join(render_heldout_markdown(scored, reference, bounds, heading="###", chart=""))]


def evaluation_section(cfg: DistilleryConfig, run: RunDir, ggufs: list[str]) -> list[str]:
    verify_path = artifact(run, "export", "verify")
    lines = ["## Evaluation", "", evaluation_table(cfg, run), "", decontamination_line(run)]
    verify = _read_json(verify_path)
    if verify.get("gguf"):
        with written_by_its_stage(verify_path):
            rows = [(r["file"], f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4g}") for r in verify["gguf"].values()
                    if r["file"] in ggufs]
        lines += ["", "Every GGUF was checked against the exported 16-bit model on fixed prompts (KL in nats):", "",
                  *markdown_table(("file", "top-1 agreement", "mean KL"), rows)]
    return lines


def usage_section(repo_id: str, ggufs: list[str], transformers: bool) -> list[str]:
    """How to run the files: llama.cpp, llama-cpp-python and Ollama for GGUFs, transformers for the merged model."""
    lines = []
    if ggufs:
        first = next((g for g in ggufs if "Q4_K_M" in g), ggufs[0])
        model, name = first.removesuffix(".gguf"), repo_id.split("/")[-1].lower()
        lines += ["## Run it with llama.cpp", "", "```bash",
                  f"huggingface-cli download {repo_id} {first} --local-dir .",
                  f"llama-cli -m {first} -cnv   # the chat template is stored in the GGUF", "```", "",
                  "or from Python with llama-cpp-python:", "", "```python", "from llama_cpp import Llama",
                  f'llm = Llama.from_pretrained("{repo_id}", filename="{first}")',
                  'print(llm.create_chat_completion([{"role": "user", "content": "Hello!"}])'
                  '["choices"][0]["message"]["content"])', "```", "",
                  "## Run it with Ollama", "", "```bash",
                  f"huggingface-cli download {repo_id} {first} {model}.Modelfile --local-dir .",
                  f"ollama create {name} -f {model}.Modelfile", f"ollama run {name}", "```", ""]
    if transformers:
        lines += ["## Run it with transformers", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    return lines


def build_card(cfg: DistilleryConfig, plan: list[dict[str, Any]], repo_id: str) -> str:
    """README.md for the Hub (huggingface_hub's ModelCard): front matter, training, evaluation, files, usage."""
    from huggingface_hub import ModelCard

    run = RunDir(cfg.run.root, cfg.run.name)
    summary_path = artifact(run, "finetune", "summary")
    finetune = read_finetune_summary(summary_path).model_dump() if summary_path.is_file() else {}
    data = card_data(cfg, run, finetune, plan)
    base = data.base_model
    ggufs = [p["path_in_repo"] for p in plan if p["path_in_repo"].endswith(".gguf")]
    of = f"[{base}](https://huggingface.co/{base})" if base else cfg.model.path
    intro = (f"A full fine-tune of {of} made with Distillery (every weight trained), saved in 16-bit weights"
             if finetune.get("method") == "full" else
             f"A LoRA fine-tune of {of} made with Distillery, merged into the base model's 16-bit weights")
    intro += " and converted to GGUF with llama.cpp." if ggufs else "."
    body = [f"# {repo_id.split('/')[-1]}", "", intro, "", *training_section(finetune), "",
            *evaluation_section(cfg, run, ggufs), "", "## Files", "",
            *[f"- `{p['path_in_repo']}` ({p['bytes'] / 2**20:.1f} MiB)" for p in plan], "",
            *usage_section(repo_id, ggufs, bool(data.library_name))]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"))


def print_plan(console, plan: list[dict[str, Any]], card_path: Path, repo_id: str) -> None:
    rows = [(p["path_in_repo"], f"{p['bytes'] / 2**20:.2f} MiB", p["path"]) for p in plan]
    total = sum(p["bytes"] for p in plan)
    console.print(summary_table(f"upload to {repo_id}: {len(plan)} files, {total / 2**20:.1f} MiB", rows,
                                ("in the repository", "size", "from")))
    console.print(printable(f"model card: {card_path}"))


def push(cfg: DistilleryConfig, console, dry_run: bool = False) -> dict[str, Any]:
    """Plan, write the card, and (unless dry_run) upload. Returns the plan and what happened. The run is held as a
    stage command holds it: push records itself in the manifest, and a re-export would swap the files it uploads."""
    run = RunDir(cfg.run.root, cfg.run.name)
    with run.exclusive():
        return push_held(cfg, run, console, dry_run)


def push_held(cfg: DistilleryConfig, run: RunDir, console, dry_run: bool) -> dict[str, Any]:
    export_dir(run)
    refuse_stale_export(cfg, run)
    repo_id = cfg.push.repo_id or "<push.repo_id>"
    plan = upload_plan(cfg, run)
    push_dir = run.real_subdir("push")  # never written through a link into a folder of the user's
    out = {key: push_dir / name for key, name in OUTPUTS.items()}
    atomic_write_text(out["card"], build_card(cfg, plan, repo_id))
    plan_with_card = plan + [{"path": str(out["card"]), "path_in_repo": "README.md",
                              "bytes": out["card"].stat().st_size}]
    atomic_write_text(out["plan"], json.dumps(
        {"repo_id": cfg.push.repo_id, "private": cfg.push.private, "files": plan_with_card}, indent=2) + "\n")
    print_plan(console, plan_with_card, out["card"], repo_id)
    record(run, cfg, uploaded=False)
    if dry_run:
        console.print("[yellow]dry run[/]: nothing was uploaded.")
        return {"uploaded": False, "files": plan_with_card}
    if not cfg.push.repo_id:
        raise UserError("push.repo_id is not set: add `push: {repo_id: you/name}` to the config or pass "
                        "--set push.repo_id=you/name. Nothing was uploaded.")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN in the environment or in .env (a write token from "
                        "huggingface.co/settings/tokens). Nothing was uploaded; the list above is what would be.")
    upload(cfg, token, plan_with_card)
    record(run, cfg, uploaded=True)
    console.print(f"[green]pushed[/] {len(plan_with_card)} files to https://huggingface.co/{cfg.push.repo_id}"
                  f" ({'private' if cfg.push.private else 'public'})")
    return {"uploaded": True, "files": plan_with_card}


def record(run: RunDir, cfg: DistilleryConfig, uploaded: bool) -> None:
    """push's entry in the run's manifest: what it wrote, and whether it reached the Hub."""
    run.update_stage("push", {"status": "complete" if uploaded else "planned", "repo_id": cfg.push.repo_id,
                              "uploaded": uploaded, "outputs": describe_outputs(run.stage_dir("push")),
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def upload(cfg: DistilleryConfig, token: str, plan: list[dict[str, Any]]) -> None:
    """create_repo (private by default) + one commit with every file; any failure is a UserError without the token."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=cfg.push.repo_id, repo_type="model", private=cfg.push.private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=p["path_in_repo"], path_or_fileobj=p["path"]) for p in plan]
        api.create_commit(repo_id=cfg.push.repo_id, repo_type="model", operations=operations,
                          commit_message=cfg.push.commit_message)
    except Exception as err:  # network, auth, permissions: all end the same way for the user
        detail = (str(err).splitlines() or [""])[0].replace(token, "***")
        raise UserError(f"could not push to {cfg.push.repo_id}: {type(err).__name__}: {detail}. Check the network, "
                        "that HF_TOKEN is a write token, and the repository name. Nothing was uploaded; "
                        "`distillery push --dry-run` lists the files.") from None
