"""``QwenChat``: chat with a local Qwen model from plain Python.

The same object serves the notebook magics (through :meth:`QwenChat.reply`) and scripts that
want the tutorial's interface::

    with QwenChat("demo", max_model_len=4096) as bot:
        response, history = bot.chat("What is the capital of France?")
        response, history = bot.chat("And of Italy?", history=history)
        for text in bot.stream("Tell me a joke"):
            print(text, end="")

Prompts are built as ChatML token ids (``qwen_magic.chatml``) and trimmed to fit the context
(``qwen_magic.prompt``); the token budget is recomputed on every call as the context length
minus the reply's ``max_tokens``, so long sessions never run out of room. Whatever runs the model
sits behind :mod:`qwen_magic.backends`; this is the only module that opens one.

The system prompt defaults to the model template's own (``system=None``) everywhere: in
:meth:`QwenChat.chat`, :meth:`QwenChat.stream`, :meth:`QwenChat.reply` and ``%%qwen``. So the same
question gets the same prompt from every front-end, and the same ids as the model's
``apply_chat_template`` (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."; Qwen3: none).
Pass ``system="You are a helpful assistant."`` for the tutorial's prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwen_magic.backends import Backend, BackendError, open_backend
from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.conversation import Conversation, Recorded
from qwen_magic.prompt import PromptPlan, fit_prompt
from qwen_magic.sampling import default_max_tokens, validate

__all__ = ["QwenChat", "Reply"]


@dataclass
class Reply:
    """What one request produced.

    Attributes:
        texts: One text per sample; partial when ``interrupted``.
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

    @property
    def text(self) -> str:
        """The first sample's text (the one that joins the history)."""
        return self.texts[0]

    @property
    def tokens_per_second(self) -> float:
        """Generation speed over all samples."""
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


