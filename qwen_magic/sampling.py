"""The ONE table of sampling settings, and the default ``max_tokens`` policy.

Every tunable setting is described once, in :data:`SETTINGS`. From that table come:

- :func:`validate`, the check that the engine, ``%config``, the ``%%qwen`` flags and the panel all
  apply (so they can never disagree);
- the ``%%qwen`` flags (``qwen_magic.jupyter.magics``), the config traits (:func:`config_traits`)
  and the panel's controls (``qwen_magic.jupyter.panel_model``).

The default ``max_tokens`` (:func:`default_max_tokens`) is one documented policy that every
front-end shares: 512 tokens, but never more than a quarter of the context, so a model loaded
with a small ``--max-model-len`` still leaves room for a prompt and its history. A reply that will
think (a Qwen3-family model with thinking on) gets 8192 tokens, at most half the context: its
reasoning alone often runs to thousands of tokens (Qwen suggests up to 32,768 for hard problems;
set ``max_tokens`` or a thinking budget for those).

Pure Python (traitlets only): no vLLM, IPython or ipywidgets import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from traitlets import Float, Int, TraitType

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "GENERATION_DEFAULT_KEYS",
    "SAMPLING_KEYS",
    "SAMPLING_SETTINGS",
    "SETTINGS",
    "THINKING_MAX_TOKENS",
    "SamplingSetting",
    "config_traits",
    "default_max_tokens",
    "resolve",
    "setting",
    "validate",
]

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_SHARE_OF_CONTEXT = 4  # the default reply takes at most 1/4 of the context
THINKING_MAX_TOKENS = 8192
THINKING_SHARE_OF_CONTEXT = 2  # a thinking reply takes at most 1/2 of the context


@dataclass(frozen=True)
class SamplingSetting:
    """One sampling setting: how it is checked, offered as a flag, a trait and a control.

    Attributes:
        name: The ``SamplingParams`` field, trait and keyword name.
        kind: ``"float"``, ``"int"`` or ``"seed"`` (a whole number shown in a text box).
        check: True for an allowed value.
        allowed: The allowed range, in words, for error messages and help.
        help: One line for ``%%qwen?``, ``%config`` and the panel's tooltip.
        short_flag: A one-letter flag besides ``--name-with-dashes`` (``-t``), or "".
        label: The panel's label.
        minimum: The lowest value the panel's control offers.
        maximum: The highest value the panel's control offers (max_tokens': see the panel).
        step: The panel's step.
        neutral: vLLM's own default, shown while unset when the model states none.
    """

    name: str
    kind: Literal["float", "int", "seed"]
    check: Callable[[float], bool]
    allowed: str
    help: str
    short_flag: str
    label: str
    minimum: float
    maximum: float
    step: float
    neutral: float

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def python_type(self) -> type:
        return float if self.kind == "float" else int


SETTINGS: tuple[SamplingSetting, ...] = (
    SamplingSetting("temperature", "float", lambda v: v >= 0, ">= 0",
                    "Randomness; 0 always picks the likeliest token.", "-t",
                    "temperature", 0.0, 2.0, 0.05, 1.0),
    SamplingSetting("top_p", "float", lambda v: 0 < v <= 1, "in (0, 1]",
                    "Sample from the smallest set of tokens whose probabilities add up to this.",
                    "", "top_p", 0.01, 1.0, 0.01, 1.0),
    SamplingSetting("top_k", "int", lambda v: v == -1 or v >= 0,
                    "-1, 0 (off) or a positive count",
                    "Sample from the k likeliest tokens; 0 means no limit.", "",
                    "top_k", 0, 200, 1, 0),
    SamplingSetting("min_p", "float", lambda v: 0 <= v <= 1, "in [0, 1]",
                    "Drop tokens less likely than this fraction of the likeliest one.", "",
                    "min_p", 0.0, 1.0, 0.01, 0.0),
    SamplingSetting("max_tokens", "int", lambda v: v >= 1, "a whole number >= 1",
                    "Most tokens in one reply (default: 512, at most a quarter of the context).",
                    "", "max_tokens", 1, 4096, 1, DEFAULT_MAX_TOKENS),
    SamplingSetting("repetition_penalty", "float", lambda v: v > 0, "> 0",
                    "Penalise tokens already in the prompt or reply (1 = off).", "",
                    "repetition", 1.0, 2.0, 0.01, 1.0),
    SamplingSetting("presence_penalty", "float", lambda v: -2 <= v <= 2, "in [-2, 2]",
                    "Penalise tokens that already appeared in the reply (0 = off).", "",
                    "presence", -2.0, 2.0, 0.05, 0.0),
    SamplingSetting("frequency_penalty", "float", lambda v: -2 <= v <= 2, "in [-2, 2]",
                    "Penalise tokens by how often they appeared in the reply (0 = off).", "",
                    "frequency", -2.0, 2.0, 0.05, 0.0),
    SamplingSetting("seed", "seed", lambda v: 0 <= v < 2**63, "a whole number >= 0",
                    "Fix the random seed so a reply can be reproduced; unset means unseeded.", "",
                    "seed", 0, 2**31 - 1, 1, 0),
)  # fmt: skip

# The settings a user tunes (each has a flag, a trait and a panel control) ...
SAMPLING_SETTINGS: tuple[str, ...] = tuple(item.name for item in SETTINGS)
# ... and the keywords a request takes besides them.
SAMPLING_KEYS: tuple[str, ...] = (*SAMPLING_SETTINGS, "stop", "ignore_eos")
# What a model's generation_config.json may set (and the engine then fills in).
GENERATION_DEFAULT_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def setting(name: str) -> SamplingSetting:
    """The table row for ``name``."""
    for item in SETTINGS:
        if item.name == name:
            return item
    raise KeyError(f"no sampling setting {name!r}")


def _check_number(item: SamplingSetting, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{item.name} must be {item.allowed}, got {value!r}")
    if not math.isfinite(value) or not item.check(value):
        raise ValueError(f"{item.name} must be {item.allowed}, got {value!r}")
    if item.kind != "float":
        if int(value) != value:
            raise ValueError(f"{item.name} must be a whole number, got {value!r}")
        return int(value)
    return value


def validate(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Check sampling keywords; return those that are not None, normalised.

    Raises:
        TypeError: An unknown keyword (named in the message).
        ValueError: A value out of range (one line saying the allowed range).
    """
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(
            f"unknown sampling option {', '.join(map(repr, unknown))}: "
            f"use {', '.join(SAMPLING_KEYS)} or n"
        )
    given = {key: value for key, value in sampling.items() if value is not None}
    for item in SETTINGS:
        if item.name in given:
            given[item.name] = _check_number(item, given[item.name])
    if not isinstance(given.get("ignore_eos", False), bool):
        raise ValueError(f"ignore_eos must be True or False, got {given['ignore_eos']!r}")
    if "stop" in given:
        stop = given["stop"]
        entries = [stop] if isinstance(stop, str) else stop
        if not isinstance(entries, (list, tuple)) or not all(
            isinstance(entry, str) and entry for entry in entries
        ):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        given["stop"] = list(entries)
    return given


