"""The ``%qwen_panel``: sampling controls, system prompt, history and budget in one widget.

Show it with ``%qwen_panel`` (after ``%load_ext qwen_magic``) or from Python::

    from qwen_magic.jupyter.panel import panel
    panel()

Every control is ``widgets.link``-ed to a sampling default of the kernel's
:class:`~qwen_magic.session.ChatSession`, which ``QwenMagics``' config traits are linked to as
well, so the panel and ``%config QwenMagics.temperature = 0.3`` can never disagree: moving a
slider changes the next ``%%qwen``, and ``%config`` moves the slider. A setting left at ``None``
uses the model's default; its "default" box is ticked and the slider only *shows* that default
(see :mod:`qwen_magic.jupyter.panel_model`). The system box shows and edits the shown
conversation's own system prompt (empty: the model's default).

The panel observes ``ChatSession.revision``, bumped on every change of a conversation or the
model, so history, budget and model status follow each ``%%qwen``, ``%qwen undo``/``clear``/
``import`` and ``%qwen_load``. There is one panel per conversation: showing it again shows the
same widget, so no stale panel keeps refreshing.

This module never imports a backend: it reads the model through the session.
"""

from __future__ import annotations

import contextlib
import html
import os
import weakref
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from qwen_magic.conversation import Conversation
from qwen_magic.jupyter import session_for
from qwen_magic.jupyter.magics import parse
from qwen_magic.jupyter.panel_model import (
    CONTROL_SPECS,
    ControlSpec,
    budget_fraction,
    displayed_value,
    format_budget,
    max_tokens_limit,
    model_status,
    system_from_text,
    text_from_system,
)
from qwen_magic.prompt import fit_prompt
from qwen_magic.render import history_markdown
from qwen_magic.sampling import default_max_tokens
from qwen_magic.session import DEFAULT_CONVERSATION, ChatSession

__all__ = ["PanelMagics", "QwenPanel", "find_session", "panel"]

# One panel per (session, conversation): showing it again re-displays the same widget.
_PANELS: weakref.WeakKeyDictionary[ChatSession, dict[str, QwenPanel]] = weakref.WeakKeyDictionary()


# The thinking dropdown's labels and the session values they stand for.
THINKING_CHOICES: dict[str, bool | None] = {"model default": None, "on": True, "off": False}


