"""qwen-magic: chat with a local Qwen model from IPython and Jupyter, served by vLLM."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["QwenChat", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext qwen_magic``: register the magics; vLLM is imported only by ``%qwen_load``."""
    from qwen_magic.magics import QwenMagics

    ipython.register_magics(QwenMagics(shell=ipython))
    try:
        from qwen_magic.widgets import PanelMagics
    except ImportError:  # ipywidgets missing: the magics still work, only %qwen_panel is absent
        return
    ipython.register_magics(PanelMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext qwen_magic``: free the engine and remove the magics."""
    manager = ipython.magics_manager
    for class_name in ("QwenMagics", "PanelMagics"):
        magics = manager.registry.pop(class_name, None)
        if magics is None:
            continue
        if hasattr(magics, "detach"):
            magics.detach()
        for kind, names in magics.magics.items():
            for name in names:
                manager.magics[kind].pop(name, None)
        if magics in getattr(ipython, "configurables", []):
            ipython.configurables.remove(magics)


def __getattr__(name: str) -> Any:
    if name == "QwenChat":  # lazy: importing it imports vLLM
        from qwen_magic.chat import QwenChat

        return QwenChat
    raise AttributeError(f"module 'qwen_magic' has no attribute {name!r}")
