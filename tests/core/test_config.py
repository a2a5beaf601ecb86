"""Config schema: presets validate, unknown keys and wrong types name the key, --set overrides re-validate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from distillery.config import DistilleryConfig, load_config, redact
from distillery.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MINIMAL = {"ingest": {"sources": [{"name": "a", "kind": "hf", "files": "a.jsonl", "format": "messages"}]}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, DistilleryConfig)
    assert cfg.ingest.sources


def test_presets_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "r1-distill-qwen-32b-ko.yaml", "kanana-8b-ko-qa.yaml", "qwen2.5-mathqa.yaml",
            "low-memory.yaml"} <= names


def test_kanana_preset_has_the_seed_settings() -> None:
    cfg = load_config(ROOT / "configs" / "kanana-8b-ko-qa.yaml")
    assert (cfg.finetune.lora.r, cfg.finetune.lora.alpha, cfg.finetune.lora.dropout) == (64, 128, 0.05)
    assert len(cfg.finetune.lora.target_modules) == 7
    assert cfg.format.template == "ko_qa" and cfg.format.max_length == 1024
    assert (cfg.finetune.batch_size, cfg.finetune.gradient_accumulation_steps) == (4, 8)
    assert cfg.finetune.precision == "bf16" and cfg.finetune.learning_rate == 2e-4


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    data = {**MINIMAL, "finetune": {"lora": {"rank": 8}}}
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, data))
    assert "finetune.lora.rank: unknown key" in str(err.value)


def test_wrong_type_names_key_and_expectation(tmp_path: Path) -> None:
    data = {**MINIMAL, "finetune": {"batch_size": "four"}}
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, data))
    assert "finetune.batch_size" in str(err.value) and "integer" in str(err.value) and "'four'" in str(err.value)


def test_unknown_source_kind_and_template(tmp_path: Path) -> None:
    data = {"ingest": {"sources": [{"name": "a", "kind": "excel", "path": "x"}]}, "format": {"template": "vicuna"}}
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, data))
    text = str(err.value)
    assert "ingest.sources.0" in text and "aihub_excel" in text
    assert "format.template" in text and "'vicuna'" in text


def test_set_overrides_revalidate(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["finetune.lora.r=8", "ingest.sources.0.max_records=5", "run.name=x"])
    assert cfg.finetune.lora.r == 8 and cfg.ingest.sources[0].max_records == 5 and cfg.run.name == "x"
    with pytest.raises(UserError, match="finetune.max_steps"):
        load_config(path, ["finetune.max_steps=lots"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(path, ["finetune.max_steps"])
    with pytest.raises(UserError, match="index 3 is out of range"):
        load_config(path, ["ingest.sources.3=1"])
    with pytest.raises(UserError, match="index ² is out of range"):  # int("²") raised a ValueError: exit 1
        load_config(path, ["ingest.sources.²=1"])
    with pytest.raises(UserError, match="there is no ingest.sources.٠ to set it in"):  # int("٠") is 0
        load_config(path, ["ingest.sources.٠.max_records=5"])


def test_duplicate_source_names_rejected(tmp_path: Path) -> None:
    source = MINIMAL["ingest"]["sources"][0]
    with pytest.raises(UserError, match="repeated: a"):
        load_config(write(tmp_path, {"ingest": {"sources": [source, source]}}))


def test_missing_config_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_redact_hides_secrets_only() -> None:
    dump = {"push": {"hf_token": "hf_abc", "repo": "me/x"},
            "teacher": {"api_key": "sk-1", "api_key_env": "OPENAI_API_KEY", "url": "http://h", "max_tokens": 256}}
    assert redact(dump) == {"push": {"hf_token": "***", "repo": "me/x"},
                            "teacher": {"api_key": "***", "api_key_env": "OPENAI_API_KEY", "url": "http://h",
                                        "max_tokens": 256}}


@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", ".hidden", "-x", "x" * 101, ""])
def test_a_run_name_is_one_plain_directory_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="run.name: .*one plain directory name"):
        load_config(write(tmp_path, MINIMAL), [f"run.name={name}"] if name else ["run.name=''"])


def test_run_names_that_are_plain_directory_names_pass(tmp_path: Path) -> None:
    for name in ("demo", "qwen2.5-mathqa", "r1_32b.v2", "x" * 100):
        assert load_config(write(tmp_path, MINIMAL), [f"run.name={name}"]).run.name == name


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B-ko", "../x", "..", ".hidden", "a b"])
def test_the_gguf_name_stem_is_one_plain_file_name(tmp_path: Path, name: str) -> None:
    """export.model_name names <stem>-<QUANT>.gguf in the run's gguf/: a path there wrote the GGUFs elsewhere (or
    into a folder the converter could not open)."""
    with pytest.raises(UserError, match="export.model_name: .*one plain file name"):
        load_config(write(tmp_path, MINIMAL), [f"export.model_name={name}"])
    assert load_config(write(tmp_path, MINIMAL), ["export.model_name=Qwen2.5-7B-ko"]).export.model_name == "Qwen2.5-7B-ko"


def test_evaluate_artifacts_name_at_least_one_each_once(tmp_path: Path) -> None:
    """An empty list was accepted and evaluate ended with 'no artifact could be scored: ' and no reason."""
    with pytest.raises(UserError, match="evaluate.artifacts: .*an empty list scores nothing: name at least one of "
                                        "base, adapter, merged, gguf, or use auto"):
        load_config(write(tmp_path, MINIMAL), ["evaluate.artifacts=[]"])
    cfg = load_config(write(tmp_path, MINIMAL), ["evaluate.artifacts=[base, gguf, base]"])
    assert cfg.evaluate.artifacts == ["base", "gguf"]
    assert load_config(write(tmp_path, MINIMAL)).evaluate.artifacts == "auto"


def test_push_gguf_types_are_known_types_the_export_writes(tmp_path: Path) -> None:
    """A typo or a type the export does not write selected nothing to push (or failed at upload time)."""
    with pytest.raises(UserError, match="push.gguf_types: .*unknown GGUF quant type 'q4_km'; valid: "):
        load_config(write(tmp_path, MINIMAL), ["push.gguf_types=[q4_km]"])
    with pytest.raises(UserError, match=r"push.gguf_types: q5_k_m is not written by the export \(export.quantizations: "
                                        "q8_0, q4_k_m\); add it to export.quantizations"):
        load_config(write(tmp_path, MINIMAL), ["push.gguf_types=[q5_k_m]"])
    assert load_config(write(tmp_path, MINIMAL), ["push.gguf_types=[Q4_K_M, q8_0]"]).push.gguf_types == ["q4_k_m", "q8_0"]
    kept = load_config(write(tmp_path, MINIMAL), ["push.gguf_types=[f16]", "export.keep_intermediate=true"])
    assert kept.push.gguf_types == ["f16"]


def test_paths_in_the_config_expand_the_home_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(write(tmp_path, {**MINIMAL, "run": {"root": "~/runs"}, "model": {"path": "~/models/m"},
                                       "export": {"imatrix": "~/i.dat"}, "evaluate": {"data": "~/mathqa.jsonl"},
                                       "finetune": {"accelerate_config": "~/ddp.yaml"},
                                       "distill": {"teacher": {"kind": "hf", "path": "~/teacher"}}}))
    assert cfg.run.root == str(tmp_path / "runs") and cfg.model.path == str(tmp_path / "models/m")
    assert cfg.distill.teacher.path == str(tmp_path / "teacher")
    assert cfg.export.imatrix == str(tmp_path / "i.dat") and cfg.evaluate.data == str(tmp_path / "mathqa.jsonl")
    assert cfg.finetune.accelerate_config == str(tmp_path / "ddp.yaml")
    assert load_config(write(tmp_path, MINIMAL)).model.path == "bundled:SmolLM2-135M-Instruct"  # not a path: as is


def test_an_hf_teacher_s_model_files_are_checked_and_named_by_its_setting(tmp_path: Path, monkeypatch) -> None:
    from distillery.stages.distill import build_teacher

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{", encoding="utf-8")
    cfg = load_config(write(tmp_path, {**MINIMAL, "distill": {"teacher": {"kind": "hf", "path": "~/teacher"}}}))
    with pytest.raises(UserError, match=r"distill.teacher.path: .*teacher/config.json is not valid JSON"):
        build_teacher(cfg.distill.teacher, retries=0)


def test_an_accelerate_config_that_is_a_loop_of_symbolic_links_is_named_as_one(tmp_path: Path) -> None:
    from distillery.training.preflight import check_accelerate_config

    (tmp_path / "ddp.yaml").symlink_to(tmp_path / "ddp.yaml")
    with pytest.raises(UserError, match=r"finetune.accelerate_config: .*ddp.yaml is a loop of symbolic links"):
        check_accelerate_config(str(tmp_path / "ddp.yaml"), cuda=False)


@pytest.mark.parametrize("root, message", [("r\0x", "holds a null byte, which no path can"),
                                           ("runs/" + "y" * 256, "has a name longer than 255 bytes")])
def test_a_run_root_no_file_system_takes_is_named_in_the_config(tmp_path: Path, root: str, message: str) -> None:
    """Both were an 'unexpected' error (exit 1), the null byte one whose report failed too."""
    with pytest.raises(UserError, match=f"run.root: Value error, {message}"):
        load_config(write(tmp_path, {**MINIMAL, "run": {"root": root}}))


@pytest.mark.parametrize("root", ["a-file", "a-file/runs"])
def test_a_run_root_that_is_or_lies_in_a_file_is_refused(tmp_path: Path, root: str) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="run.root: .*a-file is a file, not a directory"):
        load_config(write(tmp_path, MINIMAL), [f"run.root={tmp_path / root}"])


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("run: {name: a}\ningest:\n  sources: [{name: a, kind: hf, files: a.jsonl, format: messages}]\n"
                    "run: {name: b}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"found the key 'run' a second time \(first on line 1\)[\s\S]*line 4"):
        load_config(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("defaults: &d {name: a, kind: hf, files: a.jsonl, format: messages}\n"
                    "ingest:\n  sources:\n    - <<: *d\n      name: b\n", encoding="utf-8")
    with pytest.raises(UserError, match="defaults: unknown key"):  # the anchor's own key; the merge itself is fine
        load_config(path)


def test_yaml_aliases_that_repeat_megabytes_are_refused_and_a_few_are_fine(tmp_path: Path) -> None:
    """1,000 aliases of a 100 KB string: a 106 KB config that wrote a 100 MB config.yaml (70 s); nested
    "billion laughs" too. The usual anchors (a source's defaults merged into others) still load."""
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump(MINIMAL) + 'push: {tags: [&s "' + "A" * 100_000 + '"' + ", *s" * 1000 + "]}\n")
    with pytest.raises(UserError, match=r"flat.yaml: not valid YAML: its aliases \(\*name\) repeat more than 1 MB"):
        load_config(flat)
    laughs = ["a0: &a0 [" + ", ".join(['"lol"'] * 10) + "]"]
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump(MINIMAL) + "\n".join(laughs) + "\n")
    with pytest.raises(UserError, match="repeat more than 1 MB"):
        load_config(nested)
    merged = tmp_path / "merged.yaml"
    merged.write_text("run: {name: m}\ningest:\n  sources:\n    - &a {name: a, kind: hf, files: a.jsonl, format: messages}\n"
                      "    - {<<: *a, name: b}\n    - {<<: *a, name: c}\n")
    assert [s.name for s in load_config(merged).ingest.sources] == ["a", "b", "c"]


