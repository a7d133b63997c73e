"""QwenChat: the tutorial's chat()/stream() interface and the reply() call the magics use.

Mechanics run on the tiny random-weight model, once in this process (context 512) and once
through a real vLLM server (``vllm_server``, context 2048): the same tests, on both backends.
Meaning is checked on the real demo model.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qwen_magic import chat as chat_module
from qwen_magic.backends import BackendBusy, BackendError, Delta
from qwen_magic.backends.openai_http import ServerBackend
from qwen_magic.chat import QwenChat, Reply
from qwen_magic.chatml import IM_END, IM_START, ChatMLError, ChatTokenizer
from qwen_magic.conversation import Conversation
from qwen_magic.prompt import MessageTooLongError, PromptTruncatedWarning
from qwen_magic.sampling import default_max_tokens, setting

if TYPE_CHECKING:
    from conftest import VllmServer

CONTROL_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

pytestmark = pytest.mark.engine


LOCAL_CONTEXT = 512
SERVER_CONTEXT = 2048  # what the vllm_server fixture serves


@pytest.fixture(scope="module")
def local_bot(tiny_model: Path) -> Iterator[QwenChat]:
    with QwenChat(str(tiny_model), max_model_len=LOCAL_CONTEXT, kv_cache_gib=0.25) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server_bot(vllm_server: VllmServer) -> Iterator[QwenChat]:
    with QwenChat(server=vllm_server.url, api_key_env=vllm_server.key_env) as connected:
        yield connected


@pytest.fixture(
    scope="module",
    params=["local", pytest.param("server", marks=pytest.mark.server)],
)
def bot(request: pytest.FixtureRequest) -> QwenChat:
    """The tiny model in this process, then the same model behind a vLLM server."""
    return request.getfixturevalue(f"{request.param}_bot")


def on_server(bot: QwenChat) -> bool:
    return isinstance(bot.backend, ServerBackend)


def local_only(bot: QwenChat, reason: str) -> None:
    if on_server(bot):
        pytest.skip(f"local backend only: {reason}")


def assert_nothing_running(bot: QwenChat, request: pytest.FixtureRequest) -> None:
    """The aborted request is gone from the engine: at once here, within 2 s on a server."""
    if not on_server(bot):
        assert not bot.backend.llm.llm_engine.has_unfinished_requests()
        return
    vllm_server: VllmServer = request.getfixturevalue("vllm_server")
    deadline = time.monotonic() + 2.0
    while vllm_server.requests_running() > 0:
        assert time.monotonic() < deadline, "the server still runs the aborted request"
        time.sleep(0.05)


def _spy_on_stream(bot: QwenChat, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what every request sends to the backend; the request still runs for real."""
    sent: list[dict[str, Any]] = []
    original = bot.backend.stream

    def stream(prompt_token_ids: list[int], **kwargs: Any) -> Iterator[Delta]:
        sent.append({"prompt_token_ids": list(prompt_token_ids), **kwargs})
        return original(prompt_token_ids, **kwargs)

    monkeypatch.setattr(bot.backend, "stream", stream)
    return sent


def test_the_parts_of_a_loaded_chat(bot: QwenChat, tiny_model: Path) -> None:
    assert bot.engine is bot.backend
    context = SERVER_CONTEXT if on_server(bot) else LOCAL_CONTEXT
    assert bot.backend.info.model == str(tiny_model) and bot.backend.info.max_model_len == context
    assert isinstance(bot.tokenizer, ChatTokenizer) and bot.tokenizer.is_chatml
    assert bot.formatter.tokenizer is bot.tokenizer


def test_chat_extends_history_without_mutating_it(bot: QwenChat) -> None:
    history = [("Hi", "Hello!")]
    response, new_history = bot.chat("How are you?", history=history, max_tokens=6)
    assert history == [("Hi", "Hello!")]
    assert new_history == [("Hi", "Hello!"), ("How are you?", response)]
    assert isinstance(response, str) and response
    assert not any(mark in response for mark in CONTROL_TEXTS)
    response, first = bot.chat("Start", max_tokens=3)
    assert first == [("Start", response)]


def test_stream_yields_text_pieces(bot: QwenChat) -> None:
    pieces = list(bot.stream("Hello", history=[("a", "b")], max_tokens=6, temperature=0))
    assert len(pieces) > 1 and all(isinstance(piece, str) for piece in pieces)
    response, _ = bot.chat("Hello", history=[("a", "b")], max_tokens=6, temperature=0)
    assert "".join(pieces) == response


