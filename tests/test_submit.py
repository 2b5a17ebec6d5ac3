"""The submit stage's parts: backoff, the pacer, and the second read of the input."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from helpers import (
    EmulatorThread,
    emulator_running,
    make_config,
    notes,
    run_pipeline,
    stored_count,
    write_csv,
)
from pipeline.client import CobaltClient
from pipeline.emulator import Faults
from pipeline.plan import RunOptions, open_inputs, pending_jobs
from pipeline.retry import Backoff, Control, Pacer
from pipeline.state import Ledger, NewRow, row_key
from pipeline.submit import GATHER_S, Job, Submitter


@pytest.mark.parametrize("attempt", [1, 2, 3, 8])
def test_backoff_is_full_jitter_under_a_cap(attempt: int) -> None:
    """Each delay is uniform in [0, min(cap, base * 2**(attempt-1))]."""
    backoff = Backoff(0.5, 4.0, random.Random(1))
    ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
    delays = [backoff.delay(attempt) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > 0.8 * ceiling
    assert min(delays) < 0.2 * ceiling


class SteppingClock:
    """A clock for the Pacer that moves ``step`` seconds each time it is read: what the pacer
    sees depends only on how often it looks, never on how loaded the machine is."""

    def __init__(self, start: float = 0.0, step: float = 0.0) -> None:
        self.now, self.step = start, step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


async def test_a_late_caller_takes_the_missed_slots_but_never_more_than_the_burst() -> None:
    """Slots lie on a grid 1/rate apart: a caller late by many slots gets ``burst`` of them at
    once, then the slots due since; the grid does not move."""
    clock = SteppingClock()
    pacer = Pacer(4, burst=3, clock=clock)  # a slot every 0.25 s
    assert await pacer.wait_turn(10) == 3  # the first call: a full burst
    clock.now = 10.0  # 40 slots late
    assert await pacer.wait_turn(10) == 3  # still only the burst
    clock.now = 10.25
    assert await pacer.wait_turn(10) == 1  # the next slot on the grid
    clock.now = 10.75
    assert await pacer.wait_turn(10) == 2  # 10.5 and 10.75
    clock.now = 11.0
    assert await pacer.wait_turn(1) == 1  # asking for fewer takes fewer


async def test_grants_never_outrun_the_rate() -> None:
    """Callers that always want more get at most rate × elapsed + burst starts, and (never
    refused) no fewer than rate × elapsed, on the pacer's own clock."""
    rate, burst = 1000, 5
    clock = SteppingClock(step=0.0003)  # 0.3 slot per look
    pacer = Pacer(rate, burst=burst, clock=clock)
    total = 0
    for _ in range(300):
        granted = await pacer.wait_turn(8)
        at = clock.now - clock.step  # when it last looked, i.e. when it granted
        assert 1 <= granted <= burst
        total += granted
        assert rate * at <= total <= rate * at + burst + 1e-6


async def test_a_pause_holds_every_start_and_banks_no_slots() -> None:
    """After pause_until(t) nothing is granted before t, and then one slot, not a burst of
    the slots the pause skipped."""
    clock = SteppingClock(step=0.0003)
    pacer = Pacer(1000, burst=5, clock=clock)
    assert await pacer.wait_turn(8) == 5
    pacer.pause_until(0.01)  # 10 slots later (a Retry-After)
    granted = await pacer.wait_turn(8)
    assert clock.now - clock.step >= 0.01
    assert granted == 1
    unlimited = Pacer(None, clock=clock)
    unlimited.pause_until(clock.now + 0.005)
    resume = unlimited.resume_at
    assert await unlimited.wait_turn(8) == 8  # no rate: everyone, but only after the pause
    assert clock.now - clock.step >= resume


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

    async def send() -> None:  # the skip marker must reach the ledger, not the API
        ledger = Ledger(config.state.ledger)
        try:
            async with CobaltClient(config.api.model_copy(update={"base_url": api.url})
                                    ) as client:
                await Submitter(client, ledger, config.submit).run(_once(jobs))
        finally:
            ledger.close()

    with EmulatorThread() as api:
        anyio.run(send)
        requests = api.emulator.requests
        stored = [api.stored(t, n) for t, n in changed]
    assert (requests, stored) == (2, [1, 0, 1])
    reader = Ledger(config.state.ledger, readonly=True)
    rows = reader.frame(outcome.run_id).to_dict("records")
    reader.close()
    assert [(r["status"], r["error"]) for r in rows][1] == (
        "failed", "the input file changed since it was read")


async def _once(jobs: list[Job]) -> AsyncIterator[list[Job]]:
    yield jobs



class _Longest(random.Random):
    """Jitter that always draws the longest delay its range allows (a real Random)."""

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)


