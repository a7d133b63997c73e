"""What the Jupyter front-end shows while things happen: replies as they stream, load progress.

The magics and the panel decide *what* to show and :mod:`qwen_magic.render` how it looks; this
module puts it on screen. In Jupyter a reply streams as one Markdown output updated in place
(IPython's ``DisplayHandle``), at most ``UPDATES_PER_SECOND`` times a second and always once
more at the end, so the saved notebook holds the final text. In a terminal the reply streams as
plain text to stdout.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from IPython.display import DisplayHandle, display

from qwen_magic.render import Bundle, mime_bundle, render_reply

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
            self._ticker = threading.Thread(target=self._run_ticker, daemon=True,
                                            name="qwen-magic-load-ticker")  # fmt: skip
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
    ) -> None:
        self.texts = [""] * samples
        self.notebook = notebook
        self.min_interval = min_interval
        self.clock = clock
        self.stream = stream if stream is not None else sys.stdout
        self.output = LiveOutput(notebook=notebook, stream=self.stream)
        self.updates = 0
        self._last_update = -float("inf")
        self._written = 0  # characters of sample 1 already written to the terminal

    def on_delta(self, index: int, text: str) -> None:
        """Append ``text`` to sample ``index`` and refresh the view if it is time."""
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
    ) -> None:
        """Show the final reply (``texts`` when given: the engine's own final text)."""
        if texts is not None:
            self.texts = list(texts)
        bundle = render_reply(self.texts, interrupted=interrupted, finish_reasons=finish_reasons)
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
        bundle = render_reply(
            self.reply.texts, interrupted=self.reply.interrupted, finish_reasons=reasons
        )
        return bundle["text/markdown"]