class QwenPanel(widgets.VBox):
    """A control panel bound to one session (the single source of truth).

    Args:
        session: The kernel's session; its sampling defaults are what the controls set.
        conversation: Name of the conversation to show (None: the default one).
    """

    def __repr__(self) -> str:
        # The text a saved notebook shows where the live widget cannot render (e.g. on GitHub);
        # ipywidgets' default would dump every child widget, local paths included.
        return "qwen-magic panel (a live widget: run the notebook to use it)"

    def __init__(self, session: ChatSession, *, conversation: str | None = None) -> None:
        self._session = session
        self._conversation_name = conversation or DEFAULT_CONVERSATION
        self._control_links: dict[str, widgets.link] = {}
        self._links: list[widgets.link] = []
        self._controls_key: tuple[Any, ...] | None = None
        self._shown_history: str | None = None
        self._showing_system = False

        self.status = widgets.HTML()
        self.controls: dict[str, widgets.ValueWidget] = {}
        self.default_boxes: dict[str, widgets.Checkbox] = {}
        control_rows = [self._control_row(spec) for spec in CONTROL_SPECS]

        # Thinking models only: shown when the loaded model has a switch / thinks at all.
        self.thinking = widgets.Dropdown(
            options=list(THINKING_CHOICES),
            description="thinking",
            tooltip="The chat template's thinking switch (%config QwenMagics.thinking)",
        )
        self.thinking_budget = widgets.IntText(
            description="budget",
            tooltip="Most reasoning tokens before the model must answer; -1: no limit "
            "(%config QwenMagics.thinking_budget)",
            layout=widgets.Layout(width="14em"),
        )
        self.thinking_row = widgets.HBox([self.thinking, self.thinking_budget])
        self.thinking.observe(self._on_thinking_value_change, names="value")
        self.thinking_budget.observe(self._on_thinking_budget_value_change, names="value")
        session.observe(self._on_session_thinking_change, names=["thinking", "thinking_budget"])
        self._on_session_thinking_change(None)

        self.system_text = widgets.Textarea(
            placeholder="(empty: the default system prompt, %config QwenMagics.system, "
            "else the model's)",
            continuous_update=False,
            rows=3,
            layout=widgets.Layout(width="100%"),
        )
        self.system_text.observe(self._on_system_text_value_change, names="value")

        self.history = widgets.Output(
            layout=widgets.Layout(max_height="420px", overflow="auto", border="1px solid #ccc")
        )
        self.budget_bar = widgets.FloatProgress(
            min=0.0, max=1.0, layout=widgets.Layout(width="40%")
        )
        self.budget_label = widgets.Label()
        self.clear_button = widgets.Button(
            description="Clear", icon="trash", tooltip="Forget all turns"
        )
        self.undo_button = widgets.Button(
            description="Undo", icon="undo", tooltip="Undo the last change (a turn, a clear, ...)"
        )
        self.export_name = widgets.Text(
            value="conversation.json",
            description="Export to",
            tooltip="A .json (lossless, %qwen import reads it) or .md (readable) file name",
        )
        self.overwrite = widgets.Checkbox(description="overwrite", indent=False,
                                          layout=widgets.Layout(width="auto"))  # fmt: skip
        self.export_button = widgets.Button(description="Export", icon="download")
        self.message = widgets.HTML()

        self.clear_button.on_click(self._on_clear_button_click)
        self.undo_button.on_click(self._on_undo_button_click)
        self.export_button.on_click(self._on_export_button_click)
        # The session bumps `revision` on every change of a conversation or the model.
        session.observe(self._on_session_revision_change, names="revision")

        super().__init__(
            [
                self.status,
                widgets.HTML("<b>Sampling</b> (ticked: the model's default is used)"),
                *control_rows,
                self.thinking_row,
                widgets.HTML("<b>System prompt</b>"),
                self.system_text,
                widgets.HTML("<b>History</b>"),
                self.history,
                widgets.HBox([self.budget_bar, self.budget_label]),
                widgets.HBox([self.clear_button, self.undo_button]),
                widgets.HBox([self.export_name, self.overwrite, self.export_button]),
                self.message,
            ]
        )
        self.add_class("qwen-panel")
        self.refresh()

    # ----------------------------------------------------------------- building controls

    def _control_row(self, spec: ControlSpec) -> widgets.HBox:
        common: dict[str, Any] = {
            "description": spec.label,
            "tooltip": spec.help,
            "style": {"description_width": "110px"},
            "layout": widgets.Layout(width="420px"),
        }
        if spec.kind == "float":
            control: widgets.ValueWidget = widgets.FloatSlider(
                min=spec.minimum, max=spec.maximum, step=spec.step, readout_format=".2f",
                continuous_update=False, **common,
            )  # fmt: skip
        elif spec.kind == "int":
            control = widgets.IntSlider(
                min=int(spec.minimum), max=int(spec.maximum), step=int(spec.step),
                continuous_update=False, **common,
            )  # fmt: skip
        else:
            control = widgets.BoundedIntText(min=int(spec.minimum), max=int(spec.maximum), **common)
        control.add_class(f"qwen-{spec.name}")
        default_box = widgets.Checkbox(
            description="default" if spec.kind != "seed" else "unseeded",
            indent=False,
            tooltip="Use the model's default (nothing is sent for this setting)",
            layout=widgets.Layout(width="auto"),
        )
        default_box.add_class(f"qwen-{spec.name}-default")
        self.controls[spec.name] = control
        self.default_boxes[spec.name] = default_box
        self._links.append(
            widgets.link(
                (self._session, spec.name),
                (default_box, "value"),
                # Unticking starts sending what the control shows: the user's choice now.
                transform=(lambda value: value is None, self._trait_for_default_box(spec)),
            )
        )
        self._link_control(spec)
        return widgets.HBox([control, default_box])

    def _trait_for_default_box(self, spec: ControlSpec) -> Any:
        control = self.controls[spec.name]
        return lambda ticked: None if ticked else control.value

    def _link_control(self, spec: ControlSpec) -> None:
        """Link a control to its trait; the link's first sync sets what the control shows."""
        self._control_links[spec.name] = widgets.link(
            (self._session, spec.name),
            (self.controls[spec.name], "value"),
            transform=(self._control_value_for(spec), lambda value: value),
        )

    def _control_value_for(self, spec: ControlSpec) -> Any:
        control = self.controls[spec.name]

        def to_control(value: float | None) -> float:
            # A value set by %config outside the slider's range widens the range rather than
            # letting the slider show (and later send) a clamped value.
            if value is not None and spec.kind != "seed":
                control.min = min(control.min, value)
                control.max = max(control.max, value)
            return displayed_value(spec, value, self.model_defaults(), maximum=control.max)

        return to_control

    # ----------------------------------------------------------------- reading the session

    @property
    def conversation(self) -> Conversation:
        """The conversation this panel shows."""
        return self._session.conversation(self._conversation_name)

    def _info(self) -> Any:
        bot = self._session.bot
        return None if bot is None else bot.backend.info

    def model_defaults(self) -> dict[str, Any]:
        """What an unset setting uses with the loaded model, or {} without one.

        The model's generation_config, plus the max_tokens policy every front-end shares (512,
        at most a quarter of the context), so an unset max_tokens shows what a reply gets.
        """
        info = self._info()
        if info is None:
            return {}
        return {"max_tokens": default_max_tokens(info.max_model_len), **info.generation_defaults}

    def _model_facts(self) -> tuple[str | None, int | None, str | None, str | None]:
        info = self._info()
        if info is None:
            return None, None, None, None
        return info.model, info.max_model_len, info.where, info.version

    def _empty_prompt_tokens(self) -> int:
        """Tokens of the shown conversation's prompt with no history and an empty message."""
        bot = self._session.bot
        if bot is None or not bot.tokenizer.is_chatml:
            return 0
        plan = fit_prompt(bot.formatter, self.conversation.system, [], "", budget=2**62)
        return plan.num_tokens

    def history_usage(self) -> tuple[int | None, int | None]:
        """Tokens the system prompt and history take, and the budget they must fit.

        The budget is what the next reply gets: context length minus its max_tokens (the
        same default policy as %%qwen). Without a model nothing can be counted: (None, None).
        """
        bot = self._session.bot
        if bot is None or not bot.tokenizer.is_chatml:
            return None, None
        conversation = self.conversation
        plan = fit_prompt(bot.formatter, conversation.system, conversation.turns, "",
                          budget=2**62)  # fmt: skip
        used = plan.system_tokens + sum(plan.turn_tokens)
        return used, max(bot.budget(max_tokens=self._session.max_tokens), 0)

    # ----------------------------------------------------------------- refreshing

    def refresh(self) -> None:
        """Re-read model, conversation and budget; cheap when nothing changed."""
        model, max_model_len, device, version = self._model_facts()
        # The max_tokens limit depends on the shown conversation's system prompt as well.
        limit = max_tokens_limit(max_model_len, self._empty_prompt_tokens())
        defaults = tuple(sorted(self.model_defaults().items()))
        controls_key = (model, max_model_len, device, defaults, limit)
        if controls_key != self._controls_key:
            self._controls_key = controls_key
            self.status.value = model_status(
                model, max_model_len=max_model_len, device=device, version=version
            )
            # Unlinked while the range changes, so a clamped value is not sent back; relinking
            # re-syncs what unset controls show (the new model's defaults).
            for link in self._control_links.values():
                link.unlink()
            self._control_links.clear()
            self.controls["max_tokens"].max = limit
            for spec in CONTROL_SPECS:
                self._link_control(spec)

        bot = self._session.bot
        self.thinking.layout.display = "" if bot and bot.has_thinking_switch else "none"
        self.thinking_row.layout.display = "" if bot and bot.thinks else "none"

        system_text = text_from_system(self.conversation.system)
        if self.system_text.value != system_text:
            self._showing_system = True
            try:
                self.system_text.value = system_text
            finally:
                self._showing_system = False
        markdown = self._history_markdown()
        if markdown != self._shown_history:
            self._shown_history = markdown
            self.history.outputs = (
                {
                    "output_type": "display_data",
                    "data": {"text/markdown": markdown, "text/plain": markdown},
                    "metadata": {},
                },
            )
        used, budget = self.history_usage()
        self.budget_bar.value = budget_fraction(used or 0, budget or 0)
        self.budget_bar.bar_style = "danger" if used and budget and used > budget else ""
        self.budget_label.value = format_budget(used, budget)

    def _history_markdown(self) -> str:
        return history_markdown(self.conversation, name=self._conversation_name)

    def close(self) -> None:
        """Stop following the session, then close the widgets (closing twice is harmless)."""
        with contextlib.suppress(ValueError):  # already closed
            self._session.unobserve(self._on_session_revision_change, names="revision")
        with contextlib.suppress(ValueError):
            self._session.unobserve(
                self._on_session_thinking_change, names=["thinking", "thinking_budget"]
            )
        panels = _PANELS.get(self._session, {})
        if panels.get(self._conversation_name) is self:
            del panels[self._conversation_name]
        for link in [*self._links, *self._control_links.values()]:
            link.unlink()
        self._links.clear()
        self._control_links.clear()
        super().close()

    # ----------------------------------------------------------------- handlers

    def _on_session_revision_change(self, change: Any) -> None:
        self.refresh()

    def _on_system_text_value_change(self, change: Any) -> None:
        if self._showing_system:
            return
        try:
            self._session.set_system(self._conversation_name, system_from_text(change["new"]))
        except Exception as error:  # busy: a reply is being generated with the old prompt
            self._say(f"System prompt not changed: {error}", error=True)
            self.refresh()

    def _on_thinking_value_change(self, change: Any) -> None:
        self._session.thinking = THINKING_CHOICES[change["new"]]

    def _on_thinking_budget_value_change(self, change: Any) -> None:
        value = change["new"]
        if value < -1:
            self.thinking_budget.value = -1
            return
        self._session.thinking_budget = None if value == -1 else value

    def _on_session_thinking_change(self, change: Any) -> None:
        choice = {value: label for label, value in THINKING_CHOICES.items()}
        self.thinking.value = choice[self._session.thinking]
        budget = self._session.thinking_budget
        self.thinking_budget.value = -1 if budget is None else budget

    def _on_clear_button_click(self, button: widgets.Button) -> None:
        try:
            removed = self._session.clear(self._conversation_name)
        except Exception as error:  # busy: a reply is being generated
            self._say(f"Not cleared: {error}", error=True)
            return
        self._say(f"Cleared {removed} turn{'s' if removed != 1 else ''} (Undo brings them back).")

    def _on_undo_button_click(self, button: widgets.Button) -> None:
        try:
            undone = self._session.undo(self._conversation_name)
        except Exception as error:
            self._say(f"Not undone: {error}", error=True)
            return
        self._say("Undid the last change." if undone else "There is nothing to undo.")

    def _on_export_button_click(self, button: widgets.Button) -> None:
        name = self.export_name.value.strip()
        target = Path(os.getcwd()) / Path(name).expanduser()
        try:
            path = self._session.export(self._conversation_name, target,
                                        force=self.overwrite.value)  # fmt: skip
        except FileExistsError:  # the session's message names --force, which the panel has not
            self._say(
                f"Not exported: {target} exists: pick another name or tick overwrite", error=True
            )
            return
        except (ValueError, OSError) as error:
            self._say(f"Not exported: {error}", error=True)
            return
        count = len(self.conversation)
        self._say(f"Exported {count} turn{'s' if count != 1 else ''} to {path}")

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#b00020" if error else "inherit"
        self.message.value = f'<span style="color: {color}">{html.escape(text)}</span>'


