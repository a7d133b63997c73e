"""The in-process vLLM backend: options, streaming, sampling, interrupts, one request at a time.

Engine tests run a real vLLM engine on the tiny random-weight model (real Qwen2.5 tokenizer);
its text is nonsense, so they check mechanics, not meaning. What must be freed after errors is
in ``test_lifetime.py``.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from qwen_magic.backends import (
    Backend,
    BackendBusy,
    BackendInfo,
    Delta,
    _vllm_compat,
    _vllm_startup,
    check_options,
)
from qwen_magic.backends._detokenize import load_tokenizer
from qwen_magic.backends.base import BatchRequest
from qwen_magic.backends.vllm_local import Engine
from qwen_magic.backends.vllm_options import EngineError, EngineOptions
from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.sampling import DEFAULT_MAX_TOKENS, default_max_tokens, validate

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
STOP_IDS = [IM_END, ENDOFTEXT, IM_START]
CONTROL_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


# --- options: pure, no vLLM -------------------------------------------------------------------


def test_missing_local_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match=r"no model folder at .*: pass a local folder or a hub id"
    ):
        EngineOptions(model=str(tmp_path / "nope"))


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2"])
def test_hub_id_passes_through(
    hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert EngineOptions(model=hub_id).model == hub_id


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "int3", "dtype"),
        ("max_model_len", 4, "max_model_len"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
        ("tensor_parallel_size", 0, "tensor_parallel_size"),
        ("kv_cache_gib", 0, "kv_cache_gib"),
        ("enforce_eager", "yes", "enforce_eager must be True or False, got 'yes'"),
        ("seed", "1", "seed must be a whole number, got '1'"),
        ("max_model_len", "4096", "max_model_len must be a whole number, got '4096'"),
        ("max_model_len", 4096.0, "max_model_len must be a whole number"),
        ("kv_cache_gib", math.inf, "kv_cache_gib must be positive, got inf"),
        ("kv_cache_gib", math.nan, "kv_cache_gib"),
        ("trust_remote_code", 1, "trust_remote_code must be True or False"),
        ("tensor_parallel_size", True, "tensor_parallel_size must be a whole number"),
        ("extra", ["swap_space"], "extra must be a dict"),
    ],
)
def test_bad_options_raise_one_line_engine_error(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(EngineError, match=message) as caught:
        EngineOptions(model=str(tmp_path), **{field: value})
    assert "\n" not in str(caught.value)


def test_unknown_option_names_are_refused_without_vllm(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown engine option 'max_len'"):
        check_options(str(tmp_path), max_len=10)


def test_llm_kwargs_defaults_per_device(tmp_path: Path) -> None:
    options = EngineOptions(model=str(tmp_path), max_model_len=1024, extra={"swap_space": 0})
    cpu = options.llm_kwargs(device="cpu")
    assert cpu["enforce_eager"] is True
    assert 0.25 * 1024**3 <= cpu["kv_cache_memory_bytes"] <= 4 * 1024**3
    assert cpu["max_model_len"] == 1024 and cpu["seed"] == 0 and cpu["swap_space"] == 0
    assert cpu["trust_remote_code"] is False
    gpu = options.llm_kwargs(device="cuda")
    assert gpu["enforce_eager"] is False and "kv_cache_memory_bytes" not in gpu
    assert "gpu_memory_utilization" not in gpu


def test_gpu_starts_fast_unless_compile_or_eager_is_asked(tmp_path: Path) -> None:
    from qwen_magic.backends.vllm_options import FAST_START_COMPILATION

    def compilation(**given: Any) -> Any:
        options = EngineOptions(model=str(tmp_path), **given)
        return options.llm_kwargs(device="cuda").get("compilation_config")

    assert compilation() == FAST_START_COMPILATION
    assert compilation(compile=True) is None  # vLLM's own default: torch.compile
    assert compilation(enforce_eager=True) is None
    assert compilation(extra={"compilation_config": {"mode": 3}}) == {"mode": 3}
    assert "compilation_config" not in EngineOptions(model=str(tmp_path)).llm_kwargs(device="cpu")
    with pytest.raises(EngineError, match="compile must be True or False"):
        EngineOptions(model=str(tmp_path), compile="yes")


def test_llm_kwargs_drop_options_this_vllm_lacks(tmp_path: Path) -> None:
    options = EngineOptions(model=str(tmp_path), enable_prefix_caching=True, kv_cache_gib=1)
    kwargs = options.llm_kwargs(device="cpu", accepted={"model", "dtype"})
    assert "enable_prefix_caching" not in kwargs and "kv_cache_memory_bytes" not in kwargs
    kwargs = options.llm_kwargs(device="cpu")
    assert kwargs["enable_prefix_caching"] is True and kwargs["kv_cache_memory_bytes"] == 1024**3


def test_check_extra_names_the_unknown_keys(tmp_path: Path) -> None:
    EngineOptions(model=str(tmp_path), extra={"swap_space": 4}).check_extra({"swap_space"})
    options = EngineOptions(model=str(tmp_path), extra={"swap_space": 4, "swap_spce": 4})
    with pytest.raises(EngineError, match="no argument 'swap_spce' \\(from extra\\)"):
        options.check_extra({"swap_space"})


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"temperature": -0.1}, ValueError),
        ({"top_p": 0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"max_tokens": 0}, ValueError),
        ({"temprature": 0.5}, TypeError),
    ],
)
def test_validate_sampling_rejects(sampling: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(sampling))):
        validate(sampling)


def test_validate_sampling_drops_none_and_normalises_stop() -> None:
    assert validate({"temperature": None, "stop": "END"}) == {"stop": ["END"]}


@pytest.mark.parametrize(
    ("max_model_len", "expected"), [(512, 128), (2048, 512), (32768, 512), (16, 4)]
)
def test_default_max_tokens_is_at_most_a_quarter_of_the_context(
    max_model_len: int, expected: int
) -> None:
    assert default_max_tokens(max_model_len) == expected


# --- a real engine on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    with Engine(
        EngineOptions(model=str(tiny_model), max_model_len=2048, kv_cache_gib=0.25, seed=0)
    ) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: Path) -> list[int]:
    return ChatFormatter(tiny_model).format([("user", "Say something.")])[1]


def _join(deltas: Iterator[Delta] | list[Delta], n: int = 1) -> list[str]:
    texts = [""] * n
    for delta in deltas:
        texts[delta.index] += delta.text
    return texts


def _generate(engine: Engine, prompt_ids: list[int], n: int = 1, **sampling: Any) -> list[str]:
    """The finished texts of one request (what ``Engine.generate`` used to return)."""
    return _join(engine.stream(prompt_ids, n=n, stop_token_ids=STOP_IDS, **sampling), n)


def _capture_params(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every SamplingParams the engine hands to vLLM (a spy: the request still runs)."""
    llm_engine = engine.llm.llm_engine
    sent: list[Any] = []
    original = llm_engine.add_request

    def spy(request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(params)
        return original(request_id, prompt, params, *args, **kwargs)

    monkeypatch.setattr(llm_engine, "add_request", spy)
    return sent


@pytest.mark.engine
def test_engine_properties(engine: Engine, tiny_model: Path) -> None:
    assert engine.device == "cpu" and engine.max_model_len == 2048
    assert engine.model == str(tiny_model)
    assert engine.vllm_version[0].isdigit()
    assert set(engine.generation_defaults) <= {
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
        "presence_penalty", "frequency_penalty",
    }  # fmt: skip
    memory = engine.memory()
    assert memory["total_rss"] >= memory["process_rss"] > 100 * 2**20
    assert memory["gpu_used"] is None
    assert isinstance(engine, Backend)
    assert engine.info == BackendInfo(
        model=str(tiny_model),
        max_model_len=2048,
        generation_defaults=engine.generation_defaults,
        where="cpu",
        version=f"vLLM {engine.vllm_version}",
    )
    assert engine.status()["memory"]
    assert not engine.busy and not engine.closed


@pytest.mark.engine
def test_stream_deltas_join_to_vllms_own_output(engine: Engine, prompt_ids: list[int]) -> None:
    from vllm import SamplingParams

    deltas = list(engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=12, temperature=0))
    assert all(isinstance(delta, Delta) for delta in deltas)
    assert len(deltas) > 1 and deltas[-1].finished
    assert [delta.finish_reason for delta in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert sum(len(delta.token_ids) for delta in deltas) == 12
    (streamed,) = _join(deltas)
    assert not any(mark in streamed for mark in CONTROL_TEXTS)
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=STOP_IDS)
    (output,) = engine.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    ids = list(output.outputs[0].token_ids)
    assert [token for delta in deltas for token in delta.token_ids] == ids
    # vLLM runs without its tokenizer here (its own text: the test with vLLM's tokenizer below)
    assert load_tokenizer(engine.model).decode(ids, skip_special_tokens=True) == streamed


