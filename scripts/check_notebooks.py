"""Execute the example notebooks headless, check their outputs and save the executed copies.

A notebook passes when no cell produced an error and every ``%%qwen`` cell produced a non-empty
Markdown reply (each sample, for ``-n``; each row of the table, for ``--each`` / ``--sweep``),
with nothing on stderr and no widget but the panel: the saved copies are what readers see on
GitHub. They keep every output but drop the widget state
that nbclient records and GitHub's renderer cannot show.

    python scripts/check_notebooks.py               # copies -> example_notebooks/executed/
    python scripts/check_notebooks.py --in-place    # refresh the committed notebooks' outputs
    python scripts/check_notebooks.py --no-execute  # only check the outputs already saved

``tests/test_notebooks.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "example_notebooks"
DEFAULT_OUTPUT_DIR = NOTEBOOK_DIR / "executed"
CELL_TIMEOUT_S = 900
MARKS = ("*✂ stopped at max_tokens*", "*⏹ interrupted*")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SAMPLE_TITLE = re.compile(r"^\*\*Sample \d+(?: \(joins the history\))?\*\*$", re.MULTILINE)


def example_notebooks() -> list[Path]:
    """The notebooks under example_notebooks/, in order."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def execute(path: Path, *, cwd: Path, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in a fresh python3 kernel started in ``cwd``.

    An error does not stop the run, so :func:`problems` can report every failing cell.
    """
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        allow_errors=True,
        record_timing=False,
    )
    client.execute()
    return notebook


def clean(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop widget state (GitHub cannot render it); outputs stay as they are."""
    notebook.metadata.pop("widgets", None)
    return notebook


def _markdown_outputs(cell: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(output type, Markdown text) of each display_data / execute_result with Markdown."""
    found = []
    for output in cell.get("outputs", []):
        if output.output_type in ("display_data", "execute_result"):
            markdown = output.get("data", {}).get("text/markdown")
            if markdown is not None:
                found.append((output.output_type, "".join(markdown)))
    return found


def _reply_samples(markdown: str) -> list[str]:
    """The sample texts of a rendered reply, without titles, separators and marks."""
    chunks = SAMPLE_TITLE.split(markdown)[1:] if SAMPLE_TITLE.search(markdown) else [markdown]
    samples = []
    for chunk in chunks:
        text = chunk.strip()
        if text.endswith("---"):  # the separator before the next sample
            text = text[:-3].strip()
        for mark in MARKS:
            text = text.replace(mark, "")
        samples.append(text.strip())
    return samples


def _batch_rows(markdown: str) -> list[dict[str, str]] | None:
    """The rows of a batch cell's Markdown table (column -> cell), or None if it has none.

    Cells never hold a raw ``|`` (the renderer escapes it), so splitting on it is exact.
    """
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")]

    header = cells(lines[0])
    if "reply" not in header or "finish_reason" not in header:
        return None
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def _batch_problems(where: str, cell: nbformat.NotebookNode) -> list[str]:
    """A ``--each`` / ``--sweep`` cell: a table with a non-empty, finished reply in every row."""
    tables = [
        rows
        for output_type, text in _markdown_outputs(cell)
        if output_type == "display_data" and (rows := _batch_rows(text)) is not None
    ]
    if not tables:
        return [f"{where}: no Markdown table of replies (display_data)"]
    if not tables[-1]:
        return [f"{where}: the table of replies has no rows"]
    found = []
    for number, row in enumerate(tables[-1], start=1):
        if not row["reply"]:
            found.append(f"{where}: row {number} of the table has an empty reply")
        if row["finish_reason"] == "interrupted":
            found.append(f"{where}: row {number} of the table was interrupted")
    return found


def _option_given(line: str, *names: str) -> bool:
    return any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for name in names)


def problems(notebook: nbformat.NotebookNode) -> list[str]:
    """What is wrong with an executed notebook.

    Errors, ``%%qwen`` cells without a non-empty Markdown reply, stray widgets (progress bars) or
    stderr noise that a saved copy would show, a missing kernelspec, widget state.
    """
    found = []
    if notebook.metadata.get("kernelspec", {}).get("name") != "python3":
        found.append("metadata.kernelspec is not python3")
    if "widgets" in notebook.metadata:
        found.append("metadata.widgets holds widget state GitHub cannot render")
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        where = f"cell {number} ({cell.source.splitlines()[0] if cell.source else 'empty'})"
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                found.append(f"{where}: {output.ename}: {output.evalue}")
            elif output.output_type == "stream" and output.name == "stderr":
                first = output.text.strip().splitlines()[0] if output.text.strip() else ""
                found.append(f"{where}: noise on stderr: {first[:120]}")
            elif WIDGET_VIEW in output.get("data", {}) and "%qwen_panel" not in cell.source:
                shown = output.data.get("text/plain", "")[:80]
                found.append(f"{where}: a widget a saved notebook cannot show: {shown}")
        if cell.execution_count is None:
            found.append(f"{where}: not executed")
            continue
        first_line = cell.source.lstrip().splitlines()[0] if cell.source.strip() else ""
        if not first_line.startswith("%%qwen"):
            continue
        if _option_given(first_line, "--each") or re.search(r"(^|\s)--sweep(\s|=)", first_line):
            found += _batch_problems(where, cell)
            continue
        kind = "execute_result" if _option_given(first_line, "-o", "--output") else "display_data"
        replies = [text for output_type, text in _markdown_outputs(cell) if output_type == kind]
        if not replies:
            found.append(f"{where}: no Markdown reply ({kind})")
            continue
        for sample_number, sample in enumerate(_reply_samples(replies[-1]), start=1):
            if not sample:
                found.append(f"{where}: sample {sample_number} of the reply is empty")
    return found


def run(
    paths: Iterable[Path], *, output_dir: Path | None, in_place: bool, execute_cells: bool
) -> int:
    """Execute (optionally), check and save each notebook; return the number that failed."""
    failed = 0
    for path in paths:
        started = time.perf_counter()
        if not execute_cells:
            notebook = nbformat.read(path, as_version=4)
        elif in_place:
            with tempfile.TemporaryDirectory(prefix="qwen-magic-notebook-") as scratch:
                notebook = clean(execute(path, cwd=Path(scratch)))
        else:
            assert output_dir is not None
            output_dir.mkdir(parents=True, exist_ok=True)
            notebook = clean(execute(path, cwd=output_dir))
        elapsed = time.perf_counter() - started
        found = problems(notebook)
        if execute_cells:
            target = path if in_place else output_dir / path.name  # type: ignore[operator]
            nbformat.write(notebook, target)
            print(f"== {path.name}: {elapsed:.0f} s -> {target}", flush=True)
        else:
            print(f"== {path.name}: checked", flush=True)
        for problem in found:
            print(f"   FAIL {problem}", flush=True)
        failed += bool(found)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: example_notebooks/*")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help="where executed copies go (also the kernels' working directory)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--in-place", action="store_true", help="save over the notebooks (to commit outputs)"
    )
    where.add_argument(
        "--no-execute", action="store_true", help="only check the outputs already saved"
    )
    args = parser.parse_args(argv)
    paths = args.notebooks or example_notebooks()
    if not paths:
        print("== no notebooks to run")
        return 0
    failed = run(
        paths,
        output_dir=None if args.in_place else args.output_dir,
        in_place=args.in_place,
        execute_cells=not args.no_execute,
    )
    if failed:
        print(f"== {failed} of {len(paths)} notebook(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
