"""``qwen-magic chat``: pure parsing first, then the real command in a real terminal.

The engine tests drive ``qwen-magic chat tiny`` through pexpect (a pty, so prompt_toolkit,
bracketed paste, Ctrl-C and the exit status are the real ones) on the tiny random-weight model:
one interactive chat for the whole module, plus a ``-q`` and a piped run started beside it.
The model's words are random; what is checked is what the conversation recorded (``/save``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwen_magic.terminal import commands
from qwen_magic.terminal.app import prompt_session
from qwen_magic.terminal.commands import Command, CommandError, Exit, Message
from qwen_magic.terminal.display import ReplyPrinter, Screen, history_text

pexpect = pytest.importorskip("pexpect")

CHAT = [sys.executable, "-m", "qwen_magic", "chat", "tiny", "--max-model-len", "1024"]
LOAD_TIMEOUT_S = 180
REPLY_TIMEOUT_S = 60
# prompt_toolkit turns bracketed paste on while it reads a line and off once it has one: the
# output between the two is what that line did (">>>" itself is redrawn at every key).
READING, READ = "\x1b[?2004h", "\x1b[?2004l"


# --- pure parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("hello", Message("hello")),
        ("  hello  ", Message("  hello  ")),
        ("", None),
        ("   ", None),
        ("/clear", Command("clear")),
        ("/system  Be brief. ", Command("system", "Be brief.")),
        ("/set temperature 0.2", Command("set", "temperature 0.2")),
        ("/?", Command("help")),
        ("//etc/hosts is a file", Message("/etc/hosts is a file")),
        ("/usr/bin\nis a folder", Message("/usr/bin\nis a folder")),  # a paste is a message
        ("first\nsecond\n", Message("first\nsecond")),
        ("/bye", Exit()),
        ("/quit now", Exit()),
        ("exit", Exit()),
        (" quit ", Exit()),
        ("退出", Exit()),
        ("exit now", Message("exit now")),
    ],
)
def test_classify(typed: str, expected: object) -> None:
    assert commands.classify(typed) == expected


def test_an_unknown_command_names_help() -> None:
    with pytest.raises(CommandError, match=r"^unknown command /frobnicate: type /help"):
        commands.classify("/frobnicate now")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['"""', "alpha", "beta", '"""'], "alpha\nbeta"),
        (['"""alpha', 'beta"""'], "alpha\nbeta"),
        (['"""one line"""'], "one line"),
        (['"""', "/clear", "exit", '"""'], "/clear\nexit"),  # commands inside are text
        (['"""', "", "  indented", '"""'], "\n  indented"),
        (['"""', '"""'], ""),
    ],
)
def test_triple_quote_block(lines: list[str], message: str) -> None:
    block = commands.TripleQuoteBlock()
    results = [block.feed(line) for line in lines]
    assert results[:-1] == [None] * (len(lines) - 1)
    assert results[-1] == message
    assert not block.is_open
    assert block.feed("plain") == "plain"


def test_a_pasted_block_starting_with_triple_quotes_is_a_message() -> None:
    pasted = '"""Docstring."""\nimport os'
    block = commands.TripleQuoteBlock()
    assert not block.opens(pasted) and block.feed(pasted) == pasted and not block.is_open


def test_triple_quote_block_cancel() -> None:
    block = commands.TripleQuoteBlock()
    assert block.feed('"""draft') is None and block.is_open
    block.cancel()
    assert not block.is_open and block.feed("next") == "next"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("temperature 0.2", ("temperature", 0.2)),
        ("top-p 0.9", ("top_p", 0.9)),
        ("--top-k 7", ("top_k", 7)),
        ("-t 0", ("temperature", 0.0)),
        ("max_tokens 64", ("max_tokens", 64)),
        ("seed 11", ("seed", 11)),
        ("temperature default", ("temperature", None)),
    ],
)
def test_parse_setting(argument: str, expected: tuple[str, object]) -> None:
    assert commands.parse_setting(argument) == expected


@pytest.mark.parametrize(
    ("argument", "error"),
    [
        ("temperature -1", "temperature must be >= 0, got -1.0"),
        ("max_tokens oops", "max_tokens must be a whole number >= 1, got 'oops'"),
        ("max_tokens 1.5", "max_tokens must be a whole number >= 1, got '1.5'"),
        ("top_p 0", "top_p must be in (0, 1], got 0.0"),
        ("warmth 3", "no setting 'warmth': use one of temperature, top_p"),
        ("temperature", "use /set KEY VALUE"),
    ],
)
def test_parse_setting_errors_are_one_line(argument: str, error: str) -> None:
    with pytest.raises(CommandError) as caught:
        commands.parse_setting(argument)
    assert str(caught.value).startswith(error)
    assert "\n" not in str(caught.value)


