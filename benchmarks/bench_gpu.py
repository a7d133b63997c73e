"""Side-by-side speed comparisons on one engine (run on the GPU machine; also runs on CPU).

    python benchmarks/bench_gpu.py --model DIR --label 0.5b [--repeat 3] [--tokens 512]

Measures, in one process and on the same vLLM engine:
  a. decode tokens/s: ``QwenChat.stream`` and ``%%qwen`` against raw ``LLM.generate``;
  b. time to first token of a follow-up turn on a ~4K-token history: qwen-magic (cached segments,
     prefix-cached prompt) against the tutorial's way (re-encode the whole history, then generate);
  d. Hugging Face transformers ``generate`` on the same weights (``--hf``);
  e. ``-n 8`` samples in one request against 8 sequential requests;
and a cProfile of the streaming path. Results go to benchmarks/results/<label>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_format import tutorial_make_context

from qwen_magic.backends import _vllm_compat
from qwen_magic.conversation import Conversation
from qwen_magic.prompt import PromptPlan, fit_prompt

RESULTS = Path(__file__).parent / "results"
# Greedy without penalties: what transformers' greedy generate does, on every path alike.
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}
FILLER = "The quick brown fox jumps over the lazy dog while the engine keeps its cache warm. "


def plan_for(bot: Any, conversation: Conversation, message: str, budget: int) -> PromptPlan:
    """The prompt ``bot.reply`` would send (the oldest turns dropped to fit ``budget``)."""
    return fit_prompt(
        bot.formatter, conversation.system, conversation.turns, message, budget=budget
    )


def timed(function) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "runs": len(values),
    }


def raw_generate(bot: Any, token_ids: list[int], **sampling: Any) -> list:
    """Plain ``LLM.generate`` on the same engine, with the same effective sampling values."""
    from vllm import SamplingParams

    values = bot.engine.resolve_sampling(len(token_ids), **sampling)
    params = SamplingParams(
        **values, stop_token_ids=bot.formatter.tokenizer.stop_token_ids, skip_special_tokens=True
    )
    return bot.engine.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)


def raw_step_loop(bot: Any, token_ids: list[int], **sampling: Any) -> int:
    """vLLM's own streaming loop (``add_request`` + ``step`` with DELTA outputs), no qwen-magic code
    in the loop.

    Separates what streaming costs inside vLLM (a RequestOutput per step) from our code's cost.
    """
    stop = bot.formatter.tokenizer.stop_token_ids
    params = bot.engine.sampling_params(len(token_ids), stop_token_ids=stop, **sampling)
    llm_engine = bot.engine.llm.llm_engine
    llm_engine.add_request(
        "bench-raw-step-loop", _vllm_compat.engine_prompt(llm_engine, token_ids), params
    )
    generated = 0
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            generated += len(output.outputs[0].token_ids)
    return generated


def decode_speed(bot: Any, shell: Any, args: argparse.Namespace) -> dict[str, Any]:
    """a. Fixed-length greedy decode (ignore_eos), four paths alternated, tokens per second."""
    conversation = Conversation()
    message = "Tell me a long story about a lighthouse keeper."
    plan = plan_for(bot, conversation, message, bot.engine.max_model_len)
    fixed = {**GREEDY, "max_tokens": args.tokens, "ignore_eos": True}
    rates: dict[str, list[float]] = {
        "llm_generate": [],
        "vllm_step_loop": [],
        "qwenchat_stream": [],
        "qwen_magic": [],
    }
    cell = (
        f"%%qwen --no-history -o bench_reply --max-tokens {args.tokens} -t 0"
        f" --repetition-penalty 1\n{message}"
    )
    for _ in range(args.repeat):
        seconds, outputs = timed(lambda: raw_generate(bot, plan.token_ids, **fixed))
        rates["llm_generate"].append(len(outputs[0].outputs[0].token_ids) / seconds)

        seconds, generated = timed(lambda: raw_step_loop(bot, plan.token_ids, **fixed))
        rates["vllm_step_loop"].append(generated / seconds)

        seconds, _ = timed(lambda: list(bot.stream(message, **fixed)))
        rates["qwenchat_stream"].append(args.tokens / seconds)  # ignore_eos: exactly max_tokens

        with contextlib.redirect_stdout(io.StringIO()):
            seconds, result = timed(lambda: shell.run_cell(cell))
        result.raise_error()
        tokens = result.result.num_generated_tokens
        rates["qwen_magic"].append(tokens / seconds)
    out = {name: summary(values) for name, values in rates.items()}
    base = out["llm_generate"]["median"]
    out["ratio_step_loop_vs_generate"] = round(out["vllm_step_loop"]["median"] / base, 3)
    out["ratio_stream_vs_generate"] = round(out["qwenchat_stream"]["median"] / base, 3)
    out["ratio_magic_vs_generate"] = round(out["qwen_magic"]["median"] / base, 3)
    # Each run's paths ran back to back, so per-run ratios cancel slow drifts of the machine.
    for name in ("vllm_step_loop", "qwenchat_stream", "qwen_magic"):
        paired = [a / b for a, b in zip(rates[name], rates["llm_generate"], strict=True)]
        out[f"paired_ratio_{name}"] = summary(paired)
    return out


def follow_up_ttft(bot: Any, args: argparse.Namespace) -> dict[str, Any]:
    """b. First token of a follow-up turn on a ~4K-token history."""
    conversation = Conversation(system="You are a helpful assistant.")
    turn = 0
    while True:
        plan = plan_for(bot, conversation, "next", 10**9)
        if plan.num_tokens >= args.history_tokens:
            break
        conversation.record(f"Question {turn}: {FILLER * 4}", f"Answer {turn}: {FILLER * 4}")
        turn += 1
    if plan.num_tokens + 32 > bot.engine.max_model_len:
        raise SystemExit(
            f"a {plan.num_tokens}-token history does not fit the {bot.engine.max_model_len}-token"
            " context: lower --history-tokens or raise max_model_len with --engine-option"
        )
    tokenizer = bot.formatter.tokenizer
    ours, tutorial, tutorial_format = [], [], []
    for attempt in range(args.repeat + 1):
        message = f"Follow-up question number {attempt}?"
        # qwen-magic: cached segments + streaming; the history prefix is in vLLM's prefix cache.
        start = time.perf_counter()
        stream = bot.engine.stream(
            plan_for(bot, conversation, message, 10**9).token_ids,
            stop_token_ids=tokenizer.stop_token_ids,
            max_tokens=1,
            **GREEDY,
        )
        next(iter(stream))
        first = time.perf_counter() - start
        for _ in stream:
            pass
        # The tutorial: re-encode every turn as text, then generate one token.
        start = time.perf_counter()
        ids = tutorial_make_context(tokenizer, conversation, message)
        formatted = time.perf_counter() - start
        raw_generate(bot, ids, max_tokens=1, **GREEDY)
        tutorial_first = time.perf_counter() - start
        if attempt:  # the first round warms both paths
            ours.append(first * 1000)
            tutorial.append(tutorial_first * 1000)
            tutorial_format.append(formatted * 1000)
    return {
        "history_tokens": plan.num_tokens,
        "turns": turn,
        "qwen_magic_ttft_ms": summary(ours),
        "tutorial_ttft_ms": summary(tutorial),
        "tutorial_reencode_ms": summary(tutorial_format),
    }


def samples(bot: Any, args: argparse.Namespace) -> dict[str, Any]:
    """e. ``-n 8`` in one request against 8 sequential requests."""
    conversation = Conversation()
    message = "Write a haiku about the sea."
    sampling = {"max_tokens": args.tokens // 2, "temperature": 0.8, "ignore_eos": True}
    parallel, sequential = [], []
    for _ in range(args.repeat):
        seconds, _ = timed(
            lambda: bot.reply(conversation, message, n=8, use_history=False, **sampling)
        )
        conversation.undo()
        parallel.append(seconds)
        start = time.perf_counter()
        for _ in range(8):
            bot.reply(conversation, message, use_history=False, **sampling)
            conversation.undo()
        sequential.append(time.perf_counter() - start)
    return {
        "n8_one_request_s": summary(parallel),
        "eight_sequential_s": summary(sequential),
        "speedup": round(statistics.median(sequential) / statistics.median(parallel), 2),
    }


def transformers_speed(model: str, bot: Any, args: argparse.Namespace) -> dict[str, Any]:
    """d. Hugging Face transformers generate on the same weights and prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device)
    plan = plan_for(bot, Conversation(), "Tell me a story.", 10**9)
    inputs = torch.tensor([plan.token_ids], device=device)
    tokens = args.tokens // 2
    fixed = {**GREEDY, "max_tokens": tokens, "ignore_eos": True}

    def hf_generate() -> Any:
        return hf.generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    rates, ours = [], []
    for _ in range(args.repeat):
        seconds, output = timed(hf_generate)
        rates.append((output.shape[1] - inputs.shape[1]) / seconds)
        seconds, _ = timed(lambda: list(bot.stream("Tell me a story.", **fixed)))
        ours.append(tokens / seconds)
    return {
        "transformers_tok_s": summary(rates),
        "qwenchat_stream_tok_s": summary(ours),
        "speedup": round(statistics.median(ours) / statistics.median(rates), 1),
    }


