"""The example notebooks: they run headless on the demo model and every reply is real.

The slow tests execute each notebook in a fresh kernel (the demo model is loaded once per
notebook: about a minute each on 2 CPU cores) and fail on any error output or empty reply. The
fast tests check the committed copies (saved with their outputs, readable on GitHub) and that the
checker itself catches what it must. The checks live in ``scripts/check_notebooks.py``, which
``scripts/demo.sh`` runs too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_checker() -> ModuleType:
    path = ROOT / "scripts" / "check_notebooks.py"
    spec = importlib.util.spec_from_file_location("check_notebooks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()
NOTEBOOKS = checker.example_notebooks()


def test_the_example_notebooks_exist() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_chatml_explained.ipynb",
        "03_prompt_engineering.ipynb",
        "04_batch_prompting.ipynb",
        "05_thinking_models.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_carries_clean_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert checker.problems(notebook) == []
    chat_cells = [cell for cell in notebook.cells if cell.source.startswith("%%qwen")]
    assert chat_cells, "each example chats with the model at least once"


@pytest.mark.semantic
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_every_reply_is_real(
    path: Path, tmp_path: Path, demo_model: Path
) -> None:
    notebook = checker.clean(checker.execute(path, cwd=tmp_path))
    assert checker.problems(notebook) == []


# ---------------------------------------------------------------- the checker itself


def _notebook(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=list(cells))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    return notebook


def _cell(source: str, *outputs: dict) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.from_dict(output) for output in outputs]
    return cell


def _display(markdown: str) -> dict:
    return {
        "output_type": "display_data",
        "data": {"text/markdown": markdown, "text/plain": markdown},
        "metadata": {},
    }


def _result(markdown: str) -> dict:
    return {**_display(markdown), "output_type": "execute_result", "execution_count": 1}


def _error(name: str, value: str) -> dict:
    return {"output_type": "error", "ename": name, "evalue": value, "traceback": []}


def _stderr(text: str) -> dict:
    return {"output_type": "stream", "name": "stderr", "text": text}


def _widget(plain: str) -> dict:
    view = {"version_major": 2, "version_minor": 0, "model_id": "0" * 32}
    data = {"application/vnd.jupyter.widget-view+json": view, "text/plain": plain}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def test_checker_accepts_real_replies() -> None:
    notebook = _notebook(
        _cell("%%qwen\nHi", _display("Hello! How can I help?")),
        _cell("%%qwen -o answer\nHi", _display("*reply stored in `answer`*"), _result("Hello!")),
        _cell("%qwen_panel", _widget("QwenPanel(...)")),
        _cell(
            "%%qwen -n 2\nHi",
            _display("**Sample 1 (joins the history)**\n\nHi!\n\n---\n\n**Sample 2**\n\nHello!"),
        ),
    )
    assert checker.problems(notebook) == []


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        (_cell("%%qwen\nHi"), "no Markdown reply"),
        (_cell("%%qwen\nHi", _display("")), "sample 1 of the reply is empty"),
        (_cell("%%qwen\nHi", _display("\n\n*✂ stopped at max_tokens*")), "is empty"),
        (_cell("%%qwen -o answer\nHi", _display("*reply stored*")), "no Markdown reply"),
        (
            _cell("%%qwen -n 2\nHi", _display("**Sample 1**\n\nHi!\n\n---\n\n**Sample 2**\n\n")),
            "sample 2 of the reply is empty",
        ),
        (_cell("1 / 0", _error("ZeroDivisionError", "division by zero")), "ZeroDivisionError"),
        (_cell("import vllm", _stderr("FutureWarning: deprecated\n")), "noise on stderr"),
        (_cell("%qwen_load", _widget("Loading shards: 0%")), "widget a saved notebook cannot"),
    ],
)
def test_checker_reports_errors_and_empty_replies(
    cell: nbformat.NotebookNode, expected: str
) -> None:
    found = checker.problems(_notebook(cell))
    assert len(found) >= 1
    assert expected in found[0]


TABLE = "| text | reply | tokens | finish_reason |\n|---|---|---|---|\n"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("| a | Bonjour &#124; salut | 3 | stop |\n| b | Merci | 2 | length |", None),
        ("| a | Bonjour | 3 | stop |\n| b |  | 0 | stop |", "row 2 of the table has an empty"),
        ("| a | Bonjour | 3 | stop |\n| b | Mer | 1 | interrupted |", "row 2 of the table was"),
        ("", "the table of replies has no rows"),
    ],
)
def test_checker_wants_a_reply_in_every_row_of_a_batch_table(
    rows: str, expected: str | None
) -> None:
    for line in ("%%qwen --each words -o table", "%%qwen --sweep temperature=0,1"):
        cell = _cell(f"{line}\nSay {{text}}", _display("*2 replies*"), _display(TABLE + rows))
        found = checker.problems(_notebook(cell))
        assert found == [] if expected is None else expected in found[0]
    no_table = _cell("%%qwen --each words\nSay {text}", _display("*2 replies*"))
    assert "no Markdown table of replies" in checker.problems(_notebook(no_table))[0]


def test_checker_wants_a_kernelspec_and_no_widget_state() -> None:
    notebook = _notebook(_cell("print(1)"))
    notebook.metadata.pop("kernelspec")
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    found = checker.problems(notebook)
    assert any("kernelspec" in problem for problem in found)
    assert any("widget state" in problem for problem in found)
    assert "widgets" not in checker.clean(notebook).metadata
