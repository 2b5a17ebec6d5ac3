"""Bare client loops, the baselines of bench/submit.py: C workers, N POSTs, nothing else.

    python bench/_clients.py IMPL URL CONCURRENCY ROWS MAX_SECONDS

IMPL: httpx (httpx's own pool), httpx-aiohttp (httpx's API over tasknotes' aiohttp
transport), aiohttp (aiohttp alone). Prints {"requests": n, "seconds": s, "rps": r}.
"""

from __future__ import annotations

import json
import sys
import time

import anyio

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from bench._common import CLIENT_CPU, pin

BODY = json.dumps({"emr_task_id": "9bef4113-e9ce-4895-9a17-2c18cd625116",
                   "note": "Patient called back, scheduled for next week. " * 3}).encode()
HEADERS = {"client_id": "c", "client_secret": "s", "access_token": "t",
           "content-type": "application/json"}


async def loop(send: object, concurrency: int, rows: int, limit_s: float) -> tuple[int, float]:
    done = 0
    start = time.perf_counter()
    deadline = start + limit_s

    async def worker() -> None:
        nonlocal done
        while done < rows and time.perf_counter() < deadline:
            done += 1
            await send()  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return done, time.perf_counter() - start


async def main(impl: str, url: str, concurrency: int, rows: int, limit_s: float) -> None:
    pin(CLIENT_CPU)
    target = f"{url}/v1/tasks/notes"
    if impl == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def send() -> None:
                async with session.post(target, data=BODY, headers=HEADERS) as r:
                    await r.read()
            done, seconds = await loop(send, concurrency, rows, limit_s)
    else:
        import httpx

        from pipeline._transport import AiohttpTransport

        transport = (AiohttpTransport(max_connections=concurrency) if impl == "httpx-aiohttp"
                     else httpx.AsyncHTTPTransport(limits=httpx.Limits(
                         max_connections=concurrency, max_keepalive_connections=concurrency)))
        async with httpx.AsyncClient(transport=transport, timeout=30) as client:
            async def send() -> None:
                r = await client.post(target, content=BODY, headers=HEADERS)
                r.json()
            done, seconds = await loop(send, concurrency, rows, limit_s)
    print(json.dumps({"requests": done, "seconds": seconds, "rps": done / seconds}))


if __name__ == "__main__":
    impl, url, conc, rows, limit = sys.argv[1:6]
    anyio.run(main, impl, url, int(conc), int(rows), float(limit))
