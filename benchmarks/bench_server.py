"""qwen-magic's server backend against a raw HTTP client, on the same vLLM server.

    python benchmarks/bench_server.py --model DIR --label gpu-0.5b-tp2 --tp 2
    python benchmarks/bench_server.py --server http://host:8000 --label remote

Starts a managed server (``--serve``; tensor parallel with ``--tp``) unless ``--server`` names
one, then measures, paths alternated within each run (and which goes first alternates too):

  single: decode tokens/s of one greedy reply through ``%%qwen`` (a real IPython shell, display
          included) against a raw streaming ``httpx`` request with the identical JSON body;
  concurrent: aggregate tokens/s of ``--concurrency`` clients at once through ``QwenChat``
          against as many raw streaming requests.

Both paths send the same prompt ids and sampling values (``ServerBackend.request_body``), so the
server does the same work; greedy replies make them the same length. Results go to
benchmarks/results/server-<label>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [f"Tell me a long story about lighthouse number {i}." for i in range(256)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "runs": len(values),
    }


def raw_request(bot: Any, message: str, tokens: int) -> int:
    """One streaming completion over plain httpx, no qwen-magic code in the loop; tokens back."""
    from qwen_magic.conversation import Conversation
    from qwen_magic.prompt import fit_prompt

    plan = fit_prompt(bot.formatter, Conversation().system, [], message, budget=10**9)
    backend = bot.backend
    body = backend.request_body(
        plan.token_ids,
        n=1,
        stop_token_ids=bot.tokenizer.stop_token_ids,
        max_tokens=tokens,
        temperature=0,
    )
    generated = 0
    with backend._client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                for choice in json.loads(line[5:]).get("choices") or ():
                    generated += len(choice.get("token_ids") or ())
    return generated


def ours(bot: Any, message: str, tokens: int) -> int:
    from qwen_magic.conversation import Conversation

    reply = bot.reply(Conversation(), message, max_tokens=tokens, temperature=0)
    return reply.num_generated_tokens


def concurrent(function: Any, bot: Any, clients: int, tokens: int) -> float:
    """Aggregate tokens/s of ``clients`` threads, each asking one different question."""
    counts = [0] * clients

    def work(index: int) -> None:
        counts[index] = function(bot, QUESTIONS[index], tokens)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder for a managed server")
    parser.add_argument("--server", help="use this running server instead")
    parser.add_argument("--label", required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (managed)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args()

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "qwen_magic")
    started = time.perf_counter()
    if args.server:
        shell.run_line_magic("qwen_load", f"--server {args.server}")
    else:
        shell.run_line_magic(
            "qwen_load",
            f"{args.model} --serve --tensor-parallel-size {args.tp} "
            f"--gpu-memory-utilization {args.gpu_memory_utilization} --max-model-len 8192",
        )
    ready = time.perf_counter() - started
    bot = shell.magics_manager.registry["QwenMagics"].session.bot
    result: dict[str, Any] = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "server": bot.backend.info.where,
        "version": bot.backend.info.version,
        "tensor_parallel_size": args.tp,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "ready_seconds": round(ready, 1),
    }
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            result["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cell = f"%%qwen --no-history -o reply --max-tokens {args.tokens} -t 0\n{QUESTIONS[0]}"
    raw_single, magic_single, raw_many, ours_many = [], [], [], []
    raw_request(bot, "warm up", 16)

    def raw_once() -> None:
        begin = time.perf_counter()
        generated = raw_request(bot, QUESTIONS[0], args.tokens)
        raw_single.append(generated / (time.perf_counter() - begin))

    def magic_once() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            begin = time.perf_counter()
            outcome = shell.run_cell(cell)
            seconds = time.perf_counter() - begin
        outcome.raise_error()
        magic_single.append(outcome.result.num_generated_tokens / seconds)

    for number in range(args.repeat):
        # Which path goes first alternates, so neither always meets a server just warmed up.
        for step in (raw_once, magic_once) if number % 2 == 0 else (magic_once, raw_once):
            step()
        many = [
            lambda: raw_many.append(concurrent(raw_request, bot, args.concurrency, args.tokens)),
            lambda: ours_many.append(concurrent(ours, bot, args.concurrency, args.tokens)),
        ]
        for step in many if number % 2 == 0 else many[::-1]:
            step()
        print(f"single raw {raw_single[-1]:.0f} / %%qwen {magic_single[-1]:.0f} tok/s; "
              f"x{args.concurrency} raw {raw_many[-1]:.0f} / QwenChat {ours_many[-1]:.0f} tok/s",
              flush=True)  # fmt: skip
    result["single_raw_tok_s"] = summary(raw_single)
    result["single_magic_tok_s"] = summary(magic_single)
    result["concurrent_raw_tok_s"] = summary(raw_many)
    result["concurrent_qwenchat_tok_s"] = summary(ours_many)
    result["paired_single_magic_vs_raw"] = summary(
        [a / b for a, b in zip(magic_single, raw_single, strict=True)]
    )
    result["paired_concurrent_qwenchat_vs_raw"] = summary(
        [a / b for a, b in zip(ours_many, raw_many, strict=True)]
    )
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"server-{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    shell.run_line_magic("qwen_unload", "")
    os._exit(0)  # a managed server is stopped by the unload above; skip slow interpreter exit


if __name__ == "__main__":
    main()
