"""Reasoning apart from the answer: a streaming splitter on token ids, and the same split on text.

Qwen3-family thinking models write ``<think>`` reasoning ``</think>`` and then the answer. The
offline vLLM engine does no splitting, so :class:`ReasoningSplitter` does it on the stream of
deltas, deciding on token *ids* (never on text, so a ``</think>`` that the model or the user writes
as ordinary text never splits). Its rules are those of vLLM's Qwen3 reasoning parser and of Qwen's
own parsing code (the last ``</think>`` id is found by id):

- the block opens at the first generated token only (a ``<think>`` later is the model talking
  about the tag), or before it when the prompt already opened it (the generation prompt of
  Qwen3-Thinking-2507 and Qwen3.5 ends in ``<think>\\n``: see
  :meth:`qwen_magic.chatml.TemplateProfile.opens_thinking`);
- the first ``</think>`` id closes it; a later one is answer text;
- a prompt that holds a whole, empty block (Qwen3 with ``enable_thinking=False``) gets a reply
  whose reasoning is ``""``: it had a block, an empty one (so the history re-sends its answer as
  the template re-sends a message with ``reasoning_content``, without splitting its text);
- a reply cut short inside the block (``max_tokens``, an interrupt) has reasoning and no answer;
- newlines around the reasoning and before the answer are trimmed as the chat template trims
  them, and the streamed pieces add up to exactly the final texts.

:func:`split_reasoning_text` applies the same rules to a reply stored as one text (exports written
before reasoning was kept apart).

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from qwen_magic.chatml import THINK_END, THINK_START, PromptBlock

if TYPE_CHECKING:
    from qwen_magic.chatml import ChatTokenizer

__all__ = ["ReasoningDelta", "ReasoningSplitter", "SplitReply", "split_reasoning_text"]


class ReasoningDelta(NamedTuple):
    """The new text of each part since the previous delta (either may be empty)."""

    reasoning: str = ""
    answer: str = ""


@dataclass(frozen=True)
class SplitReply:
    """A reply split into its reasoning and its answer.

    Attributes:
        reasoning: The think block's text; None when the reply had no think block.
        answer: The text after the block (all of it when there was none).
        closed: The block was closed (True when there was none).
        thinking_seconds: From the first delta inside the block to the one that closed it (or
            to now, while it is open); None without a block.
        thinking_tokens: Tokens generated inside the block, its tags not counted.
    """

    reasoning: str | None
    answer: str
    closed: bool = True
    thinking_seconds: float | None = None
    thinking_tokens: int = 0

    @property
    def stopped_while_thinking(self) -> bool:
        """The reply ended inside its think block: it has no answer."""
        return not self.closed


class ReasoningSplitter:
    """Splits one sample's stream of deltas into reasoning and answer.

    Args:
        think_start_id: The ``<think>`` token's id (None: the model has no think tokens, and
            everything is answer).
        think_end_id: The ``</think>`` token's id.
        prompt_block: What the prompt holds of a think block
            (:meth:`qwen_magic.chatml.TemplateProfile.prompt_block`):
            "open" starts the reply in reasoning, "closed" makes its reasoning ``""``.
        decode: Decodes ids; used only where one delta's text holds the tag's text more than
            once (the model also wrote it as ordinary tokens), to find which one is the token.
        stop_token_ids: Ids that end the reply (``<|im_end|>``): counted nowhere.
        clock: Seconds, for timing the thinking (injectable for tests).
    """

    def __init__(
        self,
        *,
        think_start_id: int | None,
        think_end_id: int | None,
        prompt_block: PromptBlock = "none",
        decode: Callable[[Sequence[int]], str] | None = None,
        stop_token_ids: Collection[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if think_start_id is None or think_end_id is None:  # no think tokens: all is answer
            think_start_id = think_end_id = None
        self._start_id, self._end_id = think_start_id, think_end_id
        self._decode = decode
        self._stop_ids = frozenset(stop_token_ids)
        self._clock = clock
        self._in_reasoning = prompt_block == "open" and self._end_id is not None
        has_block = prompt_block != "none" and self._end_id is not None
        self._reasoning: list[str] | None = [] if has_block else None
        self._answer: list[str] = []
        self._held_newlines = ""  # reasoning's trailing newlines: dropped if the block ends
        self._trim_answer = False  # the answer's leading newlines go, after a generated close
        self._first_token = True
        self._closed = not self._in_reasoning
        self._started: float | None = None
        self._ended: float | None = None
        self._thinking_tokens = 0

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: ChatTokenizer,
        *,
        enable_thinking: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> ReasoningSplitter:
        """A splitter for a reply to a prompt formatted with ``enable_thinking``."""
        return cls(
            think_start_id=tokenizer.think_start_id,
            think_end_id=tokenizer.think_end_id,
            prompt_block=tokenizer.profile.prompt_block(enable_thinking),
            decode=tokenizer.decode,
            stop_token_ids=tokenizer.stop_token_ids,
            clock=clock,
        )

    # ------------------------------------------------------------------ reading

    @property
    def in_reasoning(self) -> bool:
        """Whether the text now arriving is reasoning."""
        return self._in_reasoning

    @property
    def reasoning(self) -> str | None:
        """The reasoning so far (its trailing newlines held back); None without a block."""
        return None if self._reasoning is None else "".join(self._reasoning)

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    @property
    def thinking_tokens(self) -> int:
        return self._thinking_tokens

    @property
    def thinking_seconds(self) -> float | None:
        """Thinking time so far (still counting while the block is open)."""
        if self._reasoning is None:
            return None
        if self._started is None:
            return 0.0
        return (self._ended if self._ended is not None else self._clock()) - self._started

    def result(self) -> SplitReply:
        """The split so far; after the last delta, the reply's."""
        return SplitReply(
            reasoning=self.reasoning,
            answer=self.answer,
            closed=self._closed,
            thinking_seconds=self.thinking_seconds,
            thinking_tokens=self._thinking_tokens,
        )

    # ------------------------------------------------------------------ feeding

    def feed(
        self, token_ids: Sequence[int], text: str, *, generated: bool = True
    ) -> ReasoningDelta:
        """Take one delta (its new ids and their text); return the new text of each part.

        ``generated=False`` marks ids the model did not write (the text a thinking budget
        appends to close the block): they are not counted as thinking tokens.
        """
        if self._end_id is None:  # a model without think tokens: all of it is answer
            if text:
                self._answer.append(text)
            return ReasoningDelta(answer=text)
        now = self._clock()
        if self._in_reasoning and self._started is None:
            self._started = now
        out = ReasoningDelta()
        rest, routed = text, 0  # text not yet given to a part; ids whose text that was
        for index, token in enumerate(token_ids):
            first, self._first_token = self._first_token, False
            if token in self._stop_ids:
                continue
            if first and token == self._start_id:  # opens the block (or repeats the prompt's)
                before, rest = self._cut(rest, token_ids[routed:index], THINK_START)
                out = self._route(out, before)
                routed = index + 1
                if not self._in_reasoning:
                    self._reasoning, self._in_reasoning, self._closed = [], True, False
                    self._started = now
            elif self._in_reasoning and token == self._end_id:
                before, rest = self._cut(rest, token_ids[routed:index], THINK_END)
                out = self._route(out, before)
                routed = index + 1
                self._in_reasoning, self._closed, self._ended = False, True, now
                self._held_newlines, self._trim_answer = "", True
            elif self._in_reasoning and generated:
                self._thinking_tokens += 1
        return self._route(out, rest)

    def _cut(self, text: str, ids_before: Sequence[int], tag: str) -> tuple[str, str]:
        """``text`` around the tag token's own text: (what came before it, what follows)."""
        occurrences = text.count(tag)
        skip = 0  # how many of the tag's texts in ``text`` come from ordinary tokens before it
        if occurrences > 1 and self._decode is not None:
            skip = self._decode([t for t in ids_before if t not in self._stop_ids]).count(tag)
        position = -1
        for _ in range(min(skip, occurrences - 1) + 1):
            position = text.find(tag, position + 1)
        if position >= 0:
            return text[:position], text[position + len(tag) :]
        # The text leaves the tag out (a detokenizer that skips added tokens): cut by length.
        if not ids_before:
            return "", text
        if self._decode is None:
            return text, ""
        before = self._decode([t for t in ids_before if t not in self._stop_ids])
        return (before, text[len(before) :]) if text.startswith(before) else (text, "")

    def _route(self, out: ReasoningDelta, text: str) -> ReasoningDelta:
        if not text:
            return out
        if self._in_reasoning:
            assert self._reasoning is not None
            if not self._reasoning and not self._held_newlines:
                text = text.lstrip("\n")
            body = text.rstrip("\n")
            if not body:
                self._held_newlines += text
                return out
            piece = self._held_newlines + body
            self._held_newlines = text[len(body) :]
            self._reasoning.append(piece)
            return out._replace(reasoning=out.reasoning + piece)
        if self._trim_answer:
            text = text.lstrip("\n")
            if not text:
                return out
            self._trim_answer = False
        self._answer.append(text)
        return out._replace(answer=out.answer + text)


def split_reasoning_text(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """Split a reply stored as one text into ``(reasoning, answer)`` by the splitter's rules.

    Only a leading ``<think>`` opens a block (or ``opened``: the prompt opened it); the first
    ``</think>`` closes it. Text is all that is left of the tags here, so unlike the id splitter
    this cannot tell a tag the model wrote as ordinary text from the token: use it for replies
    stored before reasoning was kept apart.

    Returns:
        ``(None, text)`` without a block; ``(reasoning, "")`` for a block never closed.
    """
    if not opened:
        if not text.startswith(THINK_START):
            return None, text
        text = text[len(THINK_START) :]
    reasoning, closed, answer = text.partition(THINK_END)
    return reasoning.strip("\n"), (answer.lstrip("\n") if closed else "")
