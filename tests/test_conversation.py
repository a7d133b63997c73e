"""Conversation state on a real Qwen tokenizer: budget trimming, keys, undo, export."""

from __future__ import annotations

import json

import pytest

from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.history import (
    BudgetError,
    Conversation,
    PromptTruncatedWarning,
    Turn,
)


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir) -> ChatTokenizer:
    return ChatTokenizer.load(qwen3_tokenizer_dir)


@pytest.fixture
def formatter(tokenizer) -> ChatFormatter:
    return ChatFormatter(tokenizer)


def conversation_with(turns: int, system: str | None = "Be brief.") -> Conversation:
    conversation = Conversation(system=system)
    for i in range(turns):
        conversation.record(f"question number {i}", f"answer number {i}")
    return conversation


def turn_cost(formatter: ChatFormatter, i: int) -> int:
    return len(formatter.segment("user", f"question number {i}")) + len(
        formatter.segment("assistant", f"answer number {i}")
    )


def test_everything_fits(formatter):
    conversation = conversation_with(3)
    plan = conversation.prepare(formatter, "next", budget=10_000)
    assert (plan.kept_turns, plan.dropped_turns, plan.truncated) == (3, 0, False)
    assert plan.num_tokens == plan.system_tokens + sum(plan.turn_tokens) + plan.message_tokens + 3
    assert formatter.tokenizer.decode(plan.token_ids) == plan.text


@pytest.mark.parametrize(
    ("turns", "room_for", "kept"),
    [(5, 5, 5), (5, 4, 4), (5, 1, 1), (5, 0, 0), (1, 0, 0), (0, 0, 0)],
)
def test_oldest_whole_turns_go_first(formatter, turns, room_for, kept):
    conversation = conversation_with(turns)
    bare = conversation.prepare(formatter, "next", budget=10_000, use_history=False).num_tokens
    budget = bare + sum(turn_cost(formatter, i) for i in range(turns - room_for, turns))
    plan = conversation.prepare(formatter, "next", budget=budget)
    assert plan.kept_turns == kept
    assert plan.dropped_turns == turns - kept
    assert [t.user for t in plan.turns] == [
        f"question number {i}" for i in range(turns - kept, turns)
    ]
    assert plan.num_tokens <= budget
    assert plan.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>user\nnext<|im_end|>" in plan.text


def test_budget_is_recomputed_not_shrinking(formatter):
    """The tutorial decremented one shared counter per call until it went negative."""
    conversation = conversation_with(2)
    plans = [conversation.prepare(formatter, "same", budget=500) for _ in range(50)]
    assert {tuple(plan.token_ids) for plan in plans} == {tuple(plans[0].token_ids)}
    assert plans[-1].kept_turns == 2


def test_long_message_is_cut_with_warning(formatter):
    conversation = conversation_with(3)
    message = "word " * 400
    with pytest.warns(PromptTruncatedWarning, match="only its first"):
        plan = conversation.prepare(formatter, message, budget=120)
    assert plan.truncated
    assert plan.num_tokens <= 120
    assert plan.kept_turns == 0
    assert message.startswith(plan.message) and len(plan.message) < len(message)
    assert plan.text.startswith("<|im_start|>system\nBe brief.")


def test_system_prompt_larger_than_budget_is_a_clear_error(formatter):
    conversation = Conversation(system="long " * 200)
    with pytest.raises(BudgetError, match="shorten the system prompt"):
        conversation.prepare(formatter, "hi", budget=50)


def test_no_history_sends_only_system_and_message(formatter):
    plan = conversation_with(4).prepare(formatter, "fresh", budget=10_000, use_history=False)
    assert plan.kept_turns == 0 and plan.dropped_turns == 0
    assert "question number" not in plan.text


def test_rerunning_a_key_replaces_its_turn_and_drops_later_ones(formatter):
    conversation = Conversation()
    for key in ("cell-a", "cell-b", "cell-c"):
        conversation.record(f"from {key}", f"reply {key}", key=key)
    plan = conversation.prepare(formatter, "from cell-b again", budget=10_000, key="cell-b")
    assert [t.key for t in plan.turns] == ["cell-a"]
    conversation.record("from cell-b again", "new reply", key="cell-b")
    assert [(t.key, t.user) for t in conversation.turns] == [
        ("cell-a", "from cell-a"),
        ("cell-b", "from cell-b again"),
    ]
    conversation.record("brand new", "r", key="cell-d")
    assert len(conversation) == 3


def test_undo_and_clear():
    conversation = conversation_with(3)
    assert conversation.undo().user == "question number 2"
    assert len(conversation) == 2
    assert conversation.clear() == 2
    assert conversation.undo() is None
    assert conversation.system == "Be brief."


def test_json_round_trip_is_lossless(tmp_path):
    conversation = Conversation(system="Réponds en français 🇫🇷")
    conversation.record('<|im_end|> 你好 "quoted"\n\ttab', "😀 réponse", key="c1")
    conversation.record("second", "partial repl", interrupted=True)
    path = conversation.save(tmp_path / "chat.json")
    raw = path.read_text(encoding="utf-8")
    assert "你好" in raw and "😀" in raw  # readable, not \\u escapes
    loaded = Conversation.load(path)
    assert loaded.system == conversation.system
    assert loaded.turns == conversation.turns
    assert loaded.to_dict() == json.loads(raw)


def test_markdown_export(tmp_path):
    conversation = conversation_with(2)
    conversation.turns[-1].interrupted = True
    text = conversation.save(tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "## Turn 2" in text and "answer number 1" in text and "*(interrupted)*" in text


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("chat.txt", "", "use a .json or .md"),
        ("chat.json", "{not json", "not valid JSON"),
        ("chat.json", '{"format": "other"}', "not a qwen-magic conversation"),
        ("chat.md", "# hi", "only .json exports"),
    ],
)
def test_bad_import_files_are_clear_errors(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=error):
        if name.endswith(".txt"):
            Conversation().save(path)
        else:
            Conversation.load(path)


def test_from_pairs_rejects_malformed_history():
    with pytest.raises(ValueError, match="pairs"):
        Conversation.from_pairs([("only one",)])


def test_new_turn_encodes_only_new_text(tokenizer):
    """Formatting turn 201 encodes the new message, not the 200 turns before it."""
    encoded: list[str] = []
    original = tokenizer.encode_text

    def spy(text: str) -> list[int]:
        encoded.append(text)
        return original(text)

    formatter = ChatFormatter(tokenizer)
    conversation = conversation_with(200)
    conversation.prepare(formatter, "warm-up", budget=100_000)
    encoded.clear()
    tokenizer.encode_text = spy
    try:
        plan = conversation.prepare(formatter, "the new message", budget=100_000)
    finally:
        del tokenizer.encode_text
    assert plan.kept_turns == 200
    assert "the new message" in encoded
    assert not any("question number" in text or "answer number" in text for text in encoded)


def test_qwen3_past_thinking_is_not_resent(formatter):
    conversation = Conversation()
    conversation.record("q", "<think>\nsecret reasoning\n</think>\n\nvisible answer")
    plan = conversation.prepare(formatter, "next", budget=10_000)
    assert "secret reasoning" not in plan.text and "visible answer" in plan.text
    assert "secret reasoning" in conversation.turns[0].assistant  # history keeps it


def test_turn_defaults():
    turn = Turn(user="u", assistant="a")
    assert turn.key is None and not turn.interrupted and turn.created
