"""export/ollama.py: the Modelfile TEMPLATE pieces reproduce the training chat template exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.export import ollama
from distillery.stages.format import load_template
from distillery.core.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[2] / "distillery" / "templates"


@pytest.fixture(scope="module")
def tokenizer(demo_model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e\nf"}],
]


def assert_pieces_render_like_the_template(template: str, tokenizer) -> None:
    parts = ollama.template_parts(template, tokenizer)
    for messages in CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        assert ollama.render_parts(parts, system, turns) == expected


@pytest.mark.parametrize("name", ["chat", "qa", "ko_qa", "alpaca", "r1"])
def test_pieces_render_every_conversation_like_the_jinja_template(name: str, tokenizer) -> None:
    template = tokenizer.chat_template if name == "chat" else (TEMPLATES / f"{name}.jinja").read_text()
    assert_pieces_render_like_the_template(template, tokenizer)


def test_chatml_modelfile(tokenizer) -> None:
    text = ollama.build_modelfile("m-Q4_K_M.gguf", tokenizer.chat_template, tokenizer, "<|im_end|>")
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert text.startswith("FROM ./m-Q4_K_M.gguf\n\nTEMPLATE \"\"\"{{ if .System }}<|im_start|>system\n{{ .System }}"
                           "<|im_end|>\n<|im_start|>user\n{{ else }}<|im_start|>system\n" + default_system)
    assert '{{ if eq .Role "user" }}{{ .Content }}<|im_end|>\n<|im_start|>assistant\n{{ else if' in text
    assert "{{-" not in text  # trim markers would eat the template's own newlines
    assert text.endswith('"""\n\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>user"\n')


def test_qa_template_stops_at_eos_and_the_next_question(tokenizer) -> None:
    parts = ollama.template_parts((TEMPLATES / "qa.jinja").read_text(), tokenizer)
    assert ollama.stop_tokens(parts, "<|im_end|>") == ["<|im_end|>", "### Question:"]


def test_a_template_that_depends_on_content_is_refused(tokenizer) -> None:
    template = ("{% for m in messages %}{% if m['content'] | length > 3 %}LONG {% endif %}{{ m['role'] }}: "
                "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="write the Modelfile's TEMPLATE by hand"):
        ollama.template_parts(template, tokenizer)


def test_a_template_that_raises_gets_a_modelfile_without_template_and_the_reason(tokenizer, tmp_path: Path) -> None:
    """A template that refuses a system turn (as Gemma's does) cannot be rendered into pieces: the Modelfile is
    still written, FROM and the EOS stop without TEMPLATE, and the reason names the template's own error."""
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(UserError, match="cannot render a system/user/assistant/user conversation .*System role not"):
        ollama.template_parts(template, tokenizer)
    gguf = tmp_path / "m-Q4_K_M.gguf"
    why = ollama.write_modelfile(gguf, template, tokenizer, "<|im_end|>")
    assert "System role not supported" in why and "Add a TEMPLATE by hand" in why
    assert (tmp_path / "m-Q4_K_M.Modelfile").read_text() == 'FROM ./m-Q4_K_M.gguf\n\nPARAMETER stop "<|im_end|>"\n'
    assert ollama.write_modelfile(gguf, tokenizer.chat_template, tokenizer, "<|im_end|>") is None
    assert "TEMPLATE" in (tmp_path / "m-Q4_K_M.Modelfile").read_text()


def test_go_braces_in_template_text_are_escaped() -> None:
    assert ollama.go_literal("a {{ b") == 'a {{ "{{" }} b'


@pytest.mark.parametrize("name", ["r1", "own"])
def test_r1_modelfile_renders_like_the_r1_tokenizer(name: str, tiny_r1_path: str) -> None:
    """On DeepSeek-R1-Distill-Qwen's real tokenizer (bundled:tiny-qwen2-r1): Distillery's r1 template and the
    model's own one, rendered through the Modelfile's pieces, equal the HF rendering; stops at end-of-sentence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_r1_path)
    template = load_template("r1", tokenizer) if name == "r1" else tokenizer.chat_template  # format's: BOS first
    assert_pieces_render_like_the_template(template, tokenizer)
    modelfile = ollama.build_modelfile("m.gguf", template, tokenizer, tokenizer.eos_token)
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"\nPARAMETER stop "<｜User｜>"' in modelfile
    # the template's BOS text is left to Ollama, which adds the BOS the GGUF asks for (no second one)
    assert tokenizer.bos_token not in modelfile


def test_a_stop_text_that_cannot_be_quoted_is_left_out_of_the_modelfile(tokenizer, tmp_path: Path) -> None:
    """An EOS text is the tokenizer's to choose: one holding a quote and a line break wrote Modelfile lines of its
    own after `PARAMETER stop "`."""
    hostile = '<|im_end|>"\nADAPTER /etc/passwd\nPARAMETER stop "'
    text = ollama.build_modelfile("m-Q4_K_M.gguf", tokenizer.chat_template, tokenizer, hostile)
    assert "ADAPTER" not in text and text.endswith('"""\n\nPARAMETER stop "<|im_end|>"\n')  # the next turn's
    assert ollama.modelfile_without_template("m.gguf", hostile) == "FROM ./m.gguf\n\n"
