"""What the Jupyter front-end shows while things happen: replies as they stream, load progress.

The magics and the panel decide *what* to show and :mod:`qwen_magic.render` how it looks; this
module puts it on screen. In Jupyter a reply streams as one Markdown output updated in place
(IPython's ``DisplayHandle``), at most ``UPDATES_PER_SECOND`` times a second and always once
more at the end, so the saved notebook holds the final text. In a terminal the reply streams as
plain text to stdout.

A thinking model's reasoning goes to its own block above the answer (:class:`ThinkingView`):
collapsed by default, and in a live kernel an ipywidgets Accordion while it streams, so a click
opens it and it stays open as the text grows. When the reply ends it becomes a plain HTML
``<details>``, which the saved notebook keeps, collapsed again (``--show-thinking open`` keeps it
open): a kernel busy with the cell hears the click only after it, too late to know.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from IPython.display import DisplayHandle, display

from qwen_magic.render import (
    Bundle,
    mime_bundle,
    render_reply,
    render_thinking,
    thinking_body_html,
    thinking_summary,
)

UPDATES_PER_SECOND = 20


def stored_note(variable: str, *, notebook: bool) -> str:
    where = (
        "shown below as the cell's result" if notebook else "the cell's result is a reply object"
    )
    return f"*reply stored in `{variable}`; {where}*"


def show(bundle: Bundle) -> None:
    """Display a bundle once (a normal, non-updating output)."""
    display(bundle, raw=True)


def notice(text: str, *, notebook: bool) -> None:
    """A one-line status message: Markdown in Jupyter, a plain line in a terminal."""
    if notebook:
        show(mime_bundle(text))
    else:
        print(text)


class LiveOutput:
    """One output area updated in place (Jupyter) or appended to (terminal)."""

    def __init__(self, *, notebook: bool, stream: TextIO | None = None) -> None:
        self.notebook = notebook
        self.stream = stream if stream is not None else sys.stdout
        self.handle: DisplayHandle | None = None

    def set(self, bundle: Bundle) -> None:
        """Show ``bundle``, replacing what this output showed before (Jupyter only)."""
        if not self.notebook:
            self.stream.write(bundle["text/plain"] + "\n")
            self.stream.flush()
        elif self.handle is None:
            self.handle = DisplayHandle()
            self.handle.display(bundle, raw=True)
        else:
            self.handle.update(bundle, raw=True)


class LoadProgress:
    """Load progress: the phase and a live elapsed-time ticker, on one updating line.

    Call it with each phase (it is the ``progress`` callback QwenChat takes), then
    :meth:`done` or :meth:`failed`. In Jupyter a background thread refreshes the elapsed time
    every ``tick`` seconds while a phase runs; a terminal gets one line per phase.
    """

    def __init__(
        self,
        model: str,
        *,
        notebook: bool,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
        tick: float = 1.0,
    ) -> None:
        self.model = model
        self.clock = clock
        self.started = clock()
        self.output = LiveOutput(notebook=notebook, stream=stream)
        self.phases: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._tick = tick

    def elapsed(self) -> float:
        return self.clock() - self.started

    def _line(self) -> str:
        return f"⏳ loading {self.model}: {self.phases[-1]} ({self.elapsed():.0f} s)"

    def __call__(self, phase: str) -> None:
        with self._lock:
            self.phases.append(phase)
            self.output.set(mime_bundle(self._line()))
        if self.output.notebook and self._ticker is None:
            self._ticker = threading.Thread(
                target=self._run_ticker, daemon=True, name="qwen-magic-load-ticker"
            )
            self._ticker.start()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                if not self._stop.is_set():
                    self.output.set(mime_bundle(self._line()))

    def _end(self, text: str | None) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if text is not None:
            with self._lock:
                self.output.set(mime_bundle(text))

    def stop(self) -> None:
        """Stop the ticker and leave the line as it is (nothing was loaded after all)."""
        self._end(None)

    def done(self, summary: str) -> None:
        self._end(f"✅ {summary} in {self.elapsed():.1f} s")

    def failed(self, why: str = "failed") -> None:
        # The terminal already has its lines; the error says why.
        text = f"❌ loading {self.model} {why} after {self.elapsed():.1f} s"
        self._end(text if self.output.notebook else None)


class ThinkingView:
    """Sample 1's reasoning while it streams, then its final block (see the module docstring).

    Terminal: one status line ("💭 Thinking…", then "💭 Thought for 4.1 s, 312 tokens"); with
    ``mode="open"`` the reasoning itself streams too.
    """

    def __init__(
        self,
        *,
        notebook: bool,
        mode: str = "collapsed",
        live_widgets: bool = False,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self.notebook, self.mode, self.clock = notebook, mode, clock
        self.stream = stream if stream is not None else sys.stdout
        self.output = LiveOutput(notebook=notebook, stream=self.stream)
        self.text = ""
        self.started: float | None = None
        self.ended: float | None = None
        self.shown = False
        self.summarized = False  # the terminal's summary line is written
        self._live_widgets = live_widgets and notebook and mode != "hidden"
        self._accordion: Any = None
        self._body: Any = None

    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else self.clock()) - self.started

    def add(self, text: str) -> None:
        """More reasoning; the view refreshes on :meth:`refresh`."""
        if self.started is None:
            self.started = self.clock()
        self.text += text
        if not self.notebook:
            if not self.shown:
                self.stream.write(thinking_summary(None, None, done=False) + "\n")
                self.shown = True
            if self.mode == "open":
                self.stream.write(text)
            self.stream.flush()

    def end(self) -> None:
        """The answer began: the thinking time stops (a terminal gets the summary line now,
        before the answer)."""
        if self.started is not None and self.ended is None:
            self.ended = self.clock()
            if not self.notebook:
                if self.mode == "open":
                    self.stream.write("\n")
                self.stream.write(thinking_summary(self.seconds(), None, done=True) + "\n")
                self.stream.flush()
                self.summarized = True

    def refresh(self) -> None:
        """Show the reasoning so far (Jupyter; the caller throttles)."""
        if not self.notebook or self.started is None:
            return
        summary = thinking_summary(self.seconds(), None, done=self.ended is not None)
        if self._live_widgets:
            if self._accordion is None and not self._make_widget():
                self._live_widgets = False
            else:
                self._body.value = thinking_body_html(self.text)
                self._accordion.set_title(0, summary)
                return
        self.output.set(
            render_thinking(
                self.text,
                seconds=self.seconds(),
                tokens=None,
                done=self.ended is not None,
                mode=self.mode,
            )
        )
        self.shown = True

    def _make_widget(self) -> bool:
        try:
            import ipywidgets
        except ImportError:
            return False
        self._body = ipywidgets.HTML()
        self._accordion = ipywidgets.Accordion(children=[self._body], selected_index=None)
        self._accordion.set_title(0, thinking_summary(0, None, done=False))
        self.output.handle = DisplayHandle()
        self.output.handle.display(self._accordion)
        self.shown = True
        return True

    def finish(
        self,
        reasoning: str | None,
        *,
        seconds: float | None,
        tokens: int,
        budget_reached: bool = False,
    ) -> None:
        """Show the final block (nothing when the reply had no reasoning, or an empty one)."""
        if self.notebook:
            self.end()
        elif self.ended is None and self.started is not None:
            self.ended = self.clock()
        if reasoning is not None:
            self.text = reasoning
        if not self.text:
            if self.shown and self.notebook:  # a block opened for nothing: leave a blank output
                self.output.set(mime_bundle(""))
            return
        mode = self.mode
        if self._accordion is not None:
            # Its open state cannot be kept: the kernel hears the click only after the cell.
            self._accordion.close()
        if self.notebook:
            self.output.set(
                render_thinking(
                    self.text,
                    seconds=seconds,
                    tokens=tokens,
                    done=True,
                    mode=mode,
                    budget_reached=budget_reached,
                )
            )
        elif not self.summarized:
            if mode == "open":
                self.stream.write("\n")
            summary = thinking_summary(seconds, tokens, done=True, budget_reached=budget_reached)
            self.stream.write(summary + "\n")
            self.stream.flush()


class ReplyStream:
    """Shows a reply while it is generated; pass :meth:`on_delta` to ``QwenChat.reply``.

    Jupyter: one Markdown (or, for several samples, HTML) output updated in place, throttled to
    ``UPDATES_PER_SECOND`` by time, plus a final update from :meth:`finish`. Terminal: sample 1
    is written to ``stream`` as it arrives; several samples are printed at the end.
    """

    def __init__(
        self,
        samples: int = 1,
        *,
        notebook: bool,
        min_interval: float = 1 / UPDATES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
        show_thinking: str = "collapsed",
        live_widgets: bool = False,
    ) -> None:
        self.texts = [""] * samples
        self.notebook = notebook
        self.min_interval = min_interval
        self.clock = clock
        self.stream = stream if stream is not None else sys.stdout
        # Created before the answer's output, so the reasoning block shows above it.
        self.thinking = ThinkingView(
            notebook=notebook,
            mode=show_thinking,
            live_widgets=live_widgets,
            clock=clock,
            stream=self.stream,
        )
        self.output = LiveOutput(notebook=notebook, stream=self.stream)
        self.updates = 0
        self._last_update = -float("inf")
        self._last_thinking_update = -float("inf")
        self._written = 0  # characters of sample 1 already written to the terminal

    def on_thinking(self, index: int, text: str) -> None:
        """Append reasoning of sample ``index`` (sample 1's is shown) and refresh if it is time."""
        if index != 0:
            return
        self.thinking.add(text)
        now = self.clock()
        if now - self._last_thinking_update >= self.min_interval:
            self._last_thinking_update = now
            self.updates += 1
            self.thinking.refresh()

    def on_delta(self, index: int, text: str) -> None:
        """Append ``text`` to sample ``index`` and refresh the view if it is time."""
        if index == 0 and self.thinking.started is not None and self.thinking.ended is None:
            self.thinking.end()
            self.thinking.refresh()
        self.texts[index] += text
        if not self.notebook:
            if len(self.texts) == 1:
                self._write_terminal()
            return
        now = self.clock()
        if now - self._last_update >= self.min_interval:
            self._last_update = now
            self._update(render_reply(self.texts))

    def _write_terminal(self) -> None:
        new = self.texts[0][self._written :]
        if new:
            self.stream.write(new)
            self.stream.flush()
            self._written += len(new)

    def _update(self, bundle: Bundle) -> None:
        self.updates += 1
        self.output.set(bundle)

    def finish(
        self,
        texts: Sequence[str] | None = None,
        *,
        interrupted: bool = False,
        finish_reasons: Sequence[str | None] = (),
        reply: Any = None,
    ) -> None:
        """Show the final reply (``texts`` when given: the engine's own final text; ``reply``,
        a :class:`qwen_magic.chat.Reply`, also gives the reasoning's final figures)."""
        if texts is not None:
            self.texts = list(texts)
        stopped_while_thinking: list[bool] = []
        if reply is not None and reply.thinking:
            split = reply.thinking[0]
            self.thinking.finish(
                split.reasoning,
                seconds=split.thinking_seconds,
                tokens=split.thinking_tokens,
                budget_reached=reply.budget_reached,
            )
            stopped_while_thinking = [each.stopped_while_thinking for each in reply.thinking]
        elif self.thinking.started is not None:
            self.thinking.finish(None, seconds=self.thinking.seconds(), tokens=0)
        bundle = render_reply(
            self.texts,
            interrupted=interrupted,
            finish_reasons=finish_reasons,
            stopped_while_thinking=stopped_while_thinking,
        )
        if self.notebook:
            self._update(bundle)
        elif len(self.texts) == 1:
            self._write_terminal()
            tail = bundle["text/plain"][len(self.texts[0]) :]
            self.stream.write(tail + "\n")
            self.stream.flush()
        else:
            self.stream.write(bundle["text/plain"] + "\n")
            self.stream.flush()


class ReplyResult:
    """What ``%%qwen -o VAR`` returns, like ``%timeit -o``: the reply with a Markdown repr.

    Attributes mirror QwenChat's Reply (``text``, ``texts``, ``plan``, ``sampling``, ...).
    """

    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def __getattr__(self, name: str) -> Any:
        try:
            reply = self.__dict__["reply"]
        except KeyError:  # copy / pickle probe an instance that has no __dict__ yet
            raise AttributeError(name) from None
        return getattr(reply, name)

    def __str__(self) -> str:
        return self.reply.text

    def __repr__(self) -> str:
        state = ", interrupted" if self.reply.interrupted else ""
        return (
            f"<QwenReply: {self.reply.num_generated_tokens} tokens in "
            f"{self.reply.elapsed_s:.2f} s{state}>"
        )

    def _repr_markdown_(self) -> str:
        reasons = getattr(self.reply, "finish_reasons", ())
        thinking = getattr(self.reply, "thinking", [])
        bundle = render_reply(
            self.reply.texts,
            interrupted=self.reply.interrupted,
            finish_reasons=reasons,
            stopped_while_thinking=[each.stopped_while_thinking for each in thinking],
        )
        split = thinking[0] if thinking else None
        if split is None or not split.reasoning:
            return bundle["text/markdown"]
        block = render_thinking(
            split.reasoning, seconds=split.thinking_seconds, tokens=split.thinking_tokens, done=True
        )
        return block["text/markdown"] + "\n\n" + bundle["text/markdown"]
