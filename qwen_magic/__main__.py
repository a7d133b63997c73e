"""Command line: ``qwen-magic`` (or ``python -m qwen_magic``).

- ``qwen-magic chat [MODEL] [options]``: chat in the terminal (:mod:`qwen_magic.terminal`).
- ``qwen-magic web [MODEL] [options]``: chat in the browser (:mod:`qwen_magic.web`; needs the
  ``web`` extra).
- ``qwen-magic fetch [demo|tiny|tokenizers|smollm2|all]``: fetching ahead of time keeps the first
  ``%qwen_load`` (and the first test run) from stalling on a download; each fetched path is
  printed so scripts can pick it up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from qwen_magic import models, web
from qwen_magic.terminal import cli

# Order matters for "all": small tokenizers first, the tiny model reuses the demo tokenizer.
TARGETS: dict[str, list[tuple[str, Callable[[], Path]]]] = {
    "tokenizers": [
        ("qwen3-tokenizer", models.qwen3_tokenizer_path),
        ("qwen1-tiktoken", models.qwen1_tiktoken_path),
    ],
    "demo": [("demo", models.demo_model_path)],
    "tiny": [
        ("tiny", models.tiny_model_path),
        ("tiny-qwen3", models.tiny_qwen3_model_path),
        ("tiny-qwen3-thinking", models.tiny_qwen3_thinking_model_path),
    ],
    "smollm2": [("smollm2", models.smollm2_path)],
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    parser = argparse.ArgumentParser(
        prog="qwen-magic", description="Chat with Qwen models on vLLM; tools for the extension."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch",
        help="download and build models into the cache",
        description="Download, verify and convert models into $QWEN_MAGIC_HOME "
        "(default ~/.cache/qwen-magic), then print their paths.",
    )
    fetch.add_argument(
        "what", nargs="?", default="demo", choices=[*TARGETS, "all"], help="what to fetch"
    )
    cli.add_parser(commands)
    web_page = web.add_parser(commands)
    arguments = parser.parse_args(argv)
    if arguments.command == "web":
        return web.run(web_page, arguments)
    if arguments.command == "chat":
        return cli.run(arguments)

    selected = [name for name in TARGETS if arguments.what in (name, "all")]
    try:
        for target in selected:
            for label, fetch_path in TARGETS[target]:
                print(f"{label}: {fetch_path()}", flush=True)
    except models.ModelFetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The ``qwen-magic`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
