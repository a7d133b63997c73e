"""qwen-magic: chat with a Qwen model served by vLLM, from Jupyter, IPython or Python.

``%load_ext qwen_magic`` registers the notebook magics (:mod:`qwen_magic.jupyter.magics`);
:class:`qwen_magic.chat.QwenChat` is the plain Python API. Importing the package imports no vLLM.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("qwen-magic")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["QwenChat", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext qwen_magic``: register the magics; vLLM is imported only by ``%qwen_load``."""
    from qwen_magic.jupyter import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext qwen_magic``: free the engine and remove the magics (chats are kept)."""
    from qwen_magic.jupyter import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a front-end module (qwen_magic.jupyter.*) does not pull in the API
    # layer and its backends door: the layer tests check what each module imports.
    if name == "QwenChat":
        from qwen_magic.chat import QwenChat

        return QwenChat
    raise AttributeError(f"module 'qwen_magic' has no attribute {name!r}")