def find_session(shell: InteractiveShell | None = None) -> ChatSession:
    """Return the running shell's session, or say how to load the extension."""
    if shell is None:
        shell = InteractiveShell.instance() if InteractiveShell.initialized() else None
    if shell is None or shell.magics_manager.registry.get("QwenMagics") is None:
        raise UsageError("qwen-magic is not loaded: run %load_ext qwen_magic first")
    return session_for(shell)


def panel(*, conversation: str | None = None, shell: InteractiveShell | None = None) -> QwenPanel:
    """The panel for a conversation of the running kernel (shown when it ends a cell).

    Asking again for the same conversation returns the same panel, refreshed.
    """
    session = find_session(shell)
    name = conversation or DEFAULT_CONVERSATION
    panels = _PANELS.setdefault(session, {})
    existing = panels.get(name)
    if existing is None:
        existing = panels[name] = QwenPanel(session, conversation=name)
    else:
        existing.refresh()
    return existing


@magics_class
class PanelMagics(Magics):
    """``%qwen_panel``: show the control panel."""

    @magic_arguments()
    @argument("-c", "--conversation", default=None, help="Show this named conversation.")
    @line_magic
    def qwen_panel(self, line: str) -> None:
        """Show sampling controls, system prompt, history and token budget, linked to %config."""
        args = parse(self.qwen_panel.parser, line)
        display(panel(conversation=args.conversation, shell=self.shell))
