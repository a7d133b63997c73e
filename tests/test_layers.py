"""Imports point inward: the pure core imports no engine, UI or network library, and no
front-end imports a concrete backend. Each module is imported alone, in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

CORE = (
    "qwen_magic.chatml",
    "qwen_magic.template",
    "qwen_magic.reasoning",
    "qwen_magic.conversation",
    "qwen_magic.prompt",
    "qwen_magic.sampling",
    "qwen_magic.batch",
    "qwen_magic.generation",
    "qwen_magic.render",
    "qwen_magic.session",
    "qwen_magic.backends",
    "qwen_magic.backends.base",
)
ENGINE_UI_NETWORK = ("vllm", "torch", "IPython", "ipywidgets", "httpx", "gradio")
CONCRETE_BACKENDS = (
    "qwen_magic.backends.vllm_local",
    "qwen_magic.backends.openai_http",
    "qwen_magic.backends.managed_server",
    "vllm",
    "httpx",
)
FRONT_ENDS = (
    "qwen_magic.jupyter",
    "qwen_magic.jupyter.magics",
    "qwen_magic.jupyter.batch_cell",
    "qwen_magic.jupyter.commands",
    "qwen_magic.jupyter.loading",
    "qwen_magic.jupyter.output",
    "qwen_magic.jupyter.panel",
    "qwen_magic.terminal",
    "qwen_magic.terminal.app",
    "qwen_magic.terminal.cli",
    "qwen_magic.terminal.commands",
    "qwen_magic.terminal.display",
    "qwen_magic.web",
    "qwen_magic.web.page",
    "qwen_magic.web.view",
    "qwen_magic.__main__",
)


def imported_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print([m for m in {candidates!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_engine_ui_or_network(module: str) -> None:
    assert imported_by(module, ENGINE_UI_NETWORK) == []


# gradio itself speaks HTTP through httpx: for the page, only our backends and vLLM count.
GRADIO_PAGES = ("qwen_magic.web.page",)


@pytest.mark.parametrize("module", FRONT_ENDS)
def test_front_ends_import_no_concrete_backend(module: str) -> None:
    candidates = CONCRETE_BACKENDS
    if module in GRADIO_PAGES:
        candidates = tuple(name for name in candidates if name != "httpx")
    assert imported_by(module, candidates) == []
