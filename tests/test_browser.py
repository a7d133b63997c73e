"""The panel in a real JupyterLab 4 and Notebook 7, driven by headless Chromium (Playwright).

Each test starts its own server on 127.0.0.1 with its own Jupyter dirs, opens a copy of
``tests/notebooks/panel_demo.ipynb``, runs it (the tiny random-weight model on the CPU) and
checks what a user would see. Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import ast
import re
import shutil
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from browser_util import (
    CHROMIUM,
    cell_output_text,
    chromium_page,
    code_cells,
    jupyter_server,
    run_all_cells,
    run_cell,
    wait_for_kernel,
    wait_until_run,
)

pytestmark = [pytest.mark.browser, pytest.mark.engine, pytest.mark.slow]

TESTS = Path(__file__).parent
NOTEBOOK = TESTS / "notebooks" / "panel_demo.ipynb"
QUICKSTART = TESTS.parent / "example_notebooks" / "01_quickstart.ipynb"
ARTIFACTS = TESTS / "artifacts"
# Code cells of panel_demo.ipynb.
LOAD_CELL, PANEL_CELL, CHAT_CELL, SAMPLING_CELL = range(4)
SMALL_MAX_TOKENS = 3


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright")
    ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Any) -> Path:
    """A server root with a fresh copy of the demo notebook (the tiny model is built first)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    return root


def _shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _printed_sampling(text: str) -> dict[str, Any]:
    match = re.search(r"SAMPLING (\{.*\})", text)
    assert match, f"no sampling printed: {text!r}"
    return ast.literal_eval(match.group(1))


def _printed_generated(text: str) -> int:
    match = re.search(r"GENERATED (\d+)", text)
    assert match, f"no token count printed: {text!r}"
    return int(match.group(1))


