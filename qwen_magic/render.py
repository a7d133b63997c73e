"""Pure renderers: replies, prompts, history, status and budget as Markdown, HTML and plain text.

Every front-end (the Jupyter magics and panel, the terminal chat, the web page) shows the same
facts the same way by calling these functions; none of them displays anything. A *bundle* is a
dict of MIME type to text (``text/markdown``, ``text/plain``, optionally ``text/html``).

Replies are model output, so they are rendered defensively: a Markdown image or an ``<img>``
tag in a reply becomes a plain link (a browser would otherwise fetch a remote image, which is
how injected prompts smuggle conversation data out), and ``$`` is left alone.

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_magic.conversation import Conversation
    from qwen_magic.prompt import PromptPlan

Bundle = dict[str, str]

INTERRUPTED = "⏹ interrupted"
CUT_AT_MAX_TOKENS = "✂ stopped at max_tokens"
_SPECIAL_STYLE = "background:#fde68a;color:#92400e;border-radius:3px"

# One readable line per mistake a user can make; the front-ends raise or print these.
NO_MODEL = "no model is loaded: run %qwen_load first (no argument loads the demo model)"
EMPTY_MESSAGE = "the cell is empty: write a message below %%qwen"
OUT_OF_MEMORY = (
    "out of memory while {action}: lower --gpu-memory-utilization or --max-model-len, "
    "or load a smaller or quantized model"
)
INTERRUPTED_NOTE = "reply interrupted: the partial reply is kept in the history, marked interrupted"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_failed(name: str, error: BaseException) -> str:
    return f"could not load {name}: {first_line(error)} (add --verbose for the full error)"


def too_long(reason: str) -> str:
    return (
        f"the message does not fit the context ({reason}): shorten it, lower --max-tokens "
        "or %qwen_load with a larger --max-model-len"
    )


def mime_bundle(markdown: str, *, html_text: str | None = None, plain: str | None = None) -> Bundle:
    """A display bundle: Markdown for Jupyter, optional HTML, plain text for terminals."""
    bundle = {"text/markdown": markdown, "text/plain": plain if plain is not None else markdown}
    if html_text is not None:
        bundle["text/html"] = html_text
    return bundle


_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})", re.MULTILINE)
_INLINE_CODE = re.compile(r"(`+)(?:.|\n)*?\1")
_IMAGE = re.compile(r"!\[((?:[^\]\\]|\\.)*)\]")
_IMG_TAG = re.compile(r"<(?=\s*img\b)", re.IGNORECASE)


def _defuse_prose(text: str) -> str:
    """Outside code: ``![alt](url)`` -> ``[🖼 alt](url)``, ``<img`` -> ``&lt;img``."""
    pieces, last = [], 0
    for match in _INLINE_CODE.finditer(text):
        pieces.append(_IMG_TAG.sub("&lt;", _IMAGE.sub(r"[🖼 \1]", text[last : match.start()])))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_IMG_TAG.sub("&lt;", _IMAGE.sub(r"[🖼 \1]", text[last:])))
    return "".join(pieces)


def safe_markdown(text: str) -> str:
    """Model output as Markdown that cannot make the browser fetch anything.

    Images become links the user may click; code blocks and inline code are left exactly as
    they are (an image in a code sample is code, not an image).
    """
    out, position, fence = [], 0, None
    for match in _FENCE.finditer(text):
        marker = match.group(2)
        if fence is None:
            out.append(_defuse_prose(text[position : match.start()]))
            position, fence = match.start(), marker
        elif marker[0] == fence[0] and len(marker) >= len(fence):
            end = text.find("\n", match.end())
            end = len(text) if end < 0 else end
            out.append(text[position:end])
            position, fence = end, None
    tail = text[position:]
    out.append(tail if fence is not None else _defuse_prose(tail))
    return "".join(out)


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
        markdown = safe_markdown(text) + (f"\n\n*{marks[0]}*" if marks[0] else "")
        plain = text + (f"\n[{marks[0]}]" if marks[0] else "")
        return mime_bundle(markdown, plain=plain)
    sections, columns, plain_parts = [], [], []
    for number, (text, mark) in enumerate(zip(texts, marks, strict=True), start=1):
        title = f"Sample {number}" + (" (joins the history)" if number == 1 else "")
        sections.append(f"**{title}**\n\n{safe_markdown(text)}" + (f"\n\n*{mark}*" if mark else ""))
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


def budget_summary(plan: PromptPlan) -> str:
    """One line on how the prompt fits the token budget."""
    parts = [f"{plan.num_tokens:,} of {plan.budget:,} prompt tokens"]
    parts.append(f"{plan.kept_turns} past turn{'s' if plan.kept_turns != 1 else ''} sent")
    if plan.dropped_turns:
        parts.append(f"{plan.dropped_turns} oldest dropped to fit")
    if plan.truncated:
        parts.append("message cut to fit")
    return " · ".join(parts)


def history_markdown(conversation: Conversation, *, name: str | None = None) -> str:
    """The conversation for reading (``%qwen history``, the panel, Markdown exports)."""
    title = f"**Conversation `{name}`**" if name else "**Conversation**"
    lines = [f"{title} · {len(conversation.turns)} turn(s)", ""]
    if conversation.system is not None:
        lines += [f"> **System:** {conversation.system}", ""]
    if not conversation.turns:
        lines.append("*No turns yet.*")
    for number, turn in enumerate(conversation.turns, start=1):
        if number > 1:
            lines += ["---", ""]
        marker = f" *{INTERRUPTED}*" if turn.interrupted else ""
        lines += [f"**{number}. User**", "", turn.user, ""]
        lines += [f"**{number}. Assistant**{marker}", "", safe_markdown(turn.assistant), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def status_markdown(
    facts: Mapping[str, Any] | None, conversations: Mapping[str, Conversation]
) -> str:
    """``%qwen_status``: the loaded model (or none) and the conversations."""
    if facts is None:
        lines = ["**No model loaded.** Run `%qwen_load` (no argument loads the demo model)."]
    else:
        lines = ["| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in facts.items()]
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
