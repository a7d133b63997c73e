"""The magics through a real InteractiveShell: pure display logic first, then the real engine.

Engine tests share one tiny random-weight model per module (loaded once by ``loaded``); they
check what the engine actually received (``Reply.sampling``, ``Reply.plan``) and, where cheap,
how it behaved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

from qwen_magic import render
from qwen_magic.conversation import Conversation, Turn
from qwen_magic.jupyter import output
from qwen_magic.jupyter.magics import QwenMagics
from qwen_magic.sampling import SAMPLING_SETTINGS

SAMPLING_FLAGS = {
    "temperature": ("-t 0.5", 0.5),
    "top_p": ("--top-p 0.9", 0.9),
    "top_k": ("--top-k 7", 7),
    "min_p": ("--min-p 0.05", 0.05),
    "max_tokens": ("--max-tokens 5", 5),
    "repetition_penalty": ("--repetition-penalty 1.3", 1.3),
    "presence_penalty": ("--presence-penalty 0.4", 0.4),
    "frequency_penalty": ("--frequency-penalty -0.4", -0.4),
    "seed": ("--seed 11", 11),
}


@pytest.fixture(scope="module")
def ip() -> InteractiveShell:
    shell = start_ipython() or get_ipython()  # one global shell per test process
    if "QwenMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "qwen_magic")
    yield shell
    shell.run_line_magic("unload_ext", "qwen_magic")


@pytest.fixture
def magics(ip: InteractiveShell) -> QwenMagics:
    ip.config.pop("QwenMagics", None)  # %config keeps values (even refused ones) there
    magics = ip.magics_manager.registry["QwenMagics"]
    magics.session.conversations.clear()
    for name in (*SAMPLING_SETTINGS, "system"):
        setattr(magics, name, None)
    magics.engine_options = {}
    magics.display_mode = "terminal"
    return magics


def history_state(magics: QwenMagics) -> list[tuple[str | None, list[tuple[str, str]]]]:
    return [(c.system, c.pairs()) for c in magics.session.conversations.values()]


# ---------------------------------------------------------------- extension and config


def test_load_ext_is_lazy_and_instant() -> None:
    code = (
        "import sys, time\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "start = time.perf_counter()\n"
        "ip.run_line_magic('load_ext', 'qwen_magic')\n"
        "took = time.perf_counter() - start\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print(heavy, took, 'qwen' in ip.magics_manager.magics['cell'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    heavy, took, registered = result.stdout.strip().rsplit(" ", 2)[0], *result.stdout.split()[-2:]
    assert heavy == "[]"
    assert float(took) < 2.0
    assert registered == "True"


@pytest.mark.engine
def test_preload_imports_vllm_in_the_background_while_load_ext_returns_at_once(
    tiny_model: Path,
) -> None:
    code = (
        "import sys, threading, time\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "ip.run_line_magic('config', 'QwenMagics.preload = \"always\"')\n"
        "start = time.perf_counter()\n"
        "ip.run_line_magic('load_ext', 'qwen_magic')\n"
        "took = time.perf_counter() - start\n"
        "def importing():\n"
        "    return any(t.name == 'qwen-magic-import-vllm' for t in threading.enumerate())\n"
        "while importing() and time.perf_counter() - start < 180:\n"
        "    time.sleep(0.2)  # the user reads while vLLM (and what the last load needed) imports\n"
        "from qwen_magic.backends import _vllm_startup\n"
        "waited = time.perf_counter()\n"
        "_vllm_startup.import_vllm()\n"
        "left = time.perf_counter() - waited\n"
        f"ip.run_line_magic('qwen_load', '{tiny_model} --max-model-len 256 --enforce-eager')\n"
        "print('RESULT', took, left, ip.user_ns.get('_qwen_magic_session') is None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    took, left = (float(value) for value in result.stdout.split("RESULT")[1].split()[:2])
    assert took < 2.0  # %load_ext did not wait for the import
    assert left < 1.0  # %qwen_load found it done
    assert "loaded" in result.stdout


def test_unload_ext_removes_magics_and_reload_works(ip: InteractiveShell) -> None:
    ip.run_line_magic("unload_ext", "qwen_magic")
    assert "qwen" not in ip.magics_manager.magics["cell"]
    assert "QwenMagics" not in ip.magics_manager.registry
    ip.run_line_magic("load_ext", "qwen_magic")
    assert "qwen_load" in ip.magics_manager.magics["line"]


def test_terminal_shell_streams_plain_text(magics: QwenMagics) -> None:
    magics.display_mode = "auto"
    assert magics.notebook is False  # no kernel: plain text (the kernel test covers Jupyter)


def test_help_is_generated(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%%qwen?")
    out = capsys.readouterr().out
    for flag in ("--temperature", "--top-p", "--show-prompt", "--raw", "--chat", "-o"):
        assert flag in out


@pytest.mark.parametrize(
    ("name", "bad"),
    [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("min_p", 2), ("max_tokens", 0)],
)
def test_config_refuses_out_of_range(
    ip: InteractiveShell, magics: QwenMagics, name: str, bad: float, caplog: Any
) -> None:
    ip.run_line_magic("config", f"QwenMagics.{name} = {bad}")  # IPython logs the refusal
    assert getattr(magics, name) is None
    assert f"QwenMagics.{name} must be" in caplog.text


def test_reload_ext_survives_a_refused_config(ip: InteractiveShell) -> None:
    ip.run_line_magic("config", "QwenMagics.top_p = 1.5")  # refused, yet kept in ip.config
    ip.run_line_magic("config", "QwenMagics.top_k = 5")
    ip.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    with pytest.warns(UserWarning, match=r"top_p must be in \(0, 1\], got 1.5: ignored"):
        ip.run_line_magic("reload_ext", "qwen_magic")
    magics = ip.magics_manager.registry["QwenMagics"]
    assert magics.top_p is None and magics.top_k == 5
    assert magics.session.conversation().system == "Be brief."


def test_config_sets_default(ip: InteractiveShell, magics: QwenMagics) -> None:
    ip.run_line_magic("config", "QwenMagics.temperature = 0.3")
    assert magics.session.sampling_defaults() == {"temperature": 0.3}


# ---------------------------------------------------------------- mistakes before a model


@pytest.mark.parametrize(
    ("line", "cell", "match"),
    [
        ("", "hello", "run %qwen_load"),
        ("", "   \n", "the cell is empty"),
        ("--bogus", "hello", "unrecognized arguments"),
        ("-t -1", "hello", "temperature must be >= 0"),
        ("--top-p 0", "hello", r"top_p must be in \(0, 1\]"),
        ("--top-p 1.01", "hello", r"top_p must be in \(0, 1\]"),
        ("-n 0", "hello", "-n must be at least 1"),
        ("-t warm", "hello", "invalid float value"),
        ("history", "hello", "run %qwen history on a line"),
    ],
)
def test_user_mistakes_are_one_line(
    ip: InteractiveShell, magics: QwenMagics, line: str, cell: str, match: str
) -> None:
    magics.session.conversation().record("kept", "intact")
    before = history_state(magics)
    with pytest.raises(UsageError, match=match):
        ip.run_cell_magic("qwen", line, cell)
    assert history_state(magics) == before


def test_line_magic_needs_a_command(ip: InteractiveShell, magics: QwenMagics) -> None:
    with pytest.raises(UsageError, match="needs a command"):
        ip.run_line_magic("qwen", "")


def test_missing_model_path(ip: InteractiveShell, magics: QwenMagics) -> None:
    with pytest.raises(UsageError, match="no model folder at /no/such/model: pass a local folder"):
        ip.run_line_magic("qwen_load", "/no/such/model")
    assert magics.session.bot is None


# ---------------------------------------------------------------- history commands


def test_history_clear_undo_export_import(
    ip: InteractiveShell, magics: QwenMagics, tmp_path: Path, capsys: Any
) -> None:
    work = magics.session.conversation("work")
    work.record("q1", "a1")
    work.record("q2", "a2", interrupted=True)
    ip.run_line_magic("qwen", "history --chat work")
    out = capsys.readouterr().out
    assert "q1" in out and "a2" in out and render.INTERRUPTED in out

    ip.run_line_magic("qwen", f"export {tmp_path / 'work.json'} --chat work")
    ip.run_line_magic("qwen", f"export {tmp_path / 'work.md'} --chat work")
    assert "**2. Assistant**" in (tmp_path / "work.md").read_text()
    ip.run_line_magic("qwen", "undo --chat work")
    assert work.pairs() == [("q1", "a1")]
    ip.run_line_magic("qwen", "clear --chat work")
    assert len(work) == 0 and len(magics.session.conversation()) == 0

    ip.run_line_magic("qwen", f"import {tmp_path / 'work.json'} --chat other")
    assert magics.session.conversation("other").pairs() == [("q1", "a1"), ("q2", "a2")]
    assert magics.session.conversation("other").turns[1].interrupted
    with pytest.raises(UsageError, match="no file"):
        ip.run_line_magic("qwen", f"import {tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        ip.run_line_magic("qwen", f"import {tmp_path / 'bad.json'}")
    with pytest.raises(UsageError, match=r"use a \.json or \.md"):
        ip.run_line_magic("qwen", f"export {tmp_path / 'x.txt'}")
    assert magics.session.conversation("other").pairs() == [("q1", "a1"), ("q2", "a2")]


def test_config_system_follows_unless_set_with_flag(magics: QwenMagics) -> None:
    plain = magics.session.conversation()
    own = magics.session.conversation("own")
    magics.session.set_system("own", "mine")
    magics.system = "Be brief."
    assert plain.system == "Be brief." and own.system == "mine"
    assert magics.session.conversation("later").system == "Be brief."


def test_reload_ext_keeps_the_conversations(ip: InteractiveShell, magics: QwenMagics) -> None:
    magics.session.conversation().record("kept", "across reloads")
    magics.session.set_system("own", "Mine.")
    ip.run_line_magic("reload_ext", "qwen_magic")
    session = ip.magics_manager.registry["QwenMagics"].session
    assert session is magics.session
    assert session.conversation().pairs() == [("kept", "across reloads")]
    assert session.conversation("own").system == "Mine." and session.owns_system("own")
    ip.run_line_magic("unload_ext", "qwen_magic")
    ip.run_line_magic("load_ext", "qwen_magic")
    assert ip.magics_manager.registry["QwenMagics"].session.conversation().pairs() == [
        ("kept", "across reloads")
    ]


def test_clear_and_import_can_be_undone(
    ip: InteractiveShell, magics: QwenMagics, tmp_path: Path
) -> None:
    conversation = magics.session.conversation()
    conversation.record("q1", "a1")
    conversation.record("q2", "a2")
    ip.run_line_magic("qwen", "clear")
    assert len(conversation) == 0
    ip.run_line_magic("qwen", "undo")
    assert conversation.pairs() == [("q1", "a1"), ("q2", "a2")]

    other = Conversation(system="Imported.", turns=[Turn("x", "y")])
    other.save(tmp_path / "other.json")
    with pytest.raises(UsageError, match="has 2 turn\\(s\\): add --replace"):
        ip.run_line_magic("qwen", f"import {tmp_path / 'other.json'}")
    assert conversation.pairs() == [("q1", "a1"), ("q2", "a2")]
    ip.run_line_magic("qwen", f"import {tmp_path / 'other.json'} --replace")
    assert conversation.pairs() == [("x", "y")] and conversation.system == "Imported."
    ip.run_line_magic("qwen", "undo")
    assert conversation.pairs() == [("q1", "a1"), ("q2", "a2")] and conversation.system is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"format": "qwen-magic-conversation", "version": "2", "turns": []}', "version"),
        ('{"format": "qwen-magic-conversation", "version": null, "turns": []}', "version"),
        ('{"format": "qwen-magic-conversation", "version": 1}', "no list of turns"),
        ('{"format": "qwen-magic-conversation", "version": 1, "turns": {}}', "no list of turns"),
        ('{"format": "qwen-magic-conversation", "version": 1, "turns": [{"assistant": "a"}]}',
         "needs 'user' text"),
        ('{"format": "qwen-magic-conversation", "version": 1, "turns": [{"user": 1, '
         '"assistant": null}]}', "needs 'user' text"),
        ("[" * 100_000, "nested too deeply|not valid JSON"),
    ],
)  # fmt: skip
def test_malformed_imports_are_one_line_and_change_nothing(
    ip: InteractiveShell, magics: QwenMagics, tmp_path: Path, content: str, match: str
) -> None:
    magics.session.conversation("target").record("kept", "intact")
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=match) as caught:
        ip.run_line_magic("qwen", f"import {path} --chat target --replace")
    assert "\n" not in str(caught.value)
    assert magics.session.conversation("target").pairs() == [("kept", "intact")]


def test_export_refuses_to_overwrite_without_force(
    ip: InteractiveShell, magics: QwenMagics, tmp_path: Path
) -> None:
    magics.session.conversation().record("q", "a")
    target = tmp_path / "chat.json"
    target.write_text("precious", encoding="utf-8")
    with pytest.raises(UsageError, match="exists: pick another name or overwrite it with --force"):
        ip.run_line_magic("qwen", f"export {target}")
    assert target.read_text(encoding="utf-8") == "precious"
    ip.run_line_magic("qwen", f"export {target} --force")
    assert Conversation.load(target).pairs() == [("q", "a")]
    with pytest.raises(UsageError, match="no folder"):
        ip.run_line_magic("qwen", f"export {tmp_path / 'missing' / 'chat.json'}")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("line", "cell", "match"),
    [
        ("history -t 1", None, "unrecognized arguments: -t 1"),
        ("clear -n 3", None, "unrecognized arguments: -n 3"),
        ("undo --raw", None, "unrecognized arguments: --raw"),
        ("history extra.json", None, "unrecognized arguments: extra.json"),
        ("import", None, "PATH"),
        ("export a.json --replace", None, "unrecognized arguments: --replace"),
        ("bogus", None, "invalid choice"),
        ("--raw -s X", "hello", "--raw continues plain text without a conversation: drop -s"),
        ("--raw --new --no-history", "hello", "drop --new, --no-history"),
        ("--raw --chat c", "hello", "drop --chat"),
        ('-s "unclosed', "hello", "check the quotes"),
    ],
)
def test_options_that_do_not_apply_are_refused(
    ip: InteractiveShell, magics: QwenMagics, line: str, cell: str | None, match: str
) -> None:
    magics.session.conversation().record("kept", "intact")
    before = history_state(magics)
    with pytest.raises(UsageError, match=match):
        if cell is None:
            ip.run_line_magic("qwen", line)
        else:
            ip.run_cell_magic("qwen", line, cell)
    assert history_state(magics) == before


def test_quoting_is_shell_quoting(ip: InteractiveShell, magics: QwenMagics) -> None:
    from qwen_magic.jupyter.magics import parse

    args = parse(magics.qwen.parser, '--chat "my chat" -s \'He said "hi"\'')
    assert args.chat == "my chat" and args.system == 'He said "hi"'
    ip.run_line_magic("qwen", 'clear --chat "my chat"')
    assert "my chat" in magics.session.conversations


# ---------------------------------------------------------------- pure display logic


def test_stream_is_throttled_by_time_with_a_final_update() -> None:
    now = [0.0]
    published: list[dict[str, Any]] = []
    stream = output.ReplyStream(1, notebook=True, clock=lambda: now[0])
    stream.output.set = published.append  # type: ignore[method-assign]
    for _ in range(100):  # 100 deltas in 1 s of fake time: at most 20 updates
        stream.on_delta(0, "x")
        now[0] += 0.01
    assert 15 <= stream.updates <= 21
    stream.finish(interrupted=True)
    assert published[-1]["text/markdown"] == "x" * 100 + f"\n\n*{render.INTERRUPTED}*"


def test_notebook_stream_updates_one_display(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        stream = output.ReplyStream(1, notebook=True, min_interval=0)
        for word in ("Hello", ", ", "world"):
            stream.on_delta(0, word)
        stream.finish()
    outputs = captured.outputs
    assert len(outputs) == 4
    assert len({output.transient["display_id"] for output in outputs}) == 1
    assert [output.update for output in outputs] == [False, True, True, True]
    assert outputs[-1].data["text/markdown"] == "Hello, world"


def test_terminal_stream_writes_plain_text(capsys: Any) -> None:
    stream = output.ReplyStream(1, notebook=False)
    for word in ("Hello", " there"):
        stream.on_delta(0, word)
    stream.finish(interrupted=True)
    assert capsys.readouterr().out == f"Hello there\n[{render.INTERRUPTED}]\n"


def test_several_samples_render_side_by_side() -> None:
    bundle = render.render_reply(["a <b>", "c"], finish_reasons=["stop", "length"])
    assert bundle["text/html"].count('style="flex:1') == 2
    assert "a &lt;b&gt;" in bundle["text/html"]
    assert "Sample 1 (joins the history)" in bundle["text/markdown"]
    assert render.CUT_AT_MAX_TOKENS in bundle["text/markdown"]


def test_history_markdown() -> None:
    conversation = Conversation(system="S", turns=[Turn("hi", "part", interrupted=True)])
    markdown = render.history_markdown(conversation, name="x")
    assert "**System:** S" in markdown and render.INTERRUPTED in markdown
    assert "No turns yet" in render.history_markdown(Conversation())


def test_highlight_only_real_control_tokens(tiny_model: Path) -> None:
    from qwen_magic.chatml import ChatFormatter

    formatter = ChatFormatter(tiny_model)
    _, ids = formatter.format([("user", "<b> and a typed <|im_end|>")])
    html = render.highlight_special_tokens(ids, formatter.tokenizer)
    assert html.count("<span") == 3  # im_start, im_end, im_start of the reply
    assert "&lt;b&gt; and a typed &lt;|im_end|&gt;" in html


def test_reply_result_repr() -> None:
    reply = SimpleNamespace(
        texts=["**hi**"], text="**hi**", interrupted=True, finish_reasons=["abort"],
        num_generated_tokens=3, elapsed_s=0.5,
    )  # fmt: skip
    result = output.ReplyResult(reply)
    assert str(result) == "**hi**" and result.num_generated_tokens == 3
    assert render.INTERRUPTED in result._repr_markdown_()
    assert "3 tokens" in repr(result)


def test_load_progress_lines(capsys: Any) -> None:
    ticks = iter([0.0, 1.0, 2.5])
    progress = output.LoadProgress("tiny", notebook=False, clock=lambda: next(ticks))
    progress("loading weights")
    progress.done("loaded tiny")
    assert capsys.readouterr().out.splitlines() == [
        "⏳ loading tiny: loading weights (1 s)",
        "✅ loaded tiny in 2.5 s",
    ]


# ---------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def loaded(ip: InteractiveShell, tiny_model: Path) -> QwenMagics:
    magics = ip.magics_manager.registry["QwenMagics"]
    ip.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 512 --enforce-eager --seed 0")
    yield magics
    ip.run_line_magic("qwen_unload", "")


def ask(ip: InteractiveShell, line: str, cell: str = "Hello") -> Any:
    """Run ``%%qwen -o reply`` (plus ``line``) and return the ReplyResult."""
    return ip.run_cell_magic("qwen", f"-o reply --max-tokens 4 {line}", cell)


@pytest.mark.engine
def test_load_again_is_a_no_op_and_status(
    ip: InteractiveShell, loaded: QwenMagics, tiny_model: Path, capsys: Any
) -> None:
    chat = loaded.session.bot
    ip.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 512 --enforce-eager --seed 0")
    assert loaded.session.bot is chat
    assert "already loaded" in capsys.readouterr().out
    ip.run_line_magic("qwen_status", "")
    out = capsys.readouterr().out
    assert "tiny-random-qwen2" in out and "512" in out


@pytest.mark.engine
@pytest.mark.parametrize("name", list(SAMPLING_FLAGS))
def test_every_sampling_flag_reaches_the_engine(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, name: str
) -> None:
    flag, value = SAMPLING_FLAGS[name]
    result = ask(ip, flag)
    assert result.sampling[name] == value


@pytest.mark.engine
def test_config_default_and_flag_override(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    ip.run_line_magic("config", "QwenMagics.top_k = 3")
    assert ask(ip, "").sampling["top_k"] == 3
    assert ask(ip, "--top-k 9").sampling["top_k"] == 9


@pytest.mark.engine
def test_max_tokens_and_seed_change_the_output(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    result = ask(ip, "--max-tokens 3 -t 1")
    assert result.num_generated_tokens == 3
    first = ask(ip, "--max-tokens 12 -t 1.5 --seed 1 --no-history").text
    again = ask(ip, "--max-tokens 12 -t 1.5 --seed 1 --no-history").text
    other = ask(ip, "--max-tokens 12 -t 1.5 --seed 2 --no-history").text
    assert first == again != other
    greedy = [ask(ip, "--max-tokens 8 -t 0 --no-history").text for _ in range(2)]
    assert greedy[0] == greedy[1]


@pytest.mark.engine
def test_system_new_no_history_and_chat(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    ask(ip, "--chat a", "first")
    ask(ip, "--chat a", "second")
    result = ask(ip, '--chat a -s "You are a pirate."', "third")
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in result.plan.text
    assert [turn.user for turn in result.plan.turns] == ["first", "second"]
    assert magics.session.conversation("a").system == "You are a pirate."
    assert magics.session.conversation("b").system is None

    lonely = ask(ip, "--chat a --no-history", "fourth")
    assert lonely.plan.turns == [] and "first" not in lonely.plan.text
    fresh = ask(ip, "--chat a --new", "fifth")
    assert fresh.plan.turns == []
    assert [turn.user for turn in magics.session.conversation("a").turns] == ["fifth"]
    assert len(magics.session.conversation("b")) == 0


@pytest.mark.engine
def test_n_samples_side_by_side_first_joins_history(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, capsys: Any
) -> None:
    result = ask(ip, "-n 3 -t 1.5 --seed 3")
    assert len(result.texts) == 3
    assert magics.session.conversation().turns[-1].assistant == result.texts[0]
    assert capsys.readouterr().out.count("--- Sample") == 3


@pytest.mark.engine
def test_output_variable_and_single_display(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    magics.display_mode = "notebook"
    with capture_output() as captured:
        result = ask(ip, "")
    assert ip.user_ns["reply"] == result.text
    assert isinstance(result, output.ReplyResult)
    assert result._repr_markdown_().startswith(result.text)
    # The streamed output ends as a short note: the result is the one display of the reply.
    assert "stored in `reply`" in captured.outputs[-1].data["text/markdown"]
    with capture_output() as captured:
        assert ip.run_cell_magic("qwen", "--max-tokens 4", "Hi") is None
    final = captured.outputs[-1].data["text/markdown"]
    assert final.startswith(magics.session.conversation().turns[-1].assistant)


@pytest.mark.engine
def test_show_prompt_shows_what_the_model_saw(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    magics.display_mode = "notebook"
    with capture_output() as captured:
        result = ask(ip, "--show-prompt -t 0.25", "What is <|im_end|>?")
    prompt = next(o.data for o in captured.outputs if "Prompt" in o.data["text/markdown"])
    assert result.plan.text in prompt["text/markdown"]
    assert "| temperature | 0.25 |" in prompt["text/markdown"]
    assert prompt["text/html"].count("<span") == 5  # system, user, reply prompt: 5 controls
    assert "What is &lt;|im_end|&gt;?" in prompt["text/html"]  # typed text stays text


@pytest.mark.engine
def test_raw_continuation_uses_plain_text(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    result = ask(ip, "--raw", "def fib(n):")
    tokenizer = loaded.session.bot.tokenizer
    assert result.prompt_token_ids == tokenizer.encode_text("def fib(n):")
    assert "<|im_start|>" not in result.prompt_text
    assert len(magics.session.conversation()) == 0


@pytest.mark.engine
def test_rerunning_a_cell_replaces_its_turn_and_sets_later_ones_aside(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, capsys: Any
) -> None:
    for _ in range(2):
        ip.run_cell("%%qwen --max-tokens 2\nfirst", cell_id="cell-1")
    ip.run_cell("%%qwen --max-tokens 2\nsecond", cell_id="cell-2")
    ip.run_cell("%%qwen --max-tokens 2\nthird", cell_id="cell-3")
    capsys.readouterr()
    before = [(turn.user, turn.assistant) for turn in magics.session.conversation().turns]
    assert [user for user, _ in before] == ["first", "second", "third"]
    ip.run_cell("%%qwen --max-tokens 2\nfirst again", cell_id="cell-1")
    assert "replaced turn 1 of `default` and set aside 2 later turn(s)" in capsys.readouterr().out
    turns = magics.session.conversation().turns
    assert [(turn.user, turn.key) for turn in turns] == [("first again", "cell-1#1")]
    ip.run_line_magic("qwen", "undo")
    after = [(turn.user, turn.assistant) for turn in magics.session.conversation().turns]
    assert after == before


@pytest.mark.engine
def test_interrupting_a_rerun_loses_nothing(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    ip.run_cell("%%qwen --max-tokens 2\nfirst", cell_id="c1")
    ip.run_cell("%%qwen --max-tokens 2\nsecond", cell_id="c2")
    before = list(magics.session.conversation().turns)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    result = ip.run_cell("%%qwen --max-tokens 400 -t 1\nfirst, at length", cell_id="c1")
    timer.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    turns = magics.session.conversation().turns
    assert [turn.user for turn in turns] == ["first, at length"] and turns[0].interrupted
    ip.run_line_magic("qwen", "undo")
    assert magics.session.conversation().turns == before


@pytest.mark.engine
def test_several_calls_in_one_cell_each_add_a_turn(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    code = (
        "for question in ['a', 'b', 'c']:\n"
        "    get_ipython().run_cell_magic('qwen', '--max-tokens 2', question)\n"
    )
    ip.run_cell(code, cell_id="loop").raise_error()
    assert [turn.user for turn in magics.session.conversation().turns] == ["a", "b", "c"]
    ip.run_cell(code.replace("'c'", "'d'"), cell_id="loop").raise_error()  # a re-run replaces
    assert [turn.user for turn in magics.session.conversation().turns] == ["a", "b", "d"]


@pytest.mark.engine
def test_default_max_tokens_fits_a_small_context(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    result = ip.run_cell_magic("qwen", "-o reply", "Hello")  # no flag: loaded with 512 tokens
    assert result.sampling["max_tokens"] == 128  # a quarter of the context
    assert result.plan.budget == 512 - 128


@pytest.mark.engine
def test_magic_and_python_api_send_the_same_prompt(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics
) -> None:
    from_magic = ask(ip, "--no-history", "Hi").plan.token_ids
    bot = loaded.session.bot
    from_api = bot.reply(Conversation(), "Hi", max_tokens=1).plan.token_ids
    assert from_magic == from_api


@pytest.mark.engine
@pytest.mark.parametrize(
    "options",
    [{"extra": {"swap_spce": 4}}, {"enforce_eager": "yes"}, {"seed": "1"}, {"kv_cache_gib": "x"}],
)
def test_bad_engine_options_keep_the_loaded_model(
    ip: InteractiveShell,
    loaded: QwenMagics,
    magics: QwenMagics,
    tiny_model: Path,
    options: dict[str, Any],
) -> None:
    bot = loaded.session.bot
    magics.engine_options = options
    with pytest.raises(UsageError) as caught:
        ip.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 256")
    assert "\n" not in str(caught.value)
    assert loaded.session.bot is bot and not bot.engine.closed


@pytest.mark.engine
@pytest.mark.parametrize(
    ("line", "cell", "match"),
    [
        ("", "word " * 2000, "does not fit the context"),
        ("-t 0 -n 3", "Name a colour.", "need a temperature above 0"),
    ],
    ids=["message-longer-than-context", "greedy-samples"],
)
def test_mistakes_found_with_the_engine_are_one_line(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, line: str, cell: str, match: str
) -> None:
    ask(ip, "", "kept")
    before = history_state(magics)
    with pytest.raises(UsageError, match=match):
        ask(ip, line, cell)
    assert history_state(magics) == before


@pytest.mark.engine
def test_out_of_memory_is_one_line_with_a_hint(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, monkeypatch: Any
) -> None:
    import torch

    ask(ip, "", "kept")
    before = history_state(magics)

    def out_of_memory(conversation: Conversation, message: str, **kwargs: Any) -> None:
        conversation.record(message, "half")  # even a half-done turn must be rolled back
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loaded.session.bot, "reply", out_of_memory)
    with pytest.raises(UsageError, match="out of memory while generating: lower"):
        ask(ip, "", "hello")
    assert history_state(magics) == before


@pytest.mark.engine
def test_interrupt_keeps_partial_reply_and_engine_usable(
    ip: InteractiveShell, loaded: QwenMagics, magics: QwenMagics, capsys: Any
) -> None:
    ask(ip, "", "before")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as caught:
        ip.run_cell_magic("qwen", "--max-tokens 400 -t 1 --seed 0", "Go on forever")
    assert time.monotonic() - started < 3.0
    timer.join()
    assert render.INTERRUPTED in capsys.readouterr().out
    assert caught.value.reply.interrupted
    turns = magics.session.conversation().turns
    assert [turn.user for turn in turns] == ["before", "Go on forever"]
    assert turns[-1].interrupted and turns[-1].assistant == caught.value.reply.text
    assert len(caught.value.reply.text) > 0
    after = ask(ip, "", "still there?")
    assert after.num_generated_tokens > 0 and not after.interrupted


@pytest.mark.engine
def test_a_second_request_while_one_runs_is_refused_at_once(
    loaded: QwenMagics, magics: QwenMagics
) -> None:
    from qwen_magic.session import SessionBusy

    session = loaded.session
    outcome: dict[str, Any] = {}

    def ask_from_another_thread() -> None:
        started = time.monotonic()
        try:
            session.ask(None, "me too", max_tokens=2)
        except SessionBusy as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    def on_delta(index: int, text: str) -> None:
        if "seconds" not in outcome:
            other = threading.Thread(target=ask_from_another_thread)
            other.start()
            other.join(10)

    alone = session.ask(None, "Hello", max_tokens=12, temperature=0, use_history=False).text
    session.undo()
    reply = session.ask(
        None, "Hello", max_tokens=12, temperature=0, use_history=False, on_delta=on_delta
    )
    assert isinstance(outcome.get("error"), SessionBusy) and outcome["seconds"] < 1.0
    assert reply.text == alone  # the first reply is complete, not cut short
    assert [turn.user for turn in session.conversation().turns] == ["Hello"]


@pytest.mark.engine
def test_replace_model_then_unload_ext_free_the_engine(
    ip: InteractiveShell, loaded: QwenMagics, tiny_model: Path, monkeypatch: Any
) -> None:
    """Runs last among the engine tests: it ends with a fresh extension and no model."""
    import qwen_magic.chat

    old = loaded.session.bot
    seen_closed: list[bool] = []
    real_init = qwen_magic.chat.QwenChat.__init__

    def spy_init(self: Any, *args: Any, **kwargs: Any) -> None:
        seen_closed.append(old.engine.closed)  # the old engine must be gone before loading
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(qwen_magic.chat.QwenChat, "__init__", spy_init)
    ip.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 256")
    assert seen_closed == [True]
    assert loaded.session.bot is not old and loaded.session.bot.engine.max_model_len == 256
    new = loaded.session.bot
    ip.run_line_magic("unload_ext", "qwen_magic")
    assert new.engine.closed
    ip.run_line_magic("load_ext", "qwen_magic")
    assert ip.magics_manager.registry["QwenMagics"].session.bot is None


def test_json_export_is_valid(magics: QwenMagics, tmp_path: Path, ip: InteractiveShell) -> None:
    magics.session.conversation().record("ü", "ß")
    ip.run_line_magic("qwen", f"export {tmp_path / 'c.json'}")
    assert json.loads((tmp_path / "c.json").read_text())["turns"][0]["user"] == "ü"
