"""A real ipykernel driven through jupyter_client: streaming display updates and interrupts.

This is what a notebook sees: ``display_data`` then ``update_display_data`` messages for one
display id, ending in the final Markdown; an interrupt stops the reply within about a second,
marks it and leaves the engine ready for the next cell.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelClient, KernelManager

from qwen_magic.render import INTERRUPTED

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def kernel(tiny_model: Path) -> Iterator[tuple[KernelManager, KernelClient]]:
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    try:
        reply, _ = execute(client, "%load_ext qwen_magic", timeout=60)
        assert reply["content"]["status"] == "ok"
        load = f"%qwen_load {tiny_model} --max-model-len 2048 --enforce-eager --seed 0"
        reply, _ = execute(client, load, timeout=300)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield manager, client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def execute(
    client: KernelClient,
    code: str,
    *,
    timeout: float,
    cell_id: str | None = None,
    on_message: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``code`` as a notebook cell (with a cell id) and collect its iopub messages."""
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    message = client.session.msg(
        "execute_request", content, metadata={"cellId": cell_id} if cell_id else {}
    )
    client.shell_channel.send(message)
    msg_id = message["header"]["msg_id"]
    deadline = time.monotonic() + timeout
    messages: list[dict[str, Any]] = []
    while True:
        item = client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if item["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(item)
        if on_message is not None:
            on_message(item)
        if item["msg_type"] == "status" and item["content"]["execution_state"] == "idle":
            break
    while True:
        reply = client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply, messages


def displays(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["msg_type"] in ("display_data", "update_display_data")]


def turn_count(client: KernelClient) -> int:
    expression = "len(get_ipython().magics_manager.registry['QwenMagics'].session.conversation())"
    content = {
        "code": "",
        "silent": True,
        "store_history": False,
        "user_expressions": {"n": expression},
    }
    message = client.session.msg("execute_request", content)
    client.shell_channel.send(message)
    while True:
        reply = client.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
            return int(reply["content"]["user_expressions"]["n"]["data"]["text/plain"])


def test_reply_streams_as_one_updating_markdown_output(
    kernel: tuple[KernelManager, KernelClient],
) -> None:
    _, client = kernel
    code = "%%qwen --max-tokens 40 -t 1 --seed 1\nTell me a long story."
    reply, messages = execute(client, code, timeout=120, cell_id="story")
    assert reply["content"]["status"] == "ok"
    shown = displays(messages)
    assert shown[0]["msg_type"] == "display_data"
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [m for m in shown[1:] if m["msg_type"] == "update_display_data"]
    assert len(updates) >= 3
    assert all(m["content"]["transient"]["display_id"] == display_id for m in updates)
    final = updates[-1]["content"]["data"]["text/markdown"]
    assert len(final) > len(shown[0]["content"]["data"]["text/markdown"])
    assert INTERRUPTED not in final
    # time-based throttle: no more than ~20 updates a second
    seconds = max(m["header"]["date"].timestamp() for m in updates) - min(
        m["header"]["date"].timestamp() for m in updates
    )
    assert len(updates) <= 20 * seconds + 3

    # Re-running the same cell replaces its turn instead of adding one.
    assert turn_count(client) == 1
    reply, _ = execute(client, code, timeout=120, cell_id="story")
    assert reply["content"]["status"] == "ok"
    assert turn_count(client) == 1


def test_interrupt_stops_within_a_second_and_marks_the_reply(
    kernel: tuple[KernelManager, KernelClient],
) -> None:
    manager, client = kernel
    before = turn_count(client)
    interrupted_at: list[float] = []

    def interrupt_once_streaming(message: dict[str, Any]) -> None:
        if message["msg_type"] == "update_display_data" and not interrupted_at:
            time.sleep(0.5)
            interrupted_at.append(time.monotonic())
            manager.interrupt_kernel()

    code = "%%qwen --max-tokens 1800 -t 1 --seed 2\nCount to a million."
    reply, messages = execute(
        client, code, timeout=180, cell_id="endless", on_message=interrupt_once_streaming
    )
    stopped = time.monotonic() - interrupted_at[0]
    assert stopped < 1.5, f"generation went on for {stopped:.2f} s after the interrupt"
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    final = displays(messages)[-1]["content"]["data"]["text/markdown"]
    assert final.endswith(f"*{INTERRUPTED}*")
    assert turn_count(client) == before + 1

    reply, messages = execute(
        client, "%%qwen --max-tokens 20\nStill there?", timeout=120, cell_id="after"
    )
    assert reply["content"]["status"] == "ok"
    assert displays(messages)[-1]["content"]["data"]["text/markdown"].strip()
    assert turn_count(client) == before + 2
