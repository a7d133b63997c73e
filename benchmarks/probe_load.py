"""Where a warm start of ``%qwen_load`` spends its time, against ``vllm.LLM(...)`` (diagnostic).

    WARMUP=1 MODES=bare-ipython,magic,magic-serial ROUNDS=3 \\
        python benchmarks/probe_load.py MODEL_DIR

Modes, each a fresh process, alternated round by round and printed as one JSON line each:
  bare-python   ``vllm.LLM(...)`` in a plain Python process;
  bare-ipython  the same code run as a cell of an IPython shell (a notebook kernel's situation);
  magic         ``%load_ext qwen_magic`` and ``%qwen_load`` (tokenizer read beside vLLM's start);
  magic-serial  the same with the tokenizer read before the engine starts.
The bare modes run ``bench_load.py``'s cell with qwen-magic's defaults for the machine (eager on
the CPU, CUDA graphs on the GPU).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import BARE_CELL


class SerialExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each submitted call at once, on the caller's thread."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def child(mode: str, model: str) -> None:
    started = time.perf_counter()
    marks: dict[str, float] = {}
    bare_names = {"MODEL": model, "EAGER": None, "MEMORY": 0.5}  # None: the machine's default
    if mode == "bare-python":
        exec(BARE_CELL, bare_names)
    else:
        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()
        if mode == "bare-ipython":
            shell.user_ns.update(bare_names)
            shell.run_cell(BARE_CELL).raise_error()
        else:
            shell.run_line_magic("load_ext", "qwen_magic")
            if mode == "magic-serial":
                import qwen_magic.chat

                qwen_magic.chat.ThreadPoolExecutor = SerialExecutor  # type: ignore[misc]
            shell.run_line_magic("qwen_load", f"{model} --gpu-memory-utilization 0.5")
            engine = shell.magics_manager.registry["QwenMagics"].chat.engine
            marks["load_seconds"] = engine.load_seconds
            engine.generate([1, 2, 3], stop_token_ids=[], max_tokens=1)
    marks["total"] = time.perf_counter() - started
    print(json.dumps(marks), flush=True)


def main() -> None:
    if len(sys.argv) > 2:
        child(sys.argv[2], sys.argv[1])
        return
    model, rounds = sys.argv[1], int(os.environ.get("ROUNDS", 3))
    modes = os.environ.get("MODES", "bare-python,bare-ipython,magic,magic-serial").split(",")
    if os.environ.get("WARMUP"):  # fills the torch.compile cache
        subprocess.run([sys.executable, __file__, model, "bare-python"], capture_output=True)
    for _ in range(rounds):
        for mode in modes:
            run = subprocess.run(
                [sys.executable, __file__, model, mode], capture_output=True, text=True
            )
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            print(mode, lines[-1] if lines else run.stderr[-1500:], flush=True)


if __name__ == "__main__":
    main()