class _RemoteLedger(Ledger):
    """The SQLite ledger, saying its commits are round trips to a server as PostgreSQL's
    do (submit.remote_commits): the submit stage gathers its waves for it."""

    remote_commits = True


async def _submit(tmp_path: Path, url: str, tasks: list[str],
                  submit: dict[str, Any], *, backoff: Backoff | None = None,
                  control: Control | None = None, remote: bool = False
                  ) -> list[dict[str, Any]]:
    """A real Submitter over a real ledger and client: send one note "n" per task; the
    ledger rows afterwards, in input order. ``control`` lets the caller stop it;
    ``remote``: the ledger's commits count as round trips to a server."""
    config = make_config(tmp_path, submit={"rate_per_second": None, **submit})
    ledger = (_RemoteLedger if remote else Ledger)(config.state.ledger)
    ledger.start_run("r", "test_clinic", "fp", {})
    ledger.add_rows("r", [NewRow(0, i + 2, t, row_key("test_clinic", t, "n"), "pending")
                          for i, t in enumerate(tasks)])
    row_ids = [row_id for row_id, *_ in ledger.rows_to_send("r")]

    async def jobs() -> AsyncIterator[list[Job]]:
        yield [Job(row_id, t, "n") for row_id, t in zip(row_ids, tasks, strict=True)]

    try:
        async with CobaltClient(config.api.model_copy(update={"base_url": url,
                                                              "timeout_s": 120.0}),
                                max_connections=config.submit.concurrency) as client:
            await Submitter(client, ledger, config.submit, control=control,
                            backoff=backoff).run(jobs())
        return list(ledger.frame("r").to_dict("records"))
    finally:
        ledger.close()


async def test_a_success_resets_the_consecutive_failure_count(tmp_path: Path) -> None:
    """max_consecutive_failures counts failures IN A ROW: refused, ok, refused, ok with a
    limit of 2 sends all four rows (one at a time, so in input order)."""
    tasks = ["T1", "T2", "T3", "T4"]
    faults = Faults(rate_400=1.0, only_tasks=frozenset({"T1", "T3"}))
    async with emulator_running(faults=faults) as (emulator, url):
        with anyio.fail_after(60):
            rows = await _submit(tmp_path, url, tasks,
                                 {"concurrency": 1, "max_consecutive_failures": 2})
        requests = emulator.requests
    assert [r["status"] for r in rows] == ["api_rejected", "accepted"] * 2
    assert requests == 4


async def test_a_retry_after_beyond_the_cap_waits_only_the_cap(tmp_path: Path) -> None:
    """A 429 with Retry-After: 86400 waits submit.max_retry_after_s, not a day: the row is
    sent again and accepted (the deadline fails the test rather than stall it)."""
    faults = Faults(rate_429=1.0, only_first=1, retry_after_s=86400)
    async with emulator_running(faults=faults) as (emulator, url):
        with anyio.fail_after(20):
            (row,) = await _submit(tmp_path, url, ["T1"],
                                   {"max_retry_after_s": 0.05, "backoff_base_s": 0.01,
                                    "backoff_max_s": 0.01})
        answers = [status for _, status in emulator.answers]
    assert (row["status"], row["attempts"], answers) == ("accepted", 2, [429, 200])


async def test_a_retry_waits_for_its_backoff_while_fresh_rows_go(tmp_path: Path) -> None:
    """A row refused with a 503 (Retry-After: 0) goes again only after its backoff (1 s
    here, drawn at its longest), though fresh rows keep the dispatcher busy meanwhile: some
    request (the retry) arrives 1 s or more after the 503 left, where starting the retry
    with the fresh rows ends the run in a few milliseconds. A lower bound on one clock: a
    slow machine only lengthens it; the order of the retry among the fresh rows is not
    asserted, since a slow machine may make it due before the last fresh row goes."""
    tasks = [f"T{i}" for i in range(6)]
    faults = Faults(rate_503=1.0, only_first=1, retry_after_s=0, only_tasks=frozenset({"T0"}))
    async with emulator_running(faults=faults) as (emulator, url):
        with anyio.fail_after(60):
            rows = await _submit(tmp_path, url, tasks, {"concurrency": 1},
                                 backoff=Backoff(1.0, 1.0, _Longest()))
        arrivals, answers = list(emulator.arrivals), list(emulator.answers)
    assert [(r["status"], r["attempts"]) for r in rows] == [("accepted", 2)] + [
        ("accepted", 1)] * 5
    assert [status for _, status in answers] == [503] + [200] * 6
    refused_at = answers[0][0]
    assert max(arrivals) - refused_at >= 1.0


