"""The Jupyter / IPython front-end: magics, live output and the control panel.

The kernel's :class:`qwen_magic.session.ChatSession` lives on the shell, not on the magics, so
``%reload_ext qwen_magic`` (after an upgrade, say) keeps every conversation.
"""

from __future__ import annotations

from typing import Any

from qwen_magic.session import ChatSession

_SESSION_ATTRIBUTE = "_qwen_magic_session"


def session_for(shell: Any) -> ChatSession:
    """The shell's chat session, created on first use."""
    session = getattr(shell, _SESSION_ATTRIBUTE, None)
    if session is None:
        session = ChatSession()
        setattr(shell, _SESSION_ATTRIBUTE, session)
    return session


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics on the shell's session. Returns at once: vLLM is imported by
    ``%qwen_load``, or (``QwenMagics.preload``, on by default on a GPU machine) in a
    background thread started here."""
    from qwen_magic.jupyter.magics import QwenMagics
    from qwen_magic.jupyter.panel import PanelMagics

    magics = QwenMagics(shell=ipython, session=session_for(ipython))
    ipython.register_magics(magics)
    ipython.register_magics(PanelMagics)
    if _should_preload(magics):
        from qwen_magic.backends import preload_engine

        preload_engine()


def _should_preload(magics: Any) -> bool:
    """QwenMagics.preload: "always", "never", or "auto" (a GPU machine that loads locally)."""
    if magics.preload != "auto":
        return magics.preload == "always"
    from qwen_magic.backends import has_nvidia_gpu

    return magics.server is None and has_nvidia_gpu()


def unload_ipython_extension(ipython: Any) -> None:
    """Free the engine and remove the magics; the conversations stay on the shell."""
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
