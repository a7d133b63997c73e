"""Command line: ``python -m qwen_magic fetch [demo|tiny|tokenizers|smollm2|all]``.

Fetching ahead of time keeps the first ``%qwen_load`` (and the first test run) from stalling on
a download; each fetched path is printed so scripts can pick it up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from qwen_magic import models

# Order matters for "all": small tokenizers first, the tiny model reuses the demo tokenizer.
TARGETS: dict[str, list[tuple[str, Callable[[], Path]]]] = {
    "tokenizers": [
        ("qwen3-tokenizer", models.qwen3_tokenizer_path),
        ("qwen1-tiktoken", models.qwen1_tiktoken_path),
    ],
    "demo": [("demo", models.demo_model_path)],
    "tiny": [("tiny", models.tiny_model_path), ("tiny-qwen3", models.tiny_qwen3_model_path)],
    "smollm2": [("smollm2", models.smollm2_path)],
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m qwen_magic", description="Tools for the qwen-magic IPython extension."
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
    arguments = parser.parse_args(argv)

    selected = [name for name in TARGETS if arguments.what in (name, "all")]
    try:
        for target in selected:
            for label, fetch_path in TARGETS[target]:
                print(f"{label}: {fetch_path()}", flush=True)
    except models.ModelFetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
