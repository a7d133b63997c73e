"""What ``%qwen_load`` and ``%qwen_status`` do: choose where the model runs, load it, report.

The magics parse; this module decides between a model loaded here, a running vLLM server
(``--server``, ``QwenMagics.server``) and a server started for the kernel (``--serve``), turns
every failure into one line, and shows the status.
"""

from __future__ import annotations

import contextlib
import os
import sys
from argparse import Namespace
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from qwen_magic import render
from qwen_magic.backends.base import BackendError, forget_exception
from qwen_magic.backends.vllm_options import is_out_of_memory
from qwen_magic.jupyter import output
from qwen_magic.session import ChatSession


def load(magics: Any, args: Namespace) -> None:
    """``%qwen_load`` with parsed ``args``, on the magics' session and config."""
    if args.server and args.local:
        raise UsageError("--server and --local contradict each other: give one")
    server = None if args.local else (args.server or magics.server)
    if args.serve and server is not None:
        raise UsageError("--serve starts a server here; --server uses a running one: give one")
    flags = {"model_name", "reload", "verbose", "server", "local", "api_key_env", "serve"}
    given = {k: v for k, v in vars(args).items() if k not in flags and v is not None}
    if server is None:  # QwenMagics.engine_options are defaults for loading here
        model_name = args.model_name or magics.model
        options = {**magics.engine_options, **given}
    else:  # the server's model (None: the one it serves); its options are the server's
        model_name, options = args.model_name, given
    progress = output.LoadProgress(model_name or server, notebook=magics.notebook)
    from qwen_magic.models import ModelFetchError

    try:
        loaded = magics.session.load(
            model_name,
            options,
            server=server,
            serve=args.serve,
            api_key_env=args.api_key_env or magics.api_key_env,
            progress=progress,
            verbose=args.verbose,
            reload=args.reload,
        )
    except KeyboardInterrupt:
        progress.failed("interrupted")
        raise
    except Exception as error:
        progress.failed()
        forget_exception(error)
        if isinstance(error, (BackendError, ModelFetchError)):  # one line that says what to do
            raise UsageError(str(error)) from None
        if is_out_of_memory(error):
            raise UsageError(render.OUT_OF_MEMORY.format(action="loading")) from None
        if args.verbose:
            raise
        raise UsageError(render.load_failed(model_name, error)) from None
    if not loaded:
        progress.stop()
        name = Path(magics.session.bot.backend.info.model).name
        output.notice(
            f"{name} is already loaded (use --reload to load it again)", notebook=magics.notebook
        )
        return
    info = magics.session.bot.backend.info
    progress.done(f"loaded {info.model} on {info.where}, {info.max_model_len} tokens")


def show_status(session: ChatSession) -> None:
    """``%qwen_status``: model, where it runs, context, memory or server, and conversations."""
    facts = None
    bot = session.bot
    if bot is not None:
        info = bot.backend.info
        facts = {
            "model": info.model,
            "runs on": info.where,
            "context length": info.max_model_len,
            **bot.backend.status(),
            "serving": info.version,
            "model sampling defaults": info.generation_defaults or "none",
            "%config overrides": session.sampling_defaults() or "none",
        }
    markdown = render.status_markdown(facts, session.conversations)
    output.show(render.mime_bundle(markdown))


@dataclass
class LoadDefaults:
    """What :func:`load` reads from ``QwenMagics``, for a front-end that has none (the terminal
    chat, the web page): the same defaults, so ``MODEL`` and the options mean the same there."""

    session: ChatSession
    model: str = "demo"
    server: str | None = field(default_factory=lambda: os.environ.get("QWEN_MAGIC_SERVER") or None)
    api_key_env: str = "VLLM_API_KEY"
    engine_options: dict[str, Any] = field(default_factory=dict)
    notebook: bool = False


def session_from_command_line(
    args: Namespace, *, own_options: Collection[str]
) -> ChatSession | int:
    """A session for a command (``qwen-magic chat``, ``qwen-magic web``) with the model loaded
    as ``%qwen_load`` loads it; ``args`` came from ``%qwen_load``'s parser plus the command's
    ``own_options`` (a ``system`` among them sets the default system prompt). Progress goes to
    stderr.

    Returns:
        The session; or, after printing why to stderr, the exit status (1, 130 for Ctrl-C).
    """
    session = ChatSession(system=getattr(args, "system", None))
    given = {key: value for key, value in vars(args).items() if key not in own_options}
    load_args = Namespace(**{"reload": False, **given})
    with contextlib.redirect_stdout(sys.stderr):
        try:
            load(LoadDefaults(session), load_args)
        except KeyboardInterrupt:
            return 130
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return session
