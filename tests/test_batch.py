"""Batch prompting: templates and sweeps (pure), then ``QwenChat.batch`` and ``%%qwen --each`` /
``--sweep`` on the tiny model, in this process and through a real vLLM server.

The engine tests share one tiny model, loaded once by ``%qwen_load`` in a real InteractiveShell;
the Python API tests use that session's ``QwenChat``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas
import pytest
from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from qwen_magic import render
from qwen_magic.batch import BatchItem, BatchResult, Job, Template, expand_sweep, plan_jobs
from qwen_magic.chat import QwenChat, Reply
from qwen_magic.conversation import Conversation
from qwen_magic.jupyter import batch_cell
from qwen_magic.jupyter.batch_cell import parse_sweeps
from qwen_magic.jupyter.magics import QwenMagics
from qwen_magic.sampling import SAMPLING_SETTINGS

if TYPE_CHECKING:
    from conftest import VllmServer

# ---------------------------------------------------------------- templates (pure)


@pytest.mark.parametrize(
    ("template", "fields", "filled"),
    [
        ("Translate to French: {text}", ("text",), "Translate to French: chat"),
        ('Answer as JSON {"answer": "..."} about {text}', ("text",),
         'Answer as JSON {"answer": "..."} about chat'),
        ("{{text}} is literal, {text} is not", ("text",), "{text} is literal, chat is not"),
        ("{{{text}}}", ("text",), "{chat}"),
        ("{os.environ} {x.__class__} {x[0]} {x!r} {x:>9} { x } {} {0}", (),
         "{os.environ} {x.__class__} {x[0]} {x!r} {x:>9} { x } {} {0}"),
        ("a lone { and } stay", (), "a lone { and } stay"),
        ("{text}{text} {mot}", ("text", "mot"), "chatchat word"),
    ],
)  # fmt: skip
def test_template_fields_are_identifiers_and_every_other_brace_is_literal(
    template: str, fields: tuple[str, ...], filled: str
) -> None:
    parsed = Template.parse(template)
    assert parsed.fields == fields
    assert parsed.fill({"text": "chat", "mot": "word", "x": "SECRET"}) == filled


def test_a_value_is_inserted_as_text_and_never_parsed_again() -> None:
    values = {"text": "{other} {os.environ} {{", "other": "NO"}
    assert Template.parse("<{text}>").fill(values) == "<{other} {os.environ} {{>"


def test_a_missing_field_names_the_field_and_the_row() -> None:
    with pytest.raises(ValueError, match=r"row 1 has no field 'text'.*\(it has: txt\)"):
        plan_jobs("Say {text}", rows=[{"text": "a"}, {"txt": "b"}])


def test_rows_from_a_dataframe_list_of_dicts_and_list_of_strings() -> None:
    frame = pandas.DataFrame({"text": ["a", "b"], "n": [1, 2]}, index=["x", "y"])
    assert [job.message for job in plan_jobs("{text}/{n}", rows=frame)] == ["a/1", "b/2"]
    assert plan_jobs("{text}", rows=frame)[1].fields == {"text": "b", "n": 2}
    with pytest.raises(ValueError, match="row 'x' has no field 'missing'"):
        plan_jobs("{missing}", rows=frame)
    assert [job.message for job in plan_jobs("<{a}>", rows=[{"a": 1}, {"a": 2}])] == ["<1>", "<2>"]
    assert [job.message for job in plan_jobs("T: {text}", rows=["x", "y"])] == ["T: x", "T: y"]


@pytest.mark.parametrize(
    ("template", "rows", "error", "match"),
    [
        ("{a} {b}", ["x"], ValueError, "fills one {field}, but the template has a, b"),
        ("no field", ["x"], ValueError, "the template has none"),
        ("{a}", "abc", TypeError, "not str"),
        ("{a}", {"a": 1}, TypeError, "not dict"),
        ("{a}", [{"a": 1}, 3], TypeError, "row 1 is a int"),
    ],
)
def test_wrong_rows_are_one_readable_error(
    template: str, rows: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        plan_jobs(template, rows=rows)


def test_without_rows_a_message_is_not_a_template() -> None:
    assert plan_jobs("Say {text}")[0].message == "Say {text}"
    assert [job.message for job in plan_jobs(["{a}", "b"])] == ["{a}", "b"]
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        plan_jobs(["a", 1])  # type: ignore[list-item]


# ---------------------------------------------------------------- sweeps (pure)


def test_a_sweep_runs_every_combination_for_every_row() -> None:
    jobs = plan_jobs(
        "{text}", rows=["a", "b"], sweep={"temperature": [0, 0.7], "top_p": [0.8, 0.95]}
    )
    assert len(jobs) == 8
    assert [(job.message, job.settings) for job in jobs[:4]] == [
        ("a", {"temperature": 0, "top_p": 0.8}),
        ("a", {"temperature": 0, "top_p": 0.95}),
        ("a", {"temperature": 0.7, "top_p": 0.8}),
        ("a", {"temperature": 0.7, "top_p": 0.95}),
    ]
    assert jobs[4].message == "b"


@pytest.mark.parametrize(
    ("sweep", "error", "match"),
    [
        ({"temprature": [0]}, TypeError, "cannot sweep 'temprature'"),
        ({"stop": ["x"]}, TypeError, "cannot sweep 'stop'"),
        ({"temperature": [-1]}, ValueError, "temperature must be >= 0"),
        ({"top_p": [0.5, 2]}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": [1.5]}, ValueError, "max_tokens must be a whole number"),
        ({"seed": []}, ValueError, "has no values"),
    ],
)
def test_a_bad_sweep_is_refused_by_the_sampling_table(
    sweep: dict[str, list[Any]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        expand_sweep(sweep)


def test_sweep_flags_are_parsed_by_the_table_types() -> None:
    assert parse_sweeps(["temperature=0,0.7,1.0", "max-tokens=3,5"]) == {
        "temperature": [0.0, 0.7, 1.0],
        "max_tokens": [3, 5],
    }


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (["temperature"], "write KEY=VALUE"),
        (["temperature="], "write KEY=VALUE"),
        (["warmth=1"], "cannot vary 'warmth'"),
        (["top_k=a"], "top_k takes -1, 0"),
        (["temperature=-1"], "temperature must be >= 0"),
        (["seed=1", "seed=2"], "given twice"),
    ],
)
def test_a_bad_sweep_flag_is_one_usage_error(specs: list[str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_sweeps(specs)


def _reply(text: str, *, interrupted: bool = False, tokens: int = 3) -> Reply:
    return Reply(
        texts=[text],
        plan=None,
        sampling={},
        finish_reasons=[None if interrupted else "stop"],
        interrupted=interrupted,
        num_prompt_tokens=5,
        num_generated_tokens=tokens,
        elapsed_s=0.5,
    )


def test_the_table_shows_inputs_settings_reply_tokens_and_finish_reason() -> None:
    cat = BatchItem(Job("Say a", {"text": "a"}, {"temperature": 0.7}), _reply("A | <b>x</b>"))
    cut = _reply("", interrupted=True, tokens=0)
    dog = BatchItem(Job("Say b", {"text": "b"}, {"temperature": 0.7}), cut)
    result = BatchResult([cat, dog], interrupted=True, elapsed_s=1.0)
    assert result.rows() == [
        {"text": "a", "temperature": 0.7, "reply": "A | <b>x</b>", "tokens": 3,
         "finish_reason": "stop"},
        {"text": "b", "temperature": 0.7, "reply": "", "tokens": 0,
         "finish_reason": "interrupted"},
    ]  # fmt: skip
    assert list(result.table().columns) == ["text", "temperature", "reply", "tokens",
                                            "finish_reason"]  # fmt: skip
    assert result.unfinished == 1 and "1 unfinished" in repr(result)
    bundle = render.render_batch_table(result.rows(), summary="2 replies")
    header, rule, first, second = bundle["text/markdown"].splitlines()[2:]
    assert header.count("|") == rule.count("|") == first.count("|") == 6  # `|` escaped
    assert "<b>" not in bundle["text/markdown"] and "<b>" not in bundle["text/html"]
    assert "interrupted" in second


# ---------------------------------------------------------------- the engine, through a shell


@pytest.fixture(scope="module")
def ip(tiny_model: Path) -> Iterator[InteractiveShell]:
    shell = start_ipython() or get_ipython()  # one global shell per test process
    if "QwenMagics" not in shell.magics_manager.registry:
        shell.run_line_magic("load_ext", "qwen_magic")
    shell.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 512 --enforce-eager --seed 0")
    yield shell
    shell.run_line_magic("qwen_unload", "")
    shell.run_line_magic("unload_ext", "qwen_magic")


@pytest.fixture
def magics(ip: InteractiveShell) -> QwenMagics:
    ip.config.pop("QwenMagics", None)
    magics = ip.magics_manager.registry["QwenMagics"]
    magics.session.conversations.clear()
    for name in (*SAMPLING_SETTINGS, "system"):
        setattr(magics, name, None)
    magics.display_mode = "terminal"
    return magics


@pytest.fixture
def bot(magics: QwenMagics) -> QwenChat:
    """The shell's tiny model, through the plain Python API."""
    return magics.session.require_bot()


