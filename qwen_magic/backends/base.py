"""The one door every backend goes through: model facts, streaming from token ids, closing.

A backend runs a model and knows nothing of chats: it takes the exact prompt token ids that
:mod:`qwen_magic.prompt` built and streams back :class:`Delta` objects. Closing the iterator
(or an interrupt inside it) aborts the request. :class:`qwen_magic.chat.QwenChat` is the only
caller; front-ends never import a concrete backend.

Pure Python: no vLLM, IPython, ipywidgets or network import.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Backend",
    "BackendBusy",
    "BackendError",
    "BackendInfo",
    "BatchRequest",
    "Delta",
    "forget_exception",
]


class BackendError(RuntimeError):
    """A problem the user can fix; the message is one line that says how."""


class BackendBusy(BackendError):
    """The backend is already generating a reply and takes one request at a time."""


class Delta(NamedTuple):
    """New text of one sample since the previous delta (a tuple: cheap to make per token).

    Attributes:
        index: Which sample (0..n-1) the text belongs to.
        text: The new text (special tokens removed).
        token_ids: The new token ids.
        finished: This sample is complete.
        finish_reason: "stop" (stop token or string), "length" (max_tokens), "abort", or None.
        num_cached_tokens: Prompt tokens taken from the prefix cache (None if unknown).
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int | None = None


class BatchRequest(NamedTuple):
    """One request of :meth:`Backend.generate_many`.

    Attributes:
        prompt_token_ids: The full prompt, already formatted.
        sampling: Its sampling values (as :meth:`Backend.resolve_sampling` returns them).
        n: Number of samples.
    """

    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    n: int = 1


@dataclass(frozen=True)
class BackendInfo:
    """What a front-end may show about the loaded model, whatever serves it.

    Attributes:
        model: The model folder, hub id or served model name.
        max_model_len: Context length in tokens.
        generation_defaults: Sampling values from the model's generation_config.json.
        where: Where it runs ("cuda", "cpu", or a server URL).
        version: The serving software's version.
    """

    model: str
    max_model_len: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    version: str = ""


@runtime_checkable
class Backend(Protocol):
    """What :class:`qwen_magic.chat.QwenChat` needs from whatever runs the model."""

    @property
    def info(self) -> BackendInfo:
        """Model facts."""

    def status(self) -> dict[str, str]:
        """Facts that change while loaded (memory, load), formatted for ``%qwen_status``."""

    def tokenizer(self) -> Any:
        """A tokenizer for the model (for ChatML formatting), when no local folder has one."""

    def resolve_sampling(self, num_prompt_tokens: int, **sampling: Any) -> dict[str, Any]:
        """The values a request sends: the user's over the model's defaults, max_tokens capped."""

    def stream(
        self, prompt_token_ids: list[int], *, n: int = 1, stop_token_ids: list[int], **sampling: Any
    ) -> Iterator[Delta]:
        """Generate; closing the iterator aborts the request."""

    def generate_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        stop_token_ids: list[int],
        concurrency: int | None = None,
    ) -> Iterator[tuple[int, Delta]]:
        """Generate every request at once (one engine batch, or concurrent server requests).

        Yields ``(request index, delta)`` once per sample, when it is complete: the delta holds
        the sample's whole text and ids. ``concurrency`` caps the requests in flight (None: the
        backend's default). Every request is checked before any is sent; closing the iterator
        (or an interrupt inside it) aborts those still running.
        """

    def close(self) -> None:
        """Free everything the backend holds; safe to call twice."""


def forget_exception(error: BaseException) -> None:
    """Drop the frames an exception (and its chain) keeps, so that they pin no engine.

    IPython keeps the last exception in ``sys.last_value``; without this, the locals of every
    frame it passed through (a backend, its engine, the model's weights) stay alive with it.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
