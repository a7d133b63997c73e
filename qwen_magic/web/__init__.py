"""``qwen-magic web``: a chat page in the browser, served by Gradio on this machine.

Usage::

    pip install "qwen-magic[web]"
    qwen-magic web                        # the demo model, on http://127.0.0.1:7860
    qwen-magic web tiny --max-model-len 1024 --port 8000
    qwen-magic web --server http://gpu-box:8000 --api-key-env VLLM_API_KEY
    python -m qwen_magic web ...          # the same

The model options are ``%qwen_load``'s own. The page streams replies, stops them (the partial
reply stays, marked interrupted), retries, undoes, clears, edits a past message and asks again
from there, exports the conversation as JSON, and shows a thinking model's reasoning as a
collapsed "Thought for X s" block. The system prompt, the thinking switch and one control per
sampling setting (:data:`qwen_magic.sampling.SETTINGS`) sit beside the chat.

Every browser tab has its own conversation; replies are generated one at a time, so a second
tab waits its turn (its message shows at once, its reply when the engine is free). The same
chat is an API endpoint for ``gradio_client`` (``Client(url).predict("hi", api_name="/chat")``),
with one conversation per client.

It binds 127.0.0.1, makes no share link and sends Gradio no analytics unless asked
(``--host 0.0.0.0``, ``--share``, ``--analytics``); give ``--auth USER:PASSWORD`` when others can
reach it. gradio is imported only here, when the page starts (:mod:`qwen_magic.web.page`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from qwen_magic.session import SessionBusy

__all__ = ["add_parser", "run"]

_OWN_OPTIONS = ("command", "host", "port", "share", "auth", "analytics", "system", "title")
INSTALL_HINT = 'the web page needs gradio: pip install "qwen-magic[web]"'


def add_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Add ``web`` to the CLI's subcommands (MODEL and ``%qwen_load``'s options, and its own)."""
    from qwen_magic.jupyter.magics import QwenMagics

    parser = subcommands.add_parser(
        "web",
        parents=[QwenMagics.qwen_load.parser],
        help="chat with a model in the browser (Gradio)",
        description="Serve a chat page for a Qwen model on this machine (127.0.0.1 unless "
        "--host says otherwise). Each browser tab has its own conversation.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument(
        "--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860 or the next free)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also publish a public gradio.live link (off)"
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this login")
    parser.add_argument(
        "--analytics", action="store_true", help="let Gradio send its usage analytics (off)"
    )
    parser.add_argument("-s", "--system", help="default system prompt (default: the model's)")
    parser.add_argument("--title", default="qwen-magic", help="the page's title")
    return parser


def _auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise ValueError("--auth takes USER:PASSWORD")
    return user, password


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``qwen-magic web`` with parsed ``args`` until Ctrl-C; the exit status."""
    from qwen_magic.jupyter.loading import session_from_command_line

    if args.reload:
        parser.error("--reload is for %qwen_load: the page loads its model afresh")
    try:
        auth = _auth(args.auth)
    except ValueError as error:
        parser.error(str(error))
    if not args.analytics:  # read when gradio is imported: set it first
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        from qwen_magic.web.page import CSS, WebChat
    except ImportError as error:
        if getattr(error, "name", None) in {"gradio", "gradio_client"}:
            print(f"error: {INSTALL_HINT}", file=sys.stderr)
            return 1
        raise
    session = session_from_command_line(args, own_options=_OWN_OPTIONS)
    if isinstance(session, int):
        return session
    try:
        page = WebChat(session, title=args.title).build()
        page.queue(default_concurrency_limit=1)
        page.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            inbrowser=False,
            show_error=True,
            footer_links=["api"],
            css=CSS,
        )
    except KeyboardInterrupt:
        return 130
    finally:
        session.stop()
        with contextlib.suppress(SessionBusy):  # a reply still running dies with the process
            session.unload()
    return 0
