"""One request's run: the :class:`Reply` it makes, streaming with the thinking budget
(:class:`Generation`) and a batch of requests (:func:`run_batch`).

:class:`qwen_magic.chat.QwenChat` plans the prompts and calls these; they speak to the backend
through its protocol only. Pure Python besides ``tqdm`` (no vLLM, IPython or network import).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen_magic.backends.base import BatchRequest
from qwen_magic.batch import BatchItem, BatchResult, Job
from qwen_magic.prompt import PromptPlan
from qwen_magic.reasoning import ReasoningSplitter, SplitReply

if TYPE_CHECKING:
    from qwen_magic.backends.base import Backend
    from qwen_magic.chatml import ChatTokenizer
    from qwen_magic.conversation import Recorded

__all__ = ["BUDGET_CLOSE_TEXT", "Generation", "Reply", "check_n", "progress_bar", "run_batch"]

# What closes a think block when the thinking budget runs out: Qwen's own sentence
# (QwenLM/Qwen3 docs, "thinking budget"), then the block's end; the model goes on to answer.
BUDGET_CLOSE_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n</think>\n\n"
)


@dataclass
class Reply:
    """What one request produced.

    Attributes:
        texts: One answer per sample (a thinking model's reasoning left out); partial when
            ``interrupted``.
        plan: How the prompt was built from the conversation (None for raw completions).
        sampling: The sampling values actually sent to vLLM (user's over model defaults).
        finish_reasons: Per sample: "stop", "length", or None when cut short.
        interrupted: A KeyboardInterrupt stopped generation.
        num_prompt_tokens: Prompt length in tokens.
        num_generated_tokens: Tokens generated over all samples.
        elapsed_s: Wall time of generation.
        prompt_text: The prompt as text.
        prompt_token_ids: The prompt's token ids.
        num_cached_tokens: Prompt tokens served from vLLM's prefix cache (None if unknown).
        recorded: How the turn joined the conversation (None when it did not).
        thinking: Per sample, its reasoning apart from its answer (empty for ``--raw``).
        budget_reached: The thinking budget closed sample 1's think block.
    """

    texts: list[str]
    plan: PromptPlan | None
    sampling: dict[str, Any]
    finish_reasons: list[str | None]
    interrupted: bool
    num_prompt_tokens: int
    num_generated_tokens: int
    elapsed_s: float
    prompt_text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    recorded: Recorded | None = None
    thinking: list[SplitReply] = field(default_factory=list)
    budget_reached: bool = False

    @property
    def text(self) -> str:
        """The first sample's answer (the one that joins the history)."""
        return self.texts[0]

    @property
    def reasoning(self) -> str | None:
        """The first sample's reasoning; None when it had no think block."""
        return self.thinking[0].reasoning if self.thinking else None

    @property
    def reasonings(self) -> list[str | None]:
        """Every sample's reasoning."""
        return [split.reasoning for split in self.thinking] or [None] * len(self.texts)

    @property
    def thinking_seconds(self) -> float | None:
        """How long sample 1 thought; None without a think block."""
        return self.thinking[0].thinking_seconds if self.thinking else None

    @property
    def thinking_tokens(self) -> int:
        """Tokens sample 1 generated inside its think block."""
        return self.thinking[0].thinking_tokens if self.thinking else 0

    @property
    def stopped_while_thinking(self) -> bool:
        """Sample 1 ended inside its think block: it has no answer."""
        return bool(self.thinking) and self.thinking[0].stopped_while_thinking

    @property
    def tokens_per_second(self) -> float:
        """Generation speed over all samples."""
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Generation:
    """One request's deltas as ``(index, ReasoningDelta)``, with the thinking budget applied.

    When sample 1 has thought ``thinking_budget`` tokens, the request is aborted and sent again
    as prompt + what was generated + :data:`BUDGET_CLOSE_TEXT` (vLLM's prefix cache makes that
    cheap), with what is left of ``max_tokens``: the same on every backend, no engine option
    needed. Closing it aborts whichever request is running.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: ChatTokenizer,
        prompt_ids: list[int],
        values: dict[str, Any],
        *,
        n: int,
        splitters: list[ReasoningSplitter] | None,
        thinking_budget: int | None,
        stop_requested: threading.Event,
    ) -> None:
        self._backend, self._tokenizer = backend, tokenizer
        self._prompt_ids, self._values, self._n = prompt_ids, values, n
        self._splitters = splitters
        self._budget = thinking_budget
        self._stop_requested = stop_requested
        self.finish_reasons: list[str | None] = [None] * n
        self.generated = 0
        self.cached: int | None = None
        self.budget_reached = False
        self.stopped = False
        self._iterator = self._pieces()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self._iterator

    def close(self) -> None:
        self._iterator.close()

    def _open(self, prompt_ids: list[int], values: dict[str, Any]) -> Any:
        stop = self._tokenizer.stop_token_ids
        return self._backend.stream(prompt_ids, n=self._n, stop_token_ids=stop, **values)

    def _budget_spent(self) -> bool:
        if self._budget is None or self.budget_reached or not self._splitters:
            return False
        splitter = self._splitters[0]
        return splitter.in_reasoning and splitter.thinking_tokens >= self._budget

    def _pieces(self) -> Iterator[tuple[int, Any]]:
        from qwen_magic.reasoning import ReasoningDelta

        sample_ids: list[int] = []  # sample 1's generated ids, for the budget's second request
        prompt_ids, values = self._prompt_ids, self._values
        while True:
            if self._budget_spent():
                forced = self._tokenizer.encode_template_text(BUDGET_CLOSE_TEXT)
                self.budget_reached = True
                yield 0, self._splitters[0].feed(forced, BUDGET_CLOSE_TEXT, generated=False)  # type: ignore[index]
                remaining = values["max_tokens"] - len(sample_ids) - len(forced)
                if remaining < 1:
                    self.finish_reasons[0] = "length"
                    return
                prompt_ids = [*self._prompt_ids, *sample_ids, *forced]
                values = {**values, "max_tokens": remaining}
            stream = self._open(prompt_ids, values)
            try:
                for delta in stream:
                    self.generated += len(delta.token_ids)
                    if delta.num_cached_tokens is not None and self.cached is None:
                        self.cached = delta.num_cached_tokens
                    if delta.finished:
                        self.finish_reasons[delta.index] = delta.finish_reason
                    if delta.index == 0:
                        sample_ids.extend(delta.token_ids)
                    if self._splitters:
                        piece = self._splitters[delta.index].feed(delta.token_ids, delta.text)
                    else:
                        piece = ReasoningDelta(answer=delta.text)
                    if piece.reasoning or piece.answer:
                        yield delta.index, piece
                    if self._stop_requested.is_set():
                        self.stopped = True
                        return
                    if not delta.finished and self._budget_spent():
                        break
                else:
                    return
            finally:
                stream.close()


def run_batch(
    backend: Backend,
    tokenizer: ChatTokenizer,
    jobs: list[Job],
    planned: list[tuple[PromptPlan, dict[str, Any]]],
    *,
    n: int,
    enable_thinking: bool | None,
    concurrency: int | None,
    progress: bool,
    on_reply: Callable[[int, Reply], None] | None,
    stop_requested: threading.Event,
) -> BatchResult:
    """Send the planned jobs as one batch; on KeyboardInterrupt attach the partial
    BatchResult and re-raise."""
    started = time.perf_counter()
    stop_requested.clear()
    splitters = [
        [
            ReasoningSplitter.for_tokenizer(tokenizer, enable_thinking=enable_thinking)
            for _ in range(n)
        ]
        for _ in jobs
    ]
    reasons: list[list[str | None]] = [[None] * n for _ in jobs]
    generated, samples_done = [0] * len(jobs), [0] * len(jobs)
    cached: list[int | None] = [None] * len(jobs)
    replies: list[Reply | None] = [None] * len(jobs)

    def build(index: int, interrupted: bool) -> Reply:
        plan, values = planned[index]
        thinking = [splitter.result() for splitter in splitters[index]]
        return Reply(
            texts=[split.answer for split in thinking],
            plan=plan,
            sampling=dict(values, n=n),
            finish_reasons=list(reasons[index]),
            interrupted=interrupted,
            num_prompt_tokens=len(plan.token_ids),
            num_generated_tokens=generated[index],
            elapsed_s=time.perf_counter() - started,
            prompt_text=plan.text,
            prompt_token_ids=list(plan.token_ids),
            num_cached_tokens=cached[index],
            thinking=thinking,
        )

    def result(interrupted: bool) -> BatchResult:
        items = [
            BatchItem(job, reply if reply is not None else build(index, True))
            for index, (job, reply) in enumerate(zip(jobs, replies, strict=True))
        ]
        return BatchResult(items, interrupted, time.perf_counter() - started)

    requests = [BatchRequest(plan.token_ids, values, n) for plan, values in planned]
    deltas = backend.generate_many(
        requests, stop_token_ids=tokenizer.stop_token_ids, concurrency=concurrency
    )
    bar = progress_bar(len(jobs)) if progress else None
    stopped = False
    try:
        for index, delta in deltas:
            splitters[index][delta.index].feed(delta.token_ids, delta.text)
            generated[index] += len(delta.token_ids)
            reasons[index][delta.index] = delta.finish_reason
            if delta.num_cached_tokens is not None:
                cached[index] = delta.num_cached_tokens
            samples_done[index] += 1
            if samples_done[index] == n:
                replies[index] = build(index, False)
                if bar is not None:
                    bar.update(1)
                if on_reply is not None:
                    on_reply(index, replies[index])
            if stop_requested.is_set():
                stopped = True
                break
    except KeyboardInterrupt as interrupt:
        deltas.close()  # abort now: the interrupt may have come from a callback
        interrupt.result = result(True)  # type: ignore[attr-defined]
        raise
    finally:
        deltas.close()
        if bar is not None:
            bar.close()
    return result(stopped)


def progress_bar(total: int) -> Any:
    """A ``tqdm.auto`` bar: a widget in a notebook, a text bar on stderr elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="qwen batch", unit="reply", dynamic_ncols=True)


def check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