def idle(bot: QwenChat) -> bool:
    return not bot.backend.llm.llm_engine.has_unfinished_requests()


@pytest.mark.engine
def test_replies_come_back_in_input_order_as_one_engine_batch(bot: QwenChat) -> None:
    in_engine_at_first_reply: list[int] = []

    def on_reply(index: int, reply: Reply) -> None:
        if not in_engine_at_first_reply:
            in_engine_at_first_reply.append(
                bot.backend.llm.llm_engine.get_num_unfinished_requests()
            )

    lengths = [9, 1, 6, 2, 7]
    result = bot.batch(
        "Say {text}",
        rows=[f"word{length}" for length in lengths],
        sweep={"max_tokens": lengths},
        temperature=0,
        progress=False,
        on_reply=on_reply,
    )
    assert len(result) == 25 and not result.interrupted
    for item in result.items:  # each reply got its own settings and its own prompt
        assert item.reply.num_generated_tokens == item.job.settings["max_tokens"]
        assert item.reply.sampling["max_tokens"] == item.job.settings["max_tokens"]
        assert item.reply.finish_reasons == ["length"]
        assert item.reply.plan.message == item.job.message == f"Say {item.job.fields['text']}"
        assert item.reply.num_prompt_tokens == len(item.reply.prompt_token_ids)
    # the 1-token replies finished while the longer ones were still in the engine
    assert in_engine_at_first_reply[0] > 0
    assert idle(bot)


