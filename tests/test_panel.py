"""The panel without a browser: pure logic, then widgets driven by ``.value`` and ``.click()``
against a real InteractiveShell with the extension loaded, then a real tiny engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from qwen_magic.history import Conversation, Turn
from qwen_magic.magics import SAMPLING_NAMES, check_sampling
from qwen_magic.panel_logic import (
    CONTROL_SPECS,
    control_spec,
    displayed_value,
    format_budget,
    max_tokens_limit,
    model_status,
    system_from_text,
    text_from_system,
)
from qwen_magic.widgets import QwenPanel, panel

# ---------------------------------------------------------------------------- pure logic


def test_there_is_one_control_per_sampling_trait() -> None:
    assert [spec.name for spec in CONTROL_SPECS] == list(SAMPLING_NAMES)


@pytest.mark.parametrize("spec", CONTROL_SPECS, ids=lambda spec: spec.name)
def test_every_value_a_control_offers_is_one_the_magics_accept(spec: Any) -> None:
    for value in (spec.minimum, spec.maximum, spec.neutral):
        check_sampling(spec.name, value)


@pytest.mark.parametrize(
    ("name", "value", "defaults", "shown"),
    [
        ("temperature", None, {"temperature": 0.7}, 0.7),  # unset: the model's default
        ("temperature", None, {}, 1.0),  # unset, model states none: vLLM's neutral value
        ("temperature", 0.3, {"temperature": 0.7}, 0.3),  # set: what the user chose
        ("top_k", None, {"top_k": 20}, 20),
        ("top_k", 5000, {}, 200),  # a slider can only show its range
        ("seed", None, {}, 0),
    ],
)
def test_displayed_value(name: str, value: Any, defaults: dict[str, Any], shown: float) -> None:
    result = displayed_value(control_spec(name), value, defaults)
    assert result == shown
    assert isinstance(result, float if control_spec(name).kind == "float" else int)


def test_system_prompt_box_shows_none_as_empty_and_back() -> None:
    assert text_from_system(None) == ""
    assert system_from_text("") is None
    assert system_from_text("  \n") is None
    assert system_from_text("Be brief.") == "Be brief."


def test_budget_text_and_limits() -> None:
    assert format_budget(1234, 32768) == "1,234 / 32,768 tokens (4%)"
    assert format_budget(None, None) == "history tokens: counted once a model is loaded"
    assert max_tokens_limit(None) == 4096
    assert max_tokens_limit(2048) == 2048


def test_model_status_escapes_and_guides() -> None:
    assert "%qwen_load" in model_status(None)
    status = model_status("/m/<tiny>", max_model_len=2048, device="cpu")
    assert "&lt;tiny&gt;" in status and "2,048" in status and "cpu" in status


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("qwen_magic.panel_logic", ("ipywidgets", "IPython", "vllm")),
        ("qwen_magic.widgets", ("vllm", "qwen_magic.engine", "qwen_magic.chat", "torch")),
    ],
)
def test_module_imports_stay_at_their_layer(module: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- a real shell


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "qwen_magic")
    yield ip
    ip.run_line_magic("unload_ext", "qwen_magic")


@pytest.fixture
def magics(shell: InteractiveShell) -> Iterator[Any]:
    """The shell's QwenMagics, with config and conversations reset after each test."""
    instance = shell.magics_manager.registry["QwenMagics"]
    yield instance
    for name in (*SAMPLING_NAMES, "system"):
        setattr(instance, name, None)
    instance.conversations.clear()
    instance.on_reply.clear()


@pytest.fixture
def make_panel(magics: Any) -> Iterator[Any]:
    panels: list[QwenPanel] = []

    def make(**kwargs: Any) -> QwenPanel:
        panels.append(QwenPanel(magics, **kwargs))
        return panels[-1]

    yield make
    for opened in panels:
        opened.close()


def _history_text(panel_: QwenPanel) -> str:
    return panel_.history.outputs[0]["data"]["text/markdown"]


def _import(shell: InteractiveShell, tmp_path: Path, *pairs: tuple[str, str]) -> None:
    path = tmp_path / "import.json"
    Conversation(turns=[Turn(user, assistant) for user, assistant in pairs]).save(path)
    shell.run_line_magic("qwen", f"import {path}")


def test_opening_the_panel_sets_nothing(magics: Any, make_panel: Any) -> None:
    panel_ = make_panel()
    assert magics.sampling_config() == {}
    assert magics.system is None
    assert all(box.value for box in panel_.default_boxes.values())


def test_saved_notebook_text_fallback_is_short_and_private(magics: Any, make_panel: Any) -> None:
    panel = make_panel()
    bundle = panel._repr_mimebundle_()
    text = (bundle[0] if isinstance(bundle, tuple) else bundle)["text/plain"]
    assert text == "qwen-magic panel (a live widget: run the notebook to use it)"


def test_slider_sets_the_trait_and_config_moves_the_slider(
    shell: InteractiveShell, magics: Any, make_panel: Any
) -> None:
    panel_ = make_panel()
    slider, default_box = panel_.controls["temperature"], panel_.default_boxes["temperature"]

    slider.value = 0.35
    assert magics.temperature == 0.35
    assert magics.sampling_config() == {"temperature": 0.35}
    assert not default_box.value

    shell.run_line_magic("config", "QwenMagics.temperature = 1.25")
    assert slider.value == 1.25 and not default_box.value

    shell.run_line_magic("config", "QwenMagics.temperature = None")
    assert default_box.value
    assert slider.value == 1.0  # no model: shows vLLM's neutral value, sends nothing
    assert magics.sampling_config() == {}


