"""Conversation state: turns, token-budget trimming, replacing a re-run cell's turn, export.

A :class:`Conversation` holds a system prompt and a list of :class:`Turn`. Before each reply,
:meth:`Conversation.prepare` fits the conversation into a token budget, recomputed on every call
from the engine's context length minus the reply's ``max_tokens``:

- the system prompt and the new message are never dropped;
- the oldest whole turns go first;
- a new message that alone exceeds the budget is cut (its beginning is kept) with a warning.

The returned :class:`PromptPlan` says what was kept and dropped, so the UI can show it.

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwen_magic.chatml import SEED_SYSTEM, ChatFormatter

FORMAT_VERSION = 1
__all__ = ["SEED_SYSTEM", "Conversation", "PromptPlan", "PromptTruncatedWarning", "Turn"]


class PromptTruncatedWarning(UserWarning):
    """The new message alone did not fit the token budget and was cut."""


class BudgetError(ValueError):
    """Not even the system prompt and an empty message fit the token budget."""


@dataclass
class Turn:
    """One exchange: the user's message and the model's reply.

    Attributes:
        user: The user's message.
        assistant: The model's reply (partial when ``interrupted``).
        key: Where the turn came from (a notebook cell id); re-running that key replaces it.
        interrupted: The reply was cut short by an interrupt.
        created: ISO timestamp, for exports.
    """

    user: str
    assistant: str
    key: str | None = None
    interrupted: bool = False
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


@dataclass(frozen=True)
class PromptPlan:
    """Exactly what the model will see, and how the budget shaped it."""

    text: str
    token_ids: list[int]
    budget: int
    message: str
    system: str | None
    turns: list[Turn]
    dropped_turns: int
    truncated: bool
    system_tokens: int
    turn_tokens: list[int]
    message_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kept_turns(self) -> int:
        return len(self.turns)


class Conversation:
    """A system prompt and the turns so far.

    Args:
        system: The system prompt; None means the model template's default (Qwen2.5 inserts
            "You are Qwen, ..."; Qwen3 inserts none).
        turns: Initial turns.
    """

    def __init__(self, system: str | None = None, turns: Iterable[Turn] = ()) -> None:
        self.system = system
        self.turns: list[Turn] = list(turns)

    def __repr__(self) -> str:
        return f"Conversation(system={self.system!r}, turns={len(self.turns)})"

    def __len__(self) -> int:
        return len(self.turns)

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[Sequence[str]], system: str | None = SEED_SYSTEM
    ) -> Conversation:
        """Build from the tutorial's ``[(query, response), ...]`` history."""
        turns = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"history items must be (query, response) pairs, got {pair!r}")
            turns.append(Turn(user=str(pair[0]), assistant=str(pair[1])))
        return cls(system=system, turns=turns)

    def pairs(self) -> list[tuple[str, str]]:
        """The turns as ``(query, response)`` pairs."""
        return [(turn.user, turn.assistant) for turn in self.turns]

    def _index_of(self, key: str | None) -> int | None:
        if key is None:
            return None
        return next((i for i, turn in enumerate(self.turns) if turn.key == key), None)

    def context_turns(self, key: str | None = None) -> list[Turn]:
        """Turns a new message sees: all of them, or those before the turn ``key`` replaces."""
        index = self._index_of(key)
        return list(self.turns if index is None else self.turns[:index])

    def prepare(
        self,
        formatter: ChatFormatter,
        message: str,
        *,
        budget: int,
        use_history: bool = True,
        key: str | None = None,
        enable_thinking: bool | None = None,
    ) -> PromptPlan:
        """Fit system prompt, history and ``message`` into ``budget`` tokens.

        Args:
            formatter: Encodes segments (and caches them).
            message: The new user message.
            budget: Most prompt tokens allowed: context length minus the reply's max_tokens.
            use_history: False sends only the system prompt and the message.
            key: The key the reply will be recorded under; its old turn and the ones after it
                are not shown to the model (they are about to be replaced).
            enable_thinking: Qwen3's switch, passed to the generation prompt.

        Raises:
            BudgetError: The system prompt and generation prompt alone exceed the budget.
        """
        system = self.system if self.system is not None else formatter.default_system
        system_text = "" if system is None else formatter.segment_text("system", system)
        system_ids = [] if system is None else list(formatter.segment("system", system))
        prompt_text, prompt_ids = formatter.generation_prompt(enable_thinking=enable_thinking)
        message_ids = list(formatter.segment("user", message))
        fixed = len(system_ids) + len(prompt_ids)
        truncated = False
        if fixed + len(message_ids) > budget:
            message, message_ids = self._truncate(formatter, message, budget - fixed)
            truncated = True

        remaining = budget - fixed - len(message_ids)
        kept: list[Turn] = []
        kept_ids: list[list[int]] = []
        candidates = self.context_turns(key) if use_history else []
        for turn in reversed(candidates):
            ids = [
                *formatter.segment("user", turn.user),
                *formatter.segment("assistant", formatter.past_reply(turn.assistant)),
            ]
            if len(ids) > remaining:
                break
            remaining -= len(ids)
            kept.append(turn)
            kept_ids.append(ids)
        kept.reverse()
        kept_ids.reverse()

        texts = [system_text]
        for turn in kept:
            texts.append(formatter.segment_text("user", turn.user))
            texts.append(formatter.segment_text("assistant", formatter.past_reply(turn.assistant)))
        texts += [formatter.segment_text("user", message), prompt_text]
        token_ids = [*system_ids]
        for ids in kept_ids:
            token_ids.extend(ids)
        token_ids += message_ids + prompt_ids
        return PromptPlan(
            text="".join(texts),
            token_ids=token_ids,
            budget=budget,
            message=message,
            system=system,
            turns=kept,
            dropped_turns=len(candidates) - len(kept),
            truncated=truncated,
            system_tokens=len(system_ids),
            turn_tokens=[len(ids) for ids in kept_ids],
            message_tokens=len(message_ids),
        )

    @staticmethod
    def _truncate(formatter: ChatFormatter, message: str, room: int) -> tuple[str, list[int]]:
        tokenizer = formatter.tokenizer
        overhead = len(formatter.segment("user", ""))
        if room <= overhead:
            raise BudgetError(
                f"the system prompt leaves no room for a message in the {room + overhead}-token "
                "budget: shorten the system prompt, lower max_tokens or raise max_model_len"
            )
        content_ids = tokenizer.encode_text(message)
        keep = room - overhead
        cut = tokenizer.decode(content_ids[:keep]).rstrip("\ufffd")  # no half characters
        message_ids = list(formatter.segment("user", cut))
        while len(message_ids) > room:  # re-encoding a cut can take a token more
            cut = cut[:-1]
            message_ids = list(formatter.segment("user", cut))
        warnings.warn(
            f"the message is {len(content_ids)} tokens, more than the {keep} that fit: "
            f"only its first {len(message_ids) - overhead} tokens were sent",
            PromptTruncatedWarning,
            stacklevel=3,
        )
        return cut, message_ids

    def record(
        self, message: str, reply: str, *, key: str | None = None, interrupted: bool = False
    ) -> Turn:
        """Add a turn; a turn with the same ``key`` is replaced and the turns after it dropped."""
        index = self._index_of(key)
        if index is not None:
            del self.turns[index:]
        turn = Turn(user=message, assistant=reply, key=key, interrupted=interrupted)
        self.turns.append(turn)
        return turn

    def undo(self) -> Turn | None:
        """Remove and return the last turn (None when there is none)."""
        return self.turns.pop() if self.turns else None

    def clear(self) -> int:
        """Forget every turn (the system prompt stays); returns how many were removed."""
        removed = len(self.turns)
        self.turns.clear()
        return removed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "qwen-magic-conversation",
            "version": FORMAT_VERSION,
            "system": self.system,
            "turns": [asdict(turn) for turn in self.turns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        if not isinstance(data, dict) or data.get("format") != "qwen-magic-conversation":
            raise ValueError("not a qwen-magic conversation export (expected its JSON format)")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"this export has format version {data['version']}; upgrade qwen-magic to read it"
            )
        known = set(Turn.__dataclass_fields__)
        turns = [Turn(**{k: v for k, v in item.items() if k in known}) for item in data["turns"]]
        return cls(system=data.get("system"), turns=turns)

    def to_json(self) -> str:
        """Lossless JSON (unicode kept as is, so exports stay readable)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        """A readable transcript: the system prompt, then each turn."""
        lines = ["# Conversation", ""]
        if self.system is not None:
            lines += ["**System:** " + self.system, ""]
        for number, turn in enumerate(self.turns, start=1):
            marker = " *(interrupted)*" if turn.interrupted else ""
            lines += [f"## Turn {number}", "", "**User:**", "", turn.user, ""]
            lines += [f"**Assistant:**{marker}", "", turn.assistant, ""]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``) or Markdown (``.md``), chosen by the suffix."""
        path = Path(path).expanduser()
        if path.suffix.lower() not in {".json", ".md"}:
            raise ValueError(f"cannot export to {path.name}: use a .json or .md file name")
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_markdown()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a JSON export written by :meth:`save`."""
        path = Path(path).expanduser()
        if path.suffix.lower() != ".json":
            raise ValueError(f"cannot import {path.name}: only .json exports can be read back")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error.msg} at line {error.lineno})"
            ) from None
