"""What a line typed into ``qwen-magic chat`` means: a message, a command, or the way out.

Pure parsing, tested without a model or a terminal: :func:`classify` sorts one finished input,
:class:`TripleQuoteBlock` gathers a message typed between ``\"\"\"`` lines (ollama's convention),
and :func:`parse_setting` / :func:`parse_think` read the arguments of ``/set`` and ``/think``
through the one sampling table (:mod:`qwen_magic.sampling`), so ``/set`` accepts exactly what
``%%qwen``'s flags and ``%config`` accept. Errors are :class:`CommandError`: one line to show.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from qwen_magic.sampling import SAMPLING_SETTINGS, SETTINGS, setting, validate

__all__ = [
    "COMMANDS",
    "EXIT_WORDS",
    "Command",
    "CommandError",
    "Exit",
    "Message",
    "TripleQuoteBlock",
    "classify",
    "help_text",
    "parse_path",
    "parse_setting",
    "parse_think",
]

TRIPLE_QUOTE = '"""'
# Typed alone on a line, each leaves the chat; 退出 is the Qwen tutorial's exit word.
EXIT_WORDS = frozenset({"/bye", "/exit", "/quit", "exit", "quit", "退出"})
# Reset words for /set: back to the model's own default.
UNSET_WORDS = frozenset({"default", "none", "unset"})

# name -> (arguments, what it does); the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "show this help"),
    "show": ("", "the model, the settings and the conversation"),
    "clear": ("", "forget the conversation's turns (undoable)"),
    "undo": ("", "undo the last change: a turn, a clear, a load, a system prompt, a retry"),
    "retry": ("", "ask the last message again, replacing its reply (undoable)"),
    "system": (
        "[TEXT]",
        "set the system prompt (undoable); alone: show it; --default: the model's",
    ),
    "set": ("[KEY VALUE]", "set a sampling setting (VALUE default: the model's); alone: list them"),
    "think": ("on|off|default", "a thinking model's switch"),
    "save": ("PATH [--force]", "write the conversation to a .json or .md file"),
    "load": ("PATH [--replace]", "read a .json file written by /save (undoable)"),
    "bye": ("", "leave (so do /exit, /quit, exit, quit, 退出 and Ctrl-D)"),
}


class CommandError(ValueError):
    """A command the user mistyped; its message is the one line to show."""


@dataclass(frozen=True)
class Message:
    """Text to send to the model."""

    text: str


@dataclass(frozen=True)
class Command:
    """A slash command and the rest of its line (leading and trailing blanks removed)."""

    name: str
    argument: str = ""


@dataclass(frozen=True)
class Exit:
    """The user asked to leave."""


def classify(text: str) -> Message | Command | Exit | None:
    """Sort one finished input; None when there is nothing to send.

    ``/name rest`` is a command and ``//text`` sends ``/text`` as a message. A line is a message
    whatever it holds when it spans several lines (a paste), so a pasted path or code is never
    taken for a command.
    """
    stripped = text.strip()
    if not stripped:
        return None
    if stripped in EXIT_WORDS:
        return Exit()
    if "\n" in stripped or not stripped.startswith("/"):
        return Message(text.strip("\n"))
    if stripped.startswith("//"):
        return Message(stripped[1:])
    name, _, argument = stripped[1:].partition(" ")
    if f"/{name}" in EXIT_WORDS:
        return Exit()
    if name == "?":
        name = "help"
    if name not in COMMANDS:
        raise CommandError(f"unknown command /{name}: type /help for the commands")
    return Command(name, argument.strip())