@pytest.mark.engine
def test_every_sampling_option_reaches_vllm(
    engine: Engine, prompt_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _capture_params(engine, monkeypatch)
    options = {
        "temperature": 0.3,
        "top_p": 0.7,
        "top_k": 5,
        "min_p": 0.05,
        "max_tokens": 4,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "seed": 7,
        "stop": ["zzz"],
    }
    _generate(engine, prompt_ids, n=2, **options)
    (params,) = sent
    del options["stop"]
    for key, value in options.items():
        assert getattr(params, key) == value, key
    # vLLM runs without its tokenizer here, so the engine applies stop strings itself (below)
    assert not params.stop
    assert params.n == 2 and params.skip_special_tokens is True
    assert set(STOP_IDS) <= set(params.stop_token_ids)
    assert params.output_kind.name == "DELTA"


@pytest.mark.engine
def test_model_defaults_fill_in_and_max_tokens_is_sensible(
    engine: Engine, prompt_ids: list[int]
) -> None:
    resolved = engine.resolve_sampling(len(prompt_ids))
    assert resolved["max_tokens"] == default_max_tokens(2048) == DEFAULT_MAX_TOKENS  # not 16
    for key, value in engine.generation_defaults.items():
        assert resolved[key] == value
    assert engine.resolve_sampling(len(prompt_ids), temperature=0.0)["temperature"] == 0.0
    # capped to what fits in the context
    assert engine.resolve_sampling(2000, max_tokens=500)["max_tokens"] == 48
    with pytest.raises(EngineError, match="max-model-len"):
        engine.resolve_sampling(2048)


@pytest.mark.engine
def test_max_tokens_n_and_seed_behave(engine: Engine, prompt_ids: list[int]) -> None:
    deltas = list(engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=5))
    assert sum(len(delta.token_ids) for delta in deltas) <= 5
    first = _generate(engine, prompt_ids, n=3, max_tokens=6, seed=3)
    again = _generate(engine, prompt_ids, n=3, max_tokens=6, seed=3)
    assert len(first) == 3 and first == again
    assert len(set(first)) > 1  # three independent samples, not one copied