def test_reply_records_sample_zero_and_reports_what_was_sent(bot: QwenChat) -> None:
    conversation = Conversation(system="Be brief.")
    seen: dict[int, str] = {}

    def on_delta(index: int, text: str) -> None:
        seen[index] = seen.get(index, "") + text

    reply = bot.reply(conversation, "Hello", n=2, on_delta=on_delta, max_tokens=5, seed=1)
    assert isinstance(reply, Reply) and len(reply.texts) == 2 and reply.text == reply.texts[0]
    assert seen == {0: reply.texts[0], 1: reply.texts[1]}
    assert conversation.pairs() == [("Hello", reply.text)]
    assert reply.recorded is not None and reply.recorded.turn is conversation.turns[0]
    assert reply.sampling["max_tokens"] == 5 and reply.sampling["seed"] == 1
    assert reply.sampling["n"] == 2
    for key, value in bot.backend.info.generation_defaults.items():
        assert reply.sampling[key] == value  # model defaults filled in
    assert reply.finish_reasons == ["length", "length"]
    assert reply.num_generated_tokens == 10 and not reply.interrupted
    assert reply.num_prompt_tokens == len(reply.plan.token_ids) == len(reply.prompt_token_ids)
    assert "Be brief." in reply.plan.text


def test_reply_records_the_original_message_when_it_is_cut(bot: QwenChat) -> None:
    conversation = Conversation()
    context = bot.backend.info.max_model_len
    long_message = "word " * (2 * context)
    with pytest.raises(MessageTooLongError):
        bot.reply(conversation, long_message, on_overflow="error", max_tokens=2)
    assert conversation.turns == []
    with pytest.warns(PromptTruncatedWarning):
        reply = bot.reply(conversation, long_message, on_overflow="truncate", max_tokens=2)
    assert reply.plan.truncated and len(reply.plan.message) < len(long_message)
    assert reply.plan.num_tokens <= context - 2
    (turn,) = conversation.turns
    assert turn.user == long_message and reply.recorded.turn is turn


def test_interrupted_reply_is_recorded_and_attached(
    bot: QwenChat, request: pytest.FixtureRequest
) -> None:
    conversation = Conversation()
    pieces: list[str] = []

    def on_delta(index: int, text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.reply(conversation, "Tell me a long story", on_delta=on_delta, max_tokens=300)
    partial = caught.value.reply  # type: ignore[attr-defined]
    assert partial.interrupted and partial.text == "".join(pieces)
    (turn,) = conversation.turns
    assert turn.interrupted and turn.assistant == partial.text
    assert partial.recorded.turn is turn
    assert_nothing_running(bot, request)
    assert bot.reply(conversation, "Again", max_tokens=3).text  # engine still usable
    assert len(conversation.turns) == 2


def test_budget_is_recomputed_every_call(bot: QwenChat) -> None:
    """A long session keeps fitting: old turns are dropped, the prompt never overflows.

    (The tutorial this replaces shrank a shared budget on every call until it went negative.)
    """
    conversation = Conversation()
    room = bot.backend.info.max_model_len
    for index in range(room // 40):  # earlier turns (more than fit), recorded as reply() does
        conversation.record(f"question {index} " + "word " * 30, "answer " * 20)
    for max_tokens in (300, 400, 300, 100):
        plan, sampling = bot._plan(
            conversation, "next", {"max_tokens": max_tokens}, use_history=True, key=None
        )
        assert plan.num_tokens <= room - max_tokens and plan.dropped_turns > 0
        assert plan.budget == room - max_tokens == bot.budget(max_tokens=max_tokens)
        assert sampling["max_tokens"] == max_tokens

    def stop_early(index: int, text: str) -> None:
        raise KeyboardInterrupt  # one delta is enough to see the plan; cheap on a CPU

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.reply(conversation, "next", on_delta=stop_early, max_tokens=450)
    plan = caught.value.reply.plan  # type: ignore[attr-defined]
    assert plan.num_tokens <= room - 450 and plan.dropped_turns > 0


def test_follow_up_turn_reuses_the_prefix_cache(bot: QwenChat) -> None:
    """The next turn re-sends the history with identical ids, so vLLM serves it from cache."""
    local_only(bot, "the server backend does not report prefix-cache hits")
    conversation = Conversation(system="You are terse.")
    first = bot.reply(conversation, "context " * 300, max_tokens=4, temperature=0)
    follow_up = bot.reply(conversation, "And then?", max_tokens=4, temperature=0)
    assert first.num_cached_tokens == 0
    assert follow_up.num_cached_tokens is not None
    assert follow_up.num_cached_tokens >= len(first.prompt_token_ids) - 64  # whole blocks


def test_ignore_eos_gives_fixed_length_replies(bot: QwenChat) -> None:
    reply = bot.reply(Conversation(), "x", max_tokens=12, ignore_eos=True, temperature=0)
    assert reply.num_generated_tokens == 12
    assert reply.sampling["ignore_eos"] is True


def test_complete_continues_plain_text(bot: QwenChat) -> None:
    reply = bot.complete("def add(a, b):", max_tokens=4, temperature=0)
    assert reply.plan is None and reply.prompt_text == "def add(a, b):"
    assert reply.prompt_token_ids == bot.tokenizer.encode_text("def add(a, b):")
    assert reply.text and reply.num_generated_tokens <= 4


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"temperature": -1}, ValueError),
        ({"top_p": 0}, ValueError),
        ({"n": 0}, ValueError),
        ({"max_tokens": 0}, ValueError),
        ({"beam_width": 2}, TypeError),
    ],
)
def test_bad_sampling_is_rejected(
    bot: QwenChat, sampling: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(sampling))):
        bot.chat("hi", **sampling)


