"""Just enough of the Chrome DevTools Protocol to load a page headless and look at it."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As this machine's probe starts it: background networking off, or it knocks on closed doors.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,1800")


@dataclass
class Page:
    """What a page load did: every request, every failure, console errors, and a value read."""

    requests: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def render(url: str, profile: Path, screenshot: Path, expressions: dict[str, str]) -> Page:
    """Load ``url`` in headless Chromium, evaluate ``expressions``, save a PNG screenshot."""
    assert CHROMIUM is not None
    port = _free_port()
    async with await anyio.open_process(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            async with aiohttp.ClientSession() as session:
                target = await _page_target(session, port)
                async with session.ws_connect(target, max_msg_size=64 * 2**20) as ws:
                    return await _drive(ws, url, screenshot, expressions)
        finally:
            proc.terminate()


async def _page_target(session: aiohttp.ClientSession, port: int) -> str:
    with anyio.fail_after(20):
        while True:  # Chromium offers no signal for "DevTools is up" but answering on it
            try:
                async with session.get(f"http://127.0.0.1:{port}/json") as response:
                    pages = [t for t in await response.json() if t.get("type") == "page"]
                    if pages:
                        return str(pages[0]["webSocketDebuggerUrl"])
            except aiohttp.ClientError:
                pass
            await anyio.sleep(0.1)


async def _drive(ws: aiohttp.ClientWebSocketResponse, url: str, screenshot: Path,
                 expressions: dict[str, str]) -> Page:
    ids = itertools.count(1)
    page = Page()
    loaded = anyio.Event()
    answers: dict[int, Any] = {}

    async def call(method: str, **params: Any) -> Any:
        call_id = next(ids)
        await ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while call_id not in answers:
            await _read(ws, page, answers, loaded)
        return answers.pop(call_id)

    with anyio.fail_after(30):
        for domain in ("Network", "Page", "Runtime", "Log"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        while not loaded.is_set():
            await _read(ws, page, answers, loaded)
        for name, expression in expressions.items():
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            page.values[name] = result["result"].get("value")
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    await anyio.Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
    return page


async def _read(ws: aiohttp.ClientWebSocketResponse, page: Page, answers: dict[int, Any],
                loaded: anyio.Event) -> None:
    message = json.loads(await ws.receive_str())
    if "id" in message:
        answers[message["id"]] = message.get("result", {})
        return
    method, params = message.get("method"), message.get("params", {})
    if method == "Network.requestWillBeSent":
        page.requests.append(params["request"]["url"])
    elif method == "Network.loadingFailed":
        page.failures.append(params)
    elif method == "Runtime.exceptionThrown":
        page.errors.append(str(params.get("exceptionDetails", {}).get("text")))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        page.errors.append(str(params["entry"].get("text")))
    elif method == "Page.loadEventFired":
        loaded.set()
