"""Cost of formatting a new turn on a long history: cached segments vs the tutorial's re-encode.

The tutorial's ``make_context`` re-encodes every past turn on every call; qwen-magic's
``ChatFormatter`` caches each segment's ids, so a new turn only encodes the new message.

    python benchmarks/bench_format.py [--turns 200] [--repeat 30] [--tokenizer PATH]

Prints both medians and their ratio, and writes them to benchmarks/results/format.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.conversation import Conversation
from qwen_magic.prompt import fit_prompt

RESULTS = Path(__file__).parent / "results" / "format.json"


def tutorial_make_context(tokenizer: ChatTokenizer, conversation: Conversation, query: str) -> list:
    """Qwen's make_context as the tutorial wrote it: every segment encoded again."""
    newline = tokenizer.encode_text("\n")

    def segment(role: str, content: str) -> list[int]:
        role_ids = tokenizer.encode_text(role)
        content_ids = tokenizer.encode_text(content)
        return [tokenizer.im_start_id, *role_ids, *newline, *content_ids, tokenizer.im_end_id]

    ids = segment("system", conversation.system or "")
    for turn in conversation.turns:
        ids += newline + segment("user", turn.user) + newline + segment("assistant", turn.assistant)
    ids += newline + segment("user", query) + newline
    return [*ids, tokenizer.im_start_id, *tokenizer.encode_text("assistant"), *newline]


def median_seconds(function, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tokenizer", help="model folder or qwen.tiktoken (default: demo model)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from qwen_magic.models import demo_model_path

        args.tokenizer = str(demo_model_path())
    tokenizer = ChatTokenizer.load(args.tokenizer)
    formatter = ChatFormatter(tokenizer)
    conversation = Conversation(system="You are a helpful assistant.")
    paragraph = "Explain how a transformer attends to earlier tokens, with an example. " * 3
    for i in range(args.turns):
        conversation.record(f"Question {i}: {paragraph}", f"Answer {i}: {paragraph}")
    query = "And how does the KV cache make the next turn cheaper?"
    fit_prompt(formatter, conversation.system, conversation.turns, "warm-up", budget=10**9)

    plan = fit_prompt(formatter, conversation.system, conversation.turns, query, budget=10**9)
    tutorial_ids = tutorial_make_context(tokenizer, conversation, query)
    assert plan.token_ids == tutorial_ids, "both ways must produce the same ids"

    cached = median_seconds(
        lambda: fit_prompt(formatter, conversation.system, conversation.turns, query, budget=10**9),
        args.repeat,
    )
    tutorial = median_seconds(
        lambda: tutorial_make_context(tokenizer, conversation, query), args.repeat
    )
    result = {
        "benchmark": "format a new turn",
        "turns": args.turns,
        "prompt_tokens": plan.num_tokens,
        "cached_ms": round(cached * 1000, 3),
        "tutorial_reencode_ms": round(tutorial * 1000, 3),
        "speedup": round(tutorial / cached, 1),
        "tokenizer": args.tokenizer,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