@pytest.mark.engine
def test_several_greedy_samples_are_refused(engine: Engine, prompt_ids: list[int]) -> None:
    with pytest.raises(EngineError, match="temperature above 0") as caught:
        _generate(engine, prompt_ids, n=2, temperature=0, max_tokens=4)
    assert "\n" not in str(caught.value)
    assert not engine.busy


@pytest.mark.engine
def test_stop_token_ids_are_honoured(engine: Engine, prompt_ids: list[int]) -> None:
    greedy = list(engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=8, temperature=0))
    ids = [token for delta in greedy for token in delta.token_ids]
    # make the first greedy token not seen before it a stop token: generation must end there
    cut = next((k for k in range(1, len(ids)) if ids[k] not in ids[:k]), 0)
    stopped = list(
        engine.stream(prompt_ids, stop_token_ids=[*STOP_IDS, ids[cut]], max_tokens=8, temperature=0)
    )
    stopped_ids = [token for delta in stopped for token in delta.token_ids]
    assert stopped_ids[:cut] == ids[:cut] and len(stopped_ids) <= cut + 1
    assert stopped[-1].finish_reason == "stop"


@pytest.mark.engine
def test_a_model_folder_runs_vllm_without_its_tokenizer(engine: Engine, tiny_model: Path) -> None:
    assert engine.llm.llm_engine.model_config.skip_tokenizer_init is True
    # what QwenChat(backend=engine) formats with: the folder's tokenizer and chat template
    given = ChatTokenizer.load(engine.tokenizer())
    assert given.chat_template
    assert given.chat_template == ChatTokenizer.load(tiny_model).chat_template
    assert given.im_end_id == IM_END