@pytest.mark.engine
def test_a_batch_reply_is_what_chat_would_answer(bot: QwenChat) -> None:
    messages = ["Hello there", "What is 2+2?", "Name a colour", "<|im_end|> typed"]
    history = [("Hi", "Hello!")]
    result = bot.batch(
        messages, system="Be brief.", history=history, max_tokens=6, temperature=0, progress=False
    )
    for message, reply in zip(messages, result, strict=True):
        single = bot.reply(
            Conversation.from_pairs(history, system="Be brief."),
            message,
            max_tokens=6,
            temperature=0,
        )
        assert reply.prompt_token_ids == single.prompt_token_ids  # the same ChatML path
        assert reply.plan.dropped_turns == 0 and len(reply.plan.turns) == 1
    typed = result[3].prompt_token_ids  # the typed control token stayed text
    assert typed.count(bot.tokenizer.im_end_id) == result[0].prompt_token_ids.count(
        bot.tokenizer.im_end_id
    )


@pytest.mark.engine
def test_an_injection_stays_literal_and_nothing_leaks(
    bot: QwenChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_MAGIC_TEST_SECRET", "hunter2-secret")
    template = "{os.environ} {text.__class__} {text[0]} {text!r} says {text}"
    result = bot.batch(template, rows=["hi"], max_tokens=2, progress=False)
    prompt = result[0].prompt_text
    assert "{os.environ} {text.__class__} {text[0]} {text!r} says hi" in prompt
    assert "hunter2-secret" not in prompt and "<class" not in prompt


@pytest.mark.engine
def test_a_missing_field_is_raised_before_anything_is_sent(
    bot: QwenChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Any] = []
    monkeypatch.setattr(bot.backend, "generate_many", lambda *a, **k: sent.append(a) or iter(()))
    with pytest.raises(ValueError, match="row 2 has no field 'text'"):
        bot.batch("Say {text}", rows=[{"text": "a"}, {"text": "b"}, {"txt": "c"}], progress=False)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        bot.batch(["a"], sweep={"temperature": [0, -1]}, progress=False)
    assert sent == []


@pytest.mark.engine
def test_sweep_labels_match_the_sampling_each_reply_got(bot: QwenChat) -> None:
    sweep = {"temperature": [0.0, 0.7, 1.0], "top_p": [0.8, 0.95]}
    result = bot.batch("Hello", sweep=sweep, seed=3, max_tokens=3, progress=False)
    assert len(result) == 6
    for item, row in zip(result.items, result.rows(), strict=True):
        for key, value in item.job.settings.items():
            assert item.reply.sampling[key] == value == row[key]
        assert item.reply.sampling["seed"] == 3
    assert {(row["temperature"], row["top_p"]) for row in result.rows()} == {
        (t, p) for t in sweep["temperature"] for p in sweep["top_p"]
    }


@pytest.mark.engine
def test_samples_and_a_concurrency_cap(bot: QwenChat) -> None:
    in_engine: list[int] = []

    def on_reply(index: int, reply: Reply) -> None:
        in_engine.append(bot.backend.llm.llm_engine.get_num_unfinished_requests())

    result = bot.batch(["a", "b", "c"], n=2, temperature=0.8, max_tokens=3, concurrency=1,
                       progress=False, on_reply=on_reply)  # fmt: skip
    assert in_engine == [0, 0, 0]  # one request at a time: the next is added after this one
    assert [len(reply.texts) for reply in result] == [2, 2, 2]
    assert all(reply.num_generated_tokens == 6 for reply in result)
    with pytest.raises(ValueError, match="concurrency must be"):
        bot.batch(["a"], concurrency=0, progress=False)


@pytest.mark.engine
def test_an_interrupt_from_a_callback_keeps_the_finished_replies(bot: QwenChat) -> None:
    def stop_after_first(index: int, reply: Reply) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.batch(["short", "long", "longer"], sweep={"max_tokens": [1, 200]}, temperature=0,
                  progress=False, on_reply=stop_after_first)  # fmt: skip
    partial: BatchResult = caught.value.result  # type: ignore[attr-defined]
    assert partial.interrupted and len(partial) == 6
    finished = [item for item in partial.items if item.finished]
    assert finished and all(item.job.settings["max_tokens"] == 1 for item in finished)
    assert partial.unfinished >= 3  # every 200-token reply was aborted
    for item in partial.items:
        if not item.finished:
            assert item.reply.interrupted and item.reply.text == ""
            assert item.reply.finish_reasons == [None]
    assert idle(bot)
    assert len(bot.batch(["again"], max_tokens=2, progress=False)) == 1  # still usable


@pytest.mark.engine
def test_sigint_mid_batch_aborts_every_request_and_keeps_the_finished(bot: QwenChat) -> None:
    def interrupt_soon(index: int, reply: Reply) -> None:
        if index == 0:  # SIGINT lands while the engine steps the long ones
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.batch(["one"], sweep={"max_tokens": [1, 300, 300, 300]}, temperature=0,
                  progress=False, on_reply=interrupt_soon)  # fmt: skip
    partial: BatchResult = caught.value.result  # type: ignore[attr-defined]
    assert partial.items[0].finished and partial.items[0].reply.num_generated_tokens == 1
    assert partial.unfinished == 3
    assert idle(bot)


@pytest.mark.engine
def test_stop_from_another_thread_returns_the_partial_batch(bot: QwenChat) -> None:
    result = bot.batch(["x"], sweep={"max_tokens": [1, 300]}, temperature=0, progress=False,
                       on_reply=lambda index, reply: bot.stop())  # fmt: skip
    assert result.interrupted and result.unfinished == 1
    assert idle(bot)


@pytest.mark.engine
def test_progress_bar_counts_the_replies(bot: QwenChat, capsys: Any) -> None:
    bot.batch(["a", "b", "c"], max_tokens=2)
    assert "3/3" in capsys.readouterr().err


# ---------------------------------------------------------------- %%qwen --each / --sweep


@pytest.mark.engine
def test_each_runs_the_cell_as_a_template_and_stores_a_dataframe(
    ip: InteractiveShell, magics: QwenMagics, capsys: Any
) -> None:
    ip.user_ns["words"] = pandas.DataFrame({"text": ["cat", "dog"], "id": [1, 2]})
    ip.run_cell_magic("qwen", "--each words --max-tokens 3 -t 0 -o table", "Say {text} {{x}}")
    table = ip.user_ns["table"]
    assert isinstance(table, pandas.DataFrame)
    assert list(table.columns) == ["text", "id", "reply", "tokens", "finish_reason"]
    assert list(table["text"]) == ["cat", "dog"] and list(table["tokens"]) == [3, 3]
    out = capsys.readouterr().out
    assert "2 replies in" in out and "text=cat, id=1, tokens=3, finish_reason=length" in out
    assert magics.session.conversation().turns == []  # not recorded unless asked


@pytest.mark.engine
def test_sweep_and_each_combine_and_the_flags_reach_the_engine(
    ip: InteractiveShell, magics: QwenMagics
) -> None:
    ip.user_ns["words"] = ["cat", "dog"]
    ip.run_cell_magic(
        "qwen",
        "--each words --sweep temperature=0,0.5 --sweep max_tokens=2,4 --seed 5 -o table",
        "Say {text}",
    )
    table = ip.user_ns["table"]
    assert len(table) == 8
    assert list(table["tokens"]) == list(table["max_tokens"])
    assert list(table["temperature"])[:4] == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.engine
def test_sweep_alone_sends_the_cell_as_written(ip: InteractiveShell, magics: QwenMagics) -> None:
    ip.run_cell_magic("qwen", "--sweep temperature=0,1 --max-tokens 2 -o table", "Keep {this}")
    assert list(ip.user_ns["table"]["message"]) == ["Keep {this}", "Keep {this}"]


@pytest.mark.engine
def test_record_adds_the_replies_and_one_undo_takes_them_back(
    ip: InteractiveShell, magics: QwenMagics
) -> None:
    ip.user_ns["words"] = ["cat", "dog", "owl"]
    ip.run_cell_magic("qwen", "--max-tokens 2", "Hello")
    ip.run_cell_magic("qwen", "--each words --record --max-tokens 2 --chat default", "Say {text}")
    conversation = magics.session.conversation()
    assert [turn.user for turn in conversation.turns] == ["Hello", "Say cat", "Say dog", "Say owl"]
    ip.run_line_magic("qwen", "undo")
    assert [turn.user for turn in conversation.turns] == ["Hello"]


@pytest.mark.engine
def test_an_interrupted_batch_cell_shows_the_finished_replies_then_raises(
    ip: InteractiveShell, magics: QwenMagics, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def interrupt(self: Any, index: int, reply: Reply) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_cell._Progress, "on_reply", interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        ip.run_cell_magic("qwen", "--sweep max_tokens=1,300,300 -t 0 -o table", "Hello")
    partial: BatchResult = caught.value.result  # type: ignore[attr-defined]
    assert partial.unfinished == 2
    out = capsys.readouterr().out
    assert "1 of 3 replies" in out and out.count("finish_reason=interrupted") == 2
    assert list(ip.user_ns["table"]["finish_reason"]) == ["length", "interrupted", "interrupted"]
    assert idle(magics.session.require_bot())


@pytest.mark.engine
def test_a_recorded_batch_run_again_under_its_key_replaces_its_turns(magics: QwenMagics) -> None:
    session = magics.session
    for _ in range(2):
        session.batch(None, "Say {text}", rows=["a", "b"], record=True, key="cell#1", max_tokens=2)
    assert [turn.key for turn in session.conversation().turns] == ["cell#1/0", "cell#1/1"]
    session.batch(None, "Quiet", max_tokens=2)  # not recorded
    assert len(session.conversation().turns) == 2


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("--each nowhere", "no variable 'nowhere'"),
        ("--each no_rows", "it has no rows"),
        ("--each words_bad", "row 1 has no field 'text'"),
        ("--sweep temperature=hot", "temperature takes >= 0 values"),
        ("--sweep warmth=1", "cannot vary 'warmth'"),
        ("--sweep temperature=0,1 -n 2", "-n applies to a single reply"),
        ("--sweep temperature=0,1 --raw", "--raw applies to a single reply"),
        ("--sweep temperature=0,1 --show-prompt", "--show-prompt applies"),
        ("--record", "--record is for --each / --sweep cells"),
    ],
)
@pytest.mark.engine
def test_batch_cell_mistakes_are_one_usage_error(
    ip: InteractiveShell, magics: QwenMagics, line: str, match: str
) -> None:
    ip.user_ns["words_bad"] = [{"text": "a"}, {"txt": "b"}]
    ip.user_ns["no_rows"] = []
    with pytest.raises(UsageError, match=match):
        ip.run_cell_magic("qwen", line, "Say {text}")


