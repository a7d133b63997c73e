"""One prompt over many inputs, and sampling sweeps: what a batch is, before anything runs.

A batch is a list of *jobs*, each one message with its own sampling settings, sent together so
that vLLM schedules them side by side (:meth:`qwen_magic.chat.QwenChat.batch`). This module
builds the jobs and reads the results; it runs nothing.

Templates are deliberately plain, so that a prompt full of code or JSON means what it says:

- ``{name}``, where ``name`` is an identifier, is a field filled from each row;
- ``{{`` and ``}}`` are a literal ``{`` and ``}`` (as in ``str.format``);
- every other brace is literal text: ``{"a": 1}``, ``{x.y}``, ``{x[0]}``, ``{x!r}``, ``{ x }``.
  Nothing inside braces is ever evaluated or looked up, so ``{os.environ}`` stays those twelve
  characters;
- a field some row lacks is one ``ValueError`` naming the field and the row, raised before
  anything is sent.

Rows are a pandas DataFrame, a list of dicts, or a list of strings (which fill the template's one
field). A sweep (``{"temperature": [0, 0.7], "top_p": [0.8, 0.95]}``) runs every combination of
its values, each checked by :mod:`qwen_magic.sampling`'s table; rows and combinations multiply.

Pure Python: no vLLM, IPython, ipywidgets or network import (pandas only to build a table, and
only when it is installed).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen_magic.sampling import SAMPLING_SETTINGS, validate

if TYPE_CHECKING:
    from qwen_magic.chat import Reply

__all__ = [
    "BatchItem",
    "BatchResult",
    "Job",
    "Template",
    "expand_sweep",
    "label",
    "plan_jobs",
    "read_rows",
    "to_table",
]

# A field, or an escaped brace; anything else between braces is left as it is.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^\W\d]\w*)\}")


@dataclass(frozen=True)
class Template:
    """A prompt with ``{name}`` fields (see the module docstring for the rules).

    Attributes:
        text: The template as written.
        parts: Literal text (str) and field names (a 1-tuple), in order.
    """

    text: str
    parts: tuple[str | tuple[str], ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[str | tuple[str]] = []
        literal, position = [], 0
        for match in _TOKEN.finditer(text):
            literal.append(text[position : match.start()])
            position = match.end()
            if match.group(1) is None:
                literal.append(match.group(0)[0])  # "{{" -> "{", "}}" -> "}"
                continue
            parts.append("".join(literal))
            literal = []
            parts.append((match.group(1),))
        literal.append(text[position:])
        parts.append("".join(literal))
        return cls(text, tuple(part for part in parts if part != ""))

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names, each once, in order of first use."""
        return tuple(dict.fromkeys(part[0] for part in self.parts if isinstance(part, tuple)))

    def fill(self, values: Mapping[str, Any], *, row: str = "the row") -> str:
        """The message for one row; values are inserted as ``str(value)``, never re-parsed.

        Raises:
            ValueError: ``values`` lacks a field (the message names it and ``row``).
        """
        pieces = []
        for part in self.parts:
            if isinstance(part, str):
                pieces.append(part)
                continue
            name = part[0]
            if name not in values:
                have = ", ".join(map(str, values)) or "no fields"
                raise ValueError(
                    f"{row} has no field {name!r} for the template's {{{name}}} (it has: {have}):"
                    f" add it, or write {{{{{name}}}}} for a literal brace"
                )
            pieces.append(str(values[name]))
        return "".join(pieces)


def read_rows(rows: Any, template: Template) -> list[tuple[str, dict[str, Any]]]:
    """``(row name, fields)`` of each row: a DataFrame's, a list of dicts' or of strings'.

    A list of strings fills the template's one field. Row names (for messages) are the
    DataFrame's index labels, else positions counted from 0.

    Raises:
        TypeError: ``rows`` is none of those.
        ValueError: Strings for a template with no field or several fields.
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        records = rows.to_dict("records")
        return [
            (f"row {label!r}", {str(key): value for key, value in record.items()})
            for label, record in zip(rows.index, records, strict=True)
        ]
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise TypeError(
            f"rows must be a pandas DataFrame, a list of dicts or a list of strings, "
            f"not {type(rows).__name__}"
        )
    read: list[tuple[str, dict[str, Any]]] = []
    for position, row in enumerate(rows):
        name = f"row {position}"
        if isinstance(row, Mapping):
            read.append((name, {str(key): value for key, value in row.items()}))
        elif isinstance(row, str):
            if len(template.fields) != 1:
                have = ", ".join(template.fields) or "none"
                raise ValueError(
                    f"a list of strings fills one {{field}}, but the template has {have}: "
                    "pass a list of dicts or a DataFrame"
                )
            read.append((name, {template.fields[0]: row}))
        else:
            raise TypeError(
                f"{name} is a {type(row).__name__}: rows must all be dicts or all be strings"
            )
    return read


def expand_sweep(sweep: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of a sweep's values, in order (the last key varies fastest).

    Raises:
        TypeError: A key that is no sampling setting.
        ValueError: A value out of range, or a key with no values.
    """
    if not sweep:
        return [{}]
    unknown = [key for key in sweep if key not in SAMPLING_SETTINGS]
    if unknown:
        raise TypeError(
            f"cannot sweep {', '.join(map(repr, unknown))}: sweep one of "
            f"{', '.join(SAMPLING_SETTINGS)}"
        )
    columns: list[list[tuple[str, Any]]] = []
    for key, values in sweep.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            values = [values]
        if not values:
            raise ValueError(f"the sweep over {key} has no values: give at least one")
        columns.append([(key, validate({key: value})[key]) for value in values])
    return [dict(combination) for combination in itertools.product(*columns)]


