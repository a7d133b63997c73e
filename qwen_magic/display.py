"""Everything qwen-magic shows the user: streamed replies, load progress, prompts, history, errors.

The magics and the panel decide *what* to show; this module decides *how*. In Jupyter a reply
streams as one Markdown output updated in place (``display(..., display_id=True)`` then
``update``), at most ``1 / min_interval`` times a second and always once more at the end, so the
saved notebook holds the final text. In a terminal the reply streams as plain text to stdout.

Pure rendering: no vLLM import; IPython only for ``display``.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from IPython.display import display

from qwen_magic.history import Conversation, PromptPlan

INTERRUPTED = "⏹ interrupted"
_SPECIAL_STYLE = "background:#fde68a;color:#92400e;border-radius:3px"
CUT_AT_MAX_TOKENS = "✂ stopped at max_tokens"
UPDATES_PER_SECOND = 20

# One readable line per mistake a user can make; the magics raise these as UsageError.
NO_MODEL = "no model is loaded: run %qwen_load first (no argument loads the demo model)"
EMPTY_CELL = "the cell is empty: write a message below %%qwen"
CELL_NEEDS_NO_COMMAND = "%%qwen takes options only: run %qwen {command} on a line of its own"
LINE_NEEDS_COMMAND = (
    "%qwen needs a command (history, clear, undo, export PATH, import PATH); "
    "to chat, use %%qwen as a cell magic"
)
OUT_OF_MEMORY = (
    "out of memory while {action}: lower --gpu-memory-utilization or --max-model-len, "
    "or load a smaller or quantized model"
)
INTERRUPTED_NOTE = "reply interrupted: the partial reply is kept in the history, marked interrupted"


def load_failed(name: str, error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"could not load {name}: {first_line} (add --verbose for the full error)"


def too_long(warning: str) -> str:
    return (
        f"the message does not fit the context ({warning}): shorten it, lower --max-tokens "
        "or %qwen_load with a larger --max-model-len"
    )


def stored_note(variable: str) -> str:
    return f"*reply stored in `{variable}`; shown below as the cell's result*"


Bundle = dict[str, str]


def mime_bundle(markdown: str, *, html_text: str | None = None, plain: str | None = None) -> Bundle:
    """A display bundle: Markdown for Jupyter, optional HTML, plain text for terminals."""
    bundle = {"text/markdown": markdown, "text/plain": plain if plain is not None else markdown}
    if html_text is not None:
        bundle["text/html"] = html_text
    return bundle


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
        self.display_id: str | None = None

    def set(self, bundle: Bundle) -> None:
        """Show ``bundle``, replacing what this output showed before (Jupyter only)."""
        if not self.notebook:
            self.stream.write(bundle["text/plain"] + "\n")
            self.stream.flush()
        elif self.display_id is None:
            handle = display(bundle, raw=True, display_id=True)
            self.display_id = handle.display_id if handle is not None else None
        else:
            display(bundle, raw=True, display_id=self.display_id, update=True)


class LoadProgress:
    """Load progress: the phase and the elapsed time, on one updating line in Jupyter.

    Call it with each phase (it is the ``progress`` callback QwenChat takes), then
    :meth:`done` or :meth:`failed`.
    """

    def __init__(
        self,
        model: str,
        *,
        notebook: bool,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self.model = model
        self.clock = clock
        self.started = clock()
        self.output = LiveOutput(notebook=notebook, stream=stream)
        self.phases: list[str] = []

    def elapsed(self) -> float:
        return self.clock() - self.started

    def __call__(self, phase: str) -> None:
        self.phases.append(phase)
        text = f"⏳ loading {self.model}: {phase} ({self.elapsed():.1f} s)"
        self.output.set(mime_bundle(text))

    def done(self, summary: str) -> None:
        self.output.set(mime_bundle(f"✅ {summary} in {self.elapsed():.1f} s"))

    def failed(self) -> None:
        text = f"❌ loading {self.model} failed after {self.elapsed():.1f} s"
        if self.output.notebook:  # the terminal already has its lines; the error says why
            self.output.set(mime_bundle(text))


def render_reply(
    texts: Sequence[str],
    *,
    interrupted: bool = False,
    finish_reasons: Sequence[str | None] = (),
) -> Bundle:
    """The bundle for a reply: Markdown for one sample, HTML columns for several."""
    marks = []
    for index in range(len(texts)):
        reason = finish_reasons[index] if index < len(finish_reasons) else None
        marks.append(
            INTERRUPTED if interrupted else CUT_AT_MAX_TOKENS if reason == "length" else ""
        )
    if len(texts) == 1:
        text = texts[0]
        markdown = text + (f"\n\n*{marks[0]}*" if marks[0] else "")
        plain = text + (f"\n[{marks[0]}]" if marks[0] else "")
        return mime_bundle(markdown, plain=plain)
    sections, columns, plain_parts = [], [], []
    for number, (text, mark) in enumerate(zip(texts, marks, strict=True), start=1):
        title = f"Sample {number}" + (" (joins the history)" if number == 1 else "")
        sections.append(f"**{title}**\n\n{text}" + (f"\n\n*{mark}*" if mark else ""))
        footer = f"<p><em>{html.escape(mark)}</em></p>" if mark else ""
        columns.append(
            '<div style="flex:1;min-width:0">'
            f"<strong>{html.escape(title)}</strong>"
            f'<div style="white-space:pre-wrap">{html.escape(text)}</div>{footer}</div>'
        )
        plain_parts.append(f"--- {title} ---\n{text}" + (f"\n[{mark}]" if mark else ""))
    html_text = '<div style="display:flex;gap:1.5em">' + "".join(columns) + "</div>"
    return mime_bundle(
        "\n\n---\n\n".join(sections), html_text=html_text, plain="\n".join(plain_parts)
    )


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
        return getattr(self.__dict__["reply"], name)

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


def highlight_special_tokens(token_ids: Sequence[int], tokenizer: Any) -> str:
    """HTML of the prompt with the real control tokens highlighted.

    Works on token ids, not text: a user who types ``<|im_end|>`` sees it as plain text, because
    that is what the model saw (it was encoded as ordinary tokens).
    """
    special = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.endoftext_id} - {None}
    pieces: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            pieces.append(html.escape(tokenizer.decode(run), quote=False))
            run.clear()

    for token_id in token_ids:
        if token_id in special:
            flush()
            token = html.escape(tokenizer.decode([token_id]), quote=False)
            pieces.append(f'<span style="{_SPECIAL_STYLE}">{token}</span>')
        else:
            run.append(token_id)
    flush()
    return "".join(pieces)


def budget_summary(plan_or_numbers: PromptPlan | Mapping[str, Any]) -> str:
    """One line on how the prompt fits the token budget, for the magic and the panel.

    Args:
        plan_or_numbers: A PromptPlan, or a mapping with ``num_tokens`` and ``budget`` and
            optionally ``kept_turns``, ``dropped_turns`` and ``truncated``.
    """
    if isinstance(plan_or_numbers, PromptPlan):
        plan = plan_or_numbers
        numbers: Mapping[str, Any] = {
            "num_tokens": plan.num_tokens,
            "budget": plan.budget,
            "kept_turns": plan.kept_turns,
            "dropped_turns": plan.dropped_turns,
            "truncated": plan.truncated,
        }
    else:
        numbers = plan_or_numbers
    parts = [f"{numbers['num_tokens']:,} of {numbers['budget']:,} prompt tokens"]
    kept = numbers.get("kept_turns")
    if kept is not None:
        parts.append(f"{kept} past turn{'s' if kept != 1 else ''} sent")
    if numbers.get("dropped_turns"):
        parts.append(f"{numbers['dropped_turns']} oldest dropped to fit")
    if numbers.get("truncated"):
        parts.append("message cut to fit")
    return " · ".join(parts)


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str]) -> tuple[str, str]:
    """A two-column table as (Markdown, HTML)."""
    markdown = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    markdown += [f"| {key} | {value} |" for key, value in rows]
    cells = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>"
        for key, value in rows
    )
    head = f"<tr><th>{header[0]}</th><th>{header[1]}</th></tr>"
    return "\n".join(markdown), f"<table>{head}{cells}</table>"


def render_prompt(
    text: str,
    token_ids: Sequence[int],
    tokenizer: Any,
    *,
    sampling: Mapping[str, Any],
    plan: PromptPlan | None = None,
) -> Bundle:
    """Exactly what the model saw: the prompt text with control tokens highlighted, the tokens
    per part, what the budget trimmed and the effective sampling parameters."""
    parts: list[tuple[str, Any]] = []
    if plan is not None:
        parts.append(("system", plan.system_tokens))
        parts += [(f"past turn {i}", n) for i, n in enumerate(plan.turn_tokens, start=1)]
        parts.append(("message", plan.message_tokens))
        rest = plan.num_tokens - plan.system_tokens - sum(plan.turn_tokens) - plan.message_tokens
        parts.append(("reply prompt", rest))
        summary = budget_summary(plan)
    else:
        summary = f"{len(token_ids):,} prompt tokens (raw continuation: no ChatML, no history)"
    parts.append(("total", len(token_ids)))
    token_md, token_html = _table(parts, ("part", "tokens"))
    sampling_rows = sorted(sampling.items())
    sampling_md, sampling_html = _table(sampling_rows, ("sampling", "value"))
    fence = "````"
    markdown = (
        f"**Prompt** · {summary}\n\n{fence}text\n{text}\n{fence}\n\n{token_md}\n\n{sampling_md}"
    )
    html_text = (
        f"<details open><summary><strong>Prompt</strong> · {html.escape(summary)}</summary>"
        f'<pre style="white-space:pre-wrap">{highlight_special_tokens(token_ids, tokenizer)}</pre>'
        f'<div style="display:flex;gap:2em">{token_html}{sampling_html}</div></details>'
    )
    plain = f"--- prompt ({summary}) ---\n{text}\n--- sampling: {dict(sampling_rows)} ---"
    return mime_bundle(markdown, html_text=html_text, plain=plain)


def history_markdown(conversation: Conversation, *, name: str | None = None) -> str:
    """The conversation rendered for reading; interrupted replies are marked."""
    title = f"**Conversation `{name}`**" if name else "**Conversation**"
    lines = [f"{title} · {len(conversation.turns)} turn(s)", ""]
    if conversation.system is not None:
        lines += [f"> **System:** {conversation.system}", ""]
    if not conversation.turns:
        lines.append("*No turns yet.*")
    for number, turn in enumerate(conversation.turns, start=1):
        marker = f" *{INTERRUPTED}*" if turn.interrupted else ""
        lines += [f"**{number}. User**", "", turn.user, ""]
        lines += [f"**{number}. Assistant**{marker}", "", turn.assistant, "", "---", ""]
    return "\n".join(lines).rstrip("-\n ") + "\n"


def status_markdown(
    engine: Mapping[str, Any] | None, conversations: Mapping[str, Conversation]
) -> str:
    """``%qwen_status``: the loaded model (or none) and the conversations."""
    if engine is None:
        lines = ["**No model loaded.** Run `%qwen_load` (no argument loads the demo model)."]
    else:
        lines = ["| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in engine.items()]
    lines += ["", "**Conversations:**"]
    if not conversations:
        lines.append("none yet")
    for name, conversation in conversations.items():
        lines.append(f"- `{name}`: {len(conversation.turns)} turn(s)")
    return "\n".join(lines)


def format_memory(memory: Mapping[str, Any]) -> str:
    """Engine memory figures (bytes or already-formatted values) as one line."""

    def size(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1024:
            return f"{value / 2**30:.2f} GiB"
        return str(value)

    shown = [f"{key} {size(value)}" for key, value in memory.items() if value is not None]
    return ", ".join(shown) or "n/a"
