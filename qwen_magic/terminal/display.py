"""What ``qwen-magic chat`` shows: streamed replies, the thinking line, notices and ``/show``.

Replies stream as plain text, as the model wrote them (pipe-friendly, like ``ollama run``);
marks such as "⏹ interrupted" and the thinking line are dim when the stream is a terminal and
plain when it is not (or ``NO_COLOR`` is set). Pure text formatting over a stream: no
prompt_toolkit, no engine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from qwen_magic.render import CUT_AT_MAX_TOKENS, INTERRUPTED
from qwen_magic.sampling import SETTINGS, default_max_tokens

__all__ = ["ReplyPrinter", "Screen", "history_text", "settings_text"]

_DIM, _RESET, _ERASE_LINE = "\x1b[2m", "\x1b[0m", "\r\x1b[2K"


class Screen:
    """A text stream and whether it may be styled (a terminal, ``NO_COLOR`` not set)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.styled = bool(isatty()) and not os.environ.get("NO_COLOR")

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def dim(self, text: str) -> str:
        return f"{_DIM}{text}{_RESET}" if self.styled else text

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def note(self, text: str) -> None:
        """A dim line: what happened, not what the model said."""
        self.line(self.dim(text))


class ReplyPrinter:
    """Streams one reply: a thinking model's status line, then the answer as it comes.

    Pass :meth:`on_thinking` and :meth:`on_delta` to ``ChatSession.ask`` and call
    :meth:`finish` with the reply. The reasoning itself is not printed (``/show`` has it): the
    status line reads "Thinking…" while the model thinks and "Thought for 4.1 s" once it answers.
    """

    def __init__(
        self,
        screen: Screen,
        *,
        status: Screen | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.screen = screen
        self.status = status if status is not None else screen
        self.clock = clock
        self.answer = ""
        self.thinking_started: float | None = None
        self.thinking_line_open = False

    def on_thinking(self, index: int, text: str) -> None:
        if index != 0 or not text or self.thinking_started is not None:
            return
        self.thinking_started = self.clock()
        self.thinking_line_open = True
        self.status.write(self.status.dim("Thinking…"))

    def _close_thinking_line(self, tokens: int | None = None, seconds: float | None = None) -> None:
        if not self.thinking_line_open:
            return
        self.thinking_line_open = False
        if seconds is None:
            seconds = self.clock() - (self.thinking_started or self.clock())
        summary = f"Thought for {seconds:.1f} s" + (f", {tokens} tokens" if tokens else "")
        # A terminal gets the line replaced in place; a pipe keeps "Thinking…" and a new line.
        start = _ERASE_LINE if self.status.styled else " "
        self.status.write(start + self.status.dim(summary) + "\n")

    def on_delta(self, index: int, text: str) -> None:
        if index != 0 or not text:
            return
        self._close_thinking_line()
        self.answer += text
        self.screen.write(text)

    def finish(self, reply: Any, *, interrupted: bool = False) -> None:
        """End the reply's output; ``reply`` may be None when nothing came back."""
        if reply is not None:
            self._close_thinking_line(
                getattr(reply, "thinking_tokens", None), getattr(reply, "thinking_seconds", None)
            )
            rest = reply.text[len(self.answer) :] if reply.text.startswith(self.answer) else ""
            if rest:  # the engine's final text may hold what the stream held back
                self.screen.write(rest)
                self.answer += rest
            interrupted = interrupted or reply.interrupted
        else:
            self._close_thinking_line()
        reasons = getattr(reply, "finish_reasons", None) or [None]
        mark = INTERRUPTED if interrupted else CUT_AT_MAX_TOKENS if reasons[0] == "length" else ""
        if getattr(reply, "stopped_while_thinking", False) and not interrupted:
            mark = "stopped while thinking: no answer (raise max_tokens)"
        if self.answer and not self.answer.endswith("\n"):
            self.screen.line()
        if mark:
            self.status.note(f"[{mark}]")


def settings_text(
    values: Mapping[str, Any], model_defaults: Mapping[str, Any], max_model_len: int | None
) -> str:
    """The sampling settings, one per line: the value and where it comes from."""
    lines = []
    for item in SETTINGS:
        if values.get(item.name) is not None:
            shown = f"{values[item.name]}  (set)"
        elif item.name in model_defaults:
            shown = f"{model_defaults[item.name]}  (the model's)"
        elif item.name == "max_tokens" and max_model_len:
            shown = f"{default_max_tokens(max_model_len)}  (default)"
        else:
            shown = "-  (unset)" if item.name == "seed" else f"{item.neutral:g}  (vLLM's)"
        lines.append(f"  {item.name.ljust(18)} {shown}")
    return "\n".join(lines)


def history_text(conversation: Any) -> str:
    """The conversation as plain text: the system prompt, then each turn."""
    lines = []
    system = conversation.system
    lines.append(f"system: {system}" if system is not None else "system: (the model's own)")
    if not conversation.turns:
        lines.append("(no turns yet)")
    for number, turn in enumerate(conversation.turns, start=1):
        mark = f"  [{INTERRUPTED}]" if turn.interrupted else ""
        lines.append(f"--- {number}. you")
        lines.append(turn.user)
        lines.append(f"--- {number}. assistant{mark}")
        reasoning = getattr(turn, "reasoning", None)
        if reasoning:
            lines.append(f"(thinking) {reasoning}")
        lines.append(turn.assistant)
    return "\n".join(lines)
