"""The panel without a browser: pure logic, then widgets driven by ``.value`` and ``.click()``
against a real InteractiveShell with the extension loaded, then a real tiny engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from qwen_magic.conversation import Conversation, Turn
from qwen_magic.jupyter import session_for
from qwen_magic.jupyter.panel import QwenPanel, panel
from qwen_magic.jupyter.panel_model import (
    CONTROL_SPECS,
    control_spec,
    displayed_value,
    format_budget,
    max_tokens_limit,
    model_status,
    system_from_text,
    text_from_system,
)
from qwen_magic.prompt import fit_prompt
from qwen_magic.render import history_markdown
from qwen_magic.sampling import SAMPLING_SETTINGS, default_max_tokens, validate
from qwen_magic.session import ChatSession

MakePanel = Callable[..., QwenPanel]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# ---------------------------------------------------------------------------- pure logic


def test_there_is_one_control_per_sampling_setting() -> None:
    assert [spec.name for spec in CONTROL_SPECS] == list(SAMPLING_SETTINGS)


@pytest.mark.parametrize("spec", CONTROL_SPECS, ids=lambda spec: spec.name)
def test_every_value_a_control_offers_is_one_the_session_accepts(spec: Any) -> None:
    for value in (spec.minimum, spec.maximum, spec.neutral):
        assert validate({spec.name: value}) == {spec.name: value}


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


def test_budget_text() -> None:
    assert format_budget(1234, 32768) == "1,234 / 32,768 tokens (4%)"
    assert format_budget(None, None) == "history tokens: counted once a model is loaded"
    assert format_budget(70, 0) == "70 tokens"


@pytest.mark.parametrize(
    ("max_model_len", "min_prompt_tokens", "limit"),
    [
        (None, 0, 4096),  # no model: the table's range
        (0, 0, 4096),
        (2048, 0, 2047),  # a prompt needs at least one token
        (512, 30, 481),  # the empty conversation's prompt and one token of message fit
        (512, 600, 1),  # a system prompt longer than the context: still a valid slider
    ],
)
def test_max_tokens_limit(max_model_len: int | None, min_prompt_tokens: int, limit: int) -> None:
    assert max_tokens_limit(max_model_len, min_prompt_tokens) == limit


def test_model_status_escapes_and_guides() -> None:
    assert "%qwen_load" in model_status(None)
    status = model_status("/m/<tiny>", max_model_len=2048, device="cpu")
    assert "&lt;tiny&gt;" in status and "2,048" in status and "cpu" in status


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("qwen_magic.jupyter.panel_model", ("ipywidgets", "IPython", "vllm")),
        (
            "qwen_magic.jupyter.panel",
            ("vllm", "torch", "qwen_magic.chat", "qwen_magic.backends.vllm_local"),
        ),
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
def session(shell: InteractiveShell) -> Iterator[ChatSession]:
    """The shell's session, with its defaults and conversations reset after each test."""
    session = session_for(shell)
    assert shell.magics_manager.registry["QwenMagics"].session is session
    yield session
    for name in (*SAMPLING_SETTINGS, "system"):
        setattr(session, name, None)
    for name in list(session.conversations):
        session.set_system(name, None)  # follow the default again
    session.conversations.clear()


@pytest.fixture
def make_panel(session: ChatSession) -> Iterator[MakePanel]:
    panels: list[QwenPanel] = []

    def make(**kwargs: Any) -> QwenPanel:
        panels.append(QwenPanel(session, **kwargs))
        return panels[-1]

    yield make
    for opened in panels:
        opened.close()


def _history_text(panel_: QwenPanel) -> str:
    return panel_.history.outputs[0]["data"]["text/markdown"]


def _panel_observers(session: ChatSession) -> list[Any]:
    """The panels' handlers following ``session.revision``."""
    handlers = session._trait_notifiers.get("revision", {}).get("change", [])
    return [
        handler for handler in handlers if isinstance(getattr(handler, "__self__", None), QwenPanel)
    ]


