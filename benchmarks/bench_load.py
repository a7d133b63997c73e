"""``%qwen_load`` start time against a bare ``vllm.LLM(...)`` with the same options.

    python benchmarks/bench_load.py --model DIR [--label 0.5b] [--warm-repeat 2] [--modes eager]

Each start runs in a fresh Python process with an IPython shell, as in a notebook kernel, timed
from the cell that imports vLLM (or from ``%load_ext``) until the engine can generate. "first"
starts clear vLLM's torch.compile cache beforehand; "warm" starts find it filled by the previous
run. Each ``%qwen_load`` start also reports its own overhead directly: its time to ready minus
the time the engine spent importing vLLM and constructing ``vllm.LLM`` (``Engine.load_seconds``).
Both paths run vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as qwen-magic does) and
get identical ``LLM`` keyword arguments (``EngineOptions.llm_kwargs``). Results go to
benchmarks/results/load-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMPILE_CACHE = Path.home() / ".cache" / "vllm" / "torch_compile_cache"


BARE_CELL = """
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch
import vllm
from qwen_magic.backends.vllm_options import EngineOptions

options = EngineOptions(model=MODEL, enforce_eager=EAGER, gpu_memory_utilization=MEMORY)
device = "cuda" if torch.cuda.is_available() else "cpu"
llm = vllm.LLM(**options.llm_kwargs(device=device))
llm.generate([{"prompt_token_ids": [1, 2, 3]}], vllm.SamplingParams(max_tokens=1))
"""


def child(mode: str, model: str, eager: bool, memory: float) -> None:
    """Runs in the child process: one start, printed as a JSON line."""
    started = time.perf_counter()
    if mode == "bare":
        # The user's alternative in a notebook: vllm.LLM(...) typed into a cell of the kernel, so
        # it runs in an IPython shell as %qwen_load does (the shell alone slows vLLM's start).
        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()
        shell.user_ns.update(MODEL=model, EAGER=eager, MEMORY=memory)
        shell.run_cell(BARE_CELL).raise_error()
    else:
        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "qwen_magic")
        flags = " --enforce-eager" if eager else ""
        shell.run_line_magic("qwen_load", f"{model} --gpu-memory-utilization {memory}{flags}")
        ready = time.perf_counter() - started
        chat = shell.magics_manager.registry["QwenMagics"].session.bot
        list(chat.engine.stream([1, 2, 3], stop_token_ids=[], max_tokens=1))
        overhead = ready - chat.engine.load_seconds
        print(json.dumps({"overhead_seconds": overhead}), flush=True)
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


def start(mode: str, model: str, eager: bool, memory: float) -> tuple[float, float | None]:
    """Seconds to a first token in a fresh process, and a magic start's own overhead."""
    command = [sys.executable, __file__, "--child", mode, "--model", model, "--memory", str(memory)]
    if eager:
        command.append("--eager")
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    values: dict[str, float] = {}
    for line in output.stdout.splitlines():
        if line.startswith("{"):
            values.update(json.loads(line))
    if output.returncode != 0 or "seconds" not in values:
        raise RuntimeError(f"{mode} start failed:\n{output.stderr[-3000:]}")
    return values["seconds"], values.get("overhead_seconds")


def measure(label: str, model: str, memory: float, warm_repeat: int) -> dict[str, list[float]]:
    """First and warm starts of both paths in one mode ("eager" or "cuda_graphs")."""
    runs: dict[str, list[float]] = {}

    def one(mode: str, kind: str) -> None:
        seconds, overhead = start(mode, model, label == "eager", memory)
        runs.setdefault(f"{mode}_{kind}", []).append(seconds)
        if overhead is not None:  # time to ready minus Engine.load_seconds
            runs.setdefault(f"direct_overhead_{kind}", []).append(overhead)
        print(label, mode, kind, round(seconds, 2), overhead, flush=True)

    for mode in ("bare", "magic"):  # first start: no compile cache
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)
        one(mode, "first")
    for _ in range(warm_repeat):
        for mode in ("bare", "magic"):  # alternate, so drift hits both alike
            one(mode, "warm")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--label", default="0.5b")
    parser.add_argument("--memory", type=float, default=0.5)
    parser.add_argument("--warm-repeat", type=int, default=2)
    parser.add_argument("--child", choices=["bare", "magic"])
    parser.add_argument("--eager", action="store_true")
    parser.add_argument(
        "--modes", default="eager,cuda_graphs", help="comma-separated: eager, cuda_graphs"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.eager, args.memory)
        return

    results: dict[str, dict[str, list[float]]] = {}
    for label in args.modes.split(","):
        if label not in ("eager", "cuda_graphs"):
            parser.error(f"unknown mode {label!r}: use eager or cuda_graphs")
        results[label] = measure(label, args.model, args.memory, args.warm_repeat)
    summary = {
        label: {
            "overhead_first_s": round(runs["magic_first"][0] - runs["bare_first"][0], 2),
            "overhead_warm_s": round(
                statistics.median(runs["magic_warm"]) - statistics.median(runs["bare_warm"]), 2
            ),
            "direct_overhead_median_s": round(
                statistics.median(runs["direct_overhead_first"] + runs["direct_overhead_warm"]), 3
            ),
            **{key: [round(value, 3) for value in values] for key, values in runs.items()},
        }
        for label, runs in results.items()
    }
    document = {"label": args.label, "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M")}
    document["results"] = summary
    print(json.dumps(document, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"load-{args.label}.json").write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
