"""The chat loop of ``qwen-magic chat``: read a line, run a command or ask, show the reply.

:class:`TerminalChat` holds a :class:`qwen_magic.session.ChatSession` and does what a front-end
does: parse (:mod:`qwen_magic.terminal.commands`), call the session, show
(:mod:`qwen_magic.terminal.display`). Each ``/command`` has a ``handle_<name>`` method. Input
comes from prompt_toolkit (bracketed paste, history file, Ctrl-R) in :func:`prompt_session`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_magic import render
from qwen_magic.backends.base import BackendError, forget_exception
from qwen_magic.backends.vllm_options import is_out_of_memory
from qwen_magic.prompt import BudgetError, MessageTooLongError
from qwen_magic.session import DEFAULT_CONVERSATION, ChatSession
from qwen_magic.terminal import commands
from qwen_magic.terminal.commands import Command, CommandError, Exit, Message
from qwen_magic.terminal.display import ReplyPrinter, Screen, history_text, settings_text

__all__ = ["TerminalChat", "error_line", "prompt_session"]

PROMPT, CONTINUATION = ">>> ", "... "
LEAVE_HINT = "(to leave, press Ctrl-D or type /bye)"


def error_line(error: BaseException) -> str:
    """What the user can do about a failed request, in one line."""
    forget_exception(error)
    if isinstance(error, MessageTooLongError):
        return (
            f"the message does not fit the context ({error}): shorten it, /set max_tokens lower, "
            "or start the chat with a larger --max-model-len"
        )
    if isinstance(error, (BudgetError, BackendError, ValueError, TypeError, OSError)):
        if isinstance(error, FileNotFoundError):
            return f"no file {error.filename}: check the path"
        return render.first_line(error)
    if is_out_of_memory(error):
        return render.OUT_OF_MEMORY.format(action="generating")
    return f"{type(error).__name__}: {render.first_line(error)}"


def prompt_session(history_file: Path | None) -> Any:
    """A prompt_toolkit session: ``>>>``, a history file (in memory without one), Esc+Enter for
    a new line. Bracketed paste (a pasted block is one input) is prompt_toolkit's default."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _on_escape_enter(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    if history_file is not None:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history: Any = FileHistory(str(history_file))
    else:
        history = InMemoryHistory()
    return PromptSession(
        history=history,
        key_bindings=bindings,
        prompt_continuation=lambda width, line_number, wrap_count: CONTINUATION,
        enable_history_search=False,
    )