# ---------------------------------------------------------------- through a vLLM server


@pytest.fixture(scope="module")
def server_bot(vllm_server: VllmServer) -> Iterator[QwenChat]:
    with QwenChat(server=vllm_server.url, api_key_env=vllm_server.key_env) as connected:
        yield connected


@pytest.mark.engine
@pytest.mark.server
def test_a_batch_through_the_server_keeps_order_and_settings(server_bot: QwenChat) -> None:
    lengths = [5, 1, 3, 2]
    result = server_bot.batch(["Hi", "Bye"], sweep={"max_tokens": lengths}, temperature=0,
                              concurrency=3, progress=False)  # fmt: skip
    assert len(result) == 8 and not result.interrupted
    for item in result.items:
        assert item.reply.num_generated_tokens == item.job.settings["max_tokens"]
        assert item.reply.sampling["max_tokens"] == item.job.settings["max_tokens"]
        assert item.reply.plan.message == item.job.message


@pytest.mark.engine
@pytest.mark.server
def test_an_interrupt_aborts_the_server_requests_and_keeps_the_finished(
    server_bot: QwenChat, vllm_server: VllmServer
) -> None:
    import time

    def stop(index: int, reply: Reply) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        server_bot.batch(["x"], sweep={"max_tokens": [1, 1000, 1000]}, temperature=0,
                         ignore_eos=True, progress=False, on_reply=stop)  # fmt: skip
    partial: BatchResult = caught.value.result  # type: ignore[attr-defined]
    assert partial.items[0].finished and partial.unfinished == 2
    deadline = time.monotonic() + 10
    while vllm_server.requests_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_server.requests_running() == 0


# ---------------------------------------------------------------- a thinking model


@pytest.mark.engine
def test_a_thinking_models_batch_keeps_the_reasoning_apart(thinking_only_model: Path) -> None:
    # Its generation prompt opens <think> and random weights never close it: all is reasoning.
    with QwenChat(str(thinking_only_model), max_model_len=1024, enforce_eager=True, seed=0,
                  kv_cache_gib=0.25) as bot:  # fmt: skip
        result = bot.batch(["a", "b"], max_tokens=5, temperature=0, progress=False)
    for reply in result:
        assert reply.text == "" and reply.reasoning and reply.stopped_while_thinking
        assert reply.thinking_tokens == 5
    assert "reasoning" in result.rows()[0]
