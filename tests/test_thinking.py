"""Thinking models end to end: the tiny random Qwen3 on the real engine (local and server), the
magics in a real shell, and the display pieces.

Random weights never close a think block by themselves, so these tests either stop a reply
inside its reasoning (``max_tokens``) or close the block with the thinking budget, on a
thinking-only template (the reply starts inside ``<think>``) and on Qwen3's hybrid template.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

from qwen_magic import render
from qwen_magic.chat import BUDGET_CLOSE_TEXT, QwenChat, Reply
from qwen_magic.conversation import Conversation
from qwen_magic.jupyter import output
from qwen_magic.reasoning import SplitReply
from qwen_magic.sampling import default_max_tokens
from qwen_magic.session import ChatSession

ENGINE_OPTIONS = {"max_model_len": 1024, "enforce_eager": True, "seed": 0}
GREEDY = {"temperature": 0.0}
BUDGET_SENTENCE = BUDGET_CLOSE_TEXT.split("</think>")[0].strip("\n")


# ---------------------------------------------------------------- display (pure)


def test_thinking_block_is_collapsed_and_escaped() -> None:
    bundle = render.render_thinking(
        "</details><script>alert(1)</script> <b>x</b>", seconds=4.06, tokens=312, done=True
    )
    html_text = bundle["text/html"]
    assert html_text.startswith('<details class="qwen-thinking"><summary>')
    assert "Thought for 4.1 s, 312 tokens" in html_text
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert html_text.count("</details>") == 1  # the reasoning's own stays text

    opened = render.render_thinking("r", seconds=1, tokens=2, done=True, mode="open")
    assert '<details class="qwen-thinking" open>' in opened["text/html"]
    hidden = render.render_thinking("secret reasoning", seconds=1, tokens=2, done=True,
                                    mode="hidden")  # fmt: skip
    assert "secret reasoning" not in str(hidden) and "Thought for 1.0 s" in hidden["text/plain"]
    running = render.thinking_summary(3.2, None, done=False)
    assert running == "💭 Thinking… 3 s"


def test_the_thinking_default_max_tokens_leaves_room() -> None:
    assert default_max_tokens(40960) == 512
    assert default_max_tokens(40960, thinking=True) == 8192
    assert default_max_tokens(1024, thinking=True) == 512  # at most half the context
    assert default_max_tokens(1024) == 256


def _reply(reasoning: str | None, answer: str, *, closed: bool = True, **extra: Any) -> Reply:
    split = SplitReply(reasoning, answer, closed, thinking_seconds=2.0, thinking_tokens=7)
    return Reply(texts=[answer], plan=None, sampling={}, finish_reasons=[extra.pop("reason", None)],
                 interrupted=False, num_prompt_tokens=1, num_generated_tokens=9, elapsed_s=1.0,
                 thinking=[split], **extra)  # fmt: skip


def test_terminal_shows_one_status_line_then_the_answer() -> None:
    stream = io.StringIO()
    view = output.ReplyStream(notebook=False, stream=stream)
    view.on_thinking(0, "step one, ")
    view.on_thinking(0, "step two")
    view.on_delta(0, "The answer.")
    view.finish(["The answer."], reply=_reply("step one, step two", "The answer."))
    assert re.fullmatch(
        r"💭 Thinking…\n💭 Thought for \d+\.\d s\nThe answer\.\n", stream.getvalue()
    )  # collapsed: the reasoning itself is not printed, the answer follows the summary

    stream = io.StringIO()
    view = output.ReplyStream(notebook=False, stream=stream)
    view.on_thinking(0, "half a thought")
    view.finish([""], finish_reasons=["length"],
                reply=_reply("half a thought", "", closed=False, reason="length"))  # fmt: skip
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["💭 Thinking…", "💭 Thought for 2.0 s, 7 tokens"]
    assert "--thinking-budget" in lines[-1]


def test_a_reply_cut_off_while_thinking_says_which_flag_fixes_it() -> None:
    bundle = render.render_reply([""], finish_reasons=["length"], stopped_while_thinking=[True])
    assert "--max-tokens" in bundle["text/markdown"]
    assert "--thinking-budget" in bundle["text/markdown"]
    result = output.ReplyResult(_reply("half a thought", "", closed=False, reason="length"))
    assert "stopped while thinking" in result._repr_markdown_()
    assert str(result) == ""
    assert result.reasoning == "half a thought"


# ---------------------------------------------------------------- the engine, in process


@pytest.fixture(scope="module")
def thinking_bot(thinking_only_model: Path) -> Iterator[QwenChat]:
    with QwenChat(str(thinking_only_model), **ENGINE_OPTIONS) as bot:
        yield bot


def _collect(bot: QwenChat, conversation: Conversation, message: str, **options: Any) -> tuple:
    reasoning: list[str] = []
    answer: list[str] = []
    reply = bot.reply(
        conversation,
        message,
        on_thinking=lambda index, text: reasoning.append(text),
        on_delta=lambda index, text: answer.append(text),
        **options,
    )
    return reply, "".join(reasoning), "".join(answer)


@pytest.mark.engine
def test_the_budget_closes_the_block_and_the_history_keeps_only_the_answer(
    thinking_bot: QwenChat,
) -> None:
    profile = thinking_bot.formatter.profile
    assert profile.opens_thinking() and not thinking_bot.has_thinking_switch
    conversation = Conversation()
    reply, streamed_reasoning, streamed_answer = _collect(
        thinking_bot, conversation, "Hello", thinking_budget=3, max_tokens=40, **GREEDY
    )
    assert reply.budget_reached and reply.thinking_tokens == 3
    assert reply.reasoning.endswith(BUDGET_SENTENCE)
    assert reply.reasoning == streamed_reasoning and reply.text == streamed_answer
    assert not reply.stopped_while_thinking
    # 3 thought tokens, then the second request generated the rest of max_tokens.
    assert reply.num_generated_tokens > 3
    turn = conversation.turns[-1]
    assert (turn.reasoning, turn.assistant) == (reply.reasoning, reply.text)

    follow_up = thinking_bot.reply(conversation, "And then?", max_tokens=2, **GREEDY)
    prompt = follow_up.prompt_text
    assert BUDGET_SENTENCE not in prompt  # past reasoning is not sent again (Qwen3's template)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert follow_up.prompt_token_ids.count(thinking_bot.tokenizer.think_end_id) == 0


@pytest.mark.engine
def test_a_reply_cut_off_while_thinking_has_no_answer(thinking_bot: QwenChat) -> None:
    conversation = Conversation()
    reply, streamed_reasoning, streamed_answer = _collect(
        thinking_bot, conversation, "Hello", max_tokens=5, **GREEDY
    )
    assert reply.stopped_while_thinking and reply.finish_reasons == ["length"]
    assert reply.text == streamed_answer == ""
    assert reply.reasoning and reply.reasoning == streamed_reasoning
    assert reply.thinking_tokens == 5
    assert conversation.turns[-1].assistant == ""
    # The default max_tokens of a reply that thinks is the thinking policy's.
    assert thinking_bot.default_max_tokens() == default_max_tokens(1024, thinking=True)


@pytest.mark.engine
def test_chat_and_stream_return_the_answer_only(thinking_bot: QwenChat) -> None:
    answer, history = thinking_bot.chat("Hi", thinking_budget=2, max_tokens=30, **GREEDY)
    assert BUDGET_SENTENCE not in answer and history == [("Hi", answer)]
    seen: list[str] = []
    pieces = list(thinking_bot.stream("Hi", thinking_budget=2, max_tokens=30,
                                      on_thinking=seen.append, **GREEDY))  # fmt: skip
    assert "".join(pieces) == answer  # greedy: the same reply
    assert "".join(seen).endswith(BUDGET_SENTENCE)


@pytest.mark.engine
def test_thinking_options_the_model_cannot_honour_are_refused(thinking_bot: QwenChat) -> None:
    with pytest.raises(ValueError, match=r"no thinking switch .*always thinks"):
        thinking_bot.chat("Hi", enable_thinking=False)
    with pytest.raises(ValueError, match="one sample"):
        thinking_bot.reply(Conversation(), "Hi", n=2, thinking_budget=3)
    with pytest.raises(ValueError, match=r">= 0"):
        thinking_bot.chat("Hi", thinking_budget=-1)


@pytest.mark.engine
def test_stop_from_another_thread_keeps_the_partial_reply(thinking_only_model: Path) -> None:
    session = ChatSession()
    session.load(str(thinking_only_model), ENGINE_OPTIONS)
    try:
        first_piece = threading.Event()
        stopper = threading.Thread(target=lambda: first_piece.wait(60) and session.stop())
        stopper.start()
        reply = session.ask(None, "Hello", max_tokens=500,
                            on_thinking=lambda index, text: first_piece.set())  # fmt: skip
        stopper.join()
        assert reply.interrupted and reply.num_generated_tokens < 500
        turn = session.conversation().turns[-1]
        assert turn.interrupted and turn.reasoning == reply.reasoning
        assert not session.busy and not session.stop()  # nothing left to stop

        # retry replaces the last turn; undo brings it back.
        retried = session.retry(None, max_tokens=3, thinking_budget=1)
        assert len(session.conversation().turns) == 1
        assert session.conversation().turns[-1].reasoning == retried.reasoning
        assert retried.budget_reached
        session.undo()
        assert session.conversation().turns[-1].interrupted
    finally:
        session.unload()


# ---------------------------------------------------------------- the hybrid template (switch)


@pytest.mark.engine
def test_the_switch_reaches_the_prompt_and_the_default_length(tiny_qwen3_model: Path) -> None:
    with QwenChat(str(tiny_qwen3_model), **ENGINE_OPTIONS) as bot:
        assert bot.has_thinking_switch and bot.thinks_by_default()
        off = bot.reply(Conversation(), "Hi", enable_thinking=False, **GREEDY)
        think_start, think_end = bot.tokenizer.think_start_id, bot.tokenizer.think_end_id
        assert off.prompt_token_ids[-4:] == [think_start, 271, think_end, 271]
        assert off.reasoning == ""  # an empty block: nothing to show, nothing re-sent
        assert off.sampling["max_tokens"] == default_max_tokens(1024)
        on = bot.reply(Conversation(), "Hi", enable_thinking=True, max_tokens=None, **GREEDY)
        assert on.sampling["max_tokens"] == default_max_tokens(1024, thinking=True)
        # Random weights do not open a block: the reply is all answer.
        assert on.reasoning is None and on.prompt_text.endswith("<|im_start|>assistant\n")
        with pytest.raises(ValueError, match="one sample"):
            bot.reply(Conversation(), "Hi", n=2, thinking_budget=1)

        # The panel's control sets the session's default, which reaches the prompt.
        from qwen_magic.jupyter.panel import QwenPanel

        session = ChatSession()
        session.bot = bot
        panel = QwenPanel(session)
        try:
            assert panel.thinking.layout.display == "" and panel.thinking_row.layout.display == ""
            panel.thinking.value = "off"
            panel.thinking_budget.value = 5
            assert (session.thinking, session.thinking_budget) == (False, 5)
            reply = session.ask(None, "Hi", max_tokens=2)
            assert reply.prompt_token_ids[-4:] == [think_start, 271, think_end, 271]
            session.thinking, session.thinking_budget = None, None
            assert (panel.thinking.value, panel.thinking_budget.value) == ("model default", -1)
            reply = session.ask(None, "Hi", max_tokens=2)
            assert reply.prompt_text.endswith("<|im_start|>assistant\n")
        finally:
            panel.close()
            session.bot = None


def test_the_panel_hides_thinking_controls_for_models_that_do_not_think() -> None:
    from qwen_magic.jupyter.panel import QwenPanel

    session = ChatSession()
    panel = QwenPanel(session)  # no model: nothing to switch
    try:
        assert panel.thinking_row.layout.display == "none"
    finally:
        panel.close()


# ---------------------------------------------------------------- the magics


@pytest.fixture(scope="module")
def ip(thinking_only_model: Path) -> Iterator[InteractiveShell]:
    shell = start_ipython() or get_ipython()  # one global shell per test process
    if "QwenMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "qwen_magic")
    magics = shell.magics_manager.registry["QwenMagics"]
    shell.run_line_magic(
        "qwen_load", f"{thinking_only_model} --max-model-len 1024 --enforce-eager --seed 0"
    )
    yield shell
    magics.display_mode = "auto"
    magics.show_thinking = "collapsed"
    magics.thinking_budget = None
    magics.session.conversations.clear()
    shell.run_line_magic("qwen_unload", "")


@pytest.mark.engine
def test_the_cell_shows_a_collapsed_block_above_the_answer(ip: InteractiveShell) -> None:
    magics = ip.magics_manager.registry["QwenMagics"]
    magics.session.conversations.clear()
    magics.display_mode = "notebook"
    with capture_output() as captured:
        result = ip.run_cell_magic("qwen", "-o answer --thinking-budget 2 --max-tokens 30 -t 0",
                                   "Hello")  # fmt: skip
    htmls = [each.data.get("text/html", "") for each in captured.outputs]
    blocks = [text for text in htmls if 'class="qwen-thinking"' in text]
    assert blocks and "Thought for" in blocks[-1] and "2 tokens" in blocks[-1]
    assert '<details class="qwen-thinking">' in blocks[-1]  # collapsed
    assert ip.user_ns["answer"] == result.text and result.reasoning.endswith(BUDGET_SENTENCE)
    assert BUDGET_SENTENCE not in ip.user_ns["answer"]

    with capture_output() as captured:
        ip.run_cell_magic("qwen", "--show-thinking hidden --max-tokens 3", "Again")
    shown = json.dumps([each.data for each in captured.outputs])
    assert "Thinking" in shown or "Thought" in shown
    assert "qwen-thinking" not in shown  # hidden: the summary line only
    assert "stopped while thinking" in shown  # 3 tokens: cut off inside the block

    with capture_output() as captured:
        ip.run_line_magic("qwen", "history")
    history = captured.outputs[-1].data["text/markdown"]
    assert history.count("<details><summary>💭 reasoning") == 2


@pytest.mark.engine
def test_thinking_flags_are_checked(ip: InteractiveShell, tmp_path: Path) -> None:
    magics = ip.magics_manager.registry["QwenMagics"]
    magics.display_mode = "terminal"
    with pytest.raises(UsageError, match="no thinking switch"):
        ip.run_cell_magic("qwen", "--no-think", "Hi")
    with pytest.raises(UsageError, match="contradict"):
        ip.run_cell_magic("qwen", "--think --no-think", "Hi")
    with pytest.raises(UsageError, match=r"--raw .*--thinking-budget"):
        ip.run_cell_magic("qwen", "--raw --thinking-budget 3", "Hi")
    with pytest.raises(UsageError, match=r">= 0"):
        ip.run_cell_magic("qwen", "--thinking-budget -2", "Hi")

    # The config default applies, and the reasoning survives an export and an import.
    magics.thinking_budget = 1
    magics.session.conversations.clear()
    with capture_output() as captured:
        reply = ip.run_cell_magic("qwen", "-o answer --max-tokens 20", "Hi")
    assert reply.budget_reached and reply.thinking_tokens == 1
    assert "Thought for" in captured.stdout
    path = tmp_path / "chat.json"
    ip.run_line_magic("qwen", f"export {path}")
    ip.run_line_magic("qwen", f"import {path} --chat copy")
    copied = magics.session.conversation("copy").turns[-1]
    assert copied.reasoning == reply.reasoning and copied.assistant == reply.text


# ---------------------------------------------------------------- through a vLLM server


@pytest.mark.server
@pytest.mark.engine
def test_the_server_backend_splits_the_same_way(
    thinking_only_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from conftest import running_vllm_server

    log = tmp_path_factory.mktemp("thinking-server") / "server.log"
    with (
        running_vllm_server(
            thinking_only_model, log, key_env="QWEN_MAGIC_THINKING_KEY", max_model_len=1024
        ) as server,
        QwenChat(server=server.url, api_key_env=server.key_env) as bot,
    ):
        assert bot.thinks and bot.formatter.profile.opens_thinking()
        conversation = Conversation()
        reply, reasoning, answer = _collect(
            bot, conversation, "Hello", thinking_budget=3, max_tokens=40, **GREEDY
        )
        assert reply.budget_reached and reply.thinking_tokens == 3
        assert reply.reasoning == reasoning and reasoning.endswith(BUDGET_SENTENCE)
        assert reply.text == answer and conversation.turns[-1].assistant == answer
        cut = bot.reply(Conversation(), "Hello", max_tokens=4, **GREEDY)
        assert cut.stopped_while_thinking and cut.text == "" and cut.thinking_tokens == 4


def test_session_construction_forget_and_retry_without_a_turn() -> None:
    session = ChatSession(system="Be brief.", thinking=False, thinking_budget=8)
    assert session.conversation("a").system == "Be brief."
    assert session.forget("a") and not session.forget("a")
    with pytest.raises(ValueError, match="no turn to retry"):
        session.retry("empty")
    assert not session.stop()  # nothing is being generated
    with pytest.raises(Exception, match="thinking_budget must be >= 0"):
        session.thinking_budget = -3
