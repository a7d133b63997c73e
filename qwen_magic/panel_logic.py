"""What the ``%qwen_panel`` shows, decided without widgets: control ranges, labels and meters.

Every sampling control stands for one ``QwenMagics`` config trait whose value may be ``None``
("use the model's default"). A slider cannot show "nothing", so the panel pairs each control with
a "default" checkbox:

- while the trait is ``None`` the box is ticked and the control *displays* the model's default
  (or vLLM's neutral value when the model states none); nothing is sent for it;
- moving the control sets the trait to the chosen value and unticks the box; from then on that
  value is sent;
- ticking the box again sets the trait back to ``None``.

So a value reaches the engine only once the user chose it. This module never imports ipywidgets
(nor vLLM), so all of the above is testable as plain functions.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CONTROL_SPECS",
    "ControlSpec",
    "budget_fraction",
    "control_spec",
    "displayed_value",
    "format_budget",
    "max_tokens_limit",
    "model_status",
    "system_from_text",
    "text_from_system",
]

DEFAULT_MAX_TOKENS_LIMIT = 4096  # the max_tokens slider's range before a model is loaded


@dataclass(frozen=True)
class ControlSpec:
    """One sampling control: its trait, how it is drawn and what "unset" looks like.

    Attributes:
        name: The ``QwenMagics`` trait (and SamplingParams field) it sets.
        label: Short text beside the control.
        kind: ``"float"`` for a FloatSlider, ``"int"`` for an IntSlider, ``"seed"`` for a box.
        minimum: Lowest value the control offers.
        maximum: Highest value the control offers (max_tokens' is replaced by the context length).
        step: Slider step.
        neutral: vLLM's own default, shown while unset when the model states no default.
        help: Tooltip.
    """

    name: str
    label: str
    kind: Literal["float", "int", "seed"]
    minimum: float
    maximum: float
    step: float
    neutral: float
    help: str


CONTROL_SPECS: tuple[ControlSpec, ...] = (
    ControlSpec("temperature", "temperature", "float", 0.0, 2.0, 0.05, 1.0,
                "Randomness; 0 always picks the likeliest token."),
    ControlSpec("top_p", "top_p", "float", 0.01, 1.0, 0.01, 1.0,
                "Sample from the smallest set of tokens whose probabilities add up to this."),
    ControlSpec("top_k", "top_k", "int", 0, 200, 1, 0,
                "Sample from the k likeliest tokens; 0 means no limit."),
    ControlSpec("min_p", "min_p", "float", 0.0, 1.0, 0.01, 0.0,
                "Drop tokens less likely than this fraction of the likeliest one."),
    ControlSpec("max_tokens", "max_tokens", "int", 1, DEFAULT_MAX_TOKENS_LIMIT, 1, 512,
                "Most tokens in one reply."),
    ControlSpec("repetition_penalty", "repetition", "float", 1.0, 2.0, 0.01, 1.0,
                "Penalise tokens already in the prompt or reply (1 = off)."),
    ControlSpec("presence_penalty", "presence", "float", -2.0, 2.0, 0.05, 0.0,
                "Penalise tokens that already appeared in the reply (0 = off)."),
    ControlSpec("frequency_penalty", "frequency", "float", -2.0, 2.0, 0.05, 0.0,
                "Penalise tokens by how often they appeared in the reply (0 = off)."),
    ControlSpec("seed", "seed", "seed", 0, 2**31 - 1, 1, 0,
                "Fix the random seed so a reply can be reproduced; default means unseeded."),
)  # fmt: skip


def control_spec(name: str) -> ControlSpec:
    """Return the spec of the control for trait ``name``."""
    for spec in CONTROL_SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no panel control for {name!r}")


def max_tokens_limit(max_model_len: int | None) -> int:
    """The max_tokens slider's upper end: the context length once a model is loaded."""
    return max_model_len if max_model_len and max_model_len > 0 else DEFAULT_MAX_TOKENS_LIMIT


def displayed_value(
    spec: ControlSpec,
    value: float | None,
    model_defaults: Mapping[str, Any] | None = None,
    *,
    maximum: float | None = None,
) -> float:
    """What a control shows for trait value ``value``.

    A set value is shown as it is (clamped into the control's range, which is what a slider
    does anyway); ``None`` shows the model's default, else vLLM's neutral value.
    """
    if value is None:
        default = (model_defaults or {}).get(spec.name)
        value = spec.neutral if default is None else default
    upper = spec.maximum if maximum is None else maximum
    clamped = min(max(value, spec.minimum), upper)
    return int(clamped) if spec.kind != "float" else float(clamped)


def text_from_system(system: str | None) -> str:
    """The system-prompt box shows ``None`` (the template's default) as empty."""
    return "" if system is None else system


def system_from_text(text: str) -> str | None:
    """An empty (or blank) box means the template's default system prompt, i.e. ``None``."""
    return text if text.strip() else None


def budget_fraction(used: int, budget: int) -> float:
    """Share of the budget in use, clamped to [0, 1] for a progress bar."""
    if budget <= 0:
        return 0.0
    return min(max(used / budget, 0.0), 1.0)


def format_budget(used: int | None, budget: int | None) -> str:
    """``"1,234 / 32,768 tokens (4%)"``; says why when nothing can be counted yet."""
    if used is None:
        return "history tokens: counted once a model is loaded"
    if not budget:
        return f"{used:,} tokens"
    return f"{used:,} / {budget:,} tokens ({budget_fraction(used, budget):.0%})"


def model_status(
    model: str | None, *, max_model_len: int | None = None, device: str | None = None
) -> str:
    """One line of HTML: which model serves replies, or how to load one."""
    if not model:
        return "<b>No model loaded</b> &mdash; run <code>%qwen_load</code> first."
    details = []
    if max_model_len:
        details.append(f"context {max_model_len:,} tokens")
    if device:
        details.append(html.escape(str(device)))
    suffix = f" ({', '.join(details)})" if details else ""
    return f"<b>Model:</b> <code>{html.escape(str(model))}</code>{suffix}"