def test_yaml_nested_without_end_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("ingest: " + "[" * 20000, encoding="utf-8")
    with pytest.raises(UserError, match=r"deep.yaml: not valid YAML: nested more than 100 levels"):
        load_config(path)
    with pytest.raises(UserError, match=r"--set finetune.lora.r=\[\[.*nested more than 100 levels"):
        load_config(write(tmp_path, MINIMAL), ["finetune.lora.r=" + "[" * 20000])


def test_a_config_that_is_not_utf8_says_to_save_it_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "utf16.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-16")
    with pytest.raises(UserError, match=r"utf16.yaml is not UTF-8 text .* looks like UTF-16 .* Save it as UTF-8"):
        load_config(path)
    bom = tmp_path / "bom.yaml"
    bom.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8-sig")  # UTF-8 with a byte order mark is UTF-8
    assert load_config(bom).ingest.sources[0].name == "a"


def test_a_directory_given_as_the_config_is_named_as_one(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL)
    with pytest.raises(UserError, match=r"is a directory, not a file\. Pass one YAML file in it, e.g\. -c .*config.yaml"):
        load_config(tmp_path)


def test_a_bad_set_value_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--set finetune.lora.r=\[1: not valid YAML"):
        load_config(write(tmp_path, MINIMAL), ["finetune.lora.r=[1"])


@pytest.mark.parametrize("override, named", [
    ("export.verify.max_kl=.inf", "export.verify.max_kl"), ("export.min_free_disk_gb=.inf", "export.min_free_disk_gb"),
    ("finetune.learning_rate=.nan", "finetune.learning_rate"),
    ("ingest.sources.0.weight=.inf", "ingest.sources.0.hf.weight")])
def test_an_infinite_or_nan_setting_is_refused_naming_it(tmp_path: Path, override: str, named: str) -> None:
    """.inf passed where only a lower bound is checked: max_kl .inf switched the GGUF check off without a word,
    min_free_disk_gb .inf failed every export's disk check."""
    with pytest.raises(UserError, match=rf"{re.escape(named)}: Input should be a finite number"):
        load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("override", ["run.name.x=1", "finetune.lora.r.alpha=8"])
def test_a_set_key_inside_a_value_names_the_value(tmp_path: Path, override: str) -> None:
    """A key set inside a plain value (run.name is a string) was a TypeError: an 'unexpected error', exit 1."""
    parent = override.split("=")[0].rsplit(".", 1)[0]
    with pytest.raises(UserError, match=rf"--set {override.split('=')[0]}: {parent} is a value .*not a section"):
        load_config(write(tmp_path, {**MINIMAL, "run": {"name": "x"}, "finetune": {"lora": {"r": 8}}}), [override])


@pytest.mark.parametrize("size", ["banana", "0GB", "0.5GB", "-1GB", "100", "5 GBs"])
def test_a_shard_size_that_no_writer_reads_is_refused_at_load(tmp_path: Path, size: str) -> None:
    """export.max_shard_size: 'banana' passed the config and failed the merge as an unexpected ValueError."""
    with pytest.raises(UserError, match=r"export\.max_shard_size: .*a whole number above 0 and a unit"):
        load_config(write(tmp_path, {**MINIMAL, "export": {"max_shard_size": size}}))


def test_a_shard_size_is_written_as_both_writers_read_it(tmp_path: Path) -> None:
    sizes = {"5gb": "5GB", " 500 mib ": "500MiB", "2GiB": "2GiB"}  # transformers reads 5gb as bits
    for given, read in sizes.items():
        assert load_config(write(tmp_path, {**MINIMAL, "export": {"max_shard_size": given}})).export.max_shard_size == read


@pytest.mark.parametrize("repo_id, why", [("my model", "alphanumeric chars"), ("../../x", "namespace/repo_name"),
                                          ("org/sub/name", "namespace/repo_name"), ("org/name.git", ".git")])
def test_a_push_repo_id_the_hub_refuses_is_named_when_the_config_loads(tmp_path: Path, repo_id: str, why: str) -> None:
    """It failed only at the upload, after the card was written, told to check the network and the token."""
    with pytest.raises(UserError, match=rf"push\.repo_id: .*not a Hugging Face Hub repository id \(.*{re.escape(why)}"):
        load_config(write(tmp_path, {**MINIMAL, "push": {"repo_id": repo_id}}))
    for good in ("my-org/kanana-8b-ko-qa", "model.v2"):
        assert load_config(write(tmp_path, {**MINIMAL, "push": {"repo_id": good}})).push.repo_id == good


def test_a_config_from_a_named_pipe_is_read_and_a_device_is_named(tmp_path: Path) -> None:
    """`-c <(envsubst < config.yaml)` (a named pipe) and `-c /dev/null` were both '... does not exist'."""
    import os
    import threading

    pipe = tmp_path / "config.pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(yaml.safe_dump({**MINIMAL, "run": {"name": "piped"}})),
                              daemon=True)
    writer.start()
    try:
        assert load_config(pipe).run.name == "piped"
    finally:
        writer.join(timeout=10)
    with pytest.raises(UserError, match=r"config file: /dev/null is not a regular file \(a device, socket or pipe\)"):
        load_config("/dev/null")


