"""Fitting a conversation into the token budget, and the tutorial's ``format_prompt``.

:func:`fit_prompt` builds the ChatML token ids of a system prompt, past turns and a new message
within a budget that the caller recomputes on every call (the context length minus the reply's
``max_tokens``), so long sessions never run out of room:

- the system prompt and the new message are never dropped;
- the oldest whole turns go first;
- a past turn's reasoning (:attr:`Turn.reasoning <qwen_magic.conversation.Turn.reasoning>`) is
  sent again only where the model's chat template would send it (Qwen3: never, as every past
  turn comes before the new user message), so its ids equal ``apply_chat_template``'s with
  ``reasoning_content``;
- a new message that alone exceeds the budget is refused (``on_overflow="error"``, what the
  front-ends use, so the history stays as it was) or cut to fit with a
  :class:`PromptTruncatedWarning` (``on_overflow="truncate"``, the tutorial's behaviour).

The returned :class:`PromptPlan` says what was kept and dropped, so the UI can show it.

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from qwen_magic.chatml import SEED_SYSTEM, ChatFormatter

__all__ = [
    "BudgetError",
    "MessageTooLongError",
    "PromptPlan",
    "PromptTruncatedWarning",
    "fit_prompt",
    "format_prompt",
]


class PromptTruncatedWarning(UserWarning):
    """The new message alone did not fit the token budget and was cut."""


class BudgetError(ValueError):
    """Not even the system prompt and an empty message fit the token budget."""


class MessageTooLongError(BudgetError):
    """The new message alone does not fit the budget (``on_overflow="error"``)."""


class _TurnLike(Protocol):
    """A past turn; a ``reasoning`` attribute (str or None), when it has one, is its reasoning."""

    user: str
    assistant: str


@dataclass(frozen=True)
class PromptPlan:
    """Exactly what the model will see, and how the budget shaped it."""

    text: str
    token_ids: list[int]
    budget: int
    message: str
    system: str | None
    turns: list[Any]
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


def fit_prompt(
    formatter: ChatFormatter,
    system: str | None,
    turns: Sequence[_TurnLike],
    message: str,
    *,
    budget: int,
    on_overflow: Literal["error", "truncate"] = "error",
    enable_thinking: bool | None = None,
) -> PromptPlan:
    """Fit ``system``, the newest of ``turns`` and ``message`` into ``budget`` tokens.

    Args:
        formatter: Encodes segments (and caches them).
        system: The system prompt; None uses the model template's default (possibly none).
        turns: Past turns, oldest first (anything with ``user`` and ``assistant``, and
            optionally ``reasoning``).
        message: The new user message.
        budget: Most prompt tokens allowed: context length minus the reply's max_tokens.
        on_overflow: What to do with a message that alone does not fit.
        enable_thinking: The thinking switch, passed to the generation prompt (None: the
            template's default).

    Raises:
        BudgetError: The system prompt and generation prompt leave no room for a message.
        MessageTooLongError: The message does not fit and ``on_overflow="error"``.
        ValueError: ``on_overflow`` is neither of the two.
    """
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    if system is None:
        system = formatter.default_system
    system_text = "" if system is None else formatter.segment_text("system", system)
    system_ids = [] if system is None else list(formatter.segment("system", system))
    prompt_text, prompt_ids = formatter.generation_prompt(enable_thinking=enable_thinking)
    fixed = len(system_ids) + len(prompt_ids)
    message_ids = formatter.encode_uncached("user", message)
    truncated = False
    if fixed + len(message_ids) > budget:
        message, message_ids = _truncate(formatter, message, budget, fixed, on_overflow)
        truncated = True
    else:
        formatter.remember("user", message, message_ids)

    remaining = budget - fixed - len(message_ids)
    kept: list[Any] = []
    kept_ids: list[list[int]] = []
    kept_texts: list[str] = []
    for turn in reversed(turns):
        reply_text, reply_ids = formatter.past_turn(
            turn.assistant, getattr(turn, "reasoning", None)
        )
        ids = [*formatter.segment("user", turn.user), *reply_ids]
        if len(ids) > remaining:
            break
        remaining -= len(ids)
        kept.append(turn)
        kept_ids.append(ids)
        kept_texts.append(formatter.segment_text("user", turn.user) + reply_text)
    kept.reverse()
    kept_ids.reverse()
    kept_texts.reverse()

    texts = [system_text, *kept_texts, formatter.segment_text("user", message), prompt_text]
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
        dropped_turns=len(turns) - len(kept),
        truncated=truncated,
        system_tokens=len(system_ids),
        turn_tokens=[len(ids) for ids in kept_ids],
        message_tokens=len(message_ids),
    )


def _truncate(
    formatter: ChatFormatter, message: str, budget: int, fixed: int, on_overflow: str
) -> tuple[str, list[int]]:
    """Cut ``message`` so that its segment fits ``budget - fixed`` tokens (or refuse)."""
    tokenizer = formatter.tokenizer
    overhead = len(formatter.segment("user", ""))
    room = budget - fixed
    if room <= overhead:
        raise BudgetError(
            f"the system prompt and reply prompt take {fixed} of the {budget}-token budget, "
            "leaving no room for a message: shorten the system prompt, lower max_tokens or "
            "raise max_model_len"
        )
    content_ids = tokenizer.encode_text(message)
    keep = room - overhead
    if on_overflow == "error":
        raise MessageTooLongError(
            f"the message is {len(content_ids):,} tokens and only {keep:,} fit"
        )
    cut = tokenizer.decode(content_ids[:keep]).rstrip("\ufffd")  # no half characters
    message_ids = formatter.encode_uncached("user", cut)
    while len(message_ids) > room:  # re-encoding a cut can take a token more
        cut = cut[:-1]
        message_ids = formatter.encode_uncached("user", cut)
    warnings.warn(
        f"the message is {len(content_ids)} tokens, more than the {keep} that fit: "
        f"only its first {len(message_ids) - overhead} tokens were sent",
        PromptTruncatedWarning,
        stacklevel=4,
    )
    return cut, message_ids


def format_prompt(
    tokenizer: Any,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str | None = SEED_SYSTEM,
    max_window_size: int | None = None,
) -> tuple[str, list[int]]:
    """The tutorial's ``make_context``: ChatML text and ids for ``query`` after ``history``.

    Args:
        tokenizer: Anything :meth:`ChatTokenizer.load` takes, or a ChatFormatter (reuse one to
            keep its segment cache warm).
        query: The new user message.
        history: Past ``(query, response)`` pairs, oldest first.
        system: The system prompt; None uses the model template's default (possibly none).
        max_window_size: Token budget for the whole prompt; the oldest turns are dropped to fit
            and a query that alone does not fit is cut (with a warning).

    Returns:
        ``(text, token_ids)`` ending with the generation prompt ``<|im_start|>assistant\\n``.
    """
    from qwen_magic.conversation import Conversation

    formatter = tokenizer if isinstance(tokenizer, ChatFormatter) else ChatFormatter(tokenizer)
    turns = Conversation.from_pairs(history or []).turns
    budget = max_window_size if max_window_size is not None else 2**62
    plan = fit_prompt(formatter, system, turns, query, budget=budget, on_overflow="truncate")
    return plan.text, plan.token_ids