@pytest.mark.engine
def test_stop_strings_end_the_reply_before_them(
    engine: Engine, prompt_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    (whole,) = _generate(engine, prompt_ids, max_tokens=40, temperature=0)
    words = whole.split()
    stop = next(word for word in words[len(words) // 2 :] if len(word) > 2)
    aborted: list[list[str]] = []
    original = engine.llm.llm_engine.abort_request
    monkeypatch.setattr(
        engine.llm.llm_engine,
        "abort_request",
        lambda ids, *args, **kwargs: aborted.append(list(ids)) or original(ids, *args, **kwargs),
    )
    stopped = list(
        engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=40, temperature=0, stop=stop)
    )
    assert "".join(delta.text for delta in stopped) == whole[: whole.index(stop)]
    assert stopped[-1].finished and stopped[-1].finish_reason == "stop"
    assert sum(len(delta.token_ids) for delta in stopped) < 40
    assert len(aborted) == 1  # vLLM, which cannot see stop strings, was stopped there
    _assert_idle_and_usable(engine, prompt_ids)


@pytest.mark.engine
def test_stop_strings_end_each_sample_of_a_batch(engine: Engine, prompt_ids: list[int]) -> None:
    samples = [BatchRequest(prompt_ids, {"max_tokens": 30, "temperature": 1.0, "seed": 5}, 3)]
    whole = {d.index: d.text for _, d in engine.generate_many(samples, stop_token_ids=STOP_IDS)}
    stop = whole[0][len(whole[0]) // 3 :][:3]
    samples = [BatchRequest(prompt_ids, {**samples[0].sampling, "stop": [stop]}, 3)]
    cut = {d.index: d for _, d in engine.generate_many(samples, stop_token_ids=STOP_IDS)}
    assert sorted(cut) == [0, 1, 2]
    for index, delta in cut.items():
        expected = whole[index].split(stop)[0]
        assert delta.text == expected and stop not in delta.text
        assert delta.finish_reason == ("stop" if stop in whole[index] else "length")
    assert cut[0].finish_reason == "stop"
    _assert_idle_and_usable(engine, prompt_ids)


VLLM_TEXT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qwen_magic.backends.vllm_local import Engine
    from qwen_magic.backends.vllm_options import EngineOptions

    folder, prompt_ids, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    engine = Engine(EngineOptions(
        model=folder, max_model_len=2048, kv_cache_gib=0.25, seed=0, extra={"tokenizer": folder}
    ))
    assert not engine.llm.llm_engine.model_config.skip_tokenizer_init
    texts = [""] * options["n"]
    for delta in engine.stream(prompt_ids, stop_token_ids=json.loads(sys.argv[4]), **options):
        texts[delta.index] += delta.text
    print("TEXTS " + json.dumps(texts))
    """
)


@pytest.mark.engine
def test_the_text_is_what_vllm_makes_with_its_tokenizer(
    engine: Engine, tiny_model: Path, prompt_ids: list[int]
) -> None:
    """The same requests with vLLM's own tokenizer and text (in a new process: two engines in
    one process share vLLM's parallel state, and closing one breaks the other)."""
    options = {"max_tokens": 40, "temperature": 1.0, "seed": 11, "n": 3, "stop": ["ing", "er"]}
    ours = _generate(engine, prompt_ids, **options)
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    arguments = [json.dumps(value) for value in (prompt_ids, options, STOP_IDS)]
    done = subprocess.run(
        [sys.executable, "-c", VLLM_TEXT_SCRIPT, str(tiny_model), *arguments],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("TEXTS ")]
    assert lines, done.stderr[-3000:]
    assert json.loads(lines[-1][len("TEXTS ") :]) == ours
    assert any(ours)


def _assert_idle_and_usable(engine: Engine, prompt_ids: list[int]) -> None:
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert not engine.busy
    texts = _generate(engine, prompt_ids, max_tokens=3, temperature=0)
    assert len(texts) == 1 and texts[0]


@pytest.mark.engine
def test_keyboard_interrupt_from_consumer_aborts(engine: Engine, prompt_ids: list[int]) -> None:
    seen = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=400):
            seen += 1
            if seen == 3:
                raise KeyboardInterrupt
    _assert_idle_and_usable(engine, prompt_ids)


@pytest.mark.engine
def test_consumer_stopping_early_aborts(engine: Engine, prompt_ids: list[int]) -> None:
    stream = engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=400)
    next(stream)
    assert engine.busy
    stream.close()
    _assert_idle_and_usable(engine, prompt_ids)


@pytest.mark.engine
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT semantics")
def test_sigint_mid_generation_aborts(engine: Engine, prompt_ids: list[int]) -> None:
    first_delta = threading.Event()
    timer = threading.Thread(target=lambda: first_delta.wait(30) and _thread.interrupt_main())
    timer.start()
    count = 0
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=1000):
                count += 1
                first_delta.set()
    finally:
        first_delta.set()
        timer.join()
    assert 0 < count < 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _assert_idle_and_usable(engine, prompt_ids)


