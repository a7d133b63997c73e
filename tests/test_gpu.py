"""The GPU path, on a CUDA machine: ``pytest -m gpu``.

Models come from the environment, since no hub is reachable on the GPU machine either:
``QWEN_MAGIC_GPU_MODEL`` is a Qwen2.5-0.5B-shaped folder (random weights are fine; see
benchmarks/make_random_model.py) and ``QWEN_MAGIC_GPU_REAL_MODEL`` the real
Qwen2.5-Coder-0.5B-Instruct folder for the one check of meaning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from qwen_magic.conversation import Conversation

pytestmark = pytest.mark.gpu


def _needs_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _model(variable: str) -> str:
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"set {variable} to a model folder")
    return path


def gpu_used_mib() -> int:
    """GPU memory in use on device 0, all processes (what the engine and CUDA hold)."""
    output = subprocess.check_output(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        text=True,
    )
    return int(output.strip().splitlines()[0])


@pytest.fixture(scope="module")
def bot():
    _needs_cuda()
    from qwen_magic.chat import QwenChat

    chat = QwenChat(
        _model("QWEN_MAGIC_GPU_MODEL"),
        gpu_memory_utilization=0.4,
        max_model_len=8192,
        enable_prefix_caching=True,
        seed=0,
    )
    yield chat
    chat.close()


def test_loads_on_the_gpu_and_streams(bot):
    assert bot.engine.device == "cuda"
    deltas = list(bot.stream("Count to ten.", max_tokens=32, temperature=0))
    assert len(deltas) > 1
    assert "<|im_end|>" not in "".join(deltas)


def test_abort_mid_stream_leaves_engine_usable(bot):
    stream = bot.stream("Write a long story.", max_tokens=2000, temperature=0.8)
    for count, _ in enumerate(stream):
        if count == 5:
            break
    stream.close()  # the consumer stops: the request must be aborted, not left running
    response, _ = bot.chat("Say hi.", max_tokens=8)
    assert isinstance(response, str)


def test_prefix_caching_reuses_the_history(bot):
    conversation = Conversation(system="You are terse.")
    long_message = "Here is some context about the project. " * 150
    bot.reply(conversation, long_message, max_tokens=4, temperature=0)
    follow_up = bot.reply(conversation, "And then?", max_tokens=4, temperature=0)
    assert follow_up.num_cached_tokens > 0.8 * len(follow_up.plan.token_ids) - 64


def test_n_samples(bot):
    reply = bot.reply(Conversation(), "Name a colour.", n=4, max_tokens=16, temperature=1.0)
    assert len(reply.texts) == 4
    assert len(set(reply.texts)) > 1


def test_unload_returns_gpu_memory():
    _needs_cuda()
    from qwen_magic.chat import QwenChat

    model = _model("QWEN_MAGIC_GPU_MODEL")
    baseline = gpu_used_mib()
    host_rss = []
    for _ in range(3):
        chat = QwenChat(model, gpu_memory_utilization=0.3, max_model_len=4096, enforce_eager=True)
        loaded = gpu_used_mib()
        assert loaded > baseline + 1000  # the KV cache and weights are really on the GPU
        chat.close()
        assert gpu_used_mib() < baseline + 600, "engine memory was not returned"
        host_rss.append(chat.engine.memory()["total_rss"])
    # The first cycle sets up CUDA for good; after it, host memory must not grow either.
    growth_per_cycle = (host_rss[-1] - host_rss[0]) / (len(host_rss) - 1)
    assert growth_per_cycle < 40 * 2**20, [value // 2**20 for value in host_rss]


@pytest.mark.semantic
def test_real_model_answers_on_the_gpu():
    _needs_cuda()
    from qwen_magic.chat import QwenChat

    with QwenChat(_model("QWEN_MAGIC_GPU_REAL_MODEL"), gpu_memory_utilization=0.3) as chat:
        response, history = chat.chat("What is the capital of France?", temperature=0)
        assert "Paris" in response
        _, history = chat.chat("My name is Ada. Please remember it.", temperature=0)
        response, _ = chat.chat("What is my name?", history=history, temperature=0)
        assert "Ada" in response


def _shell_with_extension():
    import torch
    from IPython.testing.globalipapp import start_ipython

    torch.zeros(1, device="cuda")  # the CUDA context stays for good: count it in the baseline

    from IPython import get_ipython

    ip = start_ipython() or get_ipython()  # the second call returns None: the same shell
    if "QwenMagics" not in ip.magics_manager.registry:
        ip.run_line_magic("load_ext", "qwen_magic")
    ip.run_line_magic("config", 'QwenMagics.display_mode = "terminal"')
    return ip, ip.magics_manager.registry["QwenMagics"].session


def _interrupt_in(seconds: float) -> None:
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, raise_interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _assert_freed(what: str, baseline: int) -> None:
    assert sys.last_value is not None, f"{what}: IPython kept no exception"
    used = gpu_used_mib()
    assert used < baseline + 600, f"{what}: {used - baseline} MiB still in use"


def test_nothing_pins_the_engine_after_interrupts_and_failures():
    """Interrupted or failed replies and an interrupted load, in a real shell that keeps
    ``sys.last_*``: unloading (or the load itself) gives the GPU memory back every time."""
    _needs_cuda()
    ip, session = _shell_with_extension()
    model = _model("QWEN_MAGIC_GPU_MODEL")
    load = f"{model} --gpu-memory-utilization 0.3 --max-model-len 4096 --enforce-eager"
    baseline = gpu_used_mib()

    # (a) a reply interrupted mid-stream
    ip.run_line_magic("qwen_load", load)
    assert gpu_used_mib() > baseline + 1000
    _interrupt_in(1.0)
    ip.run_cell("%%qwen -t 1 --max-tokens 3000\nTell me a very long story.")
    assert session.conversation().turns[-1].interrupted
    ip.run_line_magic("qwen_unload", "")
    _assert_freed("interrupted reply", baseline)

    # (b) a reply that fails mid-stream
    ip.run_line_magic("qwen_load", load)
    ip.user_ns["session"] = session
    ip.run_cell(
        "def boom(index, text):\n    raise RuntimeError('display failed')\n"
        "session.ask(None, 'Hello', max_tokens=200, on_delta=boom)"
    )
    assert isinstance(sys.last_value, RuntimeError)
    ip.run_line_magic("qwen_unload", "")
    _assert_freed("failed reply", baseline)

    # (c) a load interrupted while vLLM builds the engine
    _interrupt_in(3.0)
    ip.run_cell(f"%qwen_load {load}")
    signal.setitimer(signal.ITIMER_REAL, 0)
    assert session.bot is None
    _assert_freed("interrupted load", baseline)

    ip.run_line_magic("qwen_load", load)  # and the GPU is still usable
    assert session.ask(None, "Hi", max_tokens=4).texts[0]
    ip.run_line_magic("unload_ext", "qwen_magic")
    assert gpu_used_mib() < baseline + 600


def _failed_load_frees_the_weights(extra_flags: str) -> None:
    _needs_cuda()
    ip, session = _shell_with_extension()
    model = _model("QWEN_MAGIC_GPU_MODEL")
    baseline = gpu_used_mib()
    # No room left for the KV cache once the weights are loaded.
    ip.run_cell(
        f"%qwen_load {model} --gpu-memory-utilization 0.005 --max-model-len 4096 {extra_flags}"
    )
    assert session.bot is None
    _assert_freed("failed load", baseline)


def test_a_failed_load_frees_the_weights():
    """The default (CUDA graphs without torch.compile) and --enforce-eager free everything."""
    _failed_load_frees_the_weights("")


@pytest.mark.xfail(
    strict=True,
    reason="known: after a load that fails once torch.compile has run (--compile), vLLM 0.26's "
    "compilation backend (graph_module, example_inputs, ...) still holds the weights as example "
    "inputs (~980 MiB for the 0.5B shape on an H100/H200; torch._dynamo.reset() does not free "
    "them).",
)
def test_a_failed_load_after_torch_compile_frees_the_weights():
    _failed_load_frees_the_weights("--compile")


# A "kernel": an IPython shell in its own process group, with a managed TP=2 server.
SHELL_WITH_A_TP2_SERVER = r"""
import json, os, signal, sys, threading
from IPython.testing.globalipapp import start_ipython

