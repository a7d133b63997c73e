"""Pure renderers: replies, prompts, history, status and budget as Markdown, HTML and plain text.

Every front-end (the Jupyter magics and panel, the terminal chat, the web page) shows the same
facts the same way by calling these functions; none of them displays anything. A *bundle* is a
dict of MIME type to text (``text/markdown``, ``text/plain``, optionally ``text/html``).

Replies are model output, so they are rendered defensively (:func:`safe_markdown`): a Markdown
image becomes a plain link and raw HTML shows as text (a browser would otherwise fetch a remote
image, which is how injected prompts smuggle conversation data out, and JupyterLab runs the
scripts of a trusted output), while code stays as it is and ``$`` is left alone.

Pure Python: no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import bisect
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
STOPPED_WHILE_THINKING = (
    "✂ stopped while thinking, before any answer: raise --max-tokens or set --thinking-budget"
)
_THINKING_STYLE = "white-space:pre-wrap;opacity:0.75;margin:0.3em 0 0 1em;font-size:90%"
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


_FENCE_LINE = re.compile(r"([ \t]*)(`{3,}|~{3,})(.*)")
_BACKTICK_RUN = re.compile(r"`+")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # where an HTML tag, comment or autolink can begin
_IMAGE_START = re.compile(r"!+\[")  # "!![x](url)" must not become "![🖼 x](url)"
_DEFINITION_START = re.compile(r"(?:[ \t]*(?:>|[*+-](?=[ \t])|\d{1,9}[.)](?=[ \t])))*[ \t]*(?=\[)")
_LABEL_RUNS_ON = re.compile(r"\[(?:\\.|[^\[\]\\])*(?:\]:|\Z)")
_MATH_STARTS = ("$", "\\begin{", "\\\\(", "\\\\[")  # what JupyterLab lifts out before Markdown
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _spelled(text: str) -> str:
    """``text`` with its ASCII punctuation as character references: inert in Markdown and HTML."""
    return "".join(f"&#{ord(char)};" if char in _ASCII_PUNCTUATION else char for char in text)


def _is_harmful(text: str) -> bool:
    return bool(_TAG_START.search(text) or _IMAGE_START.search(text))


def _defuse_everything(text: str) -> str:
    """Defuse images and tags even where they may be code (a fence's info string)."""
    return _TAG_START.sub("&lt;", _IMAGE_START.sub("[🖼 ", text))


def _no_fence(line: str) -> str:
    """A line that looks like a fence but must not be one (``\\`` before its marker)."""
    marker = len(line) - len(line.lstrip(" \t"))
    return line[:marker] + "\\" + line[marker:]


def _no_definition(line: str) -> str:
    """Escape a ``[`` that could open a link definition, which marked lets run on over lines
    (and over a code fence, which then is no longer one)."""
    start = _DEFINITION_START.match(line)
    if start and _LABEL_RUNS_ON.match(line, start.end()):
        return line[: start.end()] + "\\" + line[start.end() :]
    return line


def _fence_end(lines: list[str], start: int, indent: int, marker: str) -> tuple[int, bool, bool]:
    """Where the code fence opened at ``lines[start]`` ends: ``(end, closed, agreed)``.

    ``agreed`` means that CommonMark, marked (JupyterLab's parser, which also closes on a fence
    followed by tildes) and JupyterLab's math extraction (which takes only an exact fence) all end
    it there. An indented fence may sit in a list item, which a less indented line ends (and the
    fence with it) while a top-level fence would go on: that end is not agreed either.
    """
    commonmark = re.compile(rf"( *){re.escape(marker[0])}{{{len(marker)},}}[ \t]*")
    marked = re.compile(rf"( *){re.escape(marker)}[~`]* *")
    jupyterlab = re.compile(rf"{re.escape(marker)}`*")
    for number in range(start + 1, len(lines)):
        line = lines[number]
        leading = len(line) - len(line.lstrip(" "))
        by_commonmark, by_marked = commonmark.fullmatch(line), marked.fullmatch(line)
        if by_commonmark or by_marked:
            if indent == 0 and leading > 3:
                continue  # code for every parser
            agreed = by_commonmark and by_marked and indent <= leading <= 3
            return number + 1, True, bool(agreed and (indent or jupyterlab.fullmatch(line)))
        if indent and line.strip(" \t") and leading < indent:
            return number, False, False
    return len(lines), False, True


def _dedent(line: str, indent: int) -> str:
    """``line`` without up to ``indent`` leading spaces, as a fence's content is shown."""
    return line[min(indent, len(line) - len(line.lstrip(" "))) :]


def _code_block(indentation: str, body: list[str]) -> str:
    """A code block as HTML whose text no parser reads as markup, for an ambiguous fence."""
    shown = [_spelled(_dedent(line, len(indentation))) for line in body] or [""]
    shown[0] = "<pre><code>" + shown[0]
    shown[-1] += "</code></pre>"
    return "\n".join(indentation + line for line in shown)


def _inert_code(content: str) -> str:
    """Inline code as HTML ``<code>`` whose text no Markdown or HTML parser reads as markup."""
    content = content.replace("\n", " ")
    if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
        content = content[1:-1]  # as CommonMark shows a code span
    return f"<code>{_spelled(content)}</code>"


def _defuse_prose(text: str) -> str:
    """Outside code blocks: ``![`` -> ``[🖼 ``, ``<tag`` -> ``&lt;tag``.

    Inline code is kept as it is unless it holds an image or a tag. Such code becomes HTML
    ``<code>`` with its punctuation spelled as character references: it looks the same and stays
    inert whatever a parser makes of the text around it (marked lets a bare URL, emphasis or
    strikethrough cut a code span short; CommonMark does not).
    """
    runs: dict[int, list[int]] = {}
    for match in _BACKTICK_RUN.finditer(text):
        runs.setdefault(len(match[0]), []).append(match.start())
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "`":
            length = len(_BACKTICK_RUN.match(text, index)[0])
            same = runs.get(length, [])
            position = bisect.bisect_right(same, index)
            if position < len(same):  # a code span, as CommonMark pairs backtick runs
                end = same[position] + length
                content = text[index + length : end - length]
                out.append(_inert_code(content) if _is_harmful(content) else text[index:end])
                index = end
            else:
                out.append(text[index : index + length])
                index += length
            continue
        if char == "\\" and text[index + 1 : index + 2] in _ASCII_PUNCTUATION:
            if _TAG_START.match(text, index + 1):  # a bare URL before it would take the "\\"
                out.append("&lt;")
                index += 2
                continue
            if text[index + 1] != "!":  # "\\![" is defused as an image below, to be safe
                out.append(text[index : index + 2])
                index += 2
                continue
        image = _IMAGE_START.match(text, index) if char == "!" else None
        if image:
            out.append("[🖼 ")
            index = image.end()
            continue
        out.append("&lt;" if char == "<" and _TAG_START.match(text, index) else char)
        index += 1
    return "\n".join(_no_definition(line) for line in "".join(out).split("\n"))


def _safe_prose(text: str) -> str:
    """Text shown inside a line (the system prompt): no image, tag or code fence."""
    return _defuse_prose("\n".join(_no_fence(line) if _FENCE_LINE.fullmatch(line) else line
                                   for line in _lines(text)))  # fmt: skip


def safe_markdown(text: str) -> str:
    """Model output as Markdown that cannot make the browser fetch or run anything.

    Images become links the user may click and raw HTML shows as text (JupyterLab renders, and
    runs the scripts of, HTML in the Markdown of a trusted output). Code is shown as it is: a
    code fence that every parser reads alike stays a fence (so it keeps its highlighting), any
    other becomes an HTML code block with inert text. Every fence is closed, so that text shown
    after this never ends up inside one.
    """
    lines = _lines(text)
    math = any(start in text for start in _MATH_STARTS)
    out: list[str] = []
    prose: list[str] = []
    number = 0
    while number < len(lines):
        fence = _FENCE_LINE.fullmatch(lines[number])
        if fence is None or "`" in fence[3]:  # not a fence for every parser: never one
            prose.append(lines[number] if fence is None else _no_fence(lines[number]))
            number += 1
            continue
        if prose:
            out.append(_defuse_prose("\n".join(prose)))
            prose = []
        indentation, marker, info = fence.groups()
        spaces = len(indentation) if not indentation.strip(" ") else 4
        end, closed, agreed = _fence_end(lines, number, spaces, marker)
        body = lines[number + 1 : end - 1 if closed else end]
        if agreed and spaces == 0 and math:
            # JupyterLab lifts math out before Markdown sees the text, and math that began
            # outside a fence could take its opening or closing line: blank lines stop math.
            if out and out[-1].rsplit("\n", 1)[-1].strip():
                out.append("")
            info = "" if "\\" in info or "$" in info else info
            out += [marker + _defuse_everything(info), *body, marker, ""]
        elif agreed and spaces <= 3 and not math:  # JupyterLab ignores indented fences
            out += [indentation + marker + _defuse_everything(info), *body, indentation + marker]
        else:
            out.append(_code_block(indentation, body))
        number = end
    if prose:
        out.append(_defuse_prose("\n".join(prose)))
    return "\n".join(out)


def thinking_summary(
    seconds: float | None, tokens: int | None, *, done: bool, budget_reached: bool = False
) -> str:
    """What a thinking block's summary line says: "Thinking… 3 s" while it runs, "Thought for
    4.1 s, 312 tokens" after."""
    count = "" if tokens is None else f", {tokens} tokens"
    if not done:
        elapsed = "" if seconds is None else f" {seconds:.0f} s"
        return f"💭 Thinking…{elapsed}{count}"
    budget = " (thinking budget reached)" if budget_reached else ""
    return f"💭 Thought for {seconds or 0:.1f} s{count}{budget}"


def render_thinking(
    reasoning: str,
    *,
    seconds: float | None,
    tokens: int | None,
    done: bool,
    mode: str = "collapsed",
    budget_reached: bool = False,
) -> Bundle:
    """A thinking model's reasoning as a block above its answer.

    ``mode``: "collapsed" (a closed ``<details>``, opened with a click), "open", or "hidden"
    (the summary line only). The reasoning is HTML-escaped: whatever it says stays text.
    """
    summary = thinking_summary(seconds, tokens, done=done, budget_reached=budget_reached)
    if mode == "hidden":
        return mime_bundle(f"*{summary}*", html_text=f"<p><em>{summary}</em></p>", plain=summary)
    opened = " open" if mode == "open" else ""
    block = (
        f'<details class="qwen-thinking"{opened}><summary>{summary}</summary>'
        f"{thinking_body_html(reasoning)}</details>"
    )
    return mime_bundle(block, html_text=block, plain=f"{summary}\n{reasoning}")


def thinking_body_html(reasoning: str) -> str:
    """The reasoning as HTML: escaped, so whatever it says stays text."""
    return f'<div style="{_THINKING_STYLE}">{html.escape(reasoning, quote=False)}</div>'


def _reasoning_block(reasoning: str) -> str:
    """A past turn's reasoning, collapsed, for Markdown views (history, exports)."""
    return (
        f"<details><summary>💭 reasoning ({len(reasoning)} characters)</summary>"
        f"{thinking_body_html(reasoning)}</details>"
    )


def render_reply(
    texts: Sequence[str],
    *,
    interrupted: bool = False,
    finish_reasons: Sequence[str | None] = (),
    stopped_while_thinking: Sequence[bool] = (),
) -> Bundle:
    """The bundle for a reply: Markdown for one sample, HTML columns for several."""
    marks = []
    for index in range(len(texts)):
        reason = finish_reasons[index] if index < len(finish_reasons) else None
        thinking = index < len(stopped_while_thinking) and stopped_while_thinking[index]
        cut = STOPPED_WHILE_THINKING if thinking else CUT_AT_MAX_TOKENS
        marks.append(INTERRUPTED if interrupted else cut if reason == "length" else "")
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
    special = {
        tokenizer.im_start_id,
        tokenizer.im_end_id,
        tokenizer.endoftext_id,
        getattr(tokenizer, "think_start_id", None),
        getattr(tokenizer, "think_end_id", None),
    } - {None}
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


def _safe_cell(value: Any) -> str:
    """A table cell's Markdown: a stop string may hold anything, ``|`` included."""
    return _safe_prose(str(value)).replace("|", "&#124;").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str]) -> tuple[str, str]:
    """A two-column table as (Markdown, HTML)."""
    markdown = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    markdown += [f"| {key} | {_safe_cell(value)} |" for key, value in rows]
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
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    fence = "`" * max(4, longest + 1)  # no line of the prompt can close it
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
        lines += [f"> **System:** {_safe_prose(conversation.system)}", ""]
    if not conversation.turns:
        lines.append("*No turns yet.*")
    for number, turn in enumerate(conversation.turns, start=1):
        if number > 1:
            lines += ["---", ""]
        marker = f" *{INTERRUPTED}*" if turn.interrupted else ""
        lines += [f"**{number}. User**", "", safe_markdown(turn.user), ""]
        lines += [f"**{number}. Assistant**{marker}", ""]
        if turn.reasoning:
            lines += [_reasoning_block(turn.reasoning), ""]
        lines += [safe_markdown(turn.assistant), ""]
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


