"""Conversations: turns, an undo stack that makes every change reversible, export and import.

A :class:`Conversation` holds a system prompt and a list of :class:`Turn`. Every change goes
through a method that first remembers the state before it (:meth:`Conversation.undo` brings that
state back), so nothing a user did is ever silently lost:

- :meth:`~Conversation.record` adds a turn; a turn recorded under the ``key`` of an earlier one
  (a re-run notebook cell) replaces it, and the turns after it are *set aside* (the returned
  :class:`Recorded` says how many; one undo restores them);
- :meth:`~Conversation.clear`, :meth:`~Conversation.replace` (an import) and
  :meth:`~Conversation.set_system` are undoable the same way.

A turn of a thinking model keeps its reasoning apart from the answer (:attr:`Turn.reasoning`):
the answer is what the history shows and re-sends; the prompt re-sends the reasoning only where
the model's chat template would (:meth:`qwen_magic.chatml.ChatFormatter.past_turn`).

Exports are JSON (lossless, :meth:`Conversation.load` reads them back) or Markdown (for reading).
They are written atomically and never overwrite a file unless asked to. Imports are validated
field by field and capped in size; a bad file is one readable ``ValueError``. Format version 2
added ``reasoning``; a version 1 export still imports, a reply that starts with a ``<think>``
block being split as the reasoning splitter splits a stream
(:func:`qwen_magic.reasoning.split_reasoning_text`).

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwen_magic.reasoning import split_reasoning_text

__all__ = ["FORMAT_VERSION", "Conversation", "Recorded", "Turn"]

FORMAT = "qwen-magic-conversation"
FORMAT_VERSION = 2  # 2: turns carry "reasoning"; version 1 still imports
MAX_IMPORT_BYTES = 50 * 1024**2  # a bigger file is refused before it is read
MAX_IMPORT_TURNS = 100_000
UNDO_DEPTH = 100


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message and the model's reply.

    Attributes:
        user: The user's message.
        assistant: The model's answer, without its reasoning (partial when ``interrupted``;
            empty when the reply stopped while thinking).
        key: Where the turn came from (a notebook cell); recording that key again replaces it.
        interrupted: The reply was cut short by an interrupt or an error.
        created: ISO timestamp, for exports.
        reasoning: The reply's think block, kept apart from the answer; None when it had none.
    """

    user: str
    assistant: str
    key: str | None = None
    interrupted: bool = False
    created: str = field(default_factory=_now)
    reasoning: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What :meth:`Conversation.record` did.

    Attributes:
        turn: The new turn.
        replaced: The 1-based number of the turn it replaced (a re-run), or None.
        set_aside: How many later turns were set aside (``undo`` brings them back).
    """

    turn: Turn
    replaced: int | None = None
    set_aside: int = 0


_Snapshot = tuple[str | None, bool, tuple[Turn, ...]]


class Conversation:
    """A system prompt and the turns so far, with undo.

    Args:
        system: The system prompt; None means the model template's default (Qwen2.5 inserts
            "You are Qwen, ..."; Qwen3 inserts none).
        turns: Initial turns.
        owns_system: The system prompt was given to this conversation (``-s``, an import), as
            opposed to following a session-wide default; undo restores this flag too.
    """

    def __init__(
        self, system: str | None = None, turns: Iterable[Turn] = (), *, owns_system: bool = False
    ) -> None:
        self.system = system
        self.owns_system = owns_system
        self.turns: list[Turn] = list(turns)
        self._undo: deque[_Snapshot] = deque(maxlen=UNDO_DEPTH)
        self._changes = 0  # made and not undone; unlike len(self._undo), never capped

    def __repr__(self) -> str:
        return f"Conversation(system={self.system!r}, turns={len(self.turns)})"

    def __len__(self) -> int:
        return len(self.turns)

    @classmethod
    def from_pairs(cls, pairs: Iterable[Sequence[str]], system: str | None = None) -> Conversation:
        """Build from the tutorial's ``[(query, response), ...]`` history."""
        turns = []
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"history items must be (query, response) pairs, got {pair!r}")
            turns.append(Turn(user=str(pair[0]), assistant=str(pair[1])))
        return cls(system=system, turns=turns)

    def pairs(self) -> list[tuple[str, str]]:
        """The turns as ``(query, response)`` pairs."""
        return [(turn.user, turn.assistant) for turn in self.turns]

    # ------------------------------------------------------------------ reading

    def _index_of(self, key: str | None) -> int | None:
        if key is None:
            return None
        return next((i for i, turn in enumerate(self.turns) if turn.key == key), None)

    def context_turns(self, key: str | None = None) -> list[Turn]:
        """Turns a new message sees: all of them, or those before the turn ``key`` replaces."""
        index = self._index_of(key)
        return list(self.turns if index is None else self.turns[:index])

    @property
    def undo_depth(self) -> int:
        """A mark for :meth:`rollback`: how many changes were made and not undone.

        It keeps counting past the :data:`UNDO_DEPTH` snapshots that :meth:`undo` keeps, so a
        rollback late in a long session still takes back exactly the changes since the mark.
        """
        return self._changes

    def rollback(self, depth: int) -> None:
        """Undo every change made since :attr:`undo_depth` was ``depth`` (a failed request)."""
        while self._changes > depth and self.undo():
            pass

    def squash(self, depth: int) -> None:
        """Make the changes since :attr:`undo_depth` was ``depth`` one step for :meth:`undo`
        (a retry: taking the old turn off and recording the new one)."""
        extra = self._changes - depth - 1
        if extra > 0 and len(self._undo) > extra:
            for _ in range(extra):  # the snapshots after the first one (a bounded deque)
                self._undo.pop()
            self._changes -= extra

    # ------------------------------------------------------------------ changing (undoable)

    def _remember(self) -> None:
        self._undo.append((self.system, self.owns_system, tuple(self.turns)))
        self._changes += 1

    def record(
        self,
        message: str,
        reply: str,
        *,
        key: str | None = None,
        interrupted: bool = False,
        reasoning: str | None = None,
    ) -> Recorded:
        """Add a turn. A turn with the same ``key`` is replaced and the later ones set aside.

        Args:
            message: The user's message.
            reply: The answer, without its reasoning.
            key: See :attr:`Turn.key`.
            interrupted: See :attr:`Turn.interrupted`.
            reasoning: The reply's reasoning, kept apart (None: it had no think block).
        """
        self._remember()
        index = self._index_of(key)
        turn = Turn(
            user=message, assistant=reply, key=key, interrupted=interrupted, reasoning=reasoning
        )
        if index is None:
            self.turns.append(turn)
            return Recorded(turn)
        set_aside = len(self.turns) - index - 1
        self.turns[index:] = [turn]
        return Recorded(turn, replaced=index + 1, set_aside=set_aside)

    def remove_last(self) -> Turn:
        """Take the last turn off (to ask its message again). Undoable.

        Raises:
            IndexError: There is no turn.
        """
        if not self.turns:
            raise IndexError("the conversation has no turns")
        self._remember()
        return self.turns.pop()

    def clear(self) -> int:
        """Forget every turn (the system prompt stays); returns how many. Undoable."""
        removed = len(self.turns)
        if removed:
            self._remember()
            self.turns.clear()
        return removed

    def set_system(self, system: str | None, *, own: bool = True) -> None:
        """Change the system prompt (``own``: given to this conversation). Undoable."""
        if system != self.system or own != self.owns_system:
            self._remember()
            self.system = system
            self.owns_system = own

    def replace(self, other: Conversation) -> None:
        """Take ``other``'s system prompt and turns (an import). Undoable."""
        self._remember()
        self.system = other.system
        self.owns_system = True
        self.turns = list(other.turns)

    def undo(self) -> bool:
        """Bring back the state before the last change; False when there is nothing to undo."""
        if not self._undo:
            return False
        self.system, self.owns_system, turns = self._undo.pop()
        self.turns = list(turns)
        self._changes -= 1
        return True

    # ------------------------------------------------------------------ export and import

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "system": self.system,
            "turns": [asdict(turn) for turn in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """Validate and read an export; every problem is one ``ValueError`` line."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a qwen-magic conversation export (expected its JSON format)")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"the export's version must be a whole number >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this export has format version {version}; upgrade qwen-magic to read it"
            )
        system = data.get("system")
        if system is not None and not _is_text(system):
            raise ValueError(f"the export's system prompt must be text or null, got {system!r}")
        items = data.get("turns")
        if not isinstance(items, list):
            raise ValueError("the export has no list of turns ('turns')")
        if len(items) > MAX_IMPORT_TURNS:
            raise ValueError(f"the export has {len(items):,} turns, more than {MAX_IMPORT_TURNS:,}")
        turns = [_turn_from(item, number, version) for number, item in enumerate(items, start=1)]
        return cls(system=system, turns=turns)

    def to_json(self) -> str:
        """Lossless JSON (unicode kept as is, so exports stay readable)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error.msg} at line {error.lineno})") from None
        except RecursionError:
            raise ValueError("the JSON is nested too deeply to be an export") from None
        return cls.from_dict(data)

    def to_markdown(self) -> str:
        """A readable transcript (the same rendering ``%qwen history`` shows)."""
        from qwen_magic.render import history_markdown

        return history_markdown(self)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write JSON (``.json``) or Markdown (``.md``), chosen by the suffix.

        The file is written to a temporary file beside it and renamed into place, so a crash
        never leaves half an export. An existing file is kept unless ``force``.
        """
        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if suffix not in {".json", ".md"}:
            raise ValueError(f"cannot export to {path.name}: use a .json or .md file name")
        if not path.parent.is_dir():
            raise ValueError(f"no folder {path.parent}: create it first or pick another path")
        if path.is_dir():
            raise ValueError(f"{path} is a folder: give a file name")
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists: pick another name or overwrite it with --force")
        text = (self.to_json() if suffix == ".json" else self.to_markdown()) + "\n"
        _write_atomically(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a JSON export written by :meth:`save` (at most 50 MB)."""
        path = Path(path).expanduser()
        if path.suffix.lower() != ".json":
            raise ValueError(f"cannot import {path.name}: only .json exports can be read back")
        too_big = ValueError(
            f"{path.name} is more than {MAX_IMPORT_BYTES:,} bytes, too big for an export"
        )
        if path.stat().st_size > MAX_IMPORT_BYTES:
            raise too_big
        with path.open("rb") as handle:  # bounded even where the size was not known (a pipe)
            data = handle.read(MAX_IMPORT_BYTES + 1)
        if len(data) > MAX_IMPORT_BYTES:
            raise too_big
        try:
            return cls.from_json(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path.name} is not UTF-8 text: is it an export?") from None
        except ValueError as error:
            raise ValueError(f"{path.name}: {error}") from None