class TripleQuoteBlock:
    """Gathers a message typed over several lines between ``\"\"\"`` lines.

    ``\"\"\"`` at the start of a typed line opens a block (text after it is the first line),
    and a line ending in ``\"\"\"`` closes it (text before it is the last line);
    ``\"\"\"one line\"\"\"`` is a whole message. Anything inside is message text, commands and
    exit words included.
    """

    def __init__(self) -> None:
        self.lines: list[str] | None = None

    @property
    def is_open(self) -> bool:
        return self.lines is not None

    @staticmethod
    def opens(text: str) -> bool:
        """Whether ``text`` opens a block: a typed line that starts with three quotes (a pasted
        block that starts so, such as Python code, is a whole message)."""
        return "\n" not in text and text.lstrip().startswith(TRIPLE_QUOTE)

    def cancel(self) -> None:
        """Drop a half-typed block (Ctrl-C)."""
        self.lines = None

    def feed(self, text: str) -> str | None:
        """Take one input; return what is complete (``text`` itself outside a block), or None
        while a block is still open. A completed block's message is never a command."""
        if self.lines is None:
            if not self.opens(text):
                return text
            self.lines = []
            text = text.lstrip()[len(TRIPLE_QUOTE) :]
            if not text.strip():
                return None
        body = text.rstrip()
        if body.endswith(TRIPLE_QUOTE):
            last = body[: -len(TRIPLE_QUOTE)]
            lines = [*self.lines, last] if last.strip() else self.lines
            self.lines = None
            return "\n".join(lines)
        self.lines.append(text)
        return None


def parse_setting(argument: str) -> tuple[str, Any]:
    """``/set KEY VALUE``: the setting's name and its checked value (None: the model's default).

    ``KEY`` may be written with dashes (``top-p``) or as its flag (``--top-p``, ``-t``).

    Raises:
        CommandError: No such setting, a missing value, or one out of range.
    """
    words = argument.split()
    if len(words) != 2:
        raise CommandError("use /set KEY VALUE, e.g. /set temperature 0.2 (/set alone lists them)")
    key, raw = words
    name = next(
        (item.name for item in SETTINGS if key in (item.short_flag, item.flag)),
        key.lstrip("-").replace("-", "_"),
    )
    if name not in SAMPLING_SETTINGS:
        raise CommandError(f"no setting {key!r}: use one of {', '.join(SAMPLING_SETTINGS)}")
    if raw.lower() in UNSET_WORDS:
        return name, None
    item = setting(name)
    try:
        value: Any = item.python_type(raw)
    except ValueError:
        raise CommandError(f"{name} must be {item.allowed}, got {raw!r}") from None
    try:
        validate({name: value})
    except ValueError as error:
        raise CommandError(str(error)) from None
    return name, value


def parse_think(argument: str) -> bool | None:
    """``/think on|off|default`` as ``enable_thinking``: True, False or None (the model's)."""
    words = {"on": True, "off": False, "default": None}
    choice = argument.strip().lower()
    if choice not in words:
        raise CommandError("use /think on, /think off or /think default")
    return words[choice]


def parse_path(argument: str, flag: str) -> tuple[str, bool]:
    """``/save PATH [--force]`` or ``/load PATH [--replace]``: the path and whether ``flag``
    was given. Quote a path with spaces (``/save "my chat.json"``)."""
    try:
        words = shlex.split(argument)
    except ValueError as error:  # "No closing quotation"
        raise CommandError(f"cannot read the path ({error}): check the quotes") from None
    given = flag in words
    paths = [word for word in words if word != flag]
    if len(paths) != 1 or paths[0].startswith("-"):
        raise CommandError(f"give one file name, optionally with {flag}")
    return paths[0], given


def help_text() -> str:
    """The ``/help`` text: the commands, then the keys."""
    width = max(len(f"/{name} {arguments}") for name, (arguments, _) in COMMANDS.items())
    lines = [
        f"  {f'/{name} {arguments}'.ljust(width)}  {what}"
        for name, (arguments, what) in COMMANDS.items()
    ]
    lines += [
        "",
        '  """ on a line opens a multi-line message; a line ending in """ sends it.',
        "  A paste of several lines, or Esc then Enter, also makes one message.",
        "  //text sends /text as a message.",
        "  Ctrl-C stops a reply (it stays in the history, marked interrupted) or clears the line;",
        "  Up and Down recall what you typed, also in earlier chats; Ctrl-R searches it.",
    ]
    return "\n".join(lines)
