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

Thinking models (Qwen3 and later) write their reasoning in a ``<think>`` block before the answer.
Every reply is split on token ids (:class:`qwen_magic.reasoning.ReasoningSplitter`): the answer is
what :meth:`QwenChat.chat` returns, what :meth:`QwenChat.stream` yields and what the history keeps;
the reasoning is :attr:`Reply.reasoning`, streamed apart through ``on_thinking``.
``enable_thinking`` is the template's switch (None: the model's default) and ``thinking_budget``
stops the reasoning after that many tokens, closes the block as Qwen describes and lets the model
answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

from qwen_magic.backends import Backend, BackendError, open_backend
from qwen_magic.batch import BatchResult, plan_jobs
from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.conversation import Conversation
from qwen_magic.generation import BUDGET_CLOSE_TEXT, Generation, Reply, check_n, run_batch
from qwen_magic.prompt import BudgetError, PromptPlan, fit_prompt
from qwen_magic.reasoning import ReasoningSplitter
from qwen_magic.sampling import default_max_tokens, validate

__all__ = ["BUDGET_CLOSE_TEXT", "BatchResult", "QwenChat", "Reply"]


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
        self._stop_requested = threading.Event()
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

    def stop(self) -> None:
        """Stop the reply being generated (from another thread: a web page's Stop button).

        The request is aborted at its next token; the call that is generating returns the partial
        reply marked ``interrupted`` (and records it, as an interrupt would), without raising.
        """
        self._stop_requested.set()

    @property
    def thinks(self) -> bool:
        """Whether the model can write a think block (it has the tokens for one)."""
        return self.tokenizer.think_end_id is not None

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template turns thinking on and off (``enable_thinking``)."""
        return self.thinks and self.formatter.profile.has_thinking_switch

    def thinks_by_default(self, enable_thinking: bool | None = None) -> bool:
        """Whether a reply with this switch will think (and gets the thinking max_tokens)."""
        if not self.thinks or self._formatter is None:
            return False
        profile = self.formatter.profile
        if profile.prompt_block(enable_thinking) == "closed":
            return False
        if enable_thinking is None or not profile.has_thinking_switch:
            return profile.thinks_by_default
        return enable_thinking

    def check_thinking(
        self, enable_thinking: bool | None = None, thinking_budget: int | None = None
    ) -> None:
        """Refuse a thinking switch or budget the model cannot honour, in one line.

        Raises:
            ValueError: The model has no switch (or does not think at all).
        """
        name = Path(str(self.backend.info.model)).name
        if enable_thinking is not None and not self.has_thinking_switch:
            what = "always thinks" if self.thinks_by_default() else "does not think"
            raise ValueError(
                f"{name} has no thinking switch (it {what}): drop --think / --no-think"
            )
        if thinking_budget is not None:
            if isinstance(thinking_budget, bool) or not isinstance(thinking_budget, int):
                raise ValueError(f"thinking_budget must be a whole number, got {thinking_budget!r}")
            if thinking_budget < 0:
                raise ValueError(f"thinking_budget must be >= 0, got {thinking_budget}")
            if not self.thinks:
                raise ValueError(f"{name} does not think: drop --thinking-budget")

    def chat(
        self,
        prompt: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **sampling: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """Reply to ``prompt`` after ``history`` (the tutorial's interface).

        Args:
            prompt: The user's message.
            history: Past ``(query, response)`` pairs; not modified.
            system: The system prompt; None (the default) uses the model template's own.
            enable_thinking: A thinking model's switch (None: the model's default).
            thinking_budget: Most reasoning tokens before the model must answer.
            **sampling: temperature, top_p, top_k, min_p, max_tokens, repetition_penalty,
                presence_penalty, frequency_penalty, seed, stop, n.

        Returns:
            The answer (a thinking model's reasoning left out, as the history keeps it) and a new
            history list with ``(prompt, answer)`` appended.
        """
        pairs = [(str(query), str(response)) for query, response in history or []]
        conversation = Conversation.from_pairs(pairs, system=system)
        reply = self.reply(
            conversation,
            prompt,
            on_overflow="truncate",
            enable_thinking=enable_thinking,
            thinking_budget=thinking_budget,
            **sampling,
        )
        return reply.text, [*pairs, (prompt, reply.text)]

    def stream(
        self,
        prompt: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        on_thinking: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat`, but yield the answer's text as it is generated.

        A thinking model's reasoning is not yielded: pass ``on_thinking`` to see it as it comes.
        Stopping the iteration early aborts the request. The history is not extended: append
        ``(prompt, "".join(pieces))`` yourself.
        """
        if sampling.get("n", 1) != 1:
            raise ValueError("stream() yields one reply: use reply(..., n=...) for several")
        sampling.pop("n", None)
        self.check_thinking(enable_thinking, thinking_budget)
        conversation = Conversation.from_pairs(history or [], system=system)
        plan, values = self._plan(
            conversation,
            prompt,
            sampling,
            use_history=True,
            key=None,
            enable_thinking=enable_thinking,
            on_overflow="truncate",
        )
        splitter = ReasoningSplitter.for_tokenizer(self.tokenizer, enable_thinking=enable_thinking)
        # Closed explicitly, so the request is aborted the moment this generator is closed,
        # whatever else still references the backend's stream.
        generation = Generation(
            self.backend,
            self.tokenizer,
            plan.token_ids,
            values,
            n=1,
            splitters=[splitter],
            thinking_budget=thinking_budget,
            stop_requested=threading.Event(),
        )
        with closing(generation) as deltas:
            for _index, piece in deltas:
                if piece.reasoning and on_thinking is not None:
                    on_thinking(piece.reasoning)
                if piece.answer:
                    yield piece.answer

    def reply(
        self,
        conversation: Conversation,
        message: str,
        *,
        key: str | None = None,
        use_history: bool = True,
        n: int = 1,
        on_delta: Callable[[int, str], None] | None = None,
        on_thinking: Callable[[int, str], None] | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
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
            on_delta: Called as ``on_delta(index, text)`` for every piece of new answer text.
            on_thinking: Called as ``on_thinking(index, text)`` for every piece of new reasoning.
            enable_thinking: The chat template's thinking switch (None: the model's default).
            thinking_budget: Most reasoning tokens (sample 1 only, so ``n`` must be 1); then the
                think block is closed with Qwen's sentence and the model answers.
            on_overflow: A message that alone does not fit: "truncate" sends its beginning
                (with a PromptTruncatedWarning), "error" raises MessageTooLongError.
            **sampling: See :meth:`chat`.

        Returns:
            The :class:`Reply`; ``interrupted`` when :meth:`stop` stopped it.

        Raises:
            KeyboardInterrupt: Generation was interrupted. The request is aborted, the partial
                first sample is recorded as an interrupted turn (``conversation.undo()`` removes
                it), and the partial :class:`Reply` is attached as ``exc.reply``.
        """
        check_n(n)
        self.check_thinking(enable_thinking, thinking_budget)
        if thinking_budget is not None and n != 1:
            raise ValueError("a thinking budget applies to one sample: drop -n or the budget")
        plan, values = self._plan(
            conversation,
            message,
            sampling,
            use_history=use_history,
            key=key,
            enable_thinking=enable_thinking,
            on_overflow=on_overflow,
        )
        splitters = [
            ReasoningSplitter.for_tokenizer(self.tokenizer, enable_thinking=enable_thinking)
            for _ in range(n)
        ]
        try:
            reply = self._run(
                plan.token_ids,
                plan.text,
                plan,
                values,
                n=n,
                on_delta=on_delta,
                on_thinking=on_thinking,
                splitters=splitters,
                thinking_budget=thinking_budget,
            )
        except KeyboardInterrupt as interrupt:
            partial: Reply = interrupt.reply  # type: ignore[attr-defined]
            partial.recorded = self._record(conversation, message, partial, key)
            raise
        reply.recorded = self._record(conversation, message, reply, key)
        return reply

    @staticmethod
    def _record(conversation: Conversation, message: str, reply: Reply, key: str | None) -> Any:
        return conversation.record(
            message, reply.text, key=key, interrupted=reply.interrupted, reasoning=reply.reasoning
        )

    def batch(
        self,
        prompts: str | Sequence[str],
        *,
        rows: Any = None,
        system: str | None = None,
        history: Sequence[Any] | None = None,
        sweep: Mapping[str, Sequence[Any]] | None = None,
        n: int = 1,
        enable_thinking: bool | None = None,
        on_overflow: Literal["error", "truncate"] = "error",
        concurrency: int | None = None,
        progress: bool = True,
        on_reply: Callable[[int, Reply], None] | None = None,
        **sampling: Any,
    ) -> BatchResult:
        """Answer many messages at once: one batch for the engine, concurrent requests for a
        server. Each message is formatted as :meth:`chat` formats it (system, history, ChatML).

        Args:
            prompts: A list of messages; or one message, a template when ``rows`` is given
                (``"Translate to French: {text}"``; see :mod:`qwen_magic.batch` for the rules).
            rows: Fill the template: a pandas DataFrame, a list of dicts, or a list of strings
                for a template with one field.
            system: The system prompt; None uses the model template's own.
            history: Past ``(query, response)`` pairs (or turns) every message follows.
            sweep: Sampling setting -> values; every message runs once per combination
                (``{"temperature": [0, 0.7]}``), labelled in the result.
            n: Samples per message.
            enable_thinking: A thinking model's switch (None: the model's default).
            on_overflow: A message that does not fit: "error" (before anything is sent) or
                "truncate".
            concurrency: Most requests in flight (a server's default: 32; the local engine
                takes them all and schedules them itself).
            progress: Show a progress bar (``tqdm.auto``: a widget in a notebook).
            on_reply: Called as ``on_reply(index, reply)`` as each reply completes.
            **sampling: As in :meth:`chat`; a sweep's values override them.

        Returns:
            A :class:`qwen_magic.batch.BatchResult`: the replies in input order, each a
            :class:`Reply` (``.sampling`` holds what it was sent), with their inputs and sweep
            settings; ``.table()`` makes a DataFrame. Interrupted when :meth:`stop` stopped it.

        Raises:
            ValueError, TypeError: A missing template field, a bad sweep or setting, a message
                that does not fit; raised before anything is sent.
            KeyboardInterrupt: The batch was interrupted: every unfinished request is aborted
                and the partial :class:`BatchResult` (finished replies kept, the others marked
                ``interrupted``) is attached as ``exc.result``.
        """
        check_n(n)
        self.check_thinking(enable_thinking, None)
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        jobs = plan_jobs(prompts, rows=rows, sweep=sweep)
        pairs = [item for item in history or [] if isinstance(item, (tuple, list))]
        if pairs and len(pairs) != len(history or []):
            raise TypeError("history must be all (query, response) pairs or all turns")
        conversation = (
            Conversation.from_pairs(pairs, system=system)
            if pairs
            else Conversation(system=system, turns=list(history or []))
        )
        planned = []
        for position, job in enumerate(jobs):
            try:
                planned.append(
                    self._plan(
                        conversation,
                        job.message,
                        {**sampling, **job.settings},
                        use_history=True,
                        key=None,
                        enable_thinking=enable_thinking,
                        on_overflow=on_overflow,
                    )
                )
            except BudgetError as error:
                raise type(error)(f"message {position}: {error}") from None
        return run_batch(
            self.backend,
            self.tokenizer,
            jobs,
            planned,
            n=n,
            enable_thinking=enable_thinking,
            concurrency=concurrency,
            progress=progress,
            on_reply=on_reply,
            stop_requested=self._stop_requested,
        )

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
        check_n(n)
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
        max_tokens = given.get("max_tokens", self.default_max_tokens(enable_thinking))
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

    def default_max_tokens(self, enable_thinking: bool | None = None) -> int:
        """The reply length used when none is given (:func:`qwen_magic.sampling.default_max_tokens`;
        longer when the reply will think)."""
        thinking = self.thinks_by_default(enable_thinking)
        return default_max_tokens(self.backend.info.max_model_len, thinking=thinking)

    def budget(self, enable_thinking: bool | None = None, **sampling: Any) -> int:
        """Prompt tokens a reply with these settings leaves room for (context - max_tokens)."""
        given = validate(sampling)
        max_tokens = given.get("max_tokens", self.default_max_tokens(enable_thinking))
        return self.backend.info.max_model_len - max_tokens

    def _run(
        self,
        prompt_ids: list[int],
        prompt_text: str,
        plan: PromptPlan | None,
        values: dict[str, Any],
        *,
        n: int,
        on_delta: Callable[[int, str], None] | None,
        on_thinking: Callable[[int, str], None] | None = None,
        splitters: list[ReasoningSplitter] | None = None,
        thinking_budget: int | None = None,
    ) -> Reply:
        """Stream one request; on KeyboardInterrupt attach the partial Reply and re-raise."""
        texts = [""] * n
        started = time.perf_counter()
        self._stop_requested.clear()
        generation = Generation(
            self.backend,
            self.tokenizer,
            prompt_ids,
            values,
            n=n,
            splitters=splitters,
            thinking_budget=thinking_budget,
            stop_requested=self._stop_requested,
        )

        def build(interrupted: bool) -> Reply:
            thinking = [splitter.result() for splitter in splitters or []]
            return Reply(
                texts=[split.answer for split in thinking] if thinking else list(texts),
                plan=plan,
                sampling=dict(values, n=n),
                finish_reasons=list(generation.finish_reasons),
                interrupted=interrupted,
                num_prompt_tokens=len(prompt_ids),
                num_generated_tokens=generation.generated,
                elapsed_s=time.perf_counter() - started,
                prompt_text=prompt_text,
                prompt_token_ids=list(prompt_ids),
                num_cached_tokens=generation.cached,
                thinking=thinking,
                budget_reached=generation.budget_reached,
            )

        try:
            for index, piece in generation:
                texts[index] += piece.answer
                if on_thinking is not None and piece.reasoning:
                    on_thinking(index, piece.reasoning)
                if on_delta is not None and piece.answer:
                    on_delta(index, piece.answer)
        except KeyboardInterrupt as interrupt:
            generation.close()  # abort now: the interrupt may have come from a callback
            interrupt.reply = build(True)  # type: ignore[attr-defined]
            raise
        finally:
            generation.close()
        return build(generation.stopped)