def test_default_box_unsets_and_unticking_sends_the_shown_value(
    magics: Any, make_panel: Any
) -> None:
    panel_ = make_panel()
    panel_.controls["top_k"].value = 40
    panel_.default_boxes["top_k"].value = True
    assert magics.top_k is None
    panel_.default_boxes["top_k"].value = False
    assert magics.top_k == panel_.controls["top_k"].value


def test_config_outside_the_range_widens_the_slider(
    shell: InteractiveShell, magics: Any, make_panel: Any
) -> None:
    panel_ = make_panel()
    shell.run_line_magic("config", "QwenMagics.max_tokens = 10000")
    assert panel_.controls["max_tokens"].value == 10000
    assert magics.max_tokens == 10000  # the slider did not clamp it back


def test_seed_box_and_two_panels_agree(magics: Any, make_panel: Any) -> None:
    first, second = make_panel(), make_panel()
    first.controls["seed"].value = 1234
    assert magics.seed == 1234
    assert second.controls["seed"].value == 1234 and not second.default_boxes["seed"].value


def test_system_prompt_box_is_linked(shell: InteractiveShell, magics: Any, make_panel: Any) -> None:
    panel_ = make_panel()
    panel_.system_text.value = "Answer in French."
    assert magics.system == "Answer in French."
    assert magics.conversation().system == "Answer in French."
    shell.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    assert panel_.system_text.value == "Be brief."
    panel_.system_text.value = ""
    assert magics.system is None


def test_history_follows_the_magics(
    shell: InteractiveShell, magics: Any, make_panel: Any, tmp_path: Path
) -> None:
    panel_ = make_panel()
    assert "No turns yet" in _history_text(panel_)
    _import(shell, tmp_path, ("What is 2+2?", "Four."), ("And 3+3?", "Six."))
    assert "Four." in _history_text(panel_) and "Six." in _history_text(panel_)
    shell.run_line_magic("qwen", "undo")
    assert "Six." not in _history_text(panel_)
    assert "counted once a model is loaded" in panel_.budget_label.value


def test_undo_and_clear_buttons(
    shell: InteractiveShell, magics: Any, make_panel: Any, tmp_path: Path
) -> None:
    _import(shell, tmp_path, ("one", "1"), ("two", "2"), ("three", "3"))
    panel_, other = make_panel(), make_panel()
    panel_.undo_button.click()
    assert [turn.user for turn in magics.conversation().turns] == ["one", "two"]
    assert "three" not in _history_text(other)  # every panel refreshes
    panel_.clear_button.click()
    assert len(magics.conversation()) == 0
    assert "Cleared 2 turns" in panel_.message.value
    panel_.undo_button.click()
    assert "no turn to undo" in panel_.message.value


def test_export_button_writes_json_and_markdown(
    shell: InteractiveShell,
    magics: Any,
    make_panel: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _import(shell, tmp_path, ("Hi", "Hello!"))
    monkeypatch.chdir(tmp_path)
    panel_ = make_panel()
    panel_.export_name.value = "out/chat.json"
    panel_.export_button.click()
    exported = tmp_path / "out" / "chat.json"
    assert str(exported) in panel_.message.value
    assert json.loads(exported.read_text())["turns"][0]["assistant"] == "Hello!"
    panel_.export_name.value = "chat.md"
    panel_.export_button.click()
    assert "Hello!" in (tmp_path / "chat.md").read_text()
    panel_.export_name.value = "chat.txt"
    panel_.export_button.click()
    assert "Not exported" in panel_.message.value and ".json or .md" in panel_.message.value


def test_qwen_panel_magic_and_python_entry_point(shell: InteractiveShell, magics: Any) -> None:
    with capture_output() as captured:
        shell.run_line_magic("qwen_panel", "")
    (output,) = captured.outputs
    assert "application/vnd.jupyter.widget-view+json" in output.data
    opened = panel(shell=shell)
    try:
        assert isinstance(opened, QwenPanel) and opened.conversation is magics.conversation()
    finally:
        opened.close()


# ---------------------------------------------------------------------------- a real engine


@pytest.fixture(scope="module")
def loaded(shell: InteractiveShell, tiny_model: Path) -> InteractiveShell:
    shell.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 2048 --enforce-eager")
    return shell


@pytest.mark.engine
def test_panel_controls_reach_the_next_generation(
    loaded: InteractiveShell, magics: Any, make_panel: Any
) -> None:
    replies: list[Any] = []
    magics.on_reply.append(lambda chat, reply: replies.append(reply))
    panel_ = make_panel()
    engine = magics.chat.engine
    assert Path(engine.model).name in panel_.status.value
    assert panel_.controls["max_tokens"].max == engine.max_model_len

    panel_.controls["max_tokens"].value = 3
    panel_.controls["temperature"].value = 0.0
    loaded.run_cell_magic("qwen", "", "Say hello.")
    reply = replies[-1]
    assert reply.sampling["max_tokens"] == 3
    assert reply.sampling["temperature"] == 0.0
    assert reply.num_generated_tokens <= 3
    assert reply.text.strip("-\n ") in _history_text(panel_)
    used, budget = panel_.history_usage()
    assert budget == engine.max_model_len - 3 and used and used > 0
    assert f"/ {budget:,} tokens" in panel_.budget_label.value

    # Back to the model's default: nothing of the panel's is sent for temperature.
    panel_.default_boxes["temperature"].value = True
    loaded.run_cell_magic("qwen", "", "Again.")
    model_temperature = engine.generation_defaults.get("temperature")
    assert replies[-1].sampling.get("temperature") == model_temperature
    assert panel_.controls["temperature"].value == displayed_value(
        control_spec("temperature"), None, engine.generation_defaults
    )