def batch_summary(count: int, seconds: float, tokens: int, *, unfinished: int = 0) -> str:
    """``%%qwen --each`` / ``--sweep``: what the batch did, in one line."""
    speed = f", {tokens / seconds:.0f} tokens/s" if seconds > 0 else ""
    done = f"{count - unfinished} of {count} replies" if unfinished else f"{count} replies"
    mark = f" ({INTERRUPTED})" if unfinished else ""
    return f"{done} in {seconds:.1f} s, {tokens} tokens{speed}{mark}"


def render_batch_table(rows: Sequence[Mapping[str, Any]], *, summary: str = "") -> Bundle:
    """A batch's results, one row per reply (inputs, settings, reply, tokens, finish reason).

    Cells are model output or user data, so they are escaped as every reply is; the Markdown
    keeps one line per row (newlines become spaces), the HTML keeps the reply's lines.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    markdown = [f"*{summary}*", ""] if summary else []
    markdown += [
        "| " + " | ".join(_safe_cell(column) for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    markdown += [
        "| " + " | ".join(_safe_cell(row.get(column, "")) for column in columns) + " |"
        for row in rows
    ]
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td style="white-space:pre-wrap;text-align:left">'
            f"{html.escape(str(row.get(column, '')))}</td>"
            for column in columns
        )
        + "</tr>"
        for row in rows
    )
    caption = f"<p><em>{html.escape(summary)}</em></p>" if summary else ""
    plain = [summary] if summary else []
    for number, row in enumerate(rows, start=1):
        facts = ", ".join(f"{key}={value}" for key, value in row.items() if key != "reply")
        plain.append(f"--- {number}: {facts}\n{row.get('reply', '')}")
    return mime_bundle(
        "\n".join(markdown),
        html_text=f"{caption}<table><tr>{head}</tr>{body}</table>",
        plain="\n".join(plain),
    )