def _import(
    shell: InteractiveShell,
    tmp_path: Path,
    *pairs: tuple[str, str],
    system: str | None = None,
    chat: str = "default",
    replace: bool = False,
) -> None:
    path = tmp_path / "import.json"
    Conversation(system=system, turns=[Turn(user, reply) for user, reply in pairs]).save(
        path, force=True
    )
    shell.run_line_magic("qwen", f"import {path} --chat {chat}" + (" --replace" if replace else ""))


def test_opening_the_panel_sets_nothing(session: ChatSession, make_panel: MakePanel) -> None:
    panel_ = make_panel()
    assert session.sampling_defaults() == {}
    assert session.system is None and session.conversation().system is None
    assert not session.owns_system()
    assert all(box.value for box in panel_.default_boxes.values())
    assert panel_.system_text.value == ""


def test_saved_notebook_text_fallback_is_short_and_private(make_panel: MakePanel) -> None:
    bundle = make_panel()._repr_mimebundle_()
    text = (bundle[0] if isinstance(bundle, tuple) else bundle)["text/plain"]
    assert text == "qwen-magic panel (a live widget: run the notebook to use it)"


def test_slider_sets_the_default_and_config_moves_the_slider(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel
) -> None:
    panel_ = make_panel()
    magics = shell.magics_manager.registry["QwenMagics"]
    slider, default_box = panel_.controls["temperature"], panel_.default_boxes["temperature"]

    slider.value = 0.35
    assert session.temperature == 0.35 and magics.temperature == 0.35
    assert session.sampling_defaults() == {"temperature": 0.35}
    assert not default_box.value

    shell.run_line_magic("config", "QwenMagics.temperature = 1.25")
    assert slider.value == 1.25 and not default_box.value

    shell.run_line_magic("config", "QwenMagics.temperature = None")
    assert default_box.value
    assert slider.value == 1.0  # no model: shows vLLM's neutral value, sends nothing
    assert session.sampling_defaults() == {}


def test_default_box_unsets_and_unticking_sends_the_shown_value(
    session: ChatSession, make_panel: MakePanel
) -> None:
    panel_ = make_panel()
    panel_.controls["top_k"].value = 40
    panel_.default_boxes["top_k"].value = True
    assert session.top_k is None
    panel_.default_boxes["top_k"].value = False
    # Ticked, the slider went back to the model's default; unticking makes that the choice.
    assert session.top_k == panel_.controls["top_k"].value == 0


def test_config_outside_the_range_widens_the_slider(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel
) -> None:
    panel_ = make_panel()
    shell.run_line_magic("config", "QwenMagics.max_tokens = 10000")
    assert panel_.controls["max_tokens"].value == 10000
    assert session.max_tokens == 10000  # the slider did not clamp it back


def test_seed_box_and_two_panels_agree(session: ChatSession, make_panel: MakePanel) -> None:
    first, second = make_panel(), make_panel(conversation="other")
    first.controls["seed"].value = 1234
    assert session.seed == 1234
    assert second.controls["seed"].value == 1234 and not second.default_boxes["seed"].value


# ------------------------------------------------------------------ the system prompt box


def test_system_box_shows_and_edits_the_conversations_own_prompt(
    session: ChatSession, make_panel: MakePanel
) -> None:
    session.set_system("x", "Own")
    panel_ = make_panel(conversation="x")
    assert panel_.system_text.value == "Own"

    panel_.system_text.value = "Answer in French."
    assert session.conversation("x").system == "Answer in French."
    assert session.owns_system("x")
    assert session.system is None  # the default is not what the box edits
    assert session.conversation().system is None and not session.owns_system()


def test_editing_the_box_gives_its_own_prompt_and_emptying_follows_the_default(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel
) -> None:
    shell.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    panel_ = make_panel()
    assert panel_.system_text.value == "Be brief." and not session.owns_system()

    panel_.system_text.value = "Answer in French."
    assert session.conversation().system == "Answer in French."
    assert session.owns_system() and session.system == "Be brief."
    assert "> **System:** Answer in French." in _history_text(panel_)

    panel_.system_text.value = ""
    assert not session.owns_system()
    assert session.conversation().system == "Be brief."
    assert panel_.system_text.value == "Be brief."  # the box shows the default it follows again


