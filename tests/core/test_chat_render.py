"""A chat template is code that comes with a model: rendered in a child within a CPU and memory budget, a hostile
one is one message instead of a hung or swapping machine (from an adversarial review: three nested range(99999)
hung format, `'A' * 8e9` grew it past 4 GB)."""

from __future__ import annotations

import time

import pytest

from distillery.core import chat_render
from distillery.core.chat_render import Chat, ChatRenderer, TemplateRefused, TemplateTooCostly

PLAIN = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
        "{% if add_generation_prompt %}<assistant>{% endif %}"
LOOPS = "{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}" \
        "{% endfor %}{% endfor %}"
DOUBLING = "{% set ns = namespace(s='AAAA') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}" \
           "{{ ns.s | length }}"


def chats(n: int) -> list[Chat]:
    return [Chat([{"role": "user", "content": f"q{i}"}], add_generation_prompt=i % 2 == 0) for i in range(n)]


def test_renders_as_transformers_does_with_the_special_tokens(renderer: ChatRenderer) -> None:
    texts = renderer.render(chats(3), PLAIN, {"eos_token": "</s>"})
    assert texts == ["<user>q0</s><assistant>", "<user>q1</s>", "<user>q2</s><assistant>"]


def test_a_refusal_names_the_conversation_across_chunks(renderer: ChatRenderer, monkeypatch) -> None:
    monkeypatch.setattr(chat_render, "CHUNK", 2)
    raising = "{% if messages[0]['content'] == 'q2' %}{{ raise_exception('no q2') }}{% endif %}ok"
    with pytest.raises(TemplateRefused) as refused:
        renderer.render(chats(4), raising, {})
    assert (refused.value.index, refused.value.reason) == (2, "no q2")


@pytest.mark.parametrize("template, what, budget", [(LOOPS, "time", "2 s of CPU time"),
                                                    (DOUBLING, "memory", "0.25 GB of memory"),
                                                    ("{{ 'A' * 8000000000 }}", "memory", "0.25 GB of memory")])
def test_a_template_past_its_budget_is_stopped_and_the_next_render_works(template: str, what: str, budget: str,
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(chat_render, "CPU_SECONDS", 2.0)
    monkeypatch.setattr(chat_render, "MEMORY_BYTES", 256 << 20)
    monkeypatch.setattr(chat_render, "CHUNK", 2)
    with ChatRenderer() as renderer:
        started = time.monotonic()
        with pytest.raises(TemplateTooCostly) as costly:
            renderer.render(chats(3), template, {})
        assert time.monotonic() - started < 30
        assert (costly.value.what, costly.value.first, costly.value.last, costly.value.budget()) == (what, 0, 1, budget)
        assert renderer.render(chats(1), PLAIN, {"eos_token": "</s>"}) == ["<user>q0</s><assistant>"]
