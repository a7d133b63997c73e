"""``%%qwen --each VAR`` and ``%%qwen --sweep KEY=V1,V2``: one cell, many replies, one table.

- ``--each VAR`` runs the cell as a template over the rows of ``VAR`` in the notebook (a pandas
  DataFrame, a list of dicts, or a list of strings for a template with one field): ``{name}``
  is a field, every other brace is literal (:mod:`qwen_magic.batch`).
- ``--sweep temperature=0,0.7,1.0`` (repeatable) runs the cell once per combination of the
  values; the settings are checked against the sampling table.
- Both together run every row under every combination, all as one batch.

The replies show as one table (the row's fields, the settings, the reply, tokens, finish
reason) under a progress bar that becomes a summary line; ``-o NAME`` stores the table as a
pandas DataFrame (a list of dicts without pandas). The turns stay out of the conversation unless
``--record`` is given (a re-run then replaces them, and one ``%qwen undo`` takes them back); the
conversation's system prompt and history are sent as for any cell (``--no-history``: none).
Ctrl-C aborts every request, shows the finished replies and marks the rest.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

from IPython.core.error import UsageError
from IPython.display import DisplayHandle

from qwen_magic import render
from qwen_magic.backends.base import forget_exception
from qwen_magic.batch import BatchResult, expand_sweep, plan_jobs
from qwen_magic.jupyter import output
from qwen_magic.sampling import SAMPLING_SETTINGS, setting

# Flags of a one-reply cell that a batch cell cannot honour, and why.
_NOT_FOR_BATCH = (
    ("raw", "--raw"),
    ("new", "--new"),
    ("thinking_budget", "--thinking-budget"),
    ("show_prompt", "--show-prompt"),
    ("show_thinking", "--show-thinking"),
)


def wants_batch(args: Namespace) -> bool:
    """Whether the cell is a batch (``--each`` or ``--sweep``)."""
    return bool(args.each or args.sweep)


def parse_sweeps(specs: list[str]) -> dict[str, list[Any]]:
    """``["temperature=0,0.7", "top_p=0.9"]`` -> ``{"temperature": [0.0, 0.7], "top_p": [0.9]}``.

    Raises:
        UsageError: A malformed spec, a key that is no sampling setting, a value out of range.
    """
    sweep: dict[str, list[Any]] = {}
    for spec in specs:
        key, equals, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not values.strip():
            raise UsageError(f"--sweep {spec!r}: write KEY=VALUE,VALUE (e.g. temperature=0,0.7)")
        if key not in SAMPLING_SETTINGS:
            raise UsageError(
                f"--sweep cannot vary {key!r}: sweep one of {', '.join(SAMPLING_SETTINGS)}"
            )
        if key in sweep:
            raise UsageError(f"--sweep {key} is given twice: list all its values in one flag")
        kind = setting(key).python_type
        try:
            sweep[key] = [kind(value.strip()) for value in values.split(",")]
        except ValueError:
            raise UsageError(
                f"--sweep {spec!r}: {key} takes {setting(key).allowed} values, separated by commas"
            ) from None
    try:
        expand_sweep(sweep)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--sweep: {error}") from None
    return sweep


def _rows(shell: Any, name: str) -> Any:
    if name not in shell.user_ns:
        raise UsageError(
            f"--each {name}: no variable {name!r} in the notebook; define it first (a DataFrame, "
            "a list of dicts, or a list of strings)"
        )
    return shell.user_ns[name]


def _check(args: Namespace) -> None:
    given = [flag for name, flag in _NOT_FOR_BATCH if getattr(args, name)]
    if args.n != 1:
        given.append("-n")
    if given:
        raise UsageError(
            f"{', '.join(given)} applies to a single reply: drop it for --each / --sweep "
            "(sweep seed=1,2,3 for several samples)"
        )
    if args.think and args.no_think:
        raise UsageError("--think and --no-think contradict each other: pick one")


class _Progress:
    """A progress bar while the batch runs, replaced by the summary line when it ends.

    In a notebook it is tqdm's widget bar inside an output this class owns, so that the saved
    notebook keeps the summary and no widget; in a terminal, tqdm's text bar on stderr.
    """

    def __init__(self, total: int, *, notebook: bool) -> None:
        self.handle: DisplayHandle | None = None
        if notebook:
            from tqdm.notebook import tqdm

            self.bar = tqdm(total=total, desc="qwen batch", unit="reply", display=False)
            self.handle = DisplayHandle()
            self.handle.display(self.bar.container)
        else:
            from tqdm.std import tqdm

            self.bar = tqdm(
                total=total, desc="qwen batch", unit="reply", file=sys.stderr, leave=False
            )

    def on_reply(self, index: int, reply: Any) -> None:
        self.bar.update(1)

    def finish(self, summary: str) -> None:
        self.bar.close()
        if self.handle is not None:
            self.handle.update(render.mime_bundle(f"*{summary}*", plain=summary), raw=True)
        else:
            print(summary)


def run(magics: Any, args: Namespace, cell: str) -> None:
    """Run a ``--each`` / ``--sweep`` cell and show its table (see the module docstring)."""
    _check(args)
    template = cell.strip("\n")
    if not template.strip():
        raise UsageError(render.EMPTY_MESSAGE)
    sweep = parse_sweeps(args.sweep or [])
    sampling = magics._sampling(args)
    session = magics.session
    if session.bot is None:
        raise UsageError(render.NO_MODEL)
    rows = _rows(magics.shell, args.each) if args.each else None
    if rows is not None and not hasattr(rows, "__len__"):
        rows = list(rows)  # read once (a generator), here and for the batch
    try:  # a missing field is one line, and no progress bar shows for it
        total = len(plan_jobs(template, rows=rows, sweep=sweep))
    except (TypeError, ValueError) as error:
        raise UsageError(f"--each {args.each}: {error}" if args.each else str(error)) from None
    if not total:
        raise UsageError(f"--each {args.each}: it has no rows, so there is nothing to ask")
    progress = _Progress(total, notebook=magics.notebook)
    try:
        result = session.batch(
            args.chat,
            template,
            rows=rows,
            sweep=sweep or None,
            system=args.system,
            use_history=not args.no_history,
            record=args.record,
            key=magics._cell_key() if args.record else None,
            enable_thinking=True if args.think else False if args.no_think else None,
            on_reply=progress.on_reply,
            **sampling,
        )
    except KeyboardInterrupt as interrupt:
        partial: BatchResult | None = getattr(interrupt, "result", None)
        forget_exception(interrupt)
        if partial is not None:
            _show(magics, args, partial, progress)
        else:
            progress.finish(render.INTERRUPTED)
        stopped = KeyboardInterrupt(
            "batch interrupted: the finished replies are shown, the others marked interrupted"
        )
        stopped.result = partial  # type: ignore[attr-defined]
        raise stopped from None
    except Exception as error:
        progress.finish("❌ batch failed")
        raise magics._usage_error(error) from None
    _show(magics, args, result, progress)


def _show(magics: Any, args: Namespace, result: BatchResult, progress: _Progress) -> None:
    summary = render.batch_summary(
        len(result),
        result.elapsed_s,
        result.num_generated_tokens,
        unfinished=result.unfinished,
    )
    progress.finish(summary)
    rows = result.rows()
    output.show(render.render_batch_table(rows))
    if args.output:
        magics.shell.user_ns[args.output] = result.table()