def test_parse_think_and_path() -> None:
    assert [commands.parse_think(word) for word in ("on", "OFF", "default")] == [True, False, None]
    with pytest.raises(CommandError, match="/think on"):
        commands.parse_think("maybe")
    assert commands.parse_path('"my chat.json" --force', "--force") == ("my chat.json", True)
    assert commands.parse_path("chat.json", "--force") == ("chat.json", False)
    with pytest.raises(CommandError, match="one file name"):
        commands.parse_path("a.json b.json", "--force")
    with pytest.raises(CommandError, match="quotes"):
        commands.parse_path('"open.json', "--force")


def test_help_lists_every_command() -> None:
    text = commands.help_text()
    assert all(f"/{name}" in text for name in commands.COMMANDS)


# --- what is shown (a fake reply: the real ones come from the engine tests below) -------------


def test_reply_printer_thinking_line_then_answer() -> None:
    out, err = io.StringIO(), io.StringIO()
    ticks = iter([10.0, 14.1])
    printer = ReplyPrinter(Screen(out), status=Screen(err), clock=lambda: next(ticks))
    printer.on_thinking(0, "Let me see")
    printer.on_thinking(0, " more")
    assert err.getvalue() == "Thinking…"
    printer.on_delta(0, "Paris")
    printer.on_delta(0, ".")
    reply = SimpleNamespace(text="Paris.", interrupted=False, finish_reasons=["stop"],
                            thinking_tokens=312, thinking_seconds=4.1,
                            stopped_while_thinking=False)  # fmt: skip
    printer.finish(reply)
    assert out.getvalue() == "Paris.\n"
    assert err.getvalue() == "Thinking… Thought for 4.1 s\n"  # not a terminal: no styling


def test_reply_printer_marks() -> None:
    out = io.StringIO()
    printer = ReplyPrinter(Screen(out))
    printer.on_delta(0, "cut")
    printer.finish(SimpleNamespace(text="cut short", interrupted=True, finish_reasons=[None]))
    assert out.getvalue() == "cut short\n[⏹ interrupted]\n"
    out = io.StringIO()
    printer = ReplyPrinter(Screen(out))
    printer.finish(SimpleNamespace(text="long", interrupted=False, finish_reasons=["length"]))
    assert out.getvalue() == "long\n[✂ stopped at max_tokens]\n"


def test_history_text() -> None:
    from qwen_magic.conversation import Conversation

    conversation = Conversation(system="Be brief.")
    conversation.record("a\nb", "reply", interrupted=True)
    text = history_text(conversation)
    assert text.splitlines() == [
        "system: Be brief.",
        "--- 1. you",
        "a",
        "b",
        "--- 1. assistant  [⏹ interrupted]",
        "reply",
    ]


class _ScriptedPrompt:
    """Stands in for the prompt_toolkit session: returns lines, raises what a key would."""

    def __init__(self, *inputs: object) -> None:
        self.inputs = list(inputs)
        self.prompts: list[str] = []

    def prompt(self, text: str) -> str:
        self.prompts.append(text)
        item = self.inputs.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def _fake_session() -> SimpleNamespace:
    info = SimpleNamespace(model="/models/tiny", where="cpu", max_model_len=1024)
    bot = SimpleNamespace(backend=SimpleNamespace(info=info))
    return SimpleNamespace(require_bot=lambda: bot)


@pytest.mark.parametrize("leave", [EOFError(), "/bye", "退出"])
def test_the_loop_keys_ctrl_c_drops_a_block_and_leaving_is_status_0(leave: object) -> None:
    from qwen_magic.terminal.app import TerminalChat

    out = io.StringIO()
    prompt = _ScriptedPrompt('"""', "draft", KeyboardInterrupt(), KeyboardInterrupt(), "/nope",
                             leave)  # fmt: skip
    assert TerminalChat(_fake_session(), screen=Screen(out)).run(prompt) == 0
    assert prompt.prompts == [">>> ", "... ", "... ", ">>> ", ">>> ", ">>> "]
    assert out.getvalue().splitlines()[1:] == [
        "multi-line message dropped",
        "(to leave, press Ctrl-D or type /bye)",
        "(to leave, press Ctrl-D or type /bye)",
        "error: unknown command /nope: type /help for the commands",
    ]


# --- the prompt (prompt_toolkit with a pipe for a keyboard) ----------------------------------


def _prompt(history_file: Path | None, keys: str) -> str:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as keyboard, create_app_session(input=keyboard, output=DummyOutput()):
        session = prompt_session(history_file)
        keyboard.send_text(keys)
        return session.prompt(">>> ")