def profile_stream(bot: Any, args: argparse.Namespace) -> str:
    """Where the streaming path spends its time (cumulative, top entries)."""
    profiler = cProfile.Profile()
    fixed = {**GREEDY, "max_tokens": args.tokens, "ignore_eos": True}
    profiler.enable()
    for _ in bot.stream("Profile this reply.", **fixed):
        pass
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--history-tokens", type=int, default=4096)
    parser.add_argument("--hf", action="store_true", help="also time transformers generate (d)")
    parser.add_argument(
        "--parts", default="abep", help="which of a, b, e and p (the profile) to run; d is --hf"
    )
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="'[\"KEY\", VALUE]'",
        help="an engine option as a JSON pair, e.g. '[\"gpu_memory_utilization\", 0.5]'",
    )
    args = parser.parse_args()

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "qwen_magic")
    options = dict(json.loads(value) for value in args.engine_option)
    magics = shell.magics_manager.registry["QwenMagics"]
    magics.engine_options = options
    shell.run_line_magic("qwen_load", args.model)
    bot = magics.session.bot
    import vllm

    result: dict[str, Any] = {
        "label": args.label,
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "engine_options": options,
        "device": bot.engine.device,
        "max_model_len": bot.engine.max_model_len,
        "tokens": args.tokens,
    }
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
            result["torch"] = torch.__version__
    except ImportError:
        pass
    parts = {
        "a": ("a_decode", "a. decode speed", lambda: decode_speed(bot, shell, args)),
        "b": (
            "b_follow_up_ttft",
            "b. follow-up time to first token",
            lambda: follow_up_ttft(bot, args),
        ),
        "e": ("e_samples", "e. -n 8 against 8 sequential", lambda: samples(bot, args)),
        "d": (
            "d_transformers",
            "d. transformers generate",
            lambda: transformers_speed(bot.engine.model, bot, args),
        ),
        "p": ("profile", "profile of the streaming path", lambda: profile_stream(bot, args)),
    }
    wanted = args.parts + ("d" if args.hf else "")
    for letter, (key, title, run) in parts.items():
        if letter in wanted:
            print("==", title, flush=True)
            result[key] = run()
            print(result[key][:4000] if letter == "p" else json.dumps(result[key]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("wrote", path)
    shell.run_line_magic("qwen_unload", "")


if __name__ == "__main__":
    main()