def _set_readout(page: Any, control: str, value: str) -> None:
    """Type a value into a slider's readout, as a user would (works in Lab and Notebook 7)."""
    readout = page.locator(f".qwen-{control} .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(value)
    page.keyboard.press("Enter")


def _open_and_run(page: Any, url: str) -> None:
    page.goto(url)
    wait_for_kernel(page)
    run_all_cells(page)
    wait_until_run(page, executed_at_least=len(code_cells(page).all()), timeout=420)


def test_panel_in_jupyterlab(workspace: Path, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    with (
        jupyter_server("lab", workspace, tmp_path / "lab-home") as server,
        chromium_page() as page,
    ):
        timings["server"] = time.monotonic() - started
        _open_and_run(page, server.notebook_url(NOTEBOOK.name))
        timings["run all"] = time.monotonic() - started - timings["server"]

        panel = page.locator(".qwen-panel")
        panel.wait_for(state="visible")
        assert panel.locator(".widget-slider").count() >= 7
        assert "tiny" in panel.locator(".widget-html").first.inner_text().lower()
        reply_markdown = code_cells(page).nth(CHAT_CELL).locator(".jp-RenderedMarkdown")
        assert reply_markdown.first.inner_text().strip(), "no streamed reply shown"
        first = _printed_sampling(cell_output_text(page, SAMPLING_CELL))
        assert first.get("max_tokens") != SMALL_MAX_TOKENS
        _shot(page, "lab-1-panel-after-run")

        # The panel's history shows the reply after %%qwen.
        history = panel.locator(".widget-output .jp-RenderedMarkdown")
        assert "1. Assistant" in history.first.inner_text()

        # A slider change (typed into its readout) reaches the next generation.
        _set_readout(page, "max_tokens", str(SMALL_MAX_TOKENS))
        default_box = page.locator(".qwen-max_tokens-default input[type=checkbox]")
        page.wait_for_function(
            "box => !box.checked", arg=default_box.element_handle(), timeout=30_000
        )
        run_cell(page, CHAT_CELL)
        run_cell(page, SAMPLING_CELL)
        printed = cell_output_text(page, SAMPLING_CELL)
        assert _printed_sampling(printed)["max_tokens"] == SMALL_MAX_TOKENS
        assert _printed_generated(printed) <= SMALL_MAX_TOKENS
        _shot(page, "lab-2-after-slider-change")

        # Save; the reply is an ordinary Markdown output in the file.
        page.keyboard.press("Control+S")
        saved_path = workspace / NOTEBOOK.name
        deadline = time.monotonic() + 30
        reply_outputs: list[str] = []
        while time.monotonic() < deadline and not reply_outputs:
            time.sleep(0.5)
            saved = nbformat.read(saved_path, as_version=4)
            chat_cell = [cell for cell in saved.cells if cell.cell_type == "code"][CHAT_CELL]
            reply_outputs = [
                output["data"]["text/markdown"]
                for output in chat_cell.get("outputs", [])
                if "text/markdown" in output.get("data", {})
            ]
        assert reply_outputs and reply_outputs[-1].strip(), "the saved notebook lost the reply"

        # Reopened (no kernel run), the reply still renders from the saved output.
        page.goto(server.notebook_url(NOTEBOOK.name))
        reopened = code_cells(page).nth(CHAT_CELL).locator(".jp-RenderedMarkdown")
        reopened.first.wait_for(state="visible")
        assert reopened.first.inner_text().strip()
        _shot(page, "lab-3-reopened")
        timings["total"] = time.monotonic() - started
    print("timings (s):", {key: round(value, 1) for key, value in timings.items()})


def test_panel_in_notebook7(workspace: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with (
        jupyter_server("notebook", workspace, tmp_path / "nb-home") as server,
        chromium_page() as page,
    ):
        _open_and_run(page, server.notebook_url(NOTEBOOK.name))
        panel = page.locator(".qwen-panel")
        panel.wait_for(state="visible")
        assert panel.locator(".widget-slider").count() >= 7
        assert code_cells(page).nth(CHAT_CELL).locator(".jp-RenderedMarkdown").first.inner_text()
        _set_readout(page, "max_tokens", str(SMALL_MAX_TOKENS))
        run_cell(page, CHAT_CELL)
        run_cell(page, SAMPLING_CELL)
        assert _printed_sampling(cell_output_text(page, SAMPLING_CELL))["max_tokens"] == (
            SMALL_MAX_TOKENS
        )
        _shot(page, "notebook7-panel")
    print(f"notebook 7 total: {time.monotonic() - started:.1f} s")


@pytest.mark.skipif(not QUICKSTART.exists(), reason="example_notebooks/01_quickstart.ipynb absent")
def test_quickstart_notebook_opens_in_jupyterlab(tmp_path: Path) -> None:
    """The example notebook opens with its kernel and no dialog (it is not run: demo model)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(QUICKSTART, root / QUICKSTART.name)
    with (
        jupyter_server("lab", root, tmp_path / "lab-home") as server,
        chromium_page() as page,
    ):
        page.goto(server.notebook_url(QUICKSTART.name))
        wait_for_kernel(page)
        assert page.locator(".jp-Dialog").count() == 0
        assert code_cells(page).count() > 0
        _shot(page, "lab-quickstart-opened")


THINKING_CELLS = [
    "%load_ext qwen_magic\n%qwen_load tiny-qwen3-thinking --max-model-len 1024 --enforce-eager",
    # Long enough (random weights think until the budget) to click the block while it streams.
    "%%qwen --thinking-budget 300 --max-tokens 330 --seed 3\nWhat is 17 * 23?",
    "%%qwen --thinking-budget 8 --max-tokens 24 --seed 3\nAnd 17 * 24?",
]


KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _thinking_notebook(path: Path) -> None:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in THINKING_CELLS],
        metadata={"kernelspec": KERNELSPEC},
    )
    nbformat.write(notebook, path)


def test_thinking_block_in_jupyterlab(tmp_path: Path, thinking_only_model: Any) -> None:
    """The reasoning streams into a block that a click opens (and that stays open while it grows);
    the final block is a collapsed <details> above the answer, and stays so in the saved file."""
    root = tmp_path / "root"
    root.mkdir()
    _thinking_notebook(root / "thinking.ipynb")
    with (
        jupyter_server("lab", root, tmp_path / "lab-home") as server,
        chromium_page() as page,
    ):
        page.goto(server.notebook_url("thinking.ipynb"))
        wait_for_kernel(page)
        run_cell(page, 0, timeout=240)

        cell = code_cells(page).nth(1)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")
        header = cell.locator(".jupyter-widget-Collapse-header")
        header.wait_for(state="visible", timeout=120_000)
        assert "Thinking" in header.inner_text()
        header.click()  # open it while it streams
        contents = cell.locator(".jupyter-widget-Collapse-contents")
        first = contents.inner_text()
        time.sleep(1.5)
        assert contents.is_visible() and len(contents.inner_text()) > len(first)
        _shot(page, "lab-thinking-1-open-while-streaming")
        prompt = cell.locator(".jp-InputPrompt")
        page.wait_for_function(
            "prompt => /^\\[\\d+\\]/.test(prompt.textContent.trim())",
            arg=prompt.element_handle(),
            timeout=300_000,
        )
        block = cell.locator("details.qwen-thinking")
        # The final block replaces the widget: collapsed again (the kernel cannot know of the
        # click while the cell runs), with the final summary.
        assert block.count() == 1 and cell.locator(".jupyter-widget-Collapse").count() == 0
        assert "Thought for" in block.locator("summary").inner_text()

        run_cell(page, 2)
        third = code_cells(page).nth(2)
        block = third.locator("details.qwen-thinking")
        assert block.count() == 1 and block.get_attribute("open") is None  # collapsed
        summary = block.locator("summary").inner_text()
        assert "Thought for" in summary and "8 tokens" in summary
        assert not block.locator("div").is_visible()
        outputs = third.locator(".jp-OutputArea-output")
        answer = outputs.nth(outputs.count() - 1).inner_text()
        assert "Considering the limited time" not in answer  # the reasoning stays in its block
        block.locator("summary").click()
        assert "Considering the limited time" in block.locator("div").inner_text()
        _shot(page, "lab-thinking-2-collapsed-then-opened")

        page.keyboard.press("Control+S")
        deadline = time.monotonic() + 30
        saved_html: list[str] = []
        while time.monotonic() < deadline and not saved_html:
            time.sleep(0.5)
            saved = nbformat.read(root / "thinking.ipynb", as_version=4)
            saved_html = [
                "".join(output.get("data", {}).get("text/html", ""))
                for output in saved.cells[2].get("outputs", [])
                if "qwen-thinking" in "".join(output.get("data", {}).get("text/html", ""))
            ]
        assert saved_html and '<details class="qwen-thinking">' in saved_html[0]