def test_prompt_paste_is_one_input_and_history_outlives_the_session(tmp_path: Path) -> None:
    history = tmp_path / "sub" / "history"
    assert _prompt(history, "\x1b[200~first line\nsecond line\x1b[201~\r") == (
        "first line\nsecond line"
    )
    assert _prompt(history, "another\x1b\r line\r") == "another\n line"  # Esc Enter: new line
    # A new session (a new chat) recalls the last input with Up; the file holds both.
    assert _prompt(history, "\x1b[A\r") == "another\n line"
    assert "+first line\n+second line\n" in history.read_text(encoding="utf-8")
    assert _prompt(None, "\x1b[A\rhello\r") == ""  # no file: nothing from before


def test_chat_options_reuse_qwen_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_magic.__main__ import main
    from qwen_magic.terminal import cli

    parser = cli.load_options_parser()
    args = parser.parse_args(
        [
            "tiny",
            "--max-model-len",
            "1024",
            "--dtype",
            "float32",
            "--gpu-memory-utilization",
            "0.5",
            "--tensor-parallel-size",
            "2",
        ]
    )
    assert (args.model_name, args.max_model_len, args.dtype) == ("tiny", 1024, "float32")
    assert (args.gpu_memory_utilization, args.tensor_parallel_size) == (0.5, 2)
    assert not hasattr(args, "reload")  # means nothing in a new process
    monkeypatch.setenv(cli.HISTORY_VARIABLE, str(tmp_path / "h"))
    chat = SimpleNamespace(no_input_history=False, history_file=None)
    assert cli.history_path(chat) == tmp_path / "h"
    chat.history_file = tmp_path / "given"
    assert cli.history_path(chat) == tmp_path / "given"
    chat.no_input_history = True
    assert cli.history_path(chat) is None
    with pytest.raises(SystemExit) as caught:
        main(["chat", "--max-model-len", "many"])
    assert caught.value.code == 2