@pytest.mark.parametrize("override", ["distill.teacher.timeout_s=1e300", "distill.teacher.max_retry_wait_s=1e300"])
def test_a_teacher_wait_longer_than_a_day_is_refused(tmp_path: Path, override: str) -> None:
    """timeout_s=1e300 passed the config and ended distill in an OverflowError (a queue's timeout), exit 1."""
    with pytest.raises(UserError, match=r"less than or equal to 86400"):
        load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("override, named", [
    ("finetune.kd.temperature=1e200", "finetune.kd.temperature"), ("finetune.kd.temperature=1e-39", "finetune.kd.temperature"),
    ("finetune.on_policy.temperature=1e-40", "finetune.on_policy.temperature"),
    ("finetune.on_policy.max_new_tokens=1000000000000000000000", "finetune.on_policy.max_new_tokens")])
def test_distillation_settings_past_what_the_arithmetic_holds_are_refused(tmp_path: Path, override: str,
                                                                         named: str) -> None:
    """From an adversarial review: kd's temperature 1e200 overflowed in T**2 ('a bug'), 1e-39 trained into NaN and
    blamed the learning rate, on_policy's 1e-40 sampled from inf, and 10**21 new tokens generated past the
    model's context for good."""
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("seed", ["-1", str(2**32), "true", "1.5"])
def test_a_seed_outside_numpy_s_range_is_refused_before_any_stage(tmp_path: Path, seed: str) -> None:
    """run.seed=-1 went through ingest and format and failed in the training child with a traceback (numpy: seeds
    are 0 to 2^32-1), which a rerun 'resumed' into again; true was taken as 1."""
    with pytest.raises(UserError, match="run.seed"):
        load_config(write(tmp_path, MINIMAL), [f"run.seed={seed}"])
    assert load_config(write(tmp_path, MINIMAL), [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1


def test_paths_too_long_for_the_system_are_named_not_crashed_on(tmp_path: Path) -> None:
    """An OSError 'File name too long' ended format (model.path), ingest (evaluate.data) and every command
    (run.root over 4,096 bytes) as a bug."""
    from distillery.core.models import resolve_model_path
    from distillery.evals.decontaminate import evaluate_data_files

    with pytest.raises(UserError, match="run.root.*longer than 3072 bytes"):
        load_config(write(tmp_path, MINIMAL), ["run.root=" + "/".join(["c" * 200] * 25)])
    with pytest.raises(UserError, match="model.path: a{300} does not exist locally"):
        resolve_model_path("a" * 300)
    assert evaluate_data_files("x/" + "a" * 300, "test")[0] == []
    assert evaluate_data_files("./" + "a" * 300 + ".jsonl", "test")[0] == []


def test_values_yaml_reads_as_numbers_or_dates_say_to_quote_them_and_long_values_are_cut(tmp_path: Path) -> None:
    config = write(tmp_path, MINIMAL)
    for value in ("0777", "2024-01-01", "yes", "12:30"):
        with pytest.raises(UserError, match="run.name: .*quote it to keep it text"):
            load_config(config, [f"run.name={value}"])
    assert load_config(config, ['run.name="0777"']).run.name == "0777"
    with pytest.raises(UserError) as caught:
        load_config(config, ["run.name=" + "a" * 100_000])
    assert len(str(caught.value)) < 1000 and "100,000 characters" in str(caught.value)
    with pytest.raises(UserError, match="run.root: .*is empty"):
        load_config(config, ["run.root="])


@pytest.mark.parametrize("license", ["mit\n---\nevil: 1", "MIT", "Apache 2.0"])
def test_push_license_is_a_hub_license_id(tmp_path: Path, license: str) -> None:
    path = tmp_path / "c.yaml"
    sources = [{"name": "toy", "kind": "hf", "files": "d.jsonl", "format": "messages"}]
    path.write_text(yaml.safe_dump({"push": {"license": license}, "ingest": {"sources": sources}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"push.license.*a Hub license id is lowercase letters"):
        load_config(path)
    assert load_config(path, ["push.license=cc-by-nc-4.0"]).push.license == "cc-by-nc-4.0"


@pytest.mark.parametrize(("push", "message"), [
    ({"datasets": ["../../etc"]}, r"push.datasets.*'../../etc' is not a Hugging Face Hub dataset id"),
    ({"datasets": ["a b"]}, r"push.datasets.*'a b' is not a Hugging Face Hub dataset id"),
    ({"tags": ["ok", "two\nlines"]}, r"push.tags.*'two\\nlines' is not a tag"),
    ({"tags": [""]}, r"push.tags.*'' is not a tag"),
    ({"tags": ["   "]}, r"push.tags.*'   ' is not a tag"),
])
def test_push_datasets_and_tags_are_checked_before_anything_is_created(tmp_path: Path, push: dict, message: str) -> None:
    """From a review: they went into the card's front matter as given, which the Hub would refuse only after the
    repository was created."""
    path = tmp_path / "c.yaml"
    sources = [{"name": "toy", "kind": "hf", "files": "d.jsonl", "format": "messages"}]
    path.write_text(yaml.safe_dump({"push": push, "ingest": {"sources": sources}}), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_config(path)
    good = {"push": {"datasets": ["qwedsacf/grade-school-math-instructions"], "tags": ["korean", "math word problems"]},
            "ingest": {"sources": sources}}
    path.write_text(yaml.safe_dump(good), encoding="utf-8")
    assert load_config(path).push.tags == ["korean", "math word problems"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["finetune.objective=kd"], r"<top>: Value error, finetune.objective kd trains on the teacher's top-k log-probs, "
                                r"which only distill writes: set distill.enabled: true and distill.logprobs: 20"),
    (["finetune.objective=kd", "distill.enabled=true"], r"which only distill writes"),
    (["evaluate.heldout.enabled=false", "evaluate.data=null"],
     r"evaluate would have nothing to score: evaluate.heldout.enabled is false and evaluate.data is not set"),
    (["finetune.method=full", "finetune.load_in_4bit=true"],
     r"finetune: Value error, finetune.load_in_4bit: true cannot go with finetune.method: full"),
    (["finetune.objective=on_policy", "finetune.backend=unsloth"],
     r"finetune: Value error, finetune.objective on_policy runs TRL's DistillationTrainer"),
])
def test_settings_of_two_stages_that_cannot_go_together_are_refused_when_the_config_loads(
        tmp_path: Path, overrides: list[str], message: str) -> None:
    """Each was found only by the later stage: kd's missing log-probs after distill, a 4-bit full fine-tune after
    format, an evaluate with nothing to score after training and export."""
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, MINIMAL), overrides)
    # evaluate switched off; an export of an earlier run scored without exporting again
    for fine in (["evaluate.enabled=false", "evaluate.heldout.enabled=false", "evaluate.data=null"],
                 ["export.enabled=false", "evaluate.artifacts=[base, merged, gguf]"]):
        load_config(write(tmp_path, MINIMAL), fine)