def test_config_system_moves_only_the_boxes_that_follow_the_default(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel
) -> None:
    session.set_system("x", "Own")
    following, owning = make_panel(), make_panel(conversation="x")
    shell.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    assert following.system_text.value == "Be brief."
    assert owning.system_text.value == "Own"
    assert session.conversation("x").system == "Own"

    shell.run_line_magic("config", "QwenMagics.system = None")
    assert following.system_text.value == "" and session.conversation().system is None
    assert owning.system_text.value == "Own"


def test_an_imported_system_prompt_is_owned_and_shown(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel, tmp_path: Path
) -> None:
    panel_ = make_panel(conversation="imported")
    _import(shell, tmp_path, ("Hi", "Hello!"), system="Imported.", chat="imported")
    assert panel_.system_text.value == "Imported." and session.owns_system("imported")
    shell.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    assert panel_.system_text.value == "Imported."


def test_undoing_an_edit_of_the_box_follows_the_default_again(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel
) -> None:
    panel_ = make_panel()
    panel_.system_text.value = "Answer in French."
    panel_.undo_button.click()
    assert panel_.system_text.value == ""
    shell.run_line_magic("config", "QwenMagics.system = 'Be brief.'")
    assert panel_.system_text.value == "Be brief."


# ------------------------------------------------------------------ history, clear, undo


def test_history_follows_the_session(
    shell: InteractiveShell, make_panel: MakePanel, tmp_path: Path
) -> None:
    panel_ = make_panel()
    assert "No turns yet" in _history_text(panel_)
    _import(shell, tmp_path, ("What is 2+2?", "Four."), ("And 3+3?", "Six."))
    assert "Four." in _history_text(panel_) and "Six." in _history_text(panel_)
    shell.run_line_magic("qwen", "undo")
    assert "Four." not in _history_text(panel_)
    assert "counted once a model is loaded" in panel_.budget_label.value


def test_clear_then_undo_restores_the_turns(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel, tmp_path: Path
) -> None:
    _import(shell, tmp_path, ("one", "1"), ("two", "2"), ("three", "3"))
    turns = list(session.conversation().turns)
    panel_, other = make_panel(), make_panel()

    panel_.clear_button.click()
    assert len(session.conversation()) == 0
    assert panel_.message.value.endswith(">Cleared 3 turns (Undo brings them back).</span>")
    assert "three" not in _history_text(other)  # every panel of the conversation refreshes

    panel_.undo_button.click()
    assert session.conversation().turns == turns
    assert "Undid the last change." in panel_.message.value
    assert "three" in _history_text(other)

    panel_.undo_button.click()  # the import
    assert len(session.conversation()) == 0
    panel_.undo_button.click()
    assert "There is nothing to undo." in panel_.message.value


def test_buttons_act_on_the_shown_conversation_only(
    shell: InteractiveShell, session: ChatSession, make_panel: MakePanel, tmp_path: Path
) -> None:
    _import(shell, tmp_path, ("one", "1"))
    _import(shell, tmp_path, ("two", "2"), chat="other")
    make_panel(conversation="other").clear_button.click()
    assert len(session.conversation("other")) == 0
    assert [turn.user for turn in session.conversation().turns] == ["one"]


# ------------------------------------------------------------------ export


