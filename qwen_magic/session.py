"""The chat session every front-end shares: the model, named conversations and their rules.

A :class:`ChatSession` holds, for one kernel (or one terminal chat, or one web page):

- the loaded model (a :class:`qwen_magic.chat.QwenChat`, at most one, held on the instance);
- named conversations, each with undo (:mod:`qwen_magic.conversation`);
- the system-prompt rule: a conversation follows :attr:`ChatSession.system` until it is given
  its own prompt (``-s``, an import), then keeps that one;
- the sampling defaults (one trait per row of :data:`qwen_magic.sampling.SETTINGS`; None means
  the model's own default), which a front-end may link its own settings to, and the thinking
  defaults (:attr:`ChatSession.thinking`, :attr:`ChatSession.thinking_budget`), which apply only
  to models that can honour them;
- :attr:`ChatSession.revision`, bumped after every change, for views that follow the session;
- the one-request-at-a-time rule: a second request while one is running gets
  :class:`SessionBusy` at once, never a reply interleaved with another.

Front-ends parse their input, call these methods and show the result; no chat logic lives in
them. Pure Python (traitlets): no vLLM, IPython, ipywidgets or network import.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import Bool, HasTraits, Int, TraitError, Unicode, observe, validate

from qwen_magic.backends.base import BackendBusy, BackendError
from qwen_magic.conversation import Conversation
from qwen_magic.sampling import SAMPLING_KEYS, SAMPLING_SETTINGS, config_traits
from qwen_magic.sampling import validate as validate_sampling

if TYPE_CHECKING:
    from qwen_magic.batch import BatchResult
    from qwen_magic.chat import QwenChat, Reply

__all__ = ["DEFAULT_CONVERSATION", "ChatSession", "SessionBusy"]

DEFAULT_CONVERSATION = "default"


class SessionBusy(BackendBusy):
    """A reply is already being generated in this session."""


_SamplingDefaults = types.new_class(
    "_SamplingDefaults", (HasTraits,), exec_body=lambda namespace: namespace.update(config_traits())
)


class ChatSession(_SamplingDefaults):  # type: ignore[misc, valid-type]
    """Model, conversations, defaults and rules shared by every front-end of one process."""

    system = Unicode(
        None,
        allow_none=True,
        help="System prompt of conversations not given their own; None: the model's.",
    )
    revision = Int(0, help="Bumped after every change of a conversation or the model.")
    thinking = Bool(
        None,
        allow_none=True,
        help="Thinking switch of models that have one (Qwen3): True, False, or None for the "
        "model's default. Models without a switch ignore it.",
    )
    thinking_budget = Int(
        None,
        allow_none=True,
        help="Most reasoning tokens of a thinking model's reply before it must answer; None: no "
        "limit. Models that do not think ignore it.",
    )

    def __init__(self, **kwargs: Any) -> None:
        # Set before the traits: ChatSession(system=...) runs the system observer at once.
        self.bot: QwenChat | None = None
        self.loaded_request: tuple[Any, ...] | None = None
        self.conversations: dict[str, Conversation] = {}
        self._request_lock = threading.Lock()
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        model = "no model" if self.bot is None else self.bot.backend.info.model
        return f"<ChatSession: {model}, {len(self.conversations)} conversation(s)>"

    # ------------------------------------------------------------------ defaults

    @validate(*SAMPLING_SETTINGS)
    def _validate_sampling_default(self, proposal: Any) -> Any:
        try:
            validate_sampling({proposal["trait"].name: proposal["value"]})
        except ValueError as error:
            raise TraitError(str(error)) from None
        return proposal["value"]

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling settings set as defaults (None ones left out)."""
        values = {name: getattr(self, name) for name in SAMPLING_SETTINGS}
        return {name: value for name, value in values.items() if value is not None}

    def request_sampling(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """What a request sends: the given settings (validated) over the session's defaults.

        Raises:
            TypeError, ValueError: An unknown setting or a value out of range.
        """
        return {**self.sampling_defaults(), **validate_sampling(sampling)}

    @validate("thinking_budget")
    def _validate_thinking_budget(self, proposal: Any) -> Any:
        if proposal["value"] is not None and proposal["value"] < 0:
            raise TraitError(f"thinking_budget must be >= 0 or None, got {proposal['value']}")
        return proposal["value"]

    def thinking_settings(
        self, enable_thinking: bool | None = None, thinking_budget: int | None = None
    ) -> tuple[bool | None, int | None]:
        """The switch and budget a request uses: the given ones, else the session's defaults
        where the loaded model can honour them."""
        bot = self.require_bot()
        if enable_thinking is None and bot.has_thinking_switch:
            enable_thinking = self.thinking
        if thinking_budget is None and bot.thinks:
            thinking_budget = self.thinking_budget
        return enable_thinking, thinking_budget

    @observe("system")
    def _on_system_change(self, change: Any) -> None:
        for conversation in self.conversations.values():
            if not conversation.owns_system:  # following the default is not a change to undo
                conversation.system = change["new"]
        self.changed()

    def changed(self) -> None:
        """Tell the views following :attr:`revision` that something changed."""
        self.revision += 1

    # ------------------------------------------------------------------ conversations

    def conversation(self, name: str | None = None) -> Conversation:
        """The conversation ``name`` (default: "default"), created empty on first use."""
        name = name or DEFAULT_CONVERSATION
        if name not in self.conversations:
            self.conversations[name] = Conversation(system=self.system)
        return self.conversations[name]

    def forget(self, name: str) -> bool:
        """Drop a conversation entirely (a closed web page's); False when there was none.

        Raises:
            SessionBusy: A reply is being generated.
        """
        with self._exclusive():
            forgotten = self.conversations.pop(name, None) is not None
        if forgotten:
            self.changed()
        return forgotten

    def owns_system(self, name: str | None = None) -> bool:
        """Whether the conversation has its own system prompt (else it follows the default)."""
        return self.conversation(name).owns_system

    def set_system(self, name: str | None, system: str | None) -> None:
        """Give a conversation its own system prompt (undoable), or None to follow the default."""
        with self._exclusive():
            conversation = self.conversation(name)
            if system is None:
                conversation.set_system(self.system, own=False)
            else:
                conversation.set_system(system)
        self.changed()

    def clear(self, name: str | None = None) -> int:
        """Forget a conversation's turns (undoable); returns how many."""
        with self._exclusive():
            removed = self.conversation(name).clear()
        self.changed()
        return removed

    def undo(self, name: str | None = None) -> bool:
        """Undo the last change to a conversation; False when there is nothing to undo."""
        with self._exclusive():
            conversation = self.conversation(name)
            undone = conversation.undo()
            if not conversation.owns_system:  # it follows today's default, not an old one
                conversation.system = self.system
        self.changed()
        return undone

    def export(self, name: str | None, path: str | Path, *, force: bool = False) -> Path:
        """Write the conversation to ``.json`` (lossless) or ``.md``; see Conversation.save."""
        return self.conversation(name).save(path, force=force)

    def import_file(self, name: str | None, path: str | Path, *, replace: bool = False) -> int:
        """Read a JSON export into a conversation (undoable); returns its number of turns.

        Raises:
            ValueError: The file is not a valid export, or the conversation has turns and
                ``replace`` is not set.
        """
        imported = Conversation.load(path)
        name = name or DEFAULT_CONVERSATION
        with self._exclusive():
            conversation = self.conversation(name)
            if len(conversation) and not replace:
                raise ValueError(
                    f"`{name}` has {len(conversation)} turn(s): add --replace to replace them "
                    "(undo brings them back), or import into another conversation"
                )
            conversation.replace(imported)
        self.changed()
        return len(imported)

    # ------------------------------------------------------------------ the model

    def load(
        self,
        model: str | None,
        options: dict[str, Any],
        *,
        server: str | None = None,
        serve: bool = False,
        api_key_env: str = "VLLM_API_KEY",
        progress: Callable[[str], None] | None = None,
        verbose: bool = False,
        reload: bool = False,
    ) -> bool:
        """Load ``model`` (replacing another); False when it is already loaded as asked.

        With ``server``, connect to that vLLM server instead (``model`` then picks one of its
        models); with ``serve``, run the model in a vLLM server process started for it. Options are
        checked before the loaded model is freed, so a typo keeps it.

        Raises:
            BackendError: A wrong option, no such model, or the load failed.
            ModelFetchError: The demo or test model could not be fetched.
        """
        from qwen_magic.backends import check_options, check_server_options
        from qwen_magic.models import resolve_model

        if server is not None:
            check_server_options(server, options)
            path = model
        else:
            path = resolve_model(model)
            check_options(path, **options)
        settings = tuple(sorted((key, repr(value)) for key, value in options.items()))
        request = (server, serve, api_key_env, path, settings)
        if self.bot is not None and request == self.loaded_request and not reload:
            return False
        with self._exclusive():
            self._unload()  # free the old engine before the new one takes memory
            from qwen_magic.chat import QwenChat

            self.bot = QwenChat(
                path,
                server=server,
                serve=serve,
                api_key_env=api_key_env,
                progress=progress,
                verbose=verbose,
                **options,
            )
            self.loaded_request = request
        self.changed()
        return True

    def unload(self) -> str | None:
        """Free the model and its memory (the conversations stay); returns its name.

        Raises:
            SessionBusy: A reply is being generated (stop it first).
        """
        with self._exclusive():
            return self._unload()

    def _unload(self) -> str | None:
        bot, self.bot, self.loaded_request = self.bot, None, None
        if bot is None:
            return None
        model = bot.backend.info.model
        bot.close()
        self.changed()
        return model

    def require_bot(self) -> QwenChat:
        if self.bot is None:
            from qwen_magic.render import NO_MODEL

            raise BackendError(NO_MODEL)
        return self.bot

    # ------------------------------------------------------------------ asking

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._request_lock.acquire(blocking=False):
            raise SessionBusy(
                "a reply is still being generated: wait for it or stop it, then try again"
            )
        try:
            yield
        finally:
            self._request_lock.release()

    @property
    def busy(self) -> bool:
        """True while a reply is being generated."""
        return self._request_lock.locked()

    def ask(
        self,
        name: str | None,
        message: str,
        *,
        system: str | None = None,
        new: bool = False,
        key: str | None = None,
        use_history: bool = True,
        n: int = 1,
        on_delta: Callable[[int, str], None] | None = None,
        on_thinking: Callable[[int, str], None] | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **sampling: Any,
    ) -> Reply:
        """Answer ``message`` in conversation ``name`` and record the turn.

        ``system`` gives the conversation its own system prompt and ``new`` clears it first;
        both are undoable and, like everything else, undone again if the request fails. An
        interrupted reply is recorded, marked, and the KeyboardInterrupt re-raised (with the
        partial reply as ``.reply``); one stopped by :meth:`stop` is recorded, marked and
        returned. ``on_delta`` gets the answer's text and ``on_thinking`` a thinking model's
        reasoning, each as ``(sample index, new text)``.

        Raises:
            SessionBusy: Another reply is being generated.
            BackendError, ValueError, TypeError: A mistake; the conversation is as it was.
        """
        options = dict(
            system=system,
            new=new,
            key=key,
            use_history=use_history,
            n=n,
            on_delta=on_delta,
            on_thinking=on_thinking,
            enable_thinking=enable_thinking,
            thinking_budget=thinking_budget,
        )
        values = self.request_sampling(sampling)
        with self._exclusive():
            return self._ask(name or DEFAULT_CONVERSATION, message, values, **options)

    def retry(self, name: str | None = None, **options: Any) -> Reply:
        """Ask the last turn's message again, replacing that turn (undo brings it back).

        Takes :meth:`ask`'s keywords but ``system``, ``new`` and ``key``.

        Raises:
            ValueError: The conversation has no turn to retry.
            SessionBusy, BackendError, KeyboardInterrupt: As :meth:`ask`.
        """
        name = name or DEFAULT_CONVERSATION
        sampling = {key: options.pop(key) for key in list(options) if key in SAMPLING_KEYS}
        values = self.request_sampling(sampling)
        with self._exclusive():
            conversation = self.conversation(name)
            if not conversation.turns:
                raise ValueError(f"`{name}` has no turn to retry: send a message first")
            last = conversation.turns[-1]
            depth = conversation.undo_depth
            conversation.remove_last()
            try:
                return self._ask(name, last.user, values, key=last.key, **options)
            except Exception:
                conversation.rollback(depth)
                raise
            finally:  # one undo brings the old turn back, also after an interrupt
                conversation.squash(depth)

    def _ask(
        self,
        name: str,
        message: str,
        sampling: dict[str, Any],
        *,
        system: str | None = None,
        new: bool = False,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **options: Any,
    ) -> Reply:
        """:meth:`ask`, holding the request lock."""
        bot = self.require_bot()
        enable_thinking, thinking_budget = self.thinking_settings(enable_thinking, thinking_budget)
        conversation = self.conversation(name)
        depth = conversation.undo_depth
        try:
            if new:
                conversation.clear()
            if system is not None:
                conversation.set_system(system)
            return bot.reply(
                conversation,
                message,
                enable_thinking=enable_thinking,
                thinking_budget=thinking_budget,
                on_overflow="error",
                **options,
                **sampling,
            )
        except Exception:
            conversation.rollback(depth)
            raise
        finally:
            self.changed()

    def batch(
        self,
        name: str | None,
        prompts: str | list[str],
        *,
        rows: Any = None,
        sweep: dict[str, list[Any]] | None = None,
        system: str | None = None,
        use_history: bool = True,
        record: bool = False,
        key: str | None = None,
        enable_thinking: bool | None = None,
        concurrency: int | None = None,
        progress: bool = False,
        on_reply: Callable[[int, Any], None] | None = None,
        **sampling: Any,
    ) -> BatchResult:
        """Answer many messages at once after conversation ``name``'s system prompt and history
        (:meth:`qwen_magic.chat.QwenChat.batch`), under the session's sampling defaults.

        The replies join the conversation only with ``record``: then ``system`` becomes its
        system prompt (as in :meth:`ask`) and each finished reply is a turn, keyed
        ``key/index`` so that re-running replaces them; one undo takes the whole batch back.
        Without ``record``, ``system`` applies to this batch alone and nothing changes.

        Raises:
            SessionBusy: Another reply is being generated.
            BackendError, ValueError, TypeError: A mistake; nothing was sent or changed.
            KeyboardInterrupt: With the partial result as ``.result`` (recorded, if asked).
        """
        values = self.request_sampling(sampling)
        with self._exclusive():
            bot = self.require_bot()
            enable_thinking, _ = self.thinking_settings(enable_thinking, None)
            conversation = self.conversation(name)
            depth = conversation.undo_depth
            first = None if key is None else f"{key}/0"  # a re-run sees what came before it
            try:
                if record and system is not None:
                    conversation.set_system(system)
                result = bot.batch(
                    prompts,
                    rows=rows,
                    sweep=sweep,
                    system=conversation.system if system is None else system,
                    history=conversation.context_turns(first) if use_history else [],
                    enable_thinking=enable_thinking,
                    concurrency=concurrency,
                    progress=progress,
                    on_reply=on_reply,
                    **values,
                )
            except KeyboardInterrupt as interrupt:
                partial = getattr(interrupt, "result", None)
                if record and partial is not None:
                    self._record_batch(conversation, partial, key, depth)
                raise
            except Exception:
                conversation.rollback(depth)
                raise
            finally:
                self.changed()
            if record:
                self._record_batch(conversation, result, key, depth)
            return result

    @staticmethod
    def _record_batch(
        conversation: Conversation, result: BatchResult, key: str | None, depth: int
    ) -> None:
        """Record each finished reply as a turn; one undo step for them all."""
        for index, item in enumerate(result.items):
            if item.finished:
                reply = item.reply
                turn_key = None if key is None else f"{key}/{index}"
                conversation.record(
                    item.job.message, reply.text, key=turn_key, reasoning=reply.reasoning
                )
        conversation.squash(depth)

    def stop(self) -> bool:
        """Stop the reply being generated, from another thread (a web page's Stop button).

        The request is aborted at its next token; :meth:`ask` then returns the partial reply,
        recorded and marked interrupted. Returns False when nothing was being generated.
        """
        bot = self.bot
        if bot is None or not self.busy:
            return False
        bot.stop()
        return True

    def complete(
        self,
        text: str,
        *,
        n: int = 1,
        on_delta: Callable[[int, str], None] | None = None,
        **sampling: Any,
    ) -> Reply:
        """Continue ``text`` as plain text (no ChatML, no conversation)."""
        values = self.request_sampling(sampling)
        with self._exclusive():
            return self.require_bot().complete(text, n=n, on_delta=on_delta, **values)
