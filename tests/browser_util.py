"""Run JupyterLab / Notebook 7 on 127.0.0.1 and drive it with Debian's headless Chromium.

The recipe and its pitfalls are in ``shared/BROWSER.md``: isolated Jupyter/IPython dirs, the
news toast switched off in settings, a kernelspec in every notebook, readiness through
``GET /api/status`` and shutdown through ``POST /api/shutdown`` (kernels live in their own
sessions, so killing the server alone would leave them running).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic"]
DONE_PROMPT = re.compile(r"^\[\d+\]:?$")
App = Literal["lab", "notebook"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class JupyterServer:
    """A Jupyter server process serving ``root`` with its own config, data and runtime dirs."""

    def __init__(self, app: App, root: Path, home: Path) -> None:
        self.app = app
        self.root = root
        self.home = home
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = home / f"{app}-server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def notebook_url(self, path: str) -> str:
        """The page that opens notebook ``path`` (relative to ``root``) in this app."""
        prefix = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.base_url}/{prefix}/{path}?token={self.token}"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name, folder in (
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("IPYTHONDIR", "ipython"),
        ):
            env[name] = str(self.home / folder)
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        return env

    def _write_settings(self) -> None:
        # Lab 4's "be notified about news?" toast would cover the notebook otherwise.
        settings = (
            self.home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        )
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until ``/api/status`` answers."""
        self._write_settings()
        module = "jupyterlab" if self.app == "lab" else "notebook"
        command = [
            sys.executable, "-m", module, "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
        ]  # fmt: skip
        if self.app == "lab":
            command.append("--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self._environment(),
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter {self.app} exited early:\n{self.log()}")
            try:
                if self.request("GET", "/api/status").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"jupyter {self.app} did not answer within {timeout} s:\n{self.log()}")

    def request(self, method: str, path: str, timeout: float = 10.0) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        return urllib.request.urlopen(request, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Shut down kernels and server through the API; terminate, then kill, as fallback."""
        if self.process is None or self.process.poll() is not None:
            return
        with suppress(OSError):  # URLError is an OSError
            self.request("POST", "/api/shutdown")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextmanager
def jupyter_server(app: App, root: Path, home: Path) -> Iterator[JupyterServer]:
    server = JupyterServer(app, root, home)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1400, 1800)) -> Iterator[Any]:
    """A Playwright page in Debian's headless Chromium (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def wait_for_kernel(page: Any, timeout: float = 120.0) -> None:
    """Wait until the toolbar names a Python kernel and the kernel is idle."""
    page.wait_for_function(
        """() => {
            const name = document.querySelector('.jp-Toolbar-kernelName');
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            return name && /python/i.test(name.textContent)
                && (!status || status.getAttribute('data-status') === 'idle');
        }""",
        timeout=timeout * 1000,
    )


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells (there is no default shortcut)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).first.click()


def code_cells(page: Any) -> Any:
    return page.locator(".jp-Notebook .jp-CodeCell")


def prompts(page: Any) -> list[str]:
    return [text.strip() for text in code_cells(page).locator(".jp-InputPrompt").all_inner_texts()]


def wait_until_run(page: Any, *, executed_at_least: int = 1, timeout: float = 300.0) -> None:
    """Wait until every code cell shows ``[N]`` and the highest N reaches ``executed_at_least``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = prompts(page)
        if shown and all(DONE_PROMPT.match(prompt) for prompt in shown):
            numbers = [int(re.sub(r"\D", "", prompt)) for prompt in shown]
            if max(numbers) >= executed_at_least:
                return
        time.sleep(0.5)
    raise TimeoutError(f"cells still running or not run after {timeout} s: {prompts(page)}")


def run_cell(page: Any, index: int, timeout: float = 300.0) -> None:
    """Run code cell ``index`` (Ctrl+Enter) and wait until its prompt shows a new number."""
    cell = code_cells(page).nth(index)
    before = cell.locator(".jp-InputPrompt").inner_text().strip()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")  # runs in place, adds no cell
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = cell.locator(".jp-InputPrompt").inner_text().strip()
        if DONE_PROMPT.match(now) and now != before:
            return
        time.sleep(0.3)
    raise TimeoutError(f"cell {index} did not finish within {timeout} s")


def cell_output_text(page: Any, index: int) -> str:
    return "\n".join(code_cells(page).nth(index).locator(".jp-OutputArea-output").all_inner_texts())
