"""Backends: whatever runs the model, behind :class:`qwen_magic.backends.base.Backend`.

:func:`open_backend` is the one door: it picks and starts a backend for a model. Front-ends go
through :class:`qwen_magic.chat.QwenChat` and never import a concrete backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qwen_magic.backends.base import Backend, BackendBusy, BackendError, BackendInfo, Delta

__all__ = [
    "Backend",
    "BackendBusy",
    "BackendError",
    "BackendInfo",
    "Delta",
    "has_nvidia_gpu",
    "open_backend",
    "preload_engine",
]


def has_nvidia_gpu() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process (checked without torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def preload_engine() -> bool:
    """Start importing vLLM in a background thread; False when it is imported or underway.

    The import takes 10-20 s; started at ``%load_ext`` it overlaps the user's reading and typing,
    and ``%qwen_load`` only waits for what is left of it.
    """
    from qwen_magic.backends.vllm_local import start_import

    return start_import()


def open_backend(
    model: str | None,
    *,
    server: str | None = None,
    serve: bool = False,
    api_key_env: str = "VLLM_API_KEY",
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    **options: Any,
) -> Backend:
    """Start (or connect to) the backend that serves ``model``.

    Args:
        model: A folder, ``.gguf`` file or hub id to load here; with ``server``, which of the
            server's models to use (None: the one it serves).
        server: The URL of a running vLLM server (``vllm serve``) to use instead.
        serve: Start a vLLM server of our own for ``model`` (stopped on ``close()``) and talk to
            it over loopback; implied by tensor or pipeline parallel > 1.
        api_key_env: The environment variable holding the server's API key, if it wants one.
        progress: Called with short phase messages while loading.
        verbose: Show the engine's own logs.
        **options: Engine options (:class:`qwen_magic.backends.vllm_options.EngineOptions`).
    """
    if server is not None and serve:
        raise BackendError(
            "serve starts a vLLM server here and server uses one running elsewhere: pick one"
        )
    if server is not None:
        from qwen_magic.backends.openai_http import ServerBackend

        check_server_options(server, options)
        if progress is not None:
            progress(f"connecting to {server}")
        api_key = os.environ.get(api_key_env) or None
        return ServerBackend(server, api_key=api_key, api_key_env=api_key_env, model=model)
    if model is None:
        raise BackendError("no model given: pass a local folder or a hub id")
    from qwen_magic.backends.vllm_options import EngineOptions, needs_own_process

    # Parallel workers started in-process share the kernel's process group and exit on SIGINT,
    # so the first Jupyter interrupt would kill them; a server in its own session never sees it.
    if serve or needs_own_process(options):
        from qwen_magic.backends.managed_server import start_managed_server  # imports httpx

        if not serve and progress is not None:
            progress("parallel workers run in a vLLM server of their own (safe from interrupts)")
        return start_managed_server(model, progress=progress, verbose=verbose, **options)
    from qwen_magic.backends.vllm_local import Engine

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


def check_server_options(server: str, options: dict[str, Any]) -> None:
    """Refuse engine options with a server (they are the server's) and a malformed URL."""
    from qwen_magic.backends.openai_http import normalise_url

    normalise_url(server)
    if options:
        raise BackendError(
            f"engine options ({', '.join(sorted(options))}) are the server's to set: give them "
            "to vllm serve, not to a client of it"
        )
