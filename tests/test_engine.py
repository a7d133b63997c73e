"""The vLLM engine: options, streaming, sampling, interrupts and unloading.

Engine tests run a real vLLM engine on the tiny random-weight model (real Qwen2.5 tokenizer);
its text is nonsense, so they check mechanics, not meaning.
"""

from __future__ import annotations

import _thread
import gc
import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from qwen_magic.chatml import ChatFormatter
from qwen_magic.engine import (
    DEFAULT_MAX_TOKENS,
    Delta,
    Engine,
    EngineError,
    EngineOptions,
    validate_sampling,
)

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
STOP_IDS = [IM_END, ENDOFTEXT, IM_START]
CONTROL_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


# --- options: pure, no vLLM -------------------------------------------------------------------


def test_missing_local_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match=r"no model folder at .*: pass a local folder or a hub id"
    ):
        EngineOptions(model=str(tmp_path / "nope"))


def test_hub_id_passes_through() -> None:
    assert EngineOptions(model="Qwen/Qwen2.5-0.5B-Instruct").model == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "int3", "dtype"),
        ("max_model_len", 4, "max_model_len"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
        ("tensor_parallel_size", 0, "tensor_parallel_size"),
        ("kv_cache_gib", 0, "kv_cache_gib"),
    ],
)
def test_bad_options_raise_engine_error(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        EngineOptions(model=str(tmp_path), **{field: value})


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


def test_llm_kwargs_drop_options_this_vllm_lacks(tmp_path: Path) -> None:
    options = EngineOptions(model=str(tmp_path), enable_prefix_caching=True, kv_cache_gib=1)
    kwargs = options.llm_kwargs(device="cpu", accepted={"model", "dtype"})
    assert "enable_prefix_caching" not in kwargs and "kv_cache_memory_bytes" not in kwargs
    kwargs = options.llm_kwargs(device="cpu")
    assert kwargs["enable_prefix_caching"] is True and kwargs["kv_cache_memory_bytes"] == 1024**3


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
        validate_sampling(sampling)


def test_validate_sampling_drops_none_and_normalises_stop() -> None:
    assert validate_sampling({"temperature": None, "stop": "END"}) == {"stop": ["END"]}


# --- a real engine on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Any:
    with Engine(
        EngineOptions(model=str(tiny_model), max_model_len=2048, kv_cache_gib=0.25, seed=0)
    ) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: Path) -> list[int]:
    return ChatFormatter(tiny_model).format([("user", "Say something.")])[1]


def _capture_params(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every SamplingParams the engine hands to vLLM."""
    llm_engine = engine._llm.llm_engine
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


@pytest.mark.engine
def test_stream_joins_to_generate_text(engine: Engine, prompt_ids: list[int]) -> None:
    deltas = list(engine.stream(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=12, temperature=0))
    assert all(isinstance(delta, Delta) for delta in deltas)
    assert len(deltas) > 1 and deltas[-1].finished and deltas[-1].finish_reason is not None
    streamed = "".join(delta.text for delta in deltas)
    generated = engine.generate(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=12, temperature=0)
    assert generated == [streamed]
    assert not any(mark in streamed for mark in CONTROL_TEXTS)


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
    engine.generate(prompt_ids, n=2, stop_token_ids=STOP_IDS, **options)
    (params,) = sent
    for key, value in options.items():
        assert getattr(params, key) == value, key
    assert params.n == 2 and params.skip_special_tokens is True
    assert set(STOP_IDS) <= set(params.stop_token_ids)
    assert params.output_kind.name == "DELTA"


@pytest.mark.engine
def test_model_defaults_fill_in_and_max_tokens_is_sensible(
    engine: Engine, prompt_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved = engine.resolve_sampling(len(prompt_ids))
    assert resolved["max_tokens"] == DEFAULT_MAX_TOKENS  # never vLLM's 16
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
    first = engine.generate(prompt_ids, n=3, stop_token_ids=STOP_IDS, max_tokens=6, seed=3)
    again = engine.generate(prompt_ids, n=3, stop_token_ids=STOP_IDS, max_tokens=6, seed=3)
    assert len(first) == 3 and first == again
    assert len(set(first)) > 1  # three independent samples, not one copied


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


def _assert_idle_and_usable(engine: Engine, prompt_ids: list[int]) -> None:
    assert not engine._llm.llm_engine.has_unfinished_requests()
    texts = engine.generate(prompt_ids, stop_token_ids=STOP_IDS, max_tokens=3, temperature=0)
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
def test_alarm_signal_mid_generation_aborts(engine: Engine, prompt_ids: list[int]) -> None:
    def on_alarm(signum: int, frame: Any) -> None:
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


@pytest.mark.engine
def test_shutdown_is_final_and_idempotent(tiny_model: Path) -> None:
    engine = Engine(EngineOptions(model=str(tiny_model), max_model_len=512, kv_cache_gib=0.25))
    engine.shutdown()
    engine.shutdown()
    assert engine.closed
    with pytest.raises(EngineError, match="load the model again"):
        engine.generate([1, 2, 3], stop_token_ids=STOP_IDS)
    gc.collect()


RELOAD_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from qwen_magic.engine import Engine, EngineOptions

    def cycle():
        engine = Engine(EngineOptions(model=sys.argv[1], max_model_len=1024, kv_cache_gib=1.0))
        engine.generate([9707, 11, 1879], stop_token_ids=[151645], max_tokens=4)
        engine.shutdown()
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
    machine); ``Engine.shutdown`` empties them. What remains is about 5 MB per cycle of native
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