async def test_a_request_cut_at_the_drain_timeout_ends_ambiguous(tmp_path: Path) -> None:
    """Stopped while a request is in flight, with the answer later than drain_timeout_s: the
    request is cancelled and its row recorded ambiguous (the note may have landed: here it
    did), so no later run resends it. Recorded pending, the next run would post it twice."""
    faults = Faults(slow_after_store=1.0, slow_s=60.0)  # stored, then no answer in time
    control = Control()
    async with emulator_running(faults=faults) as (emulator, url):
        with anyio.fail_after(30):  # a drain that never ends fails, not hangs
            async with anyio.create_task_group() as tg:
                async def submit() -> None:
                    rows.extend(await _submit(tmp_path, url, ["T1"],
                                              {"concurrency": 1, "drain_timeout_s": 0.05},
                                              control=control))
                rows: list[dict[str, Any]] = []
                tg.start_soon(submit)
                await emulator.until(lambda e: stored_count(e, "T1", "n") == 1)
                control.stop("test")
        requests = emulator.requests
    (row,) = rows
    assert (row["status"], row["attempts"], requests) == ("ambiguous", 1, 1)
    assert "drain timeout" in row["error"]


async def test_a_slow_request_does_not_hold_the_answers_of_a_gathering_wave(
        tmp_path: Path) -> None:
    """Waves gather (submit.GATHER_S): with 15 of 16 slots busy, the one free slot waits for
    a second before a wave starts, but only GATHER_S. T0's answer is committed while the 15
    slow requests are still in flight (60 s): gathering without that bound would hold it
    uncommitted until one of them ends, and a crash meanwhile would leave T0 ambiguous."""
    slow = frozenset(f"T{i}" for i in range(1, 16))
    faults = Faults(slow_after_store=1.0, slow_s=60.0, only_tasks=slow)
    control = Control()
    async with emulator_running(faults=faults) as (emulator, url):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async def submit() -> None:
                    await _submit(tmp_path, url, ["T0", *sorted(slow)],
                                  {"concurrency": 16, "drain_timeout_s": 0.05},
                                  control=control, remote=True)
                tg.start_soon(submit)
                await emulator.until(lambda e: all(stored_count(e, t, "n") == 1 for t in slow))
                deadline = anyio.current_time() + 10
                # another connection's view of the ledger: no event to wait on, so polled
                while ledger_status(tmp_path, "T0") != "accepted":
                    assert anyio.current_time() < deadline, "T0's answer never committed"
                    await anyio.sleep(0.01)
                assert emulator.requests == 16
                assert len(emulator.answers) == 1
                control.stop("test")


def ledger_status(tmp_path: Path, task: str) -> str | None:
    """The status of ``task``'s row as another connection to the ledger sees it."""
    import sqlite3  # noqa: PLC0415

    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "ledger.sqlite")) as db:
        row = db.execute("SELECT status FROM rows WHERE emr_task_id = ?", (task,)).fetchone()
    return None if row is None else str(row[0])


async def test_a_wave_of_fewer_than_an_eighth_of_the_slots_waits_gather_s_at_most(
        tmp_path: Path) -> None:
    """Where commits are round trips to a server, a wave starts, while requests are in
    flight, once concurrency // 8 slots are free, or when its first free slot has waited
    GATHER_S: one commit then serves several answers (a wave per freed slot was a commit
    per request or two). With none in flight, at once. SQLite's waves do not gather."""
    config = make_config(tmp_path, submit={"rate_per_second": None, "concurrency": 16})
    with contextlib.closing(Ledger(tmp_path / "l.sqlite")) as local:
        assert Submitter(cast("Any", None), local, config.submit)._min_wave == 1  # as ever
    remote = _RemoteLedger(tmp_path / "r.sqlite")
    try:
        await _gathering(Submitter(cast("Any", None), remote, config.submit))
    finally:
        remote.close()


async def _gathering(submitter: Submitter) -> None:
    """The waves a Submitter of concurrency 16 whose ledger's commits are remote starts."""
    lane = submitter._lanes[""]
    lane.fresh.extend(Job(i, f"T{i}", "n") for i in range(40))
    submitter._source_done = True

    async def no_more() -> AsyncIterator[list[Job]]:
        return
        yield

    def busy(n: int) -> None:
        submitter._in_flight = lane.in_flight = n

    jobs = no_more()
    busy(15)  # one slot free: the wave gathers
    assert await submitter._next_wave(jobs) == []
    busy(14)  # two free, an eighth of 16: it goes at once, not waiting out GATHER_S
    assert len(await submitter._next_wave(jobs) or []) == 2
    busy(15)
    started = anyio.current_time()
    assert await submitter._next_wave(jobs) == []
    await anyio.sleep(GATHER_S)  # the time a gathering wave waits: the condition itself
    assert anyio.current_time() >= started + GATHER_S
    assert len(await submitter._next_wave(jobs) or []) == 1  # then goes with one
    busy(0)
    assert len(await submitter._next_wave(jobs) or []) == 16  # nothing in flight: at once
