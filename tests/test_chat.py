"""QwenChat: the tutorial's chat()/stream() interface and the reply() call the magics use.

Mechanics run on the tiny random-weight model; meaning is checked on the real demo model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwen_magic.chat import QwenChat, Reply
from qwen_magic.history import Conversation

CONTROL_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bot(tiny_model: Path) -> Any:
    with QwenChat(str(tiny_model), max_model_len=2048, kv_cache_gib=0.25) as loaded:
        yield loaded


def test_chat_extends_history_without_mutating_it(bot: QwenChat) -> None:
    history = [("Hi", "Hello!")]
    response, new_history = bot.chat("How are you?", history=history, max_tokens=6)
    assert history == [("Hi", "Hello!")]
    assert new_history == [("Hi", "Hello!"), ("How are you?", response)]
    assert isinstance(response, str) and response
    assert not any(mark in response for mark in CONTROL_TEXTS)
    response, first = bot.chat("Start", max_tokens=3)
    assert first == [("Start", response)]


def test_stream_yields_text_pieces(bot: QwenChat) -> None:
    pieces = list(bot.stream("Hello", history=[("a", "b")], max_tokens=6, temperature=0))
    assert pieces and all(isinstance(piece, str) for piece in pieces)
    response, _ = bot.chat("Hello", history=[("a", "b")], max_tokens=6, temperature=0)
    assert "".join(pieces) == response


def test_reply_records_sample_zero_and_reports_what_was_sent(bot: QwenChat) -> None:
    conversation = Conversation(system="Be brief.")
    seen: dict[int, str] = {}

    def on_delta(index: int, text: str) -> None:
        seen[index] = seen.get(index, "") + text

    reply = bot.reply(conversation, "Hello", n=2, on_delta=on_delta, max_tokens=5, seed=1)
    assert isinstance(reply, Reply) and len(reply.texts) == 2 and reply.text == reply.texts[0]
    assert seen == {0: reply.texts[0], 1: reply.texts[1]}
    assert conversation.pairs() == [("Hello", reply.text)]
    assert reply.sampling["max_tokens"] == 5 and reply.sampling["seed"] == 1
    assert reply.sampling["n"] == 2
    for key, value in bot.engine.generation_defaults.items():
        assert reply.sampling[key] == value  # model defaults filled in
    assert reply.finish_reasons == ["length", "length"] or None not in reply.finish_reasons
    assert 0 < reply.num_generated_tokens <= 10 and not reply.interrupted
    assert reply.num_prompt_tokens == len(reply.plan.token_ids) == len(reply.prompt_token_ids)
    assert "Be brief." in reply.plan.text


def test_interrupted_reply_is_recorded_and_attached(bot: QwenChat) -> None:
    conversation = Conversation()
    pieces: list[str] = []

    def on_delta(index: int, text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.reply(conversation, "Tell me a long story", on_delta=on_delta, max_tokens=300)
    partial = caught.value.reply  # type: ignore[attr-defined]
    assert partial.interrupted and partial.text == "".join(pieces)
    (turn,) = conversation.turns
    assert turn.interrupted and turn.assistant == partial.text
    assert not bot.engine._llm.llm_engine.has_unfinished_requests()
    assert bot.reply(conversation, "Again", max_tokens=3).text  # engine still usable
    assert len(conversation.turns) == 2


def test_budget_is_recomputed_every_call(bot: QwenChat) -> None:
    """A long session keeps fitting: old turns are dropped, the prompt never overflows.

    (The tutorial this replaces shrank a shared budget on every call until it went negative.)
    """
    conversation = Conversation()
    for index in range(12):  # earlier turns, recorded as reply() records them
        conversation.record(f"question {index} " + "word " * 100, "answer " * 50)
    room = bot.engine.max_model_len
    for max_tokens in (1700, 1900, 1700, 100):
        plan, sampling = bot._plan(
            conversation, "next", {"max_tokens": max_tokens}, use_history=True, key=None
        )
        assert plan.num_tokens <= room - max_tokens and plan.dropped_turns > 0
        assert sampling["max_tokens"] == max_tokens

    def stop_early(index: int, text: str) -> None:
        raise KeyboardInterrupt  # one delta is enough to see the plan; cheap on a CPU

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.reply(conversation, "next", on_delta=stop_early, max_tokens=1800)
    plan = caught.value.reply.plan  # type: ignore[attr-defined]
    assert plan.num_tokens <= room - 1800 and plan.dropped_turns > 0


def test_follow_up_turn_reuses_the_prefix_cache(bot: QwenChat) -> None:
    """The next turn re-sends the history with identical ids, so vLLM serves it from cache."""
    conversation = Conversation(system="You are terse.")
    first = bot.reply(conversation, "context " * 300, max_tokens=4, temperature=0)
    follow_up = bot.reply(conversation, "And then?", max_tokens=4, temperature=0)
    assert first.num_cached_tokens == 0
    assert follow_up.num_cached_tokens is not None
    assert follow_up.num_cached_tokens >= len(first.prompt_token_ids) - 64  # whole blocks


def test_ignore_eos_gives_fixed_length_replies(bot: QwenChat) -> None:
    reply = bot.reply(Conversation(), "x", max_tokens=12, ignore_eos=True, temperature=0)
    assert reply.num_generated_tokens == 12
    assert reply.sampling["ignore_eos"] is True


def test_complete_continues_plain_text(bot: QwenChat) -> None:
    reply = bot.complete("def add(a, b):", max_tokens=4, temperature=0)
    assert reply.plan is None and reply.prompt_text == "def add(a, b):"
    assert reply.text and reply.num_generated_tokens <= 4


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"temperature": -1}, ValueError),
        ({"top_p": 0}, ValueError),
        ({"n": 0}, ValueError),
        ({"max_tokens": 0}, ValueError),
        ({"beam_width": 2}, TypeError),
    ],
)
def test_bad_sampling_is_rejected(
    bot: QwenChat, sampling: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(sampling))):
        bot.chat("hi", **sampling)


# --- meaning, on the real demo model ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo_bot(demo_model: Path) -> Any:
    with QwenChat(str(demo_model), max_model_len=2048, kv_cache_gib=0.5) as loaded:
        yield loaded


@pytest.mark.semantic
def test_demo_knows_the_capital_of_france(demo_bot: QwenChat) -> None:
    response, _ = demo_bot.chat("What is the capital of France?", max_tokens=24, temperature=0)
    assert "Paris" in response


@pytest.mark.semantic
def test_demo_remembers_a_name_only_with_history(demo_bot: QwenChat) -> None:
    _, history = demo_bot.chat("My name is Ada. Please remember it.", max_tokens=24, temperature=0)
    question = "What is my name? Answer with the name only."
    with_history, _ = demo_bot.chat(question, history=history, max_tokens=12, temperature=0)
    without, _ = demo_bot.chat(question, history=None, max_tokens=12, temperature=0)
    assert "Ada" in with_history
    assert "Ada" not in without