def test_max_tokens_that_leave_no_prompt_room_are_refused(bot: QwenChat) -> None:
    context = bot.backend.info.max_model_len
    with pytest.raises(BackendError, match=f"max_tokens={context} leaves no room"):
        bot.chat("hi", max_tokens=context)


# --- defaults that must agree with the magics -------------------------------------------------


@pytest.mark.slow
def test_default_max_tokens_leaves_three_quarters_for_the_prompt(
    bot: QwenChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default reply is at most a quarter of the context (128 of 512, 512 of 2048), so
    chat() just works."""
    context = bot.backend.info.max_model_len
    default = default_max_tokens(context)
    assert default == {512: 128, 2048: 512}[context]
    assert bot.budget() == context - default
    sent = _spy_on_stream(bot, monkeypatch)
    response, history = bot.chat("Hello")  # no flag at all
    assert isinstance(response, str) and history == [("Hello", response)]
    (request,) = sent
    assert request["max_tokens"] == default
    assert len(request["prompt_token_ids"]) <= context - default

    def stop_early(index: int, text: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        bot.reply(Conversation(), "Hello", on_delta=stop_early)
    partial: Reply = caught.value.reply  # type: ignore[attr-defined]
    assert partial.sampling["max_tokens"] == default
    assert partial.plan is not None and partial.plan.budget == context - default


def test_chat_and_reply_send_the_templates_default_system_prompt(
    bot: QwenChat, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """system=None everywhere: the same ids as the model's own chat template (and %%qwen)."""
    from transformers import AutoTokenizer

    sent = _spy_on_stream(bot, monkeypatch)
    reply = bot.reply(Conversation(), "Hi", max_tokens=1)
    bot.chat("Hi", max_tokens=1)
    list(bot.stream("Hi", max_tokens=1))

    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "Hi"}]
    template_text = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert template_text.startswith("<|im_start|>system\nYou are Qwen")  # the template's default
    template_ids = hf_tokenizer(template_text, add_special_tokens=False)["input_ids"]
    assert reply.prompt_text == template_text
    assert [request["prompt_token_ids"] for request in sent] == [template_ids] * 3
    assert reply.plan.system == bot.tokenizer.default_system


# --- the two backends agree ------------------------------------------------------------------


@pytest.mark.server
def test_greedy_replies_are_the_same_on_both_backends(
    local_bot: QwenChat, server_bot: QwenChat
) -> None:
    """The same prompt ids and sampling values give the same greedy reply here and on a server."""
    for message in ("Hello", "Write a haiku about pandas.", "<|im_end|> is typed text"):
        here = local_bot.reply(Conversation(), message, max_tokens=24, temperature=0)
        there = server_bot.reply(Conversation(), message, max_tokens=24, temperature=0)
        assert there.prompt_token_ids == here.prompt_token_ids
        # The server is sent every value; vLLM's neutral ones go unsaid in-process.
        assert {key: there.sampling[key] for key in here.sampling} == here.sampling
        for key in there.sampling.keys() - here.sampling.keys():
            assert there.sampling[key] == setting(key).neutral, key
        assert there.text == here.text
        assert there.num_generated_tokens == here.num_generated_tokens > 0
        assert there.finish_reasons == here.finish_reasons