def label(settings: Mapping[str, Any]) -> str:
    """``temperature=0.7, top_p=0.9``: a sweep combination in words."""
    return ", ".join(f"{key}={value}" for key, value in settings.items())


@dataclass(frozen=True)
class Job:
    """One message of a batch.

    Attributes:
        message: The filled-in message.
        fields: The row it came from (empty without rows).
        settings: Its sweep combination (empty without a sweep).
    """

    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def plan_jobs(
    prompts: str | Sequence[str],
    *,
    rows: Any = None,
    sweep: Mapping[str, Sequence[Any]] | None = None,
) -> list[Job]:
    """The jobs of a batch: each message (or each row's filled template) times each combination.

    Every row is filled and every sweep value checked here, so a mistake is raised before
    anything is sent.

    Args:
        prompts: A list of messages; or one message, which is a template when ``rows`` is given.
        rows: Fills the template (see :func:`read_rows`).
        sweep: Sampling setting -> values (see :func:`expand_sweep`).

    Raises:
        TypeError, ValueError: Wrong rows, a missing field, a bad sweep.
    """
    combinations = expand_sweep(sweep)
    if rows is not None:
        if not isinstance(prompts, str):
            raise TypeError("rows fill one template: pass the template as a string")
        template = Template.parse(prompts)
        inputs = [
            (template.fill(values, row=name), values) for name, values in read_rows(rows, template)
        ]
    elif isinstance(prompts, str):
        inputs = [(prompts, {})]
    else:
        inputs = []
        for position, message in enumerate(prompts):
            if not isinstance(message, str):
                raise TypeError(
                    f"prompt {position} is a {type(message).__name__}: prompts must be strings"
                    " (for a template and its rows, pass rows=)"
                )
            inputs.append((message, {}))
    return [
        Job(message, dict(values), dict(settings))
        for message, values in inputs
        for settings in combinations
    ]


@dataclass
class BatchItem:
    """One job and its reply (interrupted and empty when the batch stopped before it ended)."""

    job: Job
    reply: Reply

    @property
    def finished(self) -> bool:
        return not self.reply.interrupted


@dataclass
class BatchResult:
    """The replies of a batch, in input order; iterating yields the :class:`Reply` objects.

    Attributes:
        items: Each job with its reply.
        interrupted: The batch was stopped before every reply ended.
        elapsed_s: Wall time of the whole batch.
    """

    items: list[BatchItem]
    interrupted: bool = False
    elapsed_s: float = 0.0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Reply]:
        return (item.reply for item in self.items)

    def __getitem__(self, index: int) -> Reply:
        return self.items[index].reply

    def __repr__(self) -> str:
        state = f", {self.unfinished} unfinished" if self.interrupted else ""
        return f"<BatchResult: {len(self)} replies in {self.elapsed_s:.2f} s{state}>"

    @property
    def replies(self) -> list[Reply]:
        return [item.reply for item in self.items]

    @property
    def texts(self) -> list[str]:
        """Each reply's answer (sample 1)."""
        return [item.reply.text for item in self.items]

    @property
    def unfinished(self) -> int:
        return sum(not item.finished for item in self.items)

    @property
    def num_generated_tokens(self) -> int:
        return sum(item.reply.num_generated_tokens for item in self.items)

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One dict per reply: its row's fields, its sweep settings, then the reply's facts."""
        table = []
        for item in self.items:
            reply = item.reply
            reason = reply.finish_reasons[0] if reply.finish_reasons else None
            row: dict[str, Any] = {**item.job.fields, **item.job.settings}
            if not item.job.fields:
                row = {"message": item.job.message, **row}
            row["reply"] = reply.text
            if reply.reasoning is not None:
                row["reasoning"] = reply.reasoning
            row["tokens"] = reply.num_generated_tokens
            row["finish_reason"] = "interrupted" if reply.interrupted else reason
            table.append(row)
        return table

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame (raises ImportError without pandas)."""
        import pandas

        return pandas.DataFrame(self.rows())

    def table(self) -> Any:
        """The table: a pandas DataFrame when pandas is installed, else a list of dicts."""
        return to_table(self.rows())


def to_table(rows: list[dict[str, Any]]) -> Any:
    """A pandas DataFrame of ``rows`` when pandas is installed, else ``rows`` as they are."""
    try:
        import pandas
    except ImportError:
        return rows
    return pandas.DataFrame(rows)
