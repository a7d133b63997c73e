"""A small sampling profiler for the start benchmark: where does a start spend its seconds?

Every ``interval`` seconds a thread reads the stack of every other Python thread
(``sys._current_frames``) and counts it. :meth:`StackSampler.report` then gives

- ``modules``: seconds spent running a module's top-level code (imports), by source file,
  counting only the innermost module on each stack, so nested imports are not counted twice;
- ``functions``: seconds each function was on a stack (inclusive), for the slowest ones;

and :meth:`StackSampler.write_collapsed` every stack (``file:function;...``, flame-graph format).

Set ``sampler.phase`` to split the counts (``"reading"``, ``"load"``, ...): the report has
one section per phase.

A sampler sees only Python frames: seconds in C code (a CUDA call, a compiler run in a
subprocess) are counted against the Python line that called it, which is what is wanted here.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "dist-packages/", "/tmp/site/", "/qwen_magic/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_name}"


class StackSampler:
    """Count the stacks of all other threads every ``interval`` seconds while running."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.samples = 0
        self.phase = "start"
        self._stacks: collections.Counter[tuple[str, ...]] = collections.Counter()  # seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            # Weighted by the time since the last sample: a thread holding the GIL delays samples.
            weight, last = now - last, now
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack: list[str] = []
                current: FrameType | None = frame
                while current is not None:
                    stack.append(_where(current))
                    current = current.f_back
                stack.append(f"[{self.phase}]")
                stack.reverse()
                if stack[-1].endswith("threading.py:wait"):
                    continue  # an idle thread (the engine's and the pool's waiting workers)
                self._stacks[tuple(stack)] += weight

    def report(self, top: int = 40) -> dict[str, Any]:
        """Per phase, the modules and functions that took the most seconds."""
        phases = sorted({stack[0] for stack in self._stacks})
        return {
            "interval_s": self.interval,
            "samples": self.samples,
            **{phase: self._report(phase, top) for phase in phases},
        }

    def _report(self, phase: str, top: int) -> dict[str, Any]:
        modules: collections.Counter[str] = collections.Counter()
        functions: collections.Counter[str] = collections.Counter()
        for stack, count in self._stacks.items():
            if stack[0] != phase:
                continue
            innermost_module = next((f for f in reversed(stack) if f.endswith(":<module>")), None)
            if innermost_module is not None:
                modules[innermost_module.rsplit(":", 1)[0]] += count
            for name in set(stack):
                functions[name] += count

        def seconds(counter: collections.Counter[str]) -> list[tuple[str, float]]:
            return [(k, round(v, 2)) for k, v in counter.most_common(top)]

        return {"modules": seconds(modules), "functions": seconds(functions)}

    def write_collapsed(self, path: Path) -> None:
        """All stacks in flame-graph format, one ``a;b;c MILLISECONDS`` line each."""
        lines = [
            ";".join(stack) + f" {round(seconds * 1000)}"
            for stack, seconds in self._stacks.most_common()
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":  # a self-check: the busy loop below must be seen
    with StackSampler(0.01) as sampler:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    print(sampler.report(top=3))
