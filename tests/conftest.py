"""Session fixtures: the paths of the real models and tokenizers (fetched once, cached), and a
real vLLM OpenAI-compatible server on loopback for the server backend's tests."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from qwen_magic import models


def pytest_configure(config: pytest.Config) -> None:
    """Give SIGINT Python's own handler back: a runner started in the background by a
    non-interactive shell inherits SIGINT ignored, and the interrupt tests would then see
    nothing (a kernel, a terminal or CI in the foreground have the default handler)."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a bf16 Hugging Face folder."""
    return models.demo_model_path()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Tiny random-weight Qwen2 folder with the real Qwen2.5 tokenizer."""
    return models.tiny_model_path()


@pytest.fixture(scope="session")
def tiny_qwen3_model() -> Path:
    """The tiny random Qwen3 model: a thinking model whose template has the thinking switch."""
    return models.tiny_qwen3_model_path()


@pytest.fixture(scope="session")
def thinking_only_model() -> Path:
    """The tiny Qwen3 with a thinking-only template (Qwen3-Thinking-2507's: the generation
    prompt opens ``<think>``, no switch), so a reply starts inside its reasoning.

    Random weights never write ``</think>`` themselves; tests close the block with the thinking
    budget or stop inside it.
    """
    return models.tiny_qwen3_thinking_model_path()


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """Folder holding the Qwen3 tokenizer.json and tokenizer_config.json."""
    return models.qwen3_tokenizer_path()


@pytest.fixture(scope="session")
def qwen1_tiktoken_file() -> Path:
    """Qwen(1)'s qwen.tiktoken BPE ranks file."""
    return models.qwen1_tiktoken_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face folder."""
    return models.smollm2_path()


# --- a real vLLM OpenAI-compatible server on loopback ---------------------------------------------

SERVER_START_TIMEOUT_S = 240.0
SERVER_STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class VllmServer:
    """A running ``vllm.entrypoints.openai.api_server`` and how to reach it.

    Attributes:
        url: Its root URL (``http://127.0.0.1:PORT``).
        key: The API key it requires.
        key_env: The environment variable that holds ``key`` while it runs.
        pid: The server's process id, also its process group id.
        log_path: Where its stdout and stderr go.
    """

    url: str
    key: str
    key_env: str
    pid: int
    log_path: Path

    def __repr__(self) -> str:  # the key stays out of test reports
        return f"VllmServer({self.url!r}, pid={self.pid}, key_env={self.key_env!r})"

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)

    def requests_running(self) -> float:
        """``vllm:num_requests_running`` from ``/metrics`` (summed over its labels)."""
        metrics = httpx.get(f"{self.url}/metrics", timeout=5.0, trust_env=False)
        metrics.raise_for_status()
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.text.splitlines()
            if line.startswith("vllm:num_requests_running")
        ]
        assert values, "no vllm:num_requests_running in /metrics"
        return sum(values)


def _log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def free_loopback_port() -> int:
    """A TCP port nobody listens on now (the kernel picks it, so never a hand-started one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after a grace period."""
    for sig, grace_s in ((signal.SIGTERM, SERVER_STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if _group_ends_within(process, grace_s):
            return


def _group_ends_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether the server and its children (EngineCore, worker) are all gone within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@contextmanager
def running_vllm_server(
    model: Path, log_path: Path, *, key_env: str, max_model_len: int = 2048
) -> Iterator[VllmServer]:
    """Start a vLLM server on ``model`` with a random key on a free loopback port; stop it after.

    ``key_env`` holds the key in ``os.environ`` while the server runs. The server runs in its own
    process group (so a test's interrupt never reaches it) and the whole group is stopped on exit,
    whatever happened.
    """
    key = secrets.token_urlsafe(24)
    port = free_loopback_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_API_KEY": key,
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log, pytest.MonkeyPatch.context() as patch:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            _wait_until_healthy(process, url, log_path)
            patch.setenv(key_env, key)
            # Tests that count this process's server children leave the shared ones out.
            shared = os.environ.get(SHARED_SERVER_PIDS, "").split()
            patch.setenv(SHARED_SERVER_PIDS, " ".join([*shared, str(process.pid)]))
            yield VllmServer(url=url, key=key, key_env=key_env, pid=process.pid, log_path=log_path)
        finally:
            _stop_process_group(process)


SHARED_SERVER_PIDS = "QWEN_MAGIC_TEST_SHARED_SERVER_PIDS"


def _wait_until_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the vLLM server exited ({process.returncode}) before it was healthy; its log "
                f"ends:\n{_log_tail(log_path, 40)}",
                pytrace=False,
            )
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(
        f"the vLLM server was not healthy after {SERVER_START_TIMEOUT_S:.0f} s; its log ends:\n"
        f"{_log_tail(log_path, 40)}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def launch_vllm_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., AbstractContextManager[VllmServer]]:
    """``with launch_vllm_server(key_env=...) as server:`` a server of its own for one test."""

    def launch(*, key_env: str, max_model_len: int = 2048) -> AbstractContextManager[VllmServer]:
        log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
        return running_vllm_server(
            tiny_model, log_path, key_env=key_env, max_model_len=max_model_len
        )

    return launch


@pytest.fixture(scope="session")
def vllm_server(
    launch_vllm_server: Callable[..., AbstractContextManager[VllmServer]],
) -> Iterator[VllmServer]:
    """One vLLM server on the tiny model (context 2048) for the whole session (~45-60 s start)."""
    with launch_vllm_server(key_env="QWEN_MAGIC_TEST_KEY") as server:
        yield server