ip = start_ipython()
ip.run_line_magic("load_ext", "qwen_magic")
ip.run_line_magic("config", 'QwenMagics.display_mode = "terminal"')
session = ip.magics_manager.registry["QwenMagics"].session
ip.run_line_magic("qwen_load", sys.argv[1] + " --tensor-parallel-size 2"
                  " --gpu-memory-utilization 0.4 --max-model-len 4096")
facts = {"where": session.bot.backend.info.where}
"""

TENSOR_PARALLEL_SCRIPT = (
    SHELL_WITH_A_TP2_SERVER
    + r"""# What Jupyter does on "interrupt": SIGINT to the kernel's whole process group.
threading.Timer(2.0, os.killpg, (os.getpgrp(), signal.SIGINT)).start()
result = ip.run_cell("%%qwen -t 1 --max-tokens 3000\nTell me a very long story.")
facts["interrupted"] = isinstance(result.error_in_exec, KeyboardInterrupt)
facts["turn_marked"] = session.conversation().turns[-1].interrupted
reply = session.ask(None, "Say hi.", max_tokens=8, temperature=0)
facts["next_reply_tokens"] = reply.num_generated_tokens
ip.run_line_magic("qwen_unload", "")
print("FACTS " + json.dumps(facts), flush=True)
"""
)


DEMO_ON_TENSOR_PARALLEL_SCRIPT = (
    SHELL_WITH_A_TP2_SERVER
    + r"""

