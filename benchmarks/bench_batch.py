"""Batch prompting throughput: ``QwenChat.batch`` against raw ``LLM.generate`` and sequential chat.

    python benchmarks/bench_batch.py --label gpu-h100                 # demo model, 256 prompts
    python benchmarks/bench_batch.py --model tiny --prompts 16 --tokens 16 --max-model-len 512 \\
        --enforce-eager --kv-cache-gib 0.25 --repeat 1 --sequential 4   # CPU smoke run

Measures, on one in-process engine and with paths alternated within each repeat:

  batch:      ``bot.batch(prompts)`` (templates filled, ChatML planned, one engine batch);
  raw:        ``LLM.generate`` on the very token ids and sampling values the batch sent (taken
              from its replies), so the engine does the same work;
  sequential: ``bot.chat`` once per prompt (``--sequential N`` times; tokens/s compared);

then, unless ``--no-server``, the same prompts through a managed vLLM server (``--serve``):
``bot.batch`` at ``--concurrency`` (default 32) against sequential ``bot.chat`` calls.

Every reply is exactly ``--tokens`` long (``ignore_eos``, greedy), so throughput is generated
tokens over wall time on every path. Results go to benchmarks/results/batch-<label>.json only
when ``--label`` is given (a real run); without it they are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TOPICS = ["lighthouses", "bread", "rivers", "chess", "owls", "volcanoes", "jazz", "glaciers"]


def prompts(count: int) -> list[str]:
    return [f"In one sentence, tell me fact number {i} about {TOPICS[i % len(TOPICS)]}."
            for i in range(count)]  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "runs": len(values),
    }


def timed(function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def raw_generate(bot: Any, result: Any) -> int:
    """``LLM.generate`` on the batch's own prompt ids and sampling values; tokens generated."""
    from vllm import SamplingParams

    llm = bot.backend.llm
    requests = [{"prompt_token_ids": list(reply.prompt_token_ids)} for reply in result]
    params = [
        SamplingParams(
            stop_token_ids=list(bot.tokenizer.stop_token_ids),
            skip_special_tokens=True,
            **dict(reply.sampling),
        )
        for reply in result
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return sum(len(sample.token_ids) for output in outputs for sample in output.outputs)


def sequential(bot: Any, messages: list[str], sampling: dict[str, Any]) -> int:
    generated = 0
    for message in messages:
        reply = bot.reply(_empty(), message, **sampling)
        generated += reply.num_generated_tokens
    return generated


def _empty() -> Any:
    from qwen_magic.conversation import Conversation

    return Conversation()


def in_process(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from qwen_magic.chat import QwenChat

    messages = prompts(args.prompts)
    sampling = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    found: dict[str, Any] = {}
    with QwenChat(args.model, **options) as bot:
        found["device"] = bot.backend.info.where
        found["vllm"] = bot.backend.info.version
        bot.batch(messages[:4], progress=False, **sampling)  # warm up
        batch_tps, raw_tps, ratio = [], [], []
        for repeat in range(args.repeat):
            result, seconds = timed(lambda: bot.batch(messages, progress=False, **sampling))
            assert len(result) == len(messages) and not result.interrupted
            ours = result.num_generated_tokens / seconds
            generated, raw_seconds = timed(lambda result=result: raw_generate(bot, result))
            raw = generated / raw_seconds
            assert generated == result.num_generated_tokens, (generated, result)
            batch_tps.append(ours)
            raw_tps.append(raw)
            ratio.append(ours / raw)
            print(
                f"[{repeat}] batch {ours:.0f} tok/s ({seconds:.2f} s), LLM.generate "
                f"{raw:.0f} tok/s ({raw_seconds:.2f} s): {ours / raw:.3f}x",
                flush=True,
            )
        count = min(args.sequential, len(messages))
        generated, seconds = timed(lambda: sequential(bot, messages[:count], sampling))
        sequential_tps = generated / seconds
        print(f"sequential chat x{count}: {sequential_tps:.0f} tok/s ({seconds:.2f} s)", flush=True)
        found.update(
            batch_tok_s=summary(batch_tps),
            raw_generate_tok_s=summary(raw_tps),
            batch_vs_raw=summary(ratio),
            sequential_prompts=count,
            sequential_tok_s=round(sequential_tps, 2),
            batch_vs_sequential=round(statistics.median(batch_tps) / sequential_tps, 2),
        )
    gc.collect()
    return found


def through_server(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from qwen_magic.chat import QwenChat

    messages = prompts(args.prompts)
    sampling = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    server_options = {key: value for key, value in options.items() if key != "kv_cache_gib"}
    found: dict[str, Any] = {"concurrency": args.concurrency}
    with QwenChat(args.model, serve=True, **server_options) as bot:
        bot.batch(messages[:4], progress=False, **sampling)  # warm up
        batch_tps = []
        for repeat in range(args.repeat):
            result, seconds = timed(
                lambda: bot.batch(
                    messages, concurrency=args.concurrency, progress=False, **sampling
                )
            )
            assert not result.interrupted
            batch_tps.append(result.num_generated_tokens / seconds)
            print(f"[{repeat}] server batch x{args.concurrency}: {batch_tps[-1]:.0f} tok/s "
                  f"({seconds:.2f} s)", flush=True)  # fmt: skip
        count = min(args.sequential, len(messages))
        generated, seconds = timed(lambda: sequential(bot, messages[:count], sampling))
        sequential_tps = generated / seconds
        print(f"server sequential chat x{count}: {sequential_tps:.0f} tok/s", flush=True)
        found.update(
            batch_tok_s=summary(batch_tps),
            sequential_prompts=count,
            sequential_tok_s=round(sequential_tps, 2),
            batch_vs_sequential=round(statistics.median(batch_tps) / sequential_tps, 2),
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help='"demo", "tiny", a folder or hub id')
    parser.add_argument("--label", help="save benchmarks/results/batch-LABEL.json (a real run)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=256, help="prompts asked one by one")
    parser.add_argument("--concurrency", type=int, default=32, help="server requests in flight")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-gib", type=float, help="CPU KV cache size")
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--no-server", action="store_true", help="skip the server backend")
    args = parser.parse_args()
    options: dict[str, Any] = {"max_model_len": args.max_model_len, "seed": 0}
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.kv_cache_gib is not None:
        options["kv_cache_gib"] = args.kv_cache_gib
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    result: dict[str, Any] = {
        "label": args.label,
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "prompts": args.prompts,
        "tokens_per_reply": args.tokens,
        "engine_options": options,
    }
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
    print("== in process", flush=True)
    result["in_process"] = in_process(args, options)
    if not args.no_server:
        print("== through a managed vLLM server", flush=True)
        result["server"] = through_server(args, options)
    print(json.dumps(result, indent=2))
    if args.label:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"batch-{args.label}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print("wrote", path)


if __name__ == "__main__":
    main()
