"""The Gradio page of ``qwen-magic web``: components and events around one :class:`ChatSession`.

Each browser tab (each Gradio session) has its own conversation in the session, named after
its session hash; the chat shown is always rendered from that conversation, so retry, undo,
edit and Stop show exactly what the session recorded. Replies stream from a worker thread
(``ChatSession.ask`` blocks) through a throttled generator. Generating events share one
Gradio concurrency group with a limit of 1, so a second tab waits its turn; everything else
that changes the session takes :attr:`WebChat.engine_lock`, so no two threads ever use the engine.

Imported only by :func:`qwen_magic.web.serve`: it is the one module that imports gradio.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from qwen_magic import render
from qwen_magic.session import ChatSession
from qwen_magic.web import view

ENGINE_GROUP = "engine"  # the Gradio concurrency group of every event that generates
STOP_WAIT_S = 60.0
CSS = ".qwen-facts p { margin: 0.2em 0; font-size: 0.9em; }"


class _Job:
    """One reply being generated in a worker thread, and what it has streamed so far."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.answer = ""
        self.reasoning: str | None = None
        self.thinking_since = time.monotonic()
        self.reply: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancelled = False
        self.running = False
        self.lock = threading.Lock()

    def cancel(self, session: ChatSession) -> None:
        """Stop the reply (from any thread); a job not started yet never starts."""
        with self.lock:
            self.cancelled = True
            running = self.running
        if running:
            session.stop()


