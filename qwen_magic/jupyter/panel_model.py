"""What the ``%qwen_panel`` shows, decided without widgets: control ranges, labels and meters.

Every sampling control stands for one sampling default of the session (a ``QwenMagics`` config
trait too) whose value may be ``None``
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
from typing import Any

from qwen_magic.sampling import SETTINGS, SamplingSetting, setting

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


# The panel's controls are the rows of the one sampling table (their ranges, steps, labels).
ControlSpec = SamplingSetting
CONTROL_SPECS: tuple[SamplingSetting, ...] = SETTINGS


def control_spec(name: str) -> SamplingSetting:
    """Return the spec of the control for trait ``name``."""
    return setting(name)


def max_tokens_limit(max_model_len: int | None, min_prompt_tokens: int = 0) -> int:
    """The max_tokens slider's upper end: what the context leaves beside the smallest prompt.

    ``min_prompt_tokens`` is the prompt of an empty conversation (system prompt and reply
    prompt), so every value the slider offers leaves room for at least that.
    """
    if not max_model_len or max_model_len <= 0:
        return DEFAULT_MAX_TOKENS_LIMIT
    return max(1, max_model_len - min_prompt_tokens - 1)


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
    model: str | None,
    *,
    max_model_len: int | None = None,
    device: str | None = None,
    version: str | None = None,
) -> str:
    """One line of HTML: which model serves replies (where, which vLLM), or how to load one."""
    if not model:
        return "<b>No model loaded</b> &mdash; run <code>%qwen_load</code> first."
    details = []
    if max_model_len:
        details.append(f"context {max_model_len:,} tokens")
    if device:
        details.append(html.escape(str(device)))
    if version:
        details.append(html.escape(str(version)))
    suffix = f" ({', '.join(details)})" if details else ""
    return f"<b>Model:</b> <code>{html.escape(str(model))}</code>{suffix}"