def _is_text(value: Any) -> bool:
    """A str that UTF-8 can hold: JSON may carry a lone surrogate, which no tokenizer takes."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _turn_from(item: Any, number: int, version: int) -> Turn:
    """One validated turn of an export (of format ``version``)."""
    if not isinstance(item, dict):
        raise ValueError(f"turn {number} of the export is not an object")
    for name in ("user", "assistant"):
        if not _is_text(item.get(name)):
            raise ValueError(f"turn {number} of the export needs '{name}' text")
    key, interrupted = item.get("key"), item.get("interrupted", False)
    if key is not None and not _is_text(key):
        raise ValueError(f"turn {number} of the export has a key that is not text: {key!r}")
    if not isinstance(interrupted, bool):
        raise ValueError(f"turn {number}'s 'interrupted' must be true or false")
    answer, reasoning = item["assistant"], item.get("reasoning")
    if reasoning is not None and not _is_text(reasoning):
        raise ValueError(f"turn {number}'s 'reasoning' must be text or null")
    if version == 1 and reasoning is None:  # the reply was kept whole, think block and all
        reasoning, answer = split_reasoning_text(answer)
    created = item.get("created")
    fields = {"user": item["user"], "assistant": answer, "key": key, "reasoning": reasoning}
    turn = Turn(interrupted=interrupted, **fields)
    return turn if not isinstance(created, str) else replace(turn, created=created)


def _write_atomically(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