def default_max_tokens(max_model_len: int, *, thinking: bool = False) -> int:
    """The reply length used when the user sets none: 512, at most a quarter of the context;
    with ``thinking`` (the reply will reason first), 8192, at most half the context.

    The prompt is fitted into ``max_model_len - max_tokens``, so this keeps three quarters (half,
    when thinking) of a small context for the system prompt, the history and the message.
    """
    if thinking:
        return max(1, min(THINKING_MAX_TOKENS, max_model_len // THINKING_SHARE_OF_CONTEXT))
    return max(1, min(DEFAULT_MAX_TOKENS, max_model_len // MAX_TOKENS_SHARE_OF_CONTEXT))


def resolve(
    given: Mapping[str, Any],
    *,
    model_defaults: Mapping[str, Any],
    max_model_len: int,
    room: int,
    explicit: bool = False,
) -> dict[str, Any]:
    """The values a request sends: ``given`` (already validated) over the model's defaults.

    ``max_tokens`` is the given one or :func:`default_max_tokens`, capped to ``room`` (what the
    context leaves after the prompt). With ``explicit``, every setting a model may default is
    sent, vLLM's neutral value where the model states none (a server would otherwise apply its
    own defaults).
    """
    resolved = {key: setting(key).neutral for key in GENERATION_DEFAULT_KEYS} if explicit else {}
    resolved.update(model_defaults)
    resolved.update(given)
    resolved["max_tokens"] = min(given.get("max_tokens", default_max_tokens(max_model_len)), room)
    return resolved


def config_traits() -> dict[str, TraitType]:
    """One ``allow_none`` config trait per setting (None: the model's default), with help."""
    traits: dict[str, TraitType] = {}
    for item in SETTINGS:
        trait_class = Float if item.kind == "float" else Int
        traits[item.name] = trait_class(None, allow_none=True, help=item.help).tag(config=True)
    return traits
