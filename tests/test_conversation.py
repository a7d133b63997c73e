"""Conversations: keyed turns, undo of every change, validated import and careful export."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from qwen_magic import conversation as conversation_module
from qwen_magic.conversation import UNDO_DEPTH, Conversation, Recorded, Turn
from qwen_magic.render import INTERRUPTED


def conversation_with(turns: int, system: str | None = "Be brief.") -> Conversation:
    conversation = Conversation(system=system)
    for i in range(turns):
        conversation.record(f"question number {i}", f"answer number {i}")
    return conversation


def state(conversation: Conversation) -> tuple[str | None, tuple[Turn, ...]]:
    """Everything undo must bring back, timestamps included (Turn equality compares them)."""
    return conversation.system, tuple(conversation.turns)


def export(**fields: object) -> dict[str, object]:
    """A valid export with ``fields`` changed."""
    data: dict[str, object] = {
        "format": "qwen-magic-conversation",
        "version": 1,
        "system": None,
        "turns": [{"user": "u", "assistant": "a", "key": None, "interrupted": False}],
    }
    data.update(fields)
    return data


# ---------------------------------------------------------------------- turns and keys


def test_turn_defaults() -> None:
    turn = Turn(user="u", assistant="a")
    assert turn.key is None and not turn.interrupted and turn.created
    assert turn.reasoning is None


def test_record_keeps_the_reasoning_apart_from_the_answer() -> None:
    conversation = conversation_with(1)
    before = state(conversation)
    recorded = conversation.record("q", "The answer.", key="k", reasoning="Because.")
    turn = conversation.turns[-1]
    assert recorded.turn is turn
    assert (turn.assistant, turn.reasoning, turn.key) == ("The answer.", "Because.", "k")
    assert conversation.pairs()[-1] == ("q", "The answer.")  # the answer only
    stopped = conversation.record("q", "", key="k", reasoning="half", interrupted=True)
    assert (stopped.replaced, conversation.turns[-1].reasoning) == (2, "half")
    assert conversation.undo() and conversation.turns[-1].reasoning == "Because."
    assert conversation.undo() and state(conversation) == before


def test_turn_is_frozen_so_history_cannot_change_behind_undo() -> None:
    turn = Turn(user="u", assistant="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        turn.assistant = "b"  # type: ignore[misc]
    assert dataclasses.replace(turn, interrupted=True).interrupted


def test_rerunning_a_key_replaces_its_turn_and_sets_aside_later_ones() -> None:
    conversation = Conversation()
    for key in ("cell-a", "cell-b", "cell-c"):
        assert conversation.record(f"from {key}", f"reply {key}", key=key).replaced is None
    assert [t.key for t in conversation.context_turns("cell-b")] == ["cell-a"]
    assert len(conversation.context_turns("cell-z")) == 3  # an unknown key sees everything
    recorded = conversation.record("from cell-b again", "new reply", key="cell-b")
    assert isinstance(recorded, Recorded)
    assert (recorded.replaced, recorded.set_aside) == (2, 1)
    assert recorded.turn is conversation.turns[-1]
    assert [(t.key, t.user) for t in conversation.turns] == [
        ("cell-a", "from cell-a"),
        ("cell-b", "from cell-b again"),
    ]
    assert conversation.record("brand new", "r", key="cell-d").set_aside == 0
    assert len(conversation) == 3


def test_from_pairs_and_pairs_round_trip() -> None:
    pairs = [("q1", "a1"), ("q2", "a2")]
    conversation = Conversation.from_pairs(pairs, system="s")
    assert conversation.pairs() == pairs and conversation.system == "s"
    with pytest.raises(ValueError, match="pairs"):
        Conversation.from_pairs([("only one",)])
    with pytest.raises(ValueError, match="pairs"):
        Conversation.from_pairs(["ab"])


# ---------------------------------------------------------------------- undo


def test_undo_after_a_new_turn() -> None:
    conversation = conversation_with(2)
    before = state(conversation)
    conversation.record("q", "a")
    assert conversation.undo() is True
    assert state(conversation) == before


def test_undo_after_clear_brings_every_turn_back() -> None:
    conversation = conversation_with(3)
    before = state(conversation)
    assert conversation.clear() == 3
    assert len(conversation) == 0 and conversation.system == "Be brief."
    assert conversation.undo() is True
    assert state(conversation) == before


def test_clearing_nothing_is_not_a_change() -> None:
    conversation = Conversation()
    assert conversation.clear() == 0
    assert conversation.undo() is False


def test_undo_after_an_import_restores_the_old_conversation() -> None:
    conversation = conversation_with(2)
    before = state(conversation)
    conversation.replace(Conversation(system="imported", turns=[Turn("x", "y")]))
    assert state(conversation) == ("imported", (conversation.turns[0],))
    assert conversation.undo() is True
    assert state(conversation) == before


def test_undo_after_set_system() -> None:
    conversation = conversation_with(1)
    conversation.set_system("Answer in French.")
    assert conversation.system == "Answer in French."
    assert conversation.undo() is True
    assert conversation.system == "Be brief."
    assert conversation.undo() is True  # the recorded turn
    assert conversation.undo() is False


def test_setting_the_same_system_prompt_is_not_a_change() -> None:
    conversation = Conversation()
    conversation.set_system("s")
    conversation.set_system("s")
    assert conversation.undo() is True
    assert conversation.system is None
    assert conversation.undo() is False


def test_one_undo_after_a_rerun_brings_back_the_old_turn_and_the_later_ones() -> None:
    conversation = Conversation(system="s")
    for key in ("a", "b", "c", "d"):
        conversation.record(f"q {key}", f"r {key}", key=key)
    before = state(conversation)
    recorded = conversation.record("q b again", "r b again", key="b")
    assert (recorded.replaced, recorded.set_aside) == (2, 2)
    assert [t.user for t in conversation.turns] == ["q a", "q b again"]
    assert conversation.undo() is True
    assert state(conversation) == before  # the very same turns, timestamps included
    assert conversation.undo() is True
    assert [t.key for t in conversation.turns] == ["a", "b", "c"]


def test_undo_on_nothing_returns_false() -> None:
    assert Conversation().undo() is False
    assert Conversation(system="s", turns=[Turn("u", "a")]).undo() is False  # built, not changed


def test_undo_keeps_the_last_changes_only() -> None:
    conversation = conversation_with(UNDO_DEPTH + 5)
    undone = 0
    while conversation.undo():
        undone += 1
    assert undone == UNDO_DEPTH
    assert len(conversation) == 5


def test_rollback_takes_back_exactly_the_changes_since_the_mark() -> None:
    conversation = conversation_with(2)
    before = state(conversation)
    mark = conversation.undo_depth
    conversation.clear()
    conversation.set_system("other")
    conversation.record("q", "a")
    conversation.rollback(mark)
    assert state(conversation) == before
    assert conversation.undo() is True  # the changes before the mark are still undoable
    assert len(conversation) == 1


def test_rollback_after_a_long_session_still_rolls_back() -> None:
    """The undo stack is capped: a mark taken when it is full must still work (it did not)."""
    conversation = conversation_with(UNDO_DEPTH + 20)
    before = state(conversation)
    mark = conversation.undo_depth
    conversation.clear()
    conversation.record("q", "a")
    conversation.rollback(mark)
    assert state(conversation) == before


def test_rollback_with_nothing_changed_changes_nothing() -> None:
    conversation = conversation_with(3)
    before = state(conversation)
    conversation.rollback(conversation.undo_depth)
    assert state(conversation) == before


# ---------------------------------------------------------------------- export and import


def test_json_round_trip_is_lossless(tmp_path: Path) -> None:
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


def test_an_old_version_1_export_still_imports(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(
        """{
  "format": "qwen-magic-conversation",
  "version": 1,
  "system": "Be brief.",
  "turns": [
    {
      "user": "What is 2+2?",
      "assistant": "4.",
      "key": "cell-1",
      "interrupted": false,
      "created": "2026-01-02T03:04:05.000000+00:00"
    },
    {
      "user": "And 3+3?",
      "assistant": "6",
      "key": null,
      "interrupted": true,
      "created": "2026-01-02T03:05:00.000000+00:00"
    }
  ]
}
""",
        encoding="utf-8",
    )
    loaded = Conversation.load(path)
    assert loaded.system == "Be brief."
    assert loaded.turns == [
        Turn("What is 2+2?", "4.", "cell-1", False, "2026-01-02T03:04:05.000000+00:00"),
        Turn("And 3+3?", "6", None, True, "2026-01-02T03:05:00.000000+00:00"),
    ]


def test_reasoning_round_trips_in_a_version_2_export(tmp_path: Path) -> None:
    conversation = Conversation(system="s")
    conversation.record("q1", "A1 </think> quoted", reasoning="R1 <think>\n 😀")
    conversation.record("q2", "", reasoning="stopped", interrupted=True)
    conversation.record("q3", "<think>\nnot reasoning\n</think>\n\nA3")  # a model without it
    conversation.record("q4", "A4", reasoning="")
    path = conversation.save(tmp_path / "chat.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 2 == conversation_module.FORMAT_VERSION
    assert [turn["reasoning"] for turn in data["turns"]] == ["R1 <think>\n 😀", "stopped", None, ""]
    loaded = Conversation.load(path)
    assert loaded.turns == conversation.turns  # version 2 text is never split again


@pytest.mark.parametrize(
    ("assistant", "reasoning", "answer"),
    [
        ("<think>\nLet me add.\n</think>\n\n4.", "Let me add.", "4."),
        ("<think>\n\n</think>\n\n4.", "", "4."),
        ("<think>\nstopped while thinki", "stopped while thinki", ""),
        ("<think>\nR\n</think>\n\nUse </think> to end.", "R", "Use </think> to end."),
        ("4.", None, "4."),
        ("Quote: <think>x</think> y", None, "Quote: <think>x</think> y"),  # not leading
    ],
)
def test_a_version_1_reply_with_a_think_block_imports_split(
    assistant: str, reasoning: str | None, answer: str
) -> None:
    """Version 1 kept the whole reply; the import splits it as the reasoning splitter does."""
    turn = {"user": "u", "assistant": assistant, "key": None, "interrupted": False}
    loaded = Conversation.from_dict(export(turns=[turn]))
    assert (loaded.turns[0].reasoning, loaded.turns[0].assistant) == (reasoning, answer)


def test_markdown_export(tmp_path: Path) -> None:
    conversation = conversation_with(2)
    conversation.turns[-1] = dataclasses.replace(conversation.turns[-1], interrupted=True)
    text = conversation.save(tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "**2. User**" in text and "answer number 1" in text and INTERRUPTED in text
    assert "> **System:** Be brief." in text
    assert text == conversation.to_markdown() + "\n"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([], "not a qwen-magic conversation"),
        ({"format": "other", "version": 1, "turns": []}, "not a qwen-magic conversation"),
        (export(version="1"), "version must be a whole number"),
        (export(version=None), "version must be a whole number"),
        (export(version=True), "version must be a whole number"),
        (export(version=0), "version must be a whole number"),
        (export(version=1.5), "version must be a whole number"),
        (export(version=3), "format version 3; upgrade qwen-magic"),
        ({"format": "qwen-magic-conversation", "version": 1}, "no list of turns"),
        (export(turns={"user": "u"}), "no list of turns"),
        (export(turns="u"), "no list of turns"),
        (export(turns=["u"]), "turn 1 of the export is not an object"),
        (export(turns=[{"assistant": "a"}]), "turn 1 of the export needs 'user' text"),
        (export(turns=[{"user": 1, "assistant": "a"}]), "needs 'user' text"),
        (export(turns=[{"user": "u", "assistant": None}]), "needs 'assistant' text"),
        (export(turns=[{"user": "u", "assistant": "a"}, {"user": "u"}]), "turn 2 of the"),
        (export(turns=[{"user": "u", "assistant": "a", "key": 3}]), "key that is not text"),
        (export(turns=[{"user": "u", "assistant": "a", "interrupted": "no"}]), "true or false"),
        (export(turns=[{"user": "u", "assistant": "a", "interrupted": 0}]), "true or false"),
        (
            export(version=2, turns=[{"user": "u", "assistant": "a", "reasoning": 5}]),
            "text or null",
        ),
        (export(turns=[{"user": "u", "assistant": "a", "reasoning": ["r"]}]), "'reasoning' must"),
        (export(system=5), "system prompt must be text or null"),
        (export(system=["s"]), "system prompt must be text or null"),
    ],
)
def test_bad_imports_are_one_line_value_errors(data: object, error: str) -> None:
    with pytest.raises(ValueError, match=error) as raised:
        Conversation.from_json(json.dumps(data))
    assert "\n" not in str(raised.value)


def test_a_lone_surrogate_is_refused_at_import() -> None:
    """JSON can carry half an emoji; no tokenizer takes it and no export could write it."""
    text = json.dumps(export(turns=[{"user": "\ud83d", "assistant": "a"}]), ensure_ascii=True)
    with pytest.raises(ValueError, match="needs 'user' text"):
        Conversation.from_json(text)


def test_too_many_turns_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversation_module, "MAX_IMPORT_TURNS", 2)
    turns = [{"user": "u", "assistant": "a"}] * 3
    with pytest.raises(ValueError, match="3 turns, more than 2"):
        Conversation.from_dict(export(turns=turns))
    assert len(Conversation.from_dict(export(turns=turns[:2]))) == 2


def test_deeply_nested_json_is_a_value_error_not_a_recursion_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply") as raised:
        Conversation.from_json("[" * 100_000)
    assert not isinstance(raised.value, RecursionError)


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("chat.txt", b"", "use a .json or .md"),
        ("chat.json", b"{not json", r"chat\.json: not valid JSON \(Expecting"),
        ("chat.json", b'{"format": "other"}', "not a qwen-magic conversation"),
        ("chat.md", b"# hi", r"only \.json exports"),
        ("chat.json", b'{"format": "\xff\xfe"}', r"chat\.json is not UTF-8 text"),
        ("chat.json", b"[1," * 50_000, "nested too deeply"),
    ],
)
def test_bad_import_files_are_clear_errors(
    tmp_path: Path, name: str, content: bytes, error: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=error) as raised:
        if name.endswith(".txt"):
            Conversation().save(path)
        else:
            Conversation.load(path)
    assert "\n" not in str(raised.value)


def test_a_file_over_the_size_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = conversation_with(3).save(tmp_path / "chat.json")
    size = path.stat().st_size
    monkeypatch.setattr(conversation_module, "MAX_IMPORT_BYTES", size)
    assert len(Conversation.load(path)) == 3  # exactly at the cap is fine
    monkeypatch.setattr(conversation_module, "MAX_IMPORT_BYTES", size - 1)
    with pytest.raises(ValueError, match=f"more than {size - 1:,} bytes"):
        Conversation.load(path)


# ---------------------------------------------------------------------- saving


def test_save_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text("precious", encoding="utf-8")
    with pytest.raises(FileExistsError, match="--force"):
        conversation_with(1).save(path)
    assert path.read_text(encoding="utf-8") == "precious"


def test_save_overwrites_with_force(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text("old", encoding="utf-8")
    conversation_with(2).save(path, force=True)
    assert len(Conversation.load(path)) == 2


def test_save_refuses_a_missing_folder_and_creates_none(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "chat.json"
    with pytest.raises(ValueError, match="no folder"):
        conversation_with(1).save(path)
    assert not path.parent.exists()


def test_save_refuses_a_folder_as_the_target(tmp_path: Path) -> None:
    folder = tmp_path / "chat.json"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        conversation_with(1).save(folder, force=True)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chat.json"
    conversation_with(1).save(path)
    before = path.read_bytes()

    def fail(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        conversation_with(5).save(path, force=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left


def test_save_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("not yours", encoding="utf-8")
    link = tmp_path / "chat.json"
    link.symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        conversation_with(1).save(link)
    conversation_with(1).save(link, force=True)
    assert not link.is_symlink()
    assert elsewhere.read_text(encoding="utf-8") == "not yours"
    assert len(Conversation.load(link)) == 1


def test_saved_file_gets_ordinary_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = conversation_with(1).save(tmp_path / "chat.md")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
