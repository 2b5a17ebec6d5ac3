"""Both transports against real sockets: a failure is NotSent only if nothing can have left."""

from __future__ import annotations

import pytest

from helpers import CREDENTIALS, emulator_running, free_port, stored_count
from pipeline.client import CobaltClient
from pipeline.config import ApiConfig
from pipeline.emulator import Faults
from pipeline.errors import NoResponse, NotSent, ServerError

TRANSPORTS = [pytest.param("aiohttp", id="aiohttp"), pytest.param("httpx", id="httpx")]


def api(url: str, transport: str, timeout_s: float = 5.0) -> ApiConfig:
    return ApiConfig.model_validate({"base_url": url, "transport": transport,
                                     "timeout_s": timeout_s, "connect_timeout_s": 2,
                                     **CREDENTIALS})


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_connection_is_not_sent(transport: str) -> None:
    """Nobody listening: the request provably never left."""
    async with CobaltClient(api(f"http://127.0.0.1:{free_port()}", transport)) as client:
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
@pytest.mark.parametrize(
    ("faults", "timeout_s", "error"),
    [
        pytest.param(Faults(drop_after_store=1.0), 5.0, NoResponse, id="dropped-after-sending"),
        pytest.param(Faults(reset_after_store=1.0), 5.0, NoResponse, id="reset-after-sending"),
        pytest.param(Faults(slow_after_store=1.0, slow_s=3.0), 0.3, NoResponse,
                     id="slower-than-the-timeout"),
        pytest.param(Faults(rate_500_after_store=1.0), 5.0, ServerError, id="500-after-storing"),
    ],
)
async def test_a_failure_after_sending_is_never_not_sent(
    transport: str, faults: Faults, timeout_s: float, error: type[Exception]
) -> None:
    """The server read the request (and stored the note), then failed: the error says the
    note may exist, whatever the transport; NotSent would let it be posted twice."""
    async with emulator_running(faults=faults) as (emulator, url), \
            CobaltClient(api(url, transport, timeout_s=timeout_s)) as client:
        with pytest.raises(error):
            await client.create_task_note("T1", "n")
    assert stored_count(emulator, "T1", "n") == 1
