"""Headless Chromium (Debian's package) driven over the DevTools protocol with aiohttp: load a page, evaluate
JavaScript, take a screenshot. No browser download, no webdriver."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Chromium: `make test` installs Debian's chromium (apt-get install -y chromium)")


class Browser:
    """One headless Chromium with one page (``async with Browser() as page: ...``)."""

    def __init__(self, width: int = 1200, height: int = 900) -> None:
        self.width, self.height = width, height
        self._ids = 0

    async def __aenter__(self) -> "Browser":
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.process = subprocess.Popen(
            [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [t for t in await response.json() if t["type"] == "page"]
        self.socket = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.socket.close()
        await self.session.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        call_id = self._ids
        await self.socket.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(60):
            while True:
                message = json.loads((await self.socket.receive()).data)
                if message.get("id") == call_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def open(self, url: str, timeout_s: float = 60) -> None:
        """Navigate and wait until the document and its images have loaded."""
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while await self.evaluate("document.readyState") != "complete" or await self.evaluate(
                "location.href") != url:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {timeout_s} s")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(data["data"]))
        return Path(path)