def test_export_defaults_to_json_and_refuses_to_overwrite_unless_ticked(
    shell: InteractiveShell,
    session: ChatSession,
    make_panel: MakePanel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _import(shell, tmp_path, ("Hi", "Hello!"))
    panel_ = make_panel()
    assert panel_.export_name.value == "conversation.json" and not panel_.overwrite.value
    panel_.export_button.click()
    exported = tmp_path / "conversation.json"
    assert f"Exported 1 turn to {exported}" in panel_.message.value
    first = exported.read_bytes()
    assert json.loads(first)["turns"][0]["assistant"] == "Hello!"

    _import(shell, tmp_path, ("Bye", "Goodbye!"), replace=True)
    panel_.export_button.click()
    assert f"Not exported: {exported} exists" in panel_.message.value
    assert "tick overwrite" in panel_.message.value and "--force" not in panel_.message.value
    assert exported.read_bytes() == first  # untouched

    panel_.overwrite.value = True
    panel_.export_button.click()
    assert f"Exported 1 turn to {exported}" in panel_.message.value
    assert json.loads(exported.read_text())["turns"][0]["assistant"] == "Goodbye!"


def test_export_to_markdown_a_folder_and_a_wrong_suffix(
    shell: InteractiveShell, make_panel: MakePanel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _import(shell, tmp_path, ("Hi", "Hello!"))
    panel_ = make_panel()
    panel_.export_name.value = "chat.md"
    panel_.export_button.click()
    assert "Hello!" in (tmp_path / "chat.md").read_text()
    (tmp_path / "out").mkdir()
    panel_.export_name.value = "out/chat.json"
    panel_.export_button.click()
    assert str(tmp_path / "out" / "chat.json") in panel_.message.value
    panel_.export_name.value = "chat.txt"
    panel_.export_button.click()
    assert "Not exported" in panel_.message.value and ".json or .md" in panel_.message.value
    assert not (tmp_path / "chat.txt").exists()


def test_export_messages_escape_the_file_name(
    shell: InteractiveShell, make_panel: MakePanel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _import(shell, tmp_path, ("Hi", "Hello!"))
    panel_ = make_panel()
    name = "<img src=x onerror=alert(1)>.json"
    panel_.export_name.value = name
    for _attempt in ("exported", "refused: it exists"):
        panel_.export_button.click()
        assert "&lt;img src=x onerror=alert(1)&gt;.json" in panel_.message.value
        assert "<img" not in panel_.message.value
    assert "Not exported" in panel_.message.value
    assert (tmp_path / name).is_file()


# ------------------------------------------------------------------ one panel per conversation


def _shown_model_id(shell: InteractiveShell, line: str) -> str:
    with capture_output() as captured:
        shell.run_line_magic("qwen_panel", line)
    (output,) = captured.outputs
    return output.data[WIDGET_VIEW]["model_id"]


@pytest.mark.parametrize(
    ("line", "name"),
    [("", "default"), ('-c "my chat"', "my chat"), ("--conversation 'my chat'", "my chat")],
)
def test_qwen_panel_twice_shows_one_panel_with_one_observer(
    shell: InteractiveShell, session: ChatSession, line: str, name: str
) -> None:
    before = len(_panel_observers(session))
    shown = [_shown_model_id(shell, line), _shown_model_id(shell, line)]
    opened = panel(conversation=name, shell=shell)
    try:
        assert shown == [opened.model_id] * 2
        assert opened.conversation is session.conversation(name)
        assert list(session.conversations) == [name]  # no quotes in the name
        assert f"Conversation `{name}`" in _history_text(opened)
        assert len(_panel_observers(session)) == before + 1
    finally:
        opened.close()
    assert len(_panel_observers(session)) == before


def test_a_closed_panel_stops_following_and_a_new_one_is_made(
    shell: InteractiveShell, session: ChatSession
) -> None:
    first = panel(shell=shell)
    first.close()
    first.close()  # closing twice is harmless
    assert _panel_observers(session) == []
    second = panel(shell=shell)
    try:
        assert second is not first and len(_panel_observers(session)) == 1
        assert panel(shell=shell) is second
        assert panel(conversation="other", shell=shell) is not second
    finally:
        panel(conversation="other", shell=shell).close()
        second.close()


def test_the_panel_needs_the_extension_and_outlives_a_reload(
    shell: InteractiveShell, session: ChatSession
) -> None:
    opened = panel(conversation="kept", shell=shell)
    shell.run_line_magic("unload_ext", "qwen_magic")
    try:
        with pytest.raises(UsageError, match="run %load_ext qwen_magic first"):
            panel(shell=shell)
    finally:
        shell.run_line_magic("load_ext", "qwen_magic")
    try:
        assert panel(conversation="kept", shell=shell) is opened
        shell.run_line_magic("config", "QwenMagics.seed = 7")  # the new magics reach it
        assert opened.controls["seed"].value == 7 and session.seed == 7
    finally:
        opened.close()


def test_qwen_panel_reports_bad_quoting_in_one_line(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="check the quotes"):
        shell.run_line_magic("qwen_panel", '-c "my chat')


# ---------------------------------------------------------------------------- a real engine


@pytest.fixture(scope="module")
def loaded(shell: InteractiveShell, tiny_model: Path) -> Iterator[ChatSession]:
    shell.run_line_magic("qwen_load", f"{tiny_model} --max-model-len 512 --enforce-eager --seed 0")
    yield session_for(shell)
    shell.run_line_magic("qwen_unload", "")


def _ask(shell: InteractiveShell, message: str, line: str = "") -> Any:
    """Run ``%%qwen -o reply`` and return the reply object (errors raise)."""
    return shell.run_cell_magic("qwen", f"-o reply {line}", message)


@pytest.mark.engine
def test_max_tokens_slider_offers_only_values_that_can_succeed(
    loaded: ChatSession, session: ChatSession, make_panel: MakePanel
) -> None:
    shell = InteractiveShell.instance()
    panel_ = make_panel()
    slider = panel_.controls["max_tokens"]
    formatter = loaded.bot.formatter
    empty = fit_prompt(formatter, None, [], "", budget=2**62).num_tokens
    assert slider.max == 512 - empty - 1
    # Unset, it shows the default the next reply gets, not the table's 512 clamped.
    assert panel_.default_boxes["max_tokens"].value
    assert slider.value == default_max_tokens(512)

    # A long system prompt leaves little room, and the slider's end follows it (and a short
    # range keeps the replies below fast on a CPU).
    panel_.system_text.value = "Think step by step." + " Check each step." * 120
    own = fit_prompt(formatter, panel_.system_text.value, [], "", budget=2**62).num_tokens
    assert own > empty and slider.max == 512 - own - 1 < 20

    # Ticked, the slider shows the default clamped to its end; unticking sends what it shows.
    assert slider.value == slider.max
    panel_.default_boxes["max_tokens"].value = False
    assert session.max_tokens == slider.max
    reply = _ask(shell, "Hi")  # one token: the least a message can be
    assert reply.sampling["max_tokens"] == slider.max and reply.num_prompt_tokens == own + 1
    for too_many in (slider.max + 1, 512):  # the end is exact; the old end, 512, must fail
        with pytest.raises(UsageError):
            _ask(shell, "Hi", f"--max-tokens {too_many}")
    assert len(session.conversation()) == 1  # the failures recorded nothing


@pytest.mark.engine
def test_panel_controls_reach_the_next_generation(
    loaded: ChatSession, session: ChatSession, make_panel: MakePanel
) -> None:
    shell = InteractiveShell.instance()
    panel_ = make_panel()
    info = loaded.bot.backend.info
    assert Path(info.model).name in panel_.status.value

    panel_.controls["max_tokens"].value = 3
    panel_.controls["temperature"].value = 0.0
    reply = _ask(shell, "Say hello.")
    assert reply.sampling["max_tokens"] == 3
    assert reply.sampling["temperature"] == 0.0
    assert reply.num_generated_tokens <= 3
    conversation = session.conversation()
    assert conversation.turns[-1].assistant == reply.text  # exactly what was generated
    assert _history_text(panel_) == history_markdown(conversation, name="default")
    used, budget = panel_.history_usage()
    assert budget == info.max_model_len - 3 and used and used > 0
    assert f"/ {budget:,} tokens" in panel_.budget_label.value

    # Back to the model's default: nothing of the panel's is sent for temperature.
    panel_.default_boxes["temperature"].value = True
    again = _ask(shell, "Again.")
    assert again.sampling.get("temperature") == info.generation_defaults.get("temperature")
    assert panel_.controls["temperature"].value == displayed_value(
        control_spec("temperature"), None, info.generation_defaults
    )
