"""The submit stage's parts: backoff, and the second read of the input."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from helpers import EmulatorThread, make_config, notes, run_pipeline, write_csv
from pipeline.ledger import Ledger
from pipeline.runner import RunOptions, open_inputs, pending_jobs
from pipeline.submit import Backoff, Control


@pytest.mark.parametrize("attempt", [1, 2, 3, 8])
def test_backoff_is_full_jitter_under_a_cap(attempt: int) -> None:
    """Each delay is uniform in [0, min(cap, base * 2**(attempt-1))]."""
    backoff = Backoff(0.5, 4.0, random.Random(1))
    ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
    delays = [backoff.delay(attempt) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > 0.8 * ceiling
    assert min(delays) < 0.2 * ceiling


def test_a_stop_wakes_a_waiter_registered_with_also_setting() -> None:
    """The dispatcher's wait for "a request ended, or a stop" is one event: a stop sets it,
    once registered (at once if the stop came first), and not after the block has ended."""
    async def main() -> None:
        control = Control()
        waiting, before, after = anyio.Event(), anyio.Event(), anyio.Event()
        with control.also_setting(after):
            pass
        with anyio.fail_after(5):  # a stop that does not wake the waiter fails, not hangs
            await _stop_while_waiting(control, waiting)
        assert waiting.is_set()
        assert not after.is_set()
        with control.also_setting(before):
            assert before.is_set()

    anyio.run(main)


async def _stop_while_waiting(control: Control, waiting: anyio.Event) -> None:
    async def wait() -> None:
        with control.also_setting(waiting):
            await waiting.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert not waiting.is_set()
        control.stop("test")


def test_a_file_changed_between_the_two_reads_is_not_sent(tmp_path: Path) -> None:
    """The note read again must hash to its ledger key; if the file changed, the row is skipped."""
    write_csv(tmp_path / "input.csv", notes(3))
    with EmulatorThread(client_id="nobody") as api:  # 401: every row stays pending
        config = make_config(tmp_path, api={"base_url": api.url}, submit={"concurrency": 1})
        outcome = run_pipeline(config)
    changed = notes(3)
    changed[1][1] = "a different note on the same line"
    write_csv(tmp_path / "input.csv", changed)
    reader = Ledger(config.state.ledger, readonly=True)
    try:
        jobs = [j for batch in pending_jobs(config, open_inputs(config, RunOptions()), reader,
                                            outcome.run_id) for j in batch]
    finally:
        reader.close()
    assert [(j.emr_task_id, j.skip) for j in jobs] == [
        ("task-00000", None), ("task-00001", "the input file changed since it was read"),
        ("task-00002", None)]
    assert jobs[0].note == changed[0][1]