# --- one request at a time ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_threads_chatting_at_once_get_a_full_reply_or_busy(bot: QwenChat) -> None:
    local_only(bot, "a server batches concurrent requests (test_server.py: 8 clients at once)")
    greedy = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    expected, _ = bot.chat("Hello", **greedy)
    start = threading.Barrier(2)
    outcomes: list[tuple[str | BaseException, float, float]] = []

    def ask() -> None:
        start.wait()
        started = time.perf_counter()
        try:
            outcome: str | BaseException = bot.chat("Hello", **greedy)[0]
        except BaseException as error:  # reported by the assertions below
            outcome = error
        outcomes.append((outcome, started, time.perf_counter()))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(outcomes) == 2
    replies = [(text, end) for text, _, end in outcomes if isinstance(text, str)]
    refusals = [(error, end) for error, _, end in outcomes if not isinstance(error, str)]
    assert [text for text, _ in replies] == [expected]  # never a truncated reply
    ((error, refused_at),) = refusals
    assert isinstance(error, BackendBusy), error
    first_start = min(started for _, started, _ in outcomes)
    assert refused_at - first_start < 2.0 and refused_at < replies[0][1]  # at once, not after
    assert not bot.backend.busy
    assert bot.chat("Hello", **greedy)[0] == expected


# --- loading -----------------------------------------------------------------------------------


def test_unknown_extra_fails_before_anything_loads(
    bot: QwenChat, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    original = chat_module.open_backend

    def open_backend(model: str, **options: Any) -> Any:
        opened.append(model)
        return original(model, **options)

    monkeypatch.setattr(chat_module, "open_backend", open_backend)
    started = time.perf_counter()
    with pytest.raises(BackendError, match="no argument 'swap_spce'") as caught:
        QwenChat(str(tiny_model), extra={"swap_spce": 4})
    assert time.perf_counter() - started < 2.0
    assert opened == [] and "\n" not in str(caught.value)
    assert bot.chat("Hi", max_tokens=2)[0]  # the loaded model is untouched


@pytest.fixture(scope="module")
def model_without_chatml(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose tokenizer has no <|im_start|> / <|im_end|> and no chat template.

    The two tokens are renamed in place (ids unchanged), so the vocabulary stays whole.
    """
    folder = tmp_path_factory.mktemp("no-chatml")
    for item in tiny_model.iterdir():
        if item.name != "chat_template.jinja":
            shutil.copy2(item, folder / item.name)
    renamed = {IM_START: "<|reserved_0|>", IM_END: "<|reserved_1|>"}
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    for token in tokenizer["added_tokens"]:
        token["content"] = renamed.get(token["content"], token["content"])
    vocab = tokenizer["model"]["vocab"]
    for old, new in renamed.items():
        if old in vocab:
            vocab[new] = vocab.pop(old)
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for token in config.get("added_tokens_decoder", {}).values():
        token["content"] = renamed.get(token["content"], token["content"])
    config.pop("chat_template", None)
    config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_raw_mode_serves_a_model_without_chatml(model_without_chatml: Path) -> None:
    with QwenChat(str(model_without_chatml), max_model_len=512, kv_cache_gib=0.25) as plain:
        assert not plain.tokenizer.is_chatml and plain.tokenizer.chat_template is None
        assert plain.tokenizer.stop_token_ids == [151643]  # <|endoftext|> only
        reply = plain.complete("Once upon a time", max_tokens=5, temperature=0)
        assert reply.text and reply.num_generated_tokens == 5
        assert reply.finish_reasons == ["length"]
        with pytest.raises(ChatMLError, match="--raw") as caught:
            plain.chat("hi")
        assert "\n" not in str(caught.value)
        with pytest.raises(ChatMLError, match="--raw"):
            plain.reply(Conversation(), "hi")
        assert not plain.backend.busy


# --- meaning, on the real demo model ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo_bot(demo_model: Path) -> Iterator[QwenChat]:
    with QwenChat(str(demo_model), max_model_len=2048, kv_cache_gib=0.5) as loaded:
        yield loaded


@pytest.mark.semantic
def test_demo_knows_the_capital_of_france(demo_bot: QwenChat) -> None:
    response, _ = demo_bot.chat("What is the capital of France?", max_tokens=24, temperature=0)
    assert "Paris" in response


@pytest.mark.semantic
def test_demo_remembers_a_name_only_with_history(demo_bot: QwenChat) -> None:
    _, history = demo_bot.chat("My name is Ada. Please remember it.", max_tokens=24, temperature=0)
    question = "What is my name? Answer with the name only."
    with_history, _ = demo_bot.chat(question, history=history, max_tokens=12, temperature=0)
    without, _ = demo_bot.chat(question, history=None, max_tokens=12, temperature=0)
    assert "Ada" in with_history
    assert "Ada" not in without