def test_terminal_modules_import_no_backend_or_vllm() -> None:
    modules = ["qwen_magic.terminal." + name for name in ("app", "cli", "commands", "display")]
    code = (
        f"import sys, {', '.join(modules)}; "
        "print([m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') "
        "or m in ('qwen_magic.backends.vllm_local', 'qwen_magic.backends.openai_http', "
        "'qwen_magic.backends.managed_server', 'httpx')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the real command in a real terminal ------------------------------------------------------


def _environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PROMPT_TOOLKIT_NO_CPR": "1",  # no cursor-position request to wait for
        "TERM": "xterm",
        "QWEN_MAGIC_CHAT_HISTORY": str(tmp_path / "chat-history"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One interactive ``qwen-magic chat tiny`` in a pty for the module."""
    tmp_path = tmp_path_factory.mktemp("chat")
    child = pexpect.spawn(
        CHAT[0],
        [*CHAT[1:], "-s", "Be terse."],
        env=_environment(tmp_path),
        cwd=str(tmp_path),
        encoding="utf-8",
        dimensions=(40, 200),
        timeout=REPLY_TIMEOUT_S,
    )
    child.expect("on cpu, 1024 tokens", timeout=LOAD_TIMEOUT_S)
    child.expect_exact(READING)
    yield SimpleNamespace(child=child, folder=tmp_path)
    if child.isalive():
        child.terminate(force=True)


def _command(child: object, line: str) -> str:
    """Type ``line`` and Enter; what was printed up to the next prompt."""
    child.send(line + "\r")
    child.expect_exact(READ)
    child.expect_exact(READING)
    return child.before


def _saved(chat: SimpleNamespace, name: str) -> dict:
    out = _command(chat.child, f"/save {name}")
    assert "saved" in out, out
    return json.loads((chat.folder / name).read_text(encoding="utf-8"))


@pytest.mark.engine
def test_chat_paste_and_triple_quotes_are_one_message(chat: SimpleNamespace) -> None:
    _command(chat.child, "/set max_tokens 8")
    chat.child.send("\x1b[200~first line\nsecond line\x1b[201~")
    _command(chat.child, "")
    for line in ('"""', "alpha", "beta"):
        assert _command(chat.child, line).strip() == ""  # no reply yet: "..." asks for more
    _command(chat.child, '"""')
    saved = _saved(chat, "two.json")
    assert [turn["user"] for turn in saved["turns"]] == ["first line\nsecond line", "alpha\nbeta"]
    assert saved["system"] == "Be terse."  # from -s


@pytest.mark.engine
def test_chat_bad_input_is_one_line_and_loses_nothing(chat: SimpleNamespace) -> None:
    for line, error in [
        ("/set max_tokens oops", "error: max_tokens must be a whole number >= 1, got 'oops'"),
        ("/set temperature -1", "error: temperature must be >= 0, got -1.0"),
        ("/frobnicate", "error: unknown command /frobnicate: type /help for the commands"),
        ("/think on", "error: tiny-random-qwen2 has no thinking switch"),
        ("/load two.json", "error: the conversation has 2 turn(s): /load PATH --replace"),
        ("/save two.json", "error: "),
    ]:
        printed = _command(chat.child, line).strip().splitlines()
        assert len(printed) == 1 and printed[0].startswith(error), printed
    assert "max_tokens         8  (set)" in _command(chat.child, "/set")


@pytest.mark.engine
def test_chat_ctrl_c_stops_the_reply_and_keeps_the_chat(chat: SimpleNamespace) -> None:
    child = chat.child
    _command(child, "/set max_tokens 700")
    child.send("a long story please\r")
    child.expect_exact(READ)
    time.sleep(3)  # the reply is streaming: 700 tokens take half a minute on the CPU
    child.sendintr()
    child.expect_exact("[⏹ interrupted]")
    child.expect_exact(READING)
    child.sendintr()  # at the prompt: how to leave
    child.expect_exact("to leave, press Ctrl-D or type /bye")
    child.expect_exact(READING)
    turns = _saved(chat, "three.json")["turns"]
    assert len(turns) == 3
    assert turns[-1]["user"] == "a long story please" and turns[-1]["interrupted"] is True
    # The engine is idle again: undo, retry and a new message work.
    _command(child, "/set max_tokens 8")
    assert "undid the last change" in _command(child, "/undo")
    _command(child, "/retry")
    out = _command(child, "/save three.json --force")
    turns = json.loads((chat.folder / "three.json").read_text())["turns"]
    assert "saved 2 turn(s)" in out
    assert [turn["interrupted"] for turn in turns] == [False, False]
    assert turns[-1]["user"] == "alpha\nbeta"


@pytest.mark.engine
def test_chat_system_show_and_up_arrow(chat: SimpleNamespace) -> None:
    child = chat.child
    _command(child, "/system Be brief.")
    out = _command(child, "/show")
    assert "model: tiny-random-qwen2 on cpu, 1024 tokens" in out
    assert "system: Be brief." in out and "--- 2. you" in out
    _command(child, "/set top_k 7")
    child.send("\x1b[A")  # Up recalls the last line
    out = _command(child, "")
    assert "top_k = 7" in out
    history = (chat.folder / "chat-history").read_text(encoding="utf-8")
    assert "+/set top_k 7" in history and "+first line\n+second line" in history


@pytest.mark.engine
def test_chat_exit_word_exits_zero(chat: SimpleNamespace) -> None:
    chat.child.send("退出\r")
    chat.child.expect(pexpect.EOF, timeout=60)
    chat.child.close()
    assert chat.child.exitstatus == 0


@pytest.mark.engine
@pytest.mark.parametrize("how", ["quick", "piped"])
def test_one_shot_prints_the_reply_alone(how: str, tmp_path: Path) -> None:
    # One after the other: two vLLM CPU engines starting at once slow each other down badly.
    command = [*CHAT[:-1], "256"]  # the default reply is then 64 tokens
    message = tmp_path / "message.txt"
    message.write_text("Say hi\n", encoding="utf-8")
    with message.open("rb") as stdin:
        result = subprocess.run([*command, "-q", "Say hi"] if how == "quick" else command,
                                stdin=subprocess.DEVNULL if how == "quick" else stdin,
                                capture_output=True, text=True, env=_environment(tmp_path),
                                timeout=LOAD_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "loading" not in result.stdout  # progress went to stderr
    assert "✅ loaded" in result.stderr and "256 tokens" in result.stderr


@pytest.mark.engine
def test_one_shot_thinking_model_shows_one_thinking_line(tmp_path: Path) -> None:
    # Random weights never close the think block the prompt opens: the whole reply (128 tokens,
    # half the context, for a thinking reply) is reasoning.
    command = [*CHAT[:4], "tiny-qwen3-thinking", "--max-model-len", "256", "-q", "Say hi"]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            env=_environment(tmp_path), timeout=LOAD_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no answer, and the reasoning is not printed
    thinking, mark = result.stderr.strip().splitlines()[-2:]
    assert re.fullmatch(r"Thinking… Thought for \d+\.\d s, 128 tokens", thinking), thinking
    assert mark == "[stopped while thinking: no answer (raise max_tokens)]"


def test_errors_go_to_stderr_with_a_non_zero_status(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "qwen_magic", "chat", str(tmp_path / "none"),
                             "-q", "hi"], capture_output=True, text=True,
                            env=_environment(tmp_path), timeout=120)  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
