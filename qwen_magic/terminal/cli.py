"""``qwen-magic chat``: its options, loading the model, and the interactive or one-shot run.

The model options are ``%qwen_load``'s own (one definition, in :mod:`qwen_magic.jupyter.magics`,
taken here as a parent parser), and loading goes through the same
:func:`qwen_magic.jupyter.loading.load`, so the two front-ends accept the same options and say
the same things when loading fails. Load progress goes to stderr, so that a one-shot answer on
stdout can be piped.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["HISTORY_VARIABLE", "add_parser", "history_path", "run"]

HISTORY_VARIABLE = "QWEN_MAGIC_CHAT_HISTORY"
_OWN_OPTIONS = ("command", "system", "quick", "history_file", "no_input_history")


# %qwen_load options whose help speaks of the kernel; --reload does nothing in a new process.
_LOAD_HELP = {
    "local": "load here even if $QWEN_MAGIC_SERVER is set",
    "serve": "run the model in a vLLM server this chat starts and stops; implied by "
    "--tensor-parallel-size > 1",
    "reload": None,
}


def load_options_parser() -> argparse.ArgumentParser:
    """``MODEL`` and ``%qwen_load``'s options, taken from the magic's own parser."""
    from qwen_magic.jupyter.magics import QwenMagics

    parser = argparse.ArgumentParser(add_help=False)
    for action in QwenMagics.qwen_load.parser._actions:
        if action.dest in _LOAD_HELP and _LOAD_HELP[action.dest] is None:
            continue
        option = copy.copy(action)  # the magic's own action stays as it is
        option.help = _LOAD_HELP.get(action.dest, action.help)
        parser._add_action(option)
    return parser


def add_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Add ``chat`` to the CLI's subcommands."""
    parser = subcommands.add_parser(
        "chat",
        parents=[load_options_parser()],
        help="chat with a model in the terminal",
        description="Chat with a Qwen model in the terminal. Without a terminal on stdin (a pipe) "
        "or with -q, answer one message and exit. Inside the chat, /help lists the commands.",
    )
    parser.add_argument("-s", "--system", help="the system prompt (default: the model's)")
    parser.add_argument(
        "-q", "--quick", metavar="MESSAGE", help="answer MESSAGE, print the reply and exit"
    )
    parser.add_argument(
        "--history-file",
        type=Path,
        metavar="PATH",
        help=f"where the input history is kept (default: ${HISTORY_VARIABLE}, else "
        "chat-history in the qwen-magic cache folder)",
    )
    parser.add_argument(
        "--no-input-history", action="store_true", help="keep what you type in memory only"
    )
    return parser


def history_path(args: argparse.Namespace) -> Path | None:
    """The input history file: ``--history-file``, ``$QWEN_MAGIC_CHAT_HISTORY``, or the cache."""
    if args.no_input_history:
        return None
    if args.history_file is not None:
        return args.history_file.expanduser()
    if os.environ.get(HISTORY_VARIABLE):
        return Path(os.environ[HISTORY_VARIABLE]).expanduser()
    from qwen_magic.models import cache_root

    return cache_root() / "chat-history"


def run(args: argparse.Namespace) -> int:
    """Run ``qwen-magic chat`` with parsed ``args``; the exit status."""
    from qwen_magic.jupyter.loading import session_from_command_line
    from qwen_magic.terminal.app import TerminalChat, error_line, prompt_session
    from qwen_magic.terminal.display import Screen

    interactive = args.quick is None and sys.stdin.isatty()
    message = args.quick
    if message is None and not interactive:
        message = sys.stdin.read().strip("\n")
        if not message.strip():
            print("error: nothing to answer: stdin was empty (or pass -q MESSAGE)", file=sys.stderr)
            return 2
    session = session_from_command_line(args, own_options=_OWN_OPTIONS)
    if isinstance(session, int):
        return session
    try:
        if interactive:
            return TerminalChat(session).run(prompt_session(history_path(args)))
        reply = TerminalChat(session, status=Screen(sys.stderr)).ask(message)
        return 1 if reply is None else 130 if reply.interrupted else 0
    except Exception as error:  # one line, not a traceback, unless asked
        if args.verbose:
            raise
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    finally:
        session.unload()
