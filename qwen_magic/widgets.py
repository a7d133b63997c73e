"""The ``%qwen_panel``: sampling controls, system prompt, history and budget in one widget.

Show it with ``%qwen_panel`` (after ``%load_ext qwen_magic``) or from Python::

    from qwen_magic.widgets import panel
    panel()

Every control is ``widgets.link``-ed to a config trait of the kernel's ``QwenMagics``, so the
panel and ``%config QwenMagics.temperature = 0.3`` can never disagree: moving a slider changes
the next ``%%qwen``, and ``%config`` moves the slider. A trait left at ``None`` uses the model's
default; its "default" box is ticked and the slider only *shows* that default (see
:mod:`qwen_magic.panel_logic`). The panel observes ``QwenMagics.revision``, bumped on every
change of a conversation or the engine, so history, budget and model status follow each
``%%qwen``, ``%qwen undo``/``clear``/``import`` and ``%qwen_load``.

This module never imports the engine: it reads the model through ``QwenMagics.chat``.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import HasTraits

from qwen_magic.display import history_markdown
from qwen_magic.history import Conversation
from qwen_magic.panel_logic import (
    CONTROL_SPECS,
    ControlSpec,
    budget_fraction,
    control_spec,
    displayed_value,
    format_budget,
    max_tokens_limit,
    model_status,
    system_from_text,
    text_from_system,
)

__all__ = ["PanelMagics", "QwenPanel", "find_qwen_magics", "panel"]


class QwenPanel(widgets.VBox):
    """A control panel bound to one ``QwenMagics`` instance (the single source of truth).

    Args:
        magics: The kernel's ``QwenMagics``; its config traits are what the controls set.
        conversation: Name of the conversation to show (None: the default one).
    """

    def __repr__(self) -> str:
        # The text a saved notebook shows where the live widget cannot render (e.g. on GitHub);
        # ipywidgets' default would dump every child widget, local paths included.
        return "qwen-magic panel (a live widget: run the notebook to use it)"

    def __init__(self, magics: HasTraits, *, conversation: str | None = None) -> None:
        self._magics = magics
        self._conversation_name = conversation
        self._control_links: dict[str, widgets.link] = {}
        self._links: list[widgets.link] = []
        self._model_key: tuple[Any, ...] | None = None
        self._shown_history: str | None = None

        self.status = widgets.HTML()
        self.controls: dict[str, widgets.ValueWidget] = {}
        self.default_boxes: dict[str, widgets.Checkbox] = {}
        control_rows = [self._control_row(spec) for spec in CONTROL_SPECS]

        self.system_text = widgets.Textarea(
            placeholder="(empty: the model's default system prompt)",
            continuous_update=False,
            rows=3,
            layout=widgets.Layout(width="100%"),
        )
        self._links.append(
            widgets.link(
                (magics, "system"),
                (self.system_text, "value"),
                transform=(text_from_system, system_from_text),
            )
        )

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
            description="Undo", icon="undo", tooltip="Drop the last turn"
        )
        self.export_name = widgets.Text(
            value="conversation.md",
            description="Export to",
            tooltip="A .json (lossless, %qwen import reads it) or .md (readable) file name",
        )
        self.export_button = widgets.Button(description="Export", icon="download")
        self.message = widgets.HTML()

        self.clear_button.on_click(self._on_clear_button_click)
        self.undo_button.on_click(self._on_undo_button_click)
        self.export_button.on_click(self._on_export_button_click)
        # QwenMagics bumps `revision` on every change of a conversation or the engine.
        magics.observe(self._on_magics_revision_change, names="revision")

        super().__init__(
            [
                self.status,
                widgets.HTML("<b>Sampling</b> (ticked: the model's default is used)"),
                *control_rows,
                widgets.HTML("<b>System prompt</b>"),
                self.system_text,
                widgets.HTML("<b>History</b>"),
                self.history,
                widgets.HBox([self.budget_bar, self.budget_label]),
                widgets.HBox([self.clear_button, self.undo_button]),
                widgets.HBox([self.export_name, self.export_button]),
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
                (self._magics, spec.name),
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
            (self._magics, spec.name),
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

    # ----------------------------------------------------------------- reading the kernel

    @property
    def conversation(self) -> Conversation:
        """The conversation this panel shows (looked up each time: %qwen import may replace it)."""
        return self._magics.conversation(self._conversation_name)

    def _engine(self) -> Any:
        chat = getattr(self._magics, "chat", None)
        return None if chat is None else chat.engine

    def model_defaults(self) -> dict[str, Any]:
        """The loaded model's sampling defaults (its generation_config), or {} without one."""
        engine = self._engine()
        return dict(getattr(engine, "generation_defaults", None) or {})

    def _model_facts(self) -> tuple[str | None, int | None, str | None]:
        engine = self._engine()
        if engine is None:
            return None, None, None
        return engine.model, engine.max_model_len, engine.device

    def history_usage(self) -> tuple[int | None, int | None]:
        """Tokens the system prompt and history take, and the budget they must fit.

        The budget is what :meth:`Conversation.prepare` uses: context length minus max_tokens.
        Without a model's tokenizer nothing can be counted: (None, None).
        """
        chat = getattr(self._magics, "chat", None)
        formatter = getattr(chat, "formatter", None)
        _, max_model_len, _ = self._model_facts()
        if formatter is None or not max_model_len:
            return None, None
        plan = self.conversation.prepare(formatter, "", budget=10**9)
        used = plan.system_tokens + sum(plan.turn_tokens)
        max_tokens = self._magics.max_tokens
        if max_tokens is None:
            max_tokens = displayed_value(
                control_spec("max_tokens"), None, self.model_defaults(), maximum=max_model_len
            )
        return used, max(max_model_len - max_tokens, 0)

    # ----------------------------------------------------------------- refreshing

    def refresh(self) -> None:
        """Re-read model, conversation and budget; cheap when nothing changed."""
        model, max_model_len, device = self._model_facts()
        model_key = (model, max_model_len, device, tuple(sorted(self.model_defaults().items())))
        if model_key != self._model_key:
            self._model_key = model_key
            self.status.value = model_status(model, max_model_len=max_model_len, device=device)
            # Unlinked while the range changes, so a clamped value is not sent back; relinking
            # re-syncs what unset controls show (the new model's defaults).
            for link in self._control_links.values():
                link.unlink()
            self._control_links.clear()
            self.controls["max_tokens"].max = max_tokens_limit(max_model_len)
            for spec in CONTROL_SPECS:
                self._link_control(spec)

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
        """Stop following the kernel, then close the widgets."""
        self._magics.unobserve(self._on_magics_revision_change, names="revision")
        for link in [*self._links, *self._control_links.values()]:
            link.unlink()
        self._links.clear()
        self._control_links.clear()
        super().close()

    # ----------------------------------------------------------------- handlers

    def _on_magics_revision_change(self, change: Any) -> None:
        self.refresh()

    def _on_clear_button_click(self, button: widgets.Button) -> None:
        removed = self.conversation.clear()
        self._say(f"Cleared {removed} turn{'s' if removed != 1 else ''}.")
        self._magics.revision += 1  # every panel (this one included) refreshes

    def _on_undo_button_click(self, button: widgets.Button) -> None:
        turn = self.conversation.undo()
        self._say("Removed the last turn." if turn else "There is no turn to undo.")
        self._magics.revision += 1

    def _on_export_button_click(self, button: widgets.Button) -> None:
        name = self.export_name.value.strip()
        try:
            path = self.conversation.save(Path(os.getcwd()) / Path(name).expanduser())
        except (ValueError, OSError) as error:
            self._say(f"Not exported: {error}", error=True)
            return
        self._say(
            f"Exported {len(self.conversation)} turns to <code>{html.escape(str(path))}</code>"
        )

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#b00020" if error else "inherit"
        self.message.value = f'<span style="color: {color}">{text}</span>'


def find_qwen_magics(shell: InteractiveShell | None = None) -> Any:
    """Return the shell's ``QwenMagics`` instance, or say how to load it."""
    if shell is None:
        shell = InteractiveShell.instance() if InteractiveShell.initialized() else None
    magics = None if shell is None else shell.magics_manager.registry.get("QwenMagics")
    if magics is None:
        raise UsageError("qwen-magic is not loaded: run %load_ext qwen_magic first")
    return magics


def panel(*, conversation: str | None = None, shell: InteractiveShell | None = None) -> QwenPanel:
    """Return a panel for the running kernel's ``QwenMagics`` (shown when it ends a cell)."""
    return QwenPanel(find_qwen_magics(shell), conversation=conversation)


@magics_class
class PanelMagics(Magics):
    """``%qwen_panel``: show the control panel."""

    @magic_arguments()
    @argument("-c", "--conversation", default=None, help="Show this named conversation.")
    @line_magic
    def qwen_panel(self, line: str) -> None:
        """Show sampling controls, system prompt, history and token budget, linked to %config."""
        args = parse_argstring(self.qwen_panel, line)
        display(panel(conversation=args.conversation, shell=self.shell))