class QwenChat:
    """A loaded Qwen model plus its ChatML formatter.

    Args:
        model: "demo" or None (the demo model), "tiny", a local folder, or a hub id; with
            ``server``, which of the server's models (None: the one it serves).
        server: The URL of a running vLLM server (``vllm serve``, with or without ``/v1``);
            the prompt goes there as the same token ids.
        api_key_env: The environment variable holding the server's API key (never shown).
        serve: Run the model in a vLLM server process started (and stopped) for it, so that
            interrupts never reach the engine; tensor parallel > 1 implies it.
        progress: Called with loading phase messages.
        verbose: Show vLLM's logs.
        backend: An already started backend to use instead of loading ``model``.
        **engine_options: Fields of :class:`qwen_magic.backends.vllm_options.EngineOptions`
            (``max_model_len=4096``, ``dtype="bfloat16"``, ...).

    Raises:
        BackendError: The model cannot be found or loaded, or an option is wrong.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        server: str | None = None,
        serve: bool = False,
        api_key_env: str = "VLLM_API_KEY",
        progress: Callable[[str], None] | None = None,
        verbose: bool = False,
        backend: Backend | None = None,
        **engine_options: Any,
    ) -> None:
        from qwen_magic.backends import check_options
        from qwen_magic.models import resolve_model

        self.tokenizer: ChatTokenizer | None = None
        if backend is None and server is not None:
            backend = open_backend(
                model,
                server=server,
                serve=serve,
                api_key_env=api_key_env,
                progress=progress,
                **engine_options,
            )
        elif backend is None:
            path = resolve_model(model)
            check_options(path, **engine_options)
            local = Path(path).is_dir()
            # Reading tokenizer.json takes a second or two; do it while vLLM starts.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-tokenizer") as pool:
                tokenizer = pool.submit(ChatTokenizer.load, path) if local else None
                backend = open_backend(
                    path, serve=serve, progress=progress, verbose=verbose, **engine_options
                )
                try:
                    self.tokenizer = tokenizer.result() if tokenizer else None
                except BaseException:
                    backend.close()
                    raise
        self.backend: Backend = backend
        try:  # a hub id or a .gguf file: use the backend's tokenizer
            if self.tokenizer is None:
                self.tokenizer = ChatTokenizer.load(backend.tokenizer())
        except BaseException:
            backend.close()
            raise
        # Chat needs ChatML; a model without it can still continue text (complete / --raw).
        self._formatter = ChatFormatter(self.tokenizer) if self.tokenizer.is_chatml else None

    @property
    def formatter(self) -> ChatFormatter:
        """The ChatML formatter (raises, saying what to do, for a model without ChatML)."""
        if self._formatter is None:
            self.tokenizer.require_chatml()
        return self._formatter  # type: ignore[return-value]

    @property
    def engine(self) -> Backend:
        """The backend (the name the magics and benchmarks have always used)."""
        return self.backend

    def __repr__(self) -> str:
        return f"QwenChat({self.backend!r})"

    def __enter__(self) -> QwenChat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the backend down and free its memory."""
        self.backend.close()

    def chat(
        self,
        prompt: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """Reply to ``prompt`` after ``history`` (the tutorial's interface).

        Args:
            prompt: The user's message.
            history: Past ``(query, response)`` pairs; not modified.
            system: The system prompt; None (the default) uses the model template's own.
            **sampling: temperature, top_p, top_k, min_p, max_tokens, repetition_penalty,
                presence_penalty, frequency_penalty, seed, stop, n.

        Returns:
            The reply and a new history list with ``(prompt, reply)`` appended.
        """
        pairs = [(str(query), str(response)) for query, response in history or []]
        conversation = Conversation.from_pairs(pairs, system=system)
        reply = self.reply(conversation, prompt, on_overflow="truncate", **sampling)
        return reply.text, [*pairs, (prompt, reply.text)]

    def stream(
        self,
        prompt: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat`, but yield the reply's text as it is generated.

        Stopping the iteration early aborts the request. The history is not extended: append
        ``(prompt, "".join(pieces))`` yourself.
        """
        if sampling.get("n", 1) != 1:
            raise ValueError("stream() yields one reply: use reply(..., n=...) for several")
        sampling.pop("n", None)
        conversation = Conversation.from_pairs(history or [], system=system)
        plan, values = self._plan(
            conversation, prompt, sampling, use_history=True, key=None, on_overflow="truncate"
        )
        stop = self.tokenizer.stop_token_ids
        # Closed explicitly, so the request is aborted the moment this generator is closed,
        # whatever else still references the backend's stream.
        with closing(self.backend.stream(plan.token_ids, stop_token_ids=stop, **values)) as deltas:
            for delta in deltas:
                if delta.text:
                    yield delta.text

    def reply(
        self,
        conversation: Conversation,
        message: str,
        *,
        key: str | None = None,
        use_history: bool = True,
        n: int = 1,
        on_delta: Callable[[int, str], None] | None = None,
        enable_thinking: bool | None = None,
        on_overflow: Literal["error", "truncate"] = "truncate",
        **sampling: Any,
    ) -> Reply:
        """Answer ``message`` within ``conversation`` and record the turn (sample 0).

        Args:
            conversation: Supplies system prompt and history; receives the new turn.
            message: The user's message.
            key: Records the turn under this key, replacing an earlier turn with it (the later
                turns are set aside; ``conversation.undo()`` brings them back).
            use_history: False shows the model only the system prompt and the message.
            n: Number of samples; only the first joins the history.
            on_delta: Called as ``on_delta(index, text)`` for every piece of new text.
            enable_thinking: Qwen3's thinking switch.
            on_overflow: A message that alone does not fit: "truncate" sends its beginning
                (with a PromptTruncatedWarning), "error" raises MessageTooLongError.
            **sampling: See :meth:`chat`.

        Returns:
            The :class:`Reply`.

        Raises:
            KeyboardInterrupt: Generation was interrupted. The request is aborted, the partial
                first sample is recorded as an interrupted turn (``conversation.undo()`` removes
                it), and the partial :class:`Reply` is attached as ``exc.reply``.
        """
        _check_n(n)
        plan, values = self._plan(
            conversation,
            message,
            sampling,
            use_history=use_history,
            key=key,
            enable_thinking=enable_thinking,
            on_overflow=on_overflow,
        )
        try:
            reply = self._run(plan.token_ids, plan.text, plan, values, n=n, on_delta=on_delta)
        except KeyboardInterrupt as interrupt:
            partial: Reply = interrupt.reply  # type: ignore[attr-defined]
            partial.recorded = conversation.record(message, partial.text, key=key, interrupted=True)
            raise
        reply.recorded = conversation.record(message, reply.text, key=key)
        return reply

    def complete(
        self,
        text: str,
        *,
        n: int = 1,
        on_delta: Callable[[int, str], None] | None = None,
        **sampling: Any,
    ) -> Reply:
        """Continue ``text`` as plain text, without chat formatting (``%%qwen --raw``).

        Raises:
            KeyboardInterrupt: As in :meth:`reply` (nothing is recorded).
        """
        _check_n(n)
        ids = self.tokenizer.encode_text(text)
        values = self.backend.resolve_sampling(len(ids), **sampling)
        return self._run(ids, text, None, values, n=n, on_delta=on_delta)

    def _plan(
        self,
        conversation: Conversation,
        message: str,
        sampling: dict[str, Any],
        *,
        use_history: bool,
        key: str | None,
        enable_thinking: bool | None = None,
        on_overflow: Literal["error", "truncate"] = "truncate",
    ) -> tuple[PromptPlan, dict[str, Any]]:
        """Fit the prompt into this call's budget and resolve the sampling values."""
        given = validate(sampling)
        max_model_len = self.backend.info.max_model_len
        max_tokens = given.get("max_tokens", default_max_tokens(max_model_len))
        budget = max_model_len - max_tokens
        if budget < 1:
            raise BackendError(
                f"max_tokens={max_tokens} leaves no room for a prompt in the "
                f"{max_model_len}-token context: lower max_tokens"
            )
        plan = fit_prompt(
            self.formatter,
            conversation.system,
            conversation.context_turns(key) if use_history else [],
            message,
            budget=budget,
            on_overflow=on_overflow,
            enable_thinking=enable_thinking,
        )
        given.setdefault("max_tokens", max_tokens)
        return plan, self.backend.resolve_sampling(len(plan.token_ids), **given)

    def budget(self, **sampling: Any) -> int:
        """Prompt tokens a reply with these settings leaves room for (context - max_tokens)."""
        max_model_len = self.backend.info.max_model_len
        given = validate(sampling)
        return max_model_len - given.get("max_tokens", default_max_tokens(max_model_len))

    def _run(
        self,
        prompt_ids: list[int],
        prompt_text: str,
        plan: PromptPlan | None,
        values: dict[str, Any],
        *,
        n: int,
        on_delta: Callable[[int, str], None] | None,
    ) -> Reply:
        """Stream one request; on KeyboardInterrupt attach the partial Reply and re-raise."""
        texts = [""] * n
        reasons: list[str | None] = [None] * n
        generated = 0
        cached: int | None = None
        started = time.perf_counter()

        def build(interrupted: bool) -> Reply:
            return Reply(
                texts=list(texts),
                plan=plan,
                sampling=dict(values, n=n),
                finish_reasons=list(reasons),
                interrupted=interrupted,
                num_prompt_tokens=len(prompt_ids),
                num_generated_tokens=generated,
                elapsed_s=time.perf_counter() - started,
                prompt_text=prompt_text,
                prompt_token_ids=list(prompt_ids),
                num_cached_tokens=cached,
            )

        stop = self.tokenizer.stop_token_ids
        deltas = self.backend.stream(prompt_ids, n=n, stop_token_ids=stop, **values)
        try:
            for delta in deltas:
                texts[delta.index] += delta.text
                generated += len(delta.token_ids)
                if delta.num_cached_tokens is not None:
                    cached = delta.num_cached_tokens
                if delta.finished:
                    reasons[delta.index] = delta.finish_reason
                if on_delta is not None and delta.text:
                    on_delta(delta.index, delta.text)
        except KeyboardInterrupt as interrupt:
            deltas.close()  # abort now: the interrupt may have come from on_delta
            interrupt.reply = build(True)  # type: ignore[attr-defined]
            raise
        finally:
            deltas.close()
        return build(False)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
