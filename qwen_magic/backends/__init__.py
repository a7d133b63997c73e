"""Backends: whatever runs the model, behind :class:`qwen_magic.backends.base.Backend`.

:func:`open_backend` is the one door: it picks and starts a backend for a model. Front-ends go
through :class:`qwen_magic.chat.QwenChat` and never import a concrete backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen_magic.backends.base import Backend, BackendBusy, BackendError, BackendInfo, Delta

__all__ = ["Backend", "BackendBusy", "BackendError", "BackendInfo", "Delta", "open_backend"]


def open_backend(
    model: str,
    *,
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    **options: Any,
) -> Backend:
    """Start the backend that serves ``model`` (a folder, ``.gguf`` file or hub id).

    Args:
        model: What to load.
        progress: Called with short phase messages while loading.
        verbose: Show the engine's own logs.
        **options: Engine options (:class:`qwen_magic.backends.vllm_options.EngineOptions`).
    """
    from qwen_magic.backends.vllm_local import Engine
    from qwen_magic.backends.vllm_options import EngineOptions

    return Engine(EngineOptions(model=model, **options), progress=progress, verbose=verbose)


def check_options(model: str, **options: Any) -> None:
    """Validate engine options without loading anything (before freeing a loaded model).

    Raises:
        BackendError: A wrong type or value, an unknown option, or no such model folder.
    """
    import sys
    from dataclasses import fields

    from qwen_magic.backends.vllm_options import EngineOptions

    known = {item.name for item in fields(EngineOptions)} - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendError(
            f"unknown engine option {', '.join(map(repr, unknown))}: use {', '.join(sorted(known))}"
        )
    checked = EngineOptions(model=model, **options)
    arg_utils = sys.modules.get("vllm.engine.arg_utils")  # only once vLLM is imported anyway
    accepted = set(getattr(getattr(arg_utils, "EngineArgs", None), "__dataclass_fields__", {}))
    if accepted:
        checked.check_extra(accepted)
