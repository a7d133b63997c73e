"""``%qwen COMMAND``: history, clear, undo, export and import of a conversation.

Each command has its own parser, so an option that does not apply (``%qwen history -t 1``) is a
``UsageError`` rather than silently ignored. The handlers call the session and say what they did
in one line; every change they make can be undone with ``%qwen undo``.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from qwen_magic import render
from qwen_magic.backends.base import BackendError
from qwen_magic.jupyter import output
from qwen_magic.session import DEFAULT_CONVERSATION, ChatSession

COMMANDS = ("history", "clear", "undo", "export", "import")
Notice = Callable[[str], None]


def parser() -> MagicArgumentParser:
    """``%qwen COMMAND``: each command takes only the options that apply to it."""
    parser = MagicArgumentParser(prog="%qwen", description="Manage a conversation.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (
        ("history", "show the conversation"),
        ("clear", "forget its turns (undoable)"),
        ("undo", "undo the last change to it"),
        ("export", "write it to PATH (.json or .md)"),
        ("import", "read a .json export into it"),
    ):
        command = commands.add_parser(name, help=help_text, prog=f"%qwen {name}")
        if name in ("export", "import"):
            command.add_argument("path", metavar="PATH")
        command.add_argument("--chat", default=DEFAULT_CONVERSATION, metavar="NAME")
        if name == "export":
            command.add_argument("--force", action="store_true", help="overwrite PATH")
        if name == "import":
            command.add_argument("--replace", action="store_true", help="replace existing turns")
    return parser


def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return method(*args, **kwargs)
    except FileNotFoundError as error:
        raise UsageError(f"no file {error.filename}: check the path") from None
    except (ValueError, OSError, BackendError) as error:
        raise UsageError(str(error)) from None


def handle_history(session: ChatSession, args: Namespace, notice: Notice) -> None:
    conversation = session.conversation(args.chat)
    output.show(render.mime_bundle(render.history_markdown(conversation, name=args.chat)))


def handle_clear(session: ChatSession, args: Namespace, notice: Notice) -> None:
    removed = _call(session.clear, args.chat)
    notice(f"cleared {removed} turn(s) from `{args.chat}` (%qwen undo brings them back)")


def handle_undo(session: ChatSession, args: Namespace, notice: Notice) -> None:
    undone = _call(session.undo, args.chat)
    notice(f"{'undid the last change' if undone else 'there is nothing to undo'} (`{args.chat}`)")


def handle_export(session: ChatSession, args: Namespace, notice: Notice) -> None:
    path = _call(session.export, args.chat, args.path, force=args.force)
    notice(f"exported `{args.chat}` to {path}")


def handle_import(session: ChatSession, args: Namespace, notice: Notice) -> None:
    count = _call(session.import_file, args.chat, args.path, replace=args.replace)
    notice(f"imported {count} turn(s) into `{args.chat}` (%qwen undo takes it back)")
