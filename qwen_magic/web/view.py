"""What the web page shows, as plain data: chat messages, the sampling controls, a reply's facts.

Gradio's ``Chatbot`` takes a list of message dicts (``{"role", "content", "metadata"}``); these
functions build them from a conversation's turns and from a reply being streamed, so the page
module only wires events. A thinking model's reasoning is its own collapsed message titled
"Thought for X s" (``status`` "pending" while it thinks, "done" after), as Gradio shows thoughts.

Pure Python: no gradio, vLLM, IPython or ipywidgets import, so it is tested without a browser.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_magic import render
from qwen_magic.sampling import SETTINGS, SamplingSetting, default_max_tokens

if TYPE_CHECKING:
    from qwen_magic.chat import Reply
    from qwen_magic.conversation import Turn

__all__ = [
    "UPDATE_INTERVAL_S",
    "Control",
    "Throttle",
    "changed_sampling",
    "chat_messages",
    "controls",
    "reply_facts",
    "thought_message",
    "turn_of_message",
]

UPDATE_INTERVAL_S = 0.05  # at most 20 updates a second: each one re-sends and re-renders the chat
Message = dict[str, Any]


class Throttle:
    """Says whether enough time has passed since the last update to show another."""

    def __init__(self, interval_s: float = UPDATE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return True


def thought_message(reasoning: str, *, seconds: float | None, done: bool) -> Message:
    """The collapsed block holding a reply's reasoning."""
    if done:
        title = "Thought" if seconds is None else f"Thought for {seconds:.1f} s"
    else:
        title = "Thinking…"
    metadata = {"title": title, "status": "done" if done else "pending"}
    return {"role": "assistant", "content": render.safe_markdown(reasoning), "metadata": metadata}


def answer_message(text: str, *, interrupted: bool = False, cut: bool = False) -> Message:
    """A reply, rendered defensively (model output) and marked as the notebook marks it."""
    reasons = ["length"] if cut else []
    bundle = render.render_reply([text], interrupted=interrupted, finish_reasons=reasons)
    return {"role": "assistant", "content": bundle["text/markdown"]}


def chat_messages(
    turns: Sequence[Turn], thinking_seconds: Mapping[str | None, float] | None = None
) -> list[Message]:
    """The chat as Gradio messages: user, [thought], answer for every turn.

    ``thinking_seconds`` maps a turn's key to how long it thought (the page remembers it; an
    imported turn has none and shows "Thought").
    """
    seconds = thinking_seconds or {}
    messages: list[Message] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn.user})
        if turn.reasoning:
            messages.append(
                thought_message(turn.reasoning, seconds=seconds.get(turn.key), done=True)
            )
        messages.append(answer_message(turn.assistant, interrupted=turn.interrupted))
    return messages


def streaming_messages(
    past: list[Message], message: str, answer: str, reasoning: str | None, thinking_since: float
) -> list[Message]:
    """The chat while a reply streams: the past, the message, the thought so far, the answer."""
    shown = [*past, {"role": "user", "content": message}]
    if reasoning is not None:
        thinking = not answer
        seconds = None if thinking else time.monotonic() - thinking_since
        shown.append(thought_message(reasoning, seconds=seconds, done=not thinking))
    if answer or reasoning is None:
        shown.append(answer_message(answer))
    return shown


def turn_of_message(turns: Sequence[Turn], index: int) -> int:
    """Which turn the chat message at ``index`` (as :func:`chat_messages` lays them out) is in."""
    position = 0
    for number, turn in enumerate(turns):
        position += 3 if turn.reasoning else 2
        if index < position:
            return number
    raise IndexError(f"no turn holds message {index}")


@dataclass(frozen=True)
class Control:
    """One sampling control of the page: its table row and the value it starts at.

    ``start`` is what the model would use anyway (its generation_config, else vLLM's neutral
    value, else the default max_tokens), so a control left alone sends nothing.
    """

    setting: SamplingSetting
    start: float | None
    maximum: float


def controls(generation_defaults: Mapping[str, Any], max_model_len: int) -> list[Control]:
    """The sampling controls, one per row of :data:`qwen_magic.sampling.SETTINGS`."""
    made = []
    for item in SETTINGS:
        maximum = item.maximum
        if item.kind == "seed":
            start = None  # unseeded
        elif item.name == "max_tokens":
            start = default_max_tokens(max_model_len)
            maximum = min(item.maximum, max_model_len - 1)
        else:
            start = generation_defaults.get(item.name, item.neutral)
        made.append(Control(item, start, maximum))
    return made


def changed_sampling(shown: Sequence[Control], values: Sequence[Any]) -> dict[str, Any]:
    """The settings whose control moved from where it started (the others stay the model's).

    Raises:
        ValueError: A value that is not a number (an empty seed box is "unseeded").
    """
    sampling: dict[str, Any] = {}
    for control, value in zip(shown, values, strict=True):
        if isinstance(value, str):
            value = value.strip()
            if not value:
                continue
            try:
                value = float(value)
            except ValueError:
                raise ValueError(
                    f"{control.setting.name} must be {control.setting.allowed}, got {value!r}"
                ) from None
        if value is None or value == control.start:
            continue
        if control.setting.kind != "float" and float(value).is_integer():
            value = int(value)
        sampling[control.setting.name] = value
    return sampling


def reply_facts(reply: Reply) -> str:
    """One Markdown line about the last reply: tokens, speed, stop reason, sampling, budget."""
    parts = [f"{reply.num_generated_tokens} tokens", f"{reply.tokens_per_second:.1f} tokens/s"]
    if reply.interrupted:
        parts.append(render.INTERRUPTED)
    elif reply.finish_reasons and reply.finish_reasons[0] == "length":
        parts.append(render.CUT_AT_MAX_TOKENS)
    seconds = getattr(reply, "thinking_seconds", None)
    if seconds is not None:
        parts.append(f"thought {seconds:.1f} s")
    if reply.plan is not None:
        parts.append(render.budget_summary(reply.plan))
    sampling = ", ".join(
        f"{key}={value}" for key, value in sorted(reply.sampling.items()) if value is not None
    )
    return " · ".join(parts) + f"\n\nsampling: `{sampling}`"
