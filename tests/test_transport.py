"""Both transports against real sockets: a failure is NotSent only if nothing can have left."""

from __future__ import annotations

import socket

import pytest

from helpers import CREDENTIALS, emulator_running, stored_count
from pipeline.client import CobaltClient
from pipeline.config import ApiConfig
from pipeline.emulator import Faults
from pipeline.errors import NoResponse, NotSent, ServerError

TRANSPORTS = [pytest.param("aiohttp", id="aiohttp"), pytest.param("httpx", id="httpx")]


def api(url: str, transport: str, timeout_s: float = 5.0) -> ApiConfig:
    return ApiConfig.model_validate({"base_url": url, "transport": transport,
                                     "timeout_s": timeout_s, "connect_timeout_s": 2,
                                     **CREDENTIALS})


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_connection_is_not_sent(transport: str) -> None:
    """Nobody listening: the request provably never left."""
    async with CobaltClient(api(f"http://127.0.0.1:{closed_port()}", transport)) as client:
        with pytest.raises(NotSent):
            await client.create_task_note("T1", "n")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_success_round_trip(transport: str) -> None:
    """A real request to the emulator comes back accepted with an integer job id as text."""
    async with emulator_running() as (emulator, url), CobaltClient(api(url, transport)) as client:
        accepted = await client.create_task_note("T1", "hello — é")
    assert accepted.job_id.isdigit()
    assert stored_count(emulator, "T1", "hello — é") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_connection_dropped_after_sending_is_ambiguous(transport: str) -> None:
    """The server read the request and hung up: the note may exist, so not NotSent."""
    faults = Faults(drop_after_store=1.0)
    async with emulator_running(faults=faults) as (emulator, url), \
            CobaltClient(api(url, transport)) as client:
        with pytest.raises(NoResponse):
            await client.create_task_note("T1", "n")
    assert stored_count(emulator, "T1", "n") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_slower_than_the_timeout_is_ambiguous(transport: str) -> None:
    """A read timeout after sending: ambiguous (the emulator did store the note)."""
    faults = Faults(slow_after_store=1.0, slow_s=3.0)
    async with emulator_running(faults=faults) as (em, url), \
            CobaltClient(api(url, transport, timeout_s=0.3)) as client:
        with pytest.raises(NoResponse):
            await client.create_task_note("T1", "n")
    assert stored_count(em, "T1", "n") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_500_after_storing_is_a_server_error(transport: str) -> None:
    """A 500 may follow a stored note: ServerError, one of the ambiguous kinds."""
    faults = Faults(rate_500_after_store=1.0)
    async with emulator_running(faults=faults) as (em, url), \
            CobaltClient(api(url, transport)) as client:
        with pytest.raises(ServerError):
            await client.create_task_note("T1", "n")
    assert stored_count(em, "T1", "n") == 1