class WebChat:
    """The page's handlers; :meth:`build` lays out the components and wires them."""

    def __init__(self, session: ChatSession, *, title: str = "qwen-magic") -> None:
        self.session = session
        self.title = title
        self.engine_lock = threading.Lock()
        self.jobs: dict[str, _Job] = {}
        self.thinking_seconds: dict[str | None, float] = {}
        self.export_dir = Path(tempfile.mkdtemp(prefix="qwen-magic-web-"))
        bot = session.require_bot()
        info = bot.backend.info
        self.info = info
        self.controls = view.controls(info.generation_defaults, info.max_model_len)
        self.has_thinking_switch = bool(getattr(bot, "has_thinking_switch", False))
        self.thinks_by_default = bool(getattr(bot, "thinks_by_default", lambda: False)())

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def conversation_name(request: gr.Request) -> str:
        """This tab's conversation: one per Gradio session (a tab, or an API client)."""
        return f"web-{request.session_hash}"

    def messages(self, name: str) -> list[dict[str, Any]]:
        turns = self.session.conversation(name).turns
        return view.chat_messages(turns, self.thinking_seconds)

    def _options(self, system: str, think: bool, values: tuple[Any, ...]) -> dict[str, Any]:
        try:
            options = view.changed_sampling(self.controls, values)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        if self.has_thinking_switch:
            options["enable_thinking"] = bool(think)
        options["system"] = system.strip() or None
        return options

    def _apply_system(self, name: str, system: str | None) -> None:
        """An emptied system box gives the conversation back the default prompt (undoable)."""
        if system is None and self.session.owns_system(name):
            self.session.set_system(name, None)

    def _stream(
        self, name: str, job: _Job, past: list[dict[str, Any]], call: Callable[..., Any]
    ) -> Iterator[Any]:
        """Run ``call(on_delta=..., on_thinking=...)`` in a worker; yield (chat, facts) updates.

        At most :data:`view.UPDATE_INTERVAL_S` apart; if the generator is closed (Stop, a
        closed tab), the reply is stopped and the worker waited for, so the engine is idle after.
        """
        self.jobs[name] = job

        def on_delta(_index: int, text: str) -> None:
            job.answer += text
            if job.cancelled:  # a Stop that came before the request began
                self.session.stop()

        def on_thinking(_index: int, text: str) -> None:
            job.reasoning = (job.reasoning or "") + text
            if job.cancelled:
                self.session.stop()

        def work() -> None:
            try:
                with self.engine_lock:
                    with job.lock:
                        if job.cancelled:
                            return
                        job.running = True
                    job.thinking_since = time.monotonic()
                    job.reply = call(on_delta=on_delta, on_thinking=on_thinking)
            except BaseException as error:  # shown in the page, never lost in a thread
                job.error = error
            finally:
                job.done.set()

        threading.Thread(target=work, name="qwen-web-reply", daemon=True).start()
        throttle = view.Throttle()
        shown = None
        try:
            while not job.done.wait(view.UPDATE_INTERVAL_S):
                state = (job.answer, job.reasoning)
                if state != shown and throttle.ready():
                    shown = state
                    chat = view.streaming_messages(
                        past, job.message, job.answer, job.reasoning, job.thinking_since
                    )
                    yield chat, gr.skip()
        finally:
            if not job.done.is_set():  # Stop, or the tab went away: abort, keep the partial
                job.cancel(self.session)
                job.done.wait(STOP_WAIT_S)
        yield self._finish(name, job)

    def _finish(self, name: str, job: _Job) -> tuple[Any, Any]:
        if job.error is not None:
            error = job.error
            raise gr.Error(render.first_line(error)) from None
        reply = job.reply
        if reply is None:
            return self.messages(name), gr.skip()
        seconds = getattr(reply, "thinking_seconds", None)
        if seconds is not None and reply.recorded is not None:
            self.thinking_seconds[reply.recorded.turn.key] = seconds
        return self.messages(name), view.reply_facts(reply)

    # ------------------------------------------------------------------ event handlers

    def _on_submit(self, message: str) -> tuple[Any, str]:
        """Show the message at once and lock the box; the reply waits for the engine."""
        if not message.strip():
            raise gr.Error("the message is empty: type something first")
        return gr.Textbox(value="", interactive=False, submit_btn=False, stop_btn=True), message

    def _show_pending(self, message: str, request: gr.Request) -> list[dict[str, Any]]:
        return [
            *self.messages(self.conversation_name(request)),
            {"role": "user", "content": message},
        ]

    def _generate(
        self, request: gr.Request, message: str, system: str, think: bool, *values: Any
    ) -> Iterator[Any]:
        name = self.conversation_name(request)
        options = self._options(system, think, values)

        def call(**callbacks: Any) -> Any:
            self._apply_system(name, options["system"])
            return self.session.ask(name, message, key=uuid.uuid4().hex, **options, **callbacks)

        yield from self._stream(name, _Job(message), self.messages(name), call)

    def _retry(self, request: gr.Request, system: str, think: bool, *values: Any) -> Iterator[Any]:
        name = self.conversation_name(request)
        turns = self.session.conversation(name).turns
        if not turns:
            return
        options = self._options(system, think, values)
        options.pop("system")  # a retry asks as the turn was asked
        past = view.chat_messages(turns[:-1], self.thinking_seconds)
        yield from self._stream(
            name,
            _Job(turns[-1].user),
            past,
            lambda **callbacks: self.session.retry(name, **options, **callbacks),
        )

    def _start_edit(self, edit: gr.EditData) -> tuple[Any, str, int]:
        """An edited user message: lock the box, keep the new text and where it was."""
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        value = edit.value
        if isinstance(value, dict):
            value = value.get("text", "")
        elif isinstance(value, list):
            value = "".join(part.get("text", "") for part in value if isinstance(part, dict))
        return self._lock_box()[0], str(value), int(index)

    def _edit(
        self, request: gr.Request, message: str, index: int, system: str, think: bool, *values: Any
    ) -> Iterator[Any]:
        # gr.Request comes first: Gradio passes it only to positional parameters before *values.
        """Ask the edited message again in place of its turn (undo brings the old turns back)."""
        name = self.conversation_name(request)
        turns = self.session.conversation(name).turns
        number = view.turn_of_message(turns, index)
        turn = turns[number]
        if turn.key is None:
            raise gr.Error("this turn cannot be edited here (it has no key): retry or undo instead")
        options = self._options(system, think, values)

        def call(**callbacks: Any) -> Any:
            self._apply_system(name, options["system"])
            return self.session.ask(name, message, key=turn.key, **options, **callbacks)

        past = view.chat_messages(turns[:number], self.thinking_seconds)
        yield from self._stream(name, _Job(message), past, call)

    def _after(self, message: str, request: gr.Request) -> tuple[Any, Any]:
        """After a reply (finished or stopped): the recorded chat, the box unlocked.

        A Stop cancels the generator; this step then waits for the worker so the partial reply,
        recorded and marked interrupted, is what the chat shows. A message that never reached
        the engine (stopped while waiting its turn) goes back into the box.
        """
        name = self.conversation_name(request)
        job = self.jobs.pop(name, None)
        if job is not None and not job.done.is_set():
            job.cancel(self.session)
            job.done.wait(STOP_WAIT_S)
        unsent = message if job is None or job.reply is None else ""
        box = gr.Textbox(value=unsent, interactive=True, submit_btn=True, stop_btn=False)
        return box, self.messages(name)

    def _undo(self, request: gr.Request) -> tuple[Any, Any, str]:
        name = self.conversation_name(request)
        before = list(self.session.conversation(name).turns)
        with self.engine_lock:
            self.session.undo(name)
        after = self.session.conversation(name).turns
        message = before[-1].user if len(after) < len(before) else gr.skip()
        return self.messages(name), message, "undone"

    def _clear(self, request: gr.Request) -> tuple[Any, str]:
        name = self.conversation_name(request)
        with self.engine_lock:
            removed = self.session.clear(name)
        return self.messages(name), f"cleared {removed} turn(s) (undo brings them back)"

    def _export(self, request: gr.Request) -> Any:
        name = self.conversation_name(request)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.session.export(name, self.export_dir / f"conversation-{stamp}.json", force=True)
        return gr.File(value=str(path), visible=True)

    def _forget(self, request: gr.Request) -> None:
        """A closed tab: stop its reply and drop its conversation (the session keeps no others)."""
        name = self.conversation_name(request)
        job = self.jobs.pop(name, None)
        if job is not None:
            job.cancel(self.session)
        self.session.conversations.pop(name, None)

    def api_chat(self, message: str, system: str = "", request: gr.Request = None) -> Iterator[str]:
        """Reply to ``message`` in this client's own conversation, yielding the reply as it grows.

        ``system`` (empty: the model's default) gives the conversation its system prompt.
        """
        name = self.conversation_name(request)
        job = _Job(message)
        wanted = system.strip() or None

        def call(**callbacks: Any) -> Any:
            self._apply_system(name, wanted)
            return self.session.ask(name, message, system=wanted, **callbacks)

        try:
            for _update in self._stream(name, job, self.messages(name), call):
                yield job.reply.text if job.reply is not None else job.answer
        finally:
            self.jobs.pop(name, None)

    # ------------------------------------------------------------------ layout

    def _control(self, control: view.Control) -> Any:
        item = control.setting
        if item.kind == "seed":  # a text box: empty means unseeded, which a number box can't say
            return gr.Textbox(
                label=item.label,
                info=item.help,
                placeholder="unseeded",
                elem_id=f"qwen-{item.name}",
            )
        return gr.Slider(
            minimum=item.minimum, maximum=control.maximum, step=item.step, value=control.start,
            label=item.label, info=item.help, elem_id=f"qwen-{item.name}",
        )  # fmt: skip

    def build(self) -> gr.Blocks:
        """The page: chat, message box, facts and export on the left; settings on the right."""
        bot = self.session.require_bot()
        default_system = bot.formatter.default_system if bot.tokenizer.is_chatml else None
        model = Path(str(self.info.model)).name or str(self.info.model)
        with gr.Blocks(title=self.title, analytics_enabled=False, fill_height=True) as page:
            gr.Markdown(
                f"### {self.title} · `{model}` on {self.info.where} · "
                f"{self.info.max_model_len:,}-token context"
            )
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        editable="user", buttons=["copy", "copy_all"], feedback_options=None,
                        height=520, elem_id="qwen-chat", show_label=False,
                        placeholder=f"Chat with **{model}**. Each tab is its own conversation.",
                    )  # fmt: skip
                    textbox = gr.Textbox(
                        show_label=False, submit_btn=True, stop_btn=False, autofocus=True,
                        placeholder="Message (Enter sends, Shift+Enter: new line)",
                        elem_id="qwen-message", lines=1, max_lines=8,
                    )  # fmt: skip
                    facts = gr.Markdown(elem_id="qwen-facts", elem_classes="qwen-facts")
                    with gr.Row():
                        export = gr.Button("Export JSON", size="sm", elem_id="qwen-export")
                        exported = gr.File(label="Conversation", visible=False, elem_id="qwen-file")
                with gr.Column(scale=1):
                    system = gr.Textbox(
                        label="System prompt", lines=3, elem_id="qwen-system",
                        placeholder=default_system or "none (the model's default)",
                    )  # fmt: skip
                    think = gr.Checkbox(
                        label="Think", value=self.thinks_by_default, elem_id="qwen-think",
                        visible=self.has_thinking_switch,
                    )  # fmt: skip
                    with gr.Accordion("Sampling", open=True):
                        sliders = [self._control(control) for control in self.controls]
            pending = gr.State("")  # the message on its way to the engine
            edit_at = gr.State(0)  # the chat message an edit replaces
            settings = [system, think, *sliders]
            generating = {"concurrency_limit": 1, "concurrency_id": ENGINE_GROUP}
            quiet = {"queue": False, "api_visibility": "undocumented"}

            submitted = textbox.submit(self._on_submit, textbox, [textbox, pending], **quiet)
            asked = submitted.success(self._show_pending, pending, chatbot, **quiet).then(
                self._generate, [pending, *settings], [chatbot, facts],
                api_visibility="undocumented", **generating,
            )  # fmt: skip
            retried = chatbot.retry(self._lock_box, None, [textbox, pending], **quiet).then(
                self._retry, settings, [chatbot, facts], api_visibility="undocumented",
                **generating,
            )  # fmt: skip
            edit_started = chatbot.edit(
                self._start_edit, None, [textbox, pending, edit_at], **quiet
            )
            edited = edit_started.then(
                self._edit, [pending, edit_at, *settings], [chatbot, facts],
                api_visibility="undocumented",
                **generating,
            )  # fmt: skip
            for event in (asked, retried, edited):
                event.then(self._after, pending, [textbox, chatbot], **quiet)
            textbox.stop(None, None, None, cancels=[asked, retried, edited], **quiet)
            chatbot.undo(self._undo, None, [chatbot, textbox, facts], **quiet)
            chatbot.clear(self._clear, None, [chatbot, facts], **quiet)
            export.click(self._export, None, exported, **quiet)
            page.load(self._on_load, None, chatbot, **quiet)
            page.unload(self._forget)
            gr.api(self.api_chat, api_name="chat", **generating)
        return page

    @staticmethod
    def _lock_box() -> tuple[Any, str]:
        """While a retry or an edit runs: Stop instead of Send, nothing to put back after."""
        return gr.Textbox(interactive=False, submit_btn=False, stop_btn=True), ""

    def _on_load(self, request: gr.Request) -> list[dict[str, Any]]:
        return self.messages(self.conversation_name(request))