@pytest.mark.engine
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGALRM")
def test_alarm_signal_mid_generation_aborts(engine: Engine, prompt_ids: list[int]) -> None:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            for _ in engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=1000):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _assert_idle_and_usable(engine, prompt_ids)


# --- one request at a time ---------------------------------------------------------------------


@pytest.mark.engine
def test_a_second_stream_is_refused_while_the_first_runs(
    engine: Engine, prompt_ids: list[int]
) -> None:
    greedy = {"stop_token_ids": STOP_IDS, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    (expected,) = _join(engine.stream(prompt_ids, **greedy))

    first = engine.stream(prompt_ids, **greedy)
    pieces = [next(first).text]
    assert engine.busy
    second = engine.stream(prompt_ids, **greedy)
    started = time.perf_counter()
    with pytest.raises(BackendBusy, match="still generating another reply"):
        next(second)  # refused before it yields anything, without stepping the engine
    assert time.perf_counter() - started < 0.5
    pieces += [delta.text for delta in first]  # the first request is untouched
    assert "".join(pieces) == expected

    assert not engine.busy
    assert _join(engine.stream(prompt_ids, **greedy)) == [expected]


@pytest.mark.engine
def test_closing_a_stream_before_it_starts_frees_the_engine(
    engine: Engine, prompt_ids: list[int]
) -> None:
    stream = engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=3)
    stream.close()  # never started: it never took the engine
    assert not engine.busy
    _assert_idle_and_usable(engine, prompt_ids)


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.engine
def test_unknown_extra_is_refused_once_vllm_is_imported(engine: Engine, tiny_model: Path) -> None:
    check_options(str(tiny_model), extra={"max_num_seqs": 4})  # a real vLLM 0.32 argument
    with pytest.raises(EngineError, match="no argument 'swap_spce'") as caught:
        check_options(str(tiny_model), extra={"swap_spce": 4})
    assert "\n" not in str(caught.value)


@pytest.mark.engine
@pytest.mark.slow
def test_verbose_on_a_later_load_shows_vllms_logs(engine: Engine, tiny_model: Path) -> None:
    """The module's engine loaded quietly; a verbose load must still show vLLM's INFO lines.

    vLLM's handler writes to qwen-magic's log sink (read for the load phases), which passes the
    lines on to stdout only when verbose; and vLLM fixes its handler's level from the environment
    at its first import, so without resetting it a later ``--verbose`` would show nothing.
    """
    handlers = [
        handler
        for handler in logging.getLogger("vllm").handlers
        if type(handler) is logging.StreamHandler
    ]
    assert handlers, "vLLM's own log handler is missing"
    assert all(handler.stream is _vllm_compat.LOG_SINK for handler in handlers)

    def load(verbose: bool) -> str:
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            options = EngineOptions(model=str(tiny_model), max_model_len=512, kv_cache_gib=0.25)
            Engine(options, verbose=verbose).close()
        return shown.getvalue()

    loud = load(verbose=True)
    assert " INFO " in loud, loud[-2000:]
    quiet = load(verbose=False)
    assert " INFO " not in quiet and " WARNING " not in quiet, quiet[-2000:]


@pytest.mark.engine
def test_shutdown_is_final_and_idempotent(tiny_model: Path, prompt_ids: list[int]) -> None:
    engine = Engine(EngineOptions(model=str(tiny_model), max_model_len=512, kv_cache_gib=0.25))
    suspended = engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=50)
    next(suspended)
    assert Engine.shutdown is Engine.close
    engine.shutdown()  # while a stream waits: it must not step a closed engine
    engine.close()
    assert engine.closed and engine.status() == {}
    assert "closed" in repr(engine)
    with pytest.raises(EngineError, match="load the model again"):
        next(suspended)
    assert not engine.busy
    with pytest.raises(EngineError, match="load the model again"):
        next(engine.stream([1, 2, 3], stop_token_ids=STOP_IDS))
    gc.collect()