class TerminalChat:
    """One terminal conversation over a loaded session.

    Args:
        session: A session with a model loaded.
        screen: Where replies and notices go (stdout).
        status: Where the thinking line and marks go (stdout, or stderr for a one-shot answer).
    """

    def __init__(
        self, session: ChatSession, *, screen: Screen | None = None, status: Screen | None = None
    ) -> None:
        self.session = session
        self.screen = screen if screen is not None else Screen()
        self.status = status if status is not None else self.screen
        self.name = DEFAULT_CONVERSATION

    # ------------------------------------------------------------------ asking

    def ask(self, message: str) -> Any:
        """Send ``message`` and stream the reply; the Reply (partial and marked interrupted after
        Ctrl-C), or None when the request failed (the error is shown)."""
        return self._stream(lambda **callbacks: self.session.ask(self.name, message, **callbacks))

    def _stream(self, request: Callable[..., Any]) -> Any:
        printer = ReplyPrinter(self.screen, status=self.status)
        try:
            reply = request(on_delta=printer.on_delta, on_thinking=printer.on_thinking)
        except KeyboardInterrupt as interrupt:  # the session recorded it, marked interrupted
            reply = getattr(interrupt, "reply", None)
            forget_exception(interrupt)
            printer.finish(reply, interrupted=True)
            return reply
        except Exception as error:
            if printer.answer:
                printer.finish(None, interrupted=True)
            self.error(error_line(error))
            return None
        printer.finish(reply)
        return reply

    def error(self, text: str) -> None:
        self.status.line(f"error: {text}")

    # ------------------------------------------------------------------ the loop

    def run(self, prompt: Any) -> int:
        """Read and answer until the user leaves; the exit status (0)."""
        block = commands.TripleQuoteBlock()
        self.status.note(f"{self.model_line()} · /help for commands, /bye to leave")
        while True:
            try:
                line = prompt.prompt(CONTINUATION if block.is_open else PROMPT)
            except KeyboardInterrupt:
                if block.is_open:
                    block.cancel()
                    self.status.note("multi-line message dropped")
                self.status.note(LEAVE_HINT)
                continue
            except EOFError:
                return 0
            entry: Message | Command | Exit | None
            if block.is_open or block.opens(line):
                text = block.feed(line)
                if text is None:
                    continue
                entry = Message(text) if text.strip() else None  # whatever it holds
            else:
                try:
                    entry = commands.classify(line)
                except CommandError as error:
                    self.error(str(error))
                    continue
            if isinstance(entry, Exit):
                return 0
            try:
                if isinstance(entry, Message):
                    self.ask(entry.text)
                elif isinstance(entry, Command):
                    getattr(self, f"handle_{entry.name}")(entry.argument)
            except CommandError as error:
                self.error(str(error))
            except KeyboardInterrupt:
                self.status.note(LEAVE_HINT)
            except Exception as error:
                self.error(error_line(error))

    # ------------------------------------------------------------------ commands

    def model_line(self) -> str:
        info = self.session.require_bot().backend.info
        return f"{Path(str(info.model)).name} on {info.where}, {info.max_model_len} tokens"

    def handle_help(self, argument: str) -> None:
        self.screen.line(commands.help_text())

    def handle_show(self, argument: str) -> None:
        bot = self.session.require_bot()
        info = bot.backend.info
        thinking = {True: "on", False: "off", None: "the model's default"}[self.session.thinking]
        if not getattr(bot, "has_thinking_switch", False):
            thinking = "no switch (this model does not think)"
            if getattr(bot, "thinks", False):
                thinking = "no switch (this model always thinks)"
        values = {name: getattr(self.session, name) for name in commands.SAMPLING_SETTINGS}
        self.screen.line(f"model: {self.model_line()}")
        self.screen.line(f"thinking: {thinking}")
        self.screen.line("sampling:")
        self.screen.line(settings_text(values, info.generation_defaults, info.max_model_len))
        self.screen.line(history_text(self.session.conversation(self.name)))

    def handle_clear(self, argument: str) -> None:
        removed = self.session.clear(self.name)
        self.status.note(f"cleared {removed} turn(s) (/undo brings them back)")

    def handle_undo(self, argument: str) -> None:
        undone = self.session.undo(self.name)
        self.status.note("undid the last change" if undone else "there is nothing to undo")

    def handle_retry(self, argument: str) -> None:
        self._stream(lambda **callbacks: self.session.retry(self.name, **callbacks))

    def handle_system(self, argument: str) -> None:
        if not argument:
            system = self.session.conversation(self.name).system
            self.screen.line(system if system is not None else "(the model's own system prompt)")
            return
        if argument == "--default":
            self.session.set_system(self.name, None)
            self.status.note("the system prompt is the model's own again (/undo takes it back)")
            return
        self.session.set_system(self.name, argument)
        self.status.note("system prompt set (/undo takes it back)")

    def handle_set(self, argument: str) -> None:
        if not argument:
            info = self.session.require_bot().backend.info
            values = {name: getattr(self.session, name) for name in commands.SAMPLING_SETTINGS}
            self.screen.line(settings_text(values, info.generation_defaults, info.max_model_len))
            return
        name, value = commands.parse_setting(argument)
        setattr(self.session, name, value)
        shown = "the model's default" if value is None else value
        self.status.note(f"{name} = {shown}")

    def handle_think(self, argument: str) -> None:
        choice = commands.parse_think(argument)
        bot = self.session.require_bot()
        if choice is not None and not getattr(bot, "has_thinking_switch", False):
            name = Path(str(bot.backend.info.model)).name
            raise CommandError(f"{name} has no thinking switch: /think does not apply to it")
        self.session.thinking = choice
        self.status.note(f"thinking: {argument.strip().lower()}")

    def handle_save(self, argument: str) -> None:
        path, force = commands.parse_path(argument, "--force")
        written = self.session.export(self.name, path, force=force)
        self.status.note(f"saved {len(self.session.conversation(self.name))} turn(s) to {written}")

    def handle_load(self, argument: str) -> None:
        path, replace = commands.parse_path(argument, "--replace")
        turns = len(self.session.conversation(self.name))
        if turns and not replace:
            raise CommandError(
                f"the conversation has {turns} turn(s): /load PATH --replace replaces them "
                "(/undo brings them back), or /clear first"
            )
        count = self.session.import_file(self.name, path, replace=replace)
        self.status.note(f"loaded {count} turn(s) from {path} (/undo takes it back)")