def cell(text):
    result = ip.run_cell(text, store_history=True)  # a new cell each time, as in a notebook
    return result, session.conversation().turns[-1]


facts["paris"] = cell("%%qwen -t 0\nWhat is the capital of France?")[1].assistant
cell("%%qwen -t 0\nMy name is Ada. Please remember it.")
facts["name_with_history"] = cell("%%qwen -t 0\nWhat is my name?")[1].assistant
facts["name_without_history"] = cell("%%qwen -t 0 --no-history\nWhat is my name?")[1].assistant
# What Jupyter does on "interrupt": SIGINT to the kernel's whole process group, mid-reply.
threading.Timer(1.0, os.killpg, (os.getpgrp(), signal.SIGINT)).start()
result, turn = cell("%%qwen -t 0 --max-tokens 3000\nCount from 1 to 3000, one number per line.")
facts["interrupted"] = isinstance(result.error_in_exec, KeyboardInterrupt)
facts["partial_kept_and_marked"] = bool(turn.assistant) and turn.interrupted
facts["next_cell"] = cell("%%qwen -t 0 --no-history\nWhat is 2 + 3?")[1].assistant
ip.run_line_magic("qwen_unload", "")
print("FACTS " + json.dumps(facts), flush=True)
"""
)


def _run_script_in_own_session(tmp_path, text, model):
    import json

    script = tmp_path / "script.py"
    script.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), model],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # its own process group, as a kernel has
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("FACTS ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS ") :])


@pytest.mark.semantic
def test_the_demo_model_answers_through_a_tensor_parallel_server_in_a_shell(tmp_path):
    """The real model on a managed TP=2 server, from a real IPython shell: it knows Paris,
    remembers Ada only with the history, and a Jupyter-style interrupt mid-reply keeps the
    partial reply (marked) while the next cell is answered."""
    _needs_cuda()
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    facts = _run_script_in_own_session(
        tmp_path, DEMO_ON_TENSOR_PARALLEL_SCRIPT, _model("QWEN_MAGIC_GPU_REAL_MODEL")
    )
    print(facts)
    assert facts["where"].startswith("http://127.0.0.1:")
    assert "Paris" in facts["paris"]
    assert "Ada" in facts["name_with_history"]
    assert "Ada" not in facts["name_without_history"]
    assert facts["interrupted"] and facts["partial_kept_and_marked"]
    assert "5" in facts["next_cell"]


def test_tensor_parallel_runs_in_a_managed_server_that_survives_interrupts(tmp_path):
    """--tensor-parallel-size 2 in a kernel: a server in its own session, so a Jupyter-style
    interrupt (SIGINT to the kernel's process group) stops the reply and the next one works."""
    _needs_cuda()
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    facts = _run_script_in_own_session(
        tmp_path, TENSOR_PARALLEL_SCRIPT, _model("QWEN_MAGIC_GPU_MODEL")
    )
    assert facts["where"].startswith("http://127.0.0.1:")
    assert facts["interrupted"] and facts["turn_marked"]
    assert facts["next_reply_tokens"] > 0