RELOAD_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from qwen_magic.backends.vllm_local import Engine, EngineOptions

    def cycle():
        engine = Engine(EngineOptions(model=sys.argv[1], max_model_len=1024, kv_cache_gib=1.0))
        for _ in engine.stream([9707, 11, 1879], stop_token_ids=[151645], max_tokens=4):
            pass
        engine.close()
        gc.collect()
        tokenizers = sum("Tokenizer" in type(value).__name__ for value in gc.get_objects())
        return engine.memory()["total_rss"], tokenizers

    print(json.dumps([cycle() for _ in range(3)]))
    """
)


@pytest.mark.engine
@pytest.mark.slow
def test_reload_does_not_grow_memory(tiny_model: Path) -> None:
    """Load and unload three times in a fresh process: unloading must free the whole engine.

    An engine that survived its unload would keep its 1 GiB KV cache. vLLM's own caches used to
    keep the deep copies of the tokenizer each engine makes (+145 MB per cycle on the dev
    machine); ``Engine.close`` empties them. What remains is about 5 MB per cycle of native
    memory (no Python object), hence the 40 MB bound.
    """
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cycles = json.loads(result.stdout.strip().splitlines()[-1])
    rss = [total_rss for total_rss, _ in cycles]
    tokenizers_alive = [count for _, count in cycles]
    assert len(set(tokenizers_alive)) == 1, f"tokenizer objects pile up: {tokenizers_alive}"
    growth_per_cycle = (rss[-1] - rss[0]) / (len(rss) - 1)
    assert growth_per_cycle < 40 * 2**20, [value // 2**20 for value in rss]


# --- start-up shortcuts -----------------------------------------------------------------------


@pytest.mark.engine
def test_a_load_records_its_imports_and_the_next_background_import_replays_them(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_MAGIC_HOME", str(tmp_path))
    model_module = "vllm.model_executor.models.qwen2"  # imported by the engine fixture's load
    assert model_module in sys.modules
    import wave  # noqa: F401 - not one of vLLM's packages: never recorded

    before = set(sys.modules) - {model_module, "wave"}
    _vllm_startup.record_load_imports(before)
    recorded = tmp_path / f"vllm-{engine.vllm_version}-load-imports.json"
    modules = json.loads(recorded.read_text())["modules"]
    assert model_module in modules and "wave" not in modules
    # The next load imports nothing new (the replay brought it in ahead): the list is kept.
    _vllm_startup.record_load_imports(set(sys.modules))
    assert json.loads(recorded.read_text())["modules"] == modules
    # A module that fails to import ahead is skipped from then on.
    missing = "vllm.no_such_module_for_qwen_magic"
    recorded.write_text(json.dumps({"modules": [missing], "failed": []}))
    monkeypatch.setattr(_vllm_startup, "_replay_failed", set())
    _vllm_startup._replay_load_imports()
    _vllm_startup.record_load_imports(before)
    assert json.loads(recorded.read_text())["failed"] == [missing]
    # A damaged file is started again, and never fails the load that records.
    recorded.write_text("{not json")
    _vllm_startup.record_load_imports(before)
    assert model_module in json.loads(recorded.read_text())["modules"]


INSPECTION_SCRIPT = """
import sys
from vllm.model_executor.models import registry

from qwen_magic.backends._detokenize import load_tokenizer
from qwen_magic.backends.base import BatchRequest
from qwen_magic.backends.vllm_local import Engine
from qwen_magic.backends.vllm_options import EngineOptions

def no_subprocess(function):
    raise AssertionError("vLLM inspected the model class in a subprocess")

registry._run_in_subprocess = no_subprocess
with Engine(EngineOptions(model=sys.argv[1], max_model_len=512, kv_cache_gib=0.25)):
    pass
assert registry._run_in_subprocess is no_subprocess  # put back after the load
print("LOADED")
"""


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_inspects_the_model_class_in_this_process_during_a_load(
    tiny_model: Path, tmp_path: Path
) -> None:
    """In a new process with an empty vLLM cache, vLLM would re-import itself in a subprocess to
    inspect the model class; a load must not (that path raises here) and still fills the cache."""
    environment = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INSPECTION_SCRIPT, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert "LOADED" in done.stdout, done.stderr[-3000:]
    assert list((tmp_path / "modelinfos").glob("*Qwen2ForCausalLM.json"))


def test_model_inspection_is_put_back_when_the_block_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.model_executor.models import registry

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's own setting

    original = registry._run_in_subprocess
    with pytest.raises(RuntimeError), _vllm_startup.model_inspection_in_process():
        assert registry._run_in_subprocess is not original
        raise RuntimeError
    assert registry._run_in_subprocess is original
