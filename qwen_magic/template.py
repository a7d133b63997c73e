"""How a model's chat template differs from bare ChatML, found by rendering it.

:class:`TemplateProfile` renders probe conversations through the template (with jinja2 here, or
on a vLLM server through ``/tokenize``) and reads off its conventions: the default system
prompt, what the generation prompt holds of a think block with the thinking switch absent, on
and off, and which past turns keep their reasoning. A leaf module: it imports nothing of this
package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
THINK_START = "<think>"
THINK_END = "</think>"

# What a generation prompt holds of a think block: nothing, an opened one, a whole (empty) one.
PromptBlock = Literal["none", "open", "closed"]

_PROBE = "\x00probe\x00"
_PROBE_REASONING = "probe reasoning"
_PROBE_ANSWER = "probe answer"


@dataclass(frozen=True)
class TemplateProfile:
    """How a model's chat template differs from bare ChatML, found by rendering it.

    Attributes:
        default_system: System prompt the template inserts when none is given (Qwen2.5's
            "You are Qwen, ..."); None when it inserts none (Qwen3).
        generation_suffix: Text after ``<|im_start|>assistant\\n`` when enable_thinking is not
            given: "" for Qwen3; ``<think>\\n`` where the template opens the think block itself
            (Qwen3-Thinking-2507, Qwen3.5).
        thinking_on_suffix: The same with enable_thinking=True.
        thinking_off_suffix: The same with enable_thinking=False (Qwen3: an empty think block).
        strips_past_thinking: Whether a past reply whose *text* holds a ``<think>`` block loses
            it before the last user message (the template splits the text on ``</think>``).
        keeps_reasoning: Whether reasoning given apart from the answer (``reasoning_content``)
            is sent again for turns before the last user message (templates that preserve
            thinking); Qwen3 drops it.
        keeps_reasoning_after_last_user: The same for assistant turns after the last user
            message (Qwen3 keeps it there: a tool loop, or a trailing assistant message).
        reasoning_open: What the template writes before re-sent reasoning.
        reasoning_close: What it writes between the reasoning and the answer.
    """

    default_system: str | None = None
    generation_suffix: str = ""
    thinking_on_suffix: str = ""
    thinking_off_suffix: str = ""
    strips_past_thinking: bool = False
    keeps_reasoning: bool = False
    keeps_reasoning_after_last_user: bool = False
    reasoning_open: str = f"{THINK_START}\n"
    reasoning_close: str = f"\n{THINK_END}\n\n"

    @property
    def has_thinking_switch(self) -> bool:
        """Whether enable_thinking changes the prompt (Qwen3, Qwen3.5; not Qwen2.5 or -2507)."""
        return self.thinking_on_suffix != self.thinking_off_suffix

    @property
    def thinking_suffix(self) -> str:
        """The enable_thinking=False suffix (the name this profile used before it had three)."""
        return self.thinking_off_suffix

    def suffix(self, enable_thinking: bool | None = None) -> str:
        """What the generation prompt adds after ``<|im_start|>assistant\\n``."""
        if enable_thinking is None:
            return self.generation_suffix
        return self.thinking_on_suffix if enable_thinking else self.thinking_off_suffix

    def prompt_block(self, enable_thinking: bool | None = None) -> PromptBlock:
        """What the generation prompt holds of a think block: "open" (the reply starts inside
        its reasoning, without a ``<think>`` of its own), "closed" (Qwen3's empty block) or
        "none"."""
        suffix = self.suffix(enable_thinking)
        opened, closed = suffix.rfind(THINK_START), suffix.rfind(THINK_END)
        if opened > closed:
            return "open"
        return "closed" if closed >= 0 else "none"

    def opens_thinking(self, enable_thinking: bool | None = None) -> bool:
        """Whether the generation prompt leaves a think block open (thinking-only templates)."""
        return self.prompt_block(enable_thinking) == "open"

    @property
    def thinks_by_default(self) -> bool:
        """Whether the model thinks when enable_thinking is not given: the default equals the
        switch's "on" (Qwen3), or the template always opens the block (Qwen3-Thinking-2507)."""
        if self.has_thinking_switch:
            return self.generation_suffix == self.thinking_on_suffix
        return self.opens_thinking()

    @classmethod
    def from_template(cls, template: str | None) -> TemplateProfile:
        """Render ``template`` on probe conversations and read off its ChatML conventions."""
        if not template or IM_START not in template:
            return cls()
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = json.dumps
        try:
            compiled = env.from_string(template)
        except Exception:  # a template that does not even compile loses only these refinements
            return cls()

        def render(messages: list[dict[str, str]], **kwargs: Any) -> str:
            return compiled.render(messages=messages, bos_token="", eos_token="", **kwargs)

        return cls.from_render(render)

    @classmethod
    def from_render(cls, render: Any) -> TemplateProfile:
        """Read the conventions off a function that renders the chat template (here or on a
        server): ``render(messages, add_generation_prompt=..., [enable_thinking=...])``."""
        user = [{"role": "user", "content": _PROBE}]
        try:
            bare = render(user, add_generation_prompt=False)
            suffixes = [
                _generation_suffix(bare, render(user, add_generation_prompt=True, **switch))
                for switch in ({}, {"enable_thinking": True}, {"enable_thinking": False})
            ]
            past = render(
                [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
                    {"role": "user", "content": "b"},
                ],
                add_generation_prompt=False,
            )
        except Exception:  # best effort: an odd template only loses these refinements
            return cls()
        system_head = f"{IM_START}system\n"
        default_system = None
        if bare.startswith(system_head) and IM_END in bare:
            default_system = bare[len(system_head) : bare.index(IM_END)]
        return cls(
            default_system=default_system,
            generation_suffix=suffixes[0],
            thinking_on_suffix=suffixes[1],
            thinking_off_suffix=suffixes[2],
            strips_past_thinking=f"{IM_START}assistant\nA{IM_END}" in past,
            **_reasoning_conventions(render),
        )


def _generation_suffix(bare: str, prompted: str) -> str:
    """What add_generation_prompt appends past ``<|im_start|>assistant\\n`` ("" for a template
    without a generation-prompt branch)."""
    generation = prompted[len(bare) :] if prompted.startswith(bare) else ""
    head = f"{IM_START}assistant\n"
    return generation[len(head) :] if generation.startswith(head) else ""


def _reasoning_conventions(render: Any) -> dict[str, Any]:
    """Whether reasoning given apart from the answer is sent again, before and after the last
    user message, and what wraps it; {} (the defaults) when the probes cannot be rendered."""
    reply = {
        "role": "assistant",
        "content": _PROBE_ANSWER,
        "reasoning_content": _PROBE_REASONING,  # what Hugging Face templates read
        "reasoning": _PROBE_REASONING,  # what a vLLM server accepts (and passes on as both)
    }
    try:
        before = render(
            [{"role": "user", "content": "a"}, reply, {"role": "user", "content": "b"}],
            add_generation_prompt=False,
        )
        after = render([{"role": "user", "content": "a"}, reply], add_generation_prompt=False)
    except Exception:
        return {}
    found: dict[str, Any] = {}
    wrapped = re.compile(
        re.escape(f"{IM_START}assistant\n")
        + f"(.*?){_PROBE_REASONING}(.*?){_PROBE_ANSWER}"
        + re.escape(IM_END),
        re.DOTALL,
    )
    for name, text in (("keeps_reasoning", before), ("keeps_reasoning_after_last_user", after)):
        match = wrapped.search(text)
        kept = match is not None and not any(
            control in match.group(1) + match.group(2) for control in (IM_START, IM_END)
        )
        found[name] = kept
        if kept and match is not None:
            found["reasoning_open"], found["reasoning_close"] = match.group(1), match.group(2)
    return found
