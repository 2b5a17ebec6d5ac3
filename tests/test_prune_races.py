"""``tasknotes prune`` beside the readers of the sink file: a reconcile whose reading
position was taken in the file prune replaced (killed after its rename, or a copy put
there by hand), a reconcile reading while prune renames, and events that arrive during
a prune keep their receive times."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_prune import KILLED_AT, append_events, created, events_in, ledger_with_a_run

from helpers import make_config, write_config
from pipeline.events import SinkFile, encode_event
from pipeline.events import compact_json as compact
from pipeline.reasons import ReasonRedactor
from pipeline.reconciliation import ingest
from pipeline.retention import prune, pruned_event
from pipeline.state import Ledger

RECENT = "2099-01-01T00:00:00Z"  # newer than any limit here


def store_with_the_sink(path: Path, events: list[dict[str, Any]], received_at: str) -> None:
    """Store ``events`` as ``tasknotes sink`` does (events.SinkFile: line and receipt,
    under its lock), each received at ``received_at``."""

    async def go() -> None:
        sink = SinkFile(path)
        sink.open()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            for event in events:
                verdict = await sink.append(compact(event), event["id"],
                                            received_at=received_at)
                assert verdict == "stored"
            sink.stop()
        sink.close()

    anyio.run(go)


def mirrored(ledger_path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The ledger's events by id, and its event tally."""
    ledger = Ledger(ledger_path, readonly=True)
    try:
        return {e.event_id: e for e in ledger.events()}, ledger.event_tally()
    finally:
        ledger.close()


def test_a_prune_killed_after_its_rename_makes_no_event_a_repeated_delivery(
        tmp_path: Path) -> None:
    """kill -9 right after the rename, before the ledger learnt its position in the new
    file: the next reconcile reads the new file from its start, stores nothing twice and
    counts no repeated delivery (none happened); a real one later is still counted."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    sink = config.webhooks.sink
    events = [created(f"evt_{i}", str(100 + i), f"T{i}", "note " * 10) for i in range(40)]
    append_events(sink, events)
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, str(config_path), "renamed"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    append_events(sink, [created("evt_new", "999", "T9", "n", when=RECENT)])
    done = subprocess.run([sys.executable, "-m", "pipeline", "reconcile", str(config_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 1), done.stderr
    found, tally = mirrored(config.state.ledger)
    assert len(found) == 41
    assert tally.get("(repeated)", 0) == 0

    append_events(sink, [events[0]])  # Cobalt's delivery of evt_0, once more
    ledger = Ledger(config.state.ledger)
    try:
        assert ingest(ledger, sink, "test_clinic") == 0
        assert ledger.event_tally().get("(repeated)", 0) == 1
    finally:
        ledger.close()


def test_a_sink_file_replaced_by_a_copy_is_read_again_without_counting_repeats(
        tmp_path: Path) -> None:
    """The sink file copied and moved over itself (a new inode, as `cp x; mv x` does):
    read again from its start, its events are no new deliveries, and the events of other
    types (and one with no id) are not counted again (attacker LOW: they were, each
    reconcile after a replacement adding them once more); one of another type that
    arrived since is counted."""
    sink = tmp_path / "state" / "webhooks.jsonl"
    other = {"access_token_reference_id": "user_1", "object": "event", "created": RECENT,
             "type": "appointment.updated", "job_id": None, "data": {}}
    append_events(sink, [created(f"evt_{i}", str(i), f"T{i}", "n", when=RECENT)
                         for i in range(33)]
                  + [{**other, "id": "evt_a1"}, {**other, "id": "evt_a2"}, other])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ingest(ledger, sink, "test_clinic") == 33
        tally = {"appointment.updated": 2, "(no id)": 1}
        assert ledger.event_tally() == tally
        copy = sink.with_name("copy")
        shutil.copyfile(sink, copy)
        copy.rename(sink)
        append_events(sink, [{**other, "id": "evt_a3"}])
        assert ingest(ledger, sink, "test_clinic") == 0
        assert ledger.event_tally() == {**tally, "appointment.updated": 3}
    finally:
        ledger.close()


class RenameWhileReading(ReasonRedactor):
    """Renames ``replacement`` over the sink file when ``ingest`` has measured the file
    and is about to read its lines: the moment a prune's rename can come in."""

    replacement: Path | None = None

    def prepare(self, sink: Path, offset: int) -> None:
        if self.replacement is not None:
            self.replacement.rename(sink)
            self.replacement = None
        super().prepare(sink, offset)


def test_a_reconcile_that_prune_renames_under_reads_the_file_it_measured(
        tmp_path: Path) -> None:
    """A reconcile measures the sink file, then prune renames its rewrite (its lines of
    other lengths) over the path: the reconcile reads the file it measured, so no
    fragment of a valid line is set aside; the next one reads the new file from its start,
    storing nothing twice and counting no repeat."""
    sink = tmp_path / "state" / "webhooks.jsonl"
    first = [created(f"evt_{i}", str(i), f"T{i}", "a longer note " * 8) for i in range(5)]
    append_events(sink, first)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ingest(ledger, sink, "test_clinic") == 5
        later = [created(f"evt_{i}", str(i), f"T{i}", "n", when=RECENT) for i in range(5, 12)]
        append_events(sink, later)
        rewrite = sink.with_name(".webhooks.jsonl.prune.tmp")
        rewrite.write_bytes(b"".join(
            encode_event(pruned_event(e, "2026-11-30T00:00:00Z") or e) + b"\n"
            for e in first) + b"".join(compact(e) + b"\n" for e in later))
        redactor = RenameWhileReading(ledger, None)
        redactor.replacement = rewrite
        assert ingest(ledger, sink, "test_clinic", redactor=redactor) == 7
        assert not sink.with_name(sink.name + ".set-aside").exists()
        assert "(set aside)" not in ledger.event_tally()
        assert ingest(ledger, sink, "test_clinic") == 0  # the new file, from its start
        assert len(ledger.events()) == 12
        assert ledger.event_tally().get("(repeated)", 0) == 0
    finally:
        ledger.close()


@pytest.mark.parametrize("step", ["mirrored", "copied"])
def test_events_stored_while_prune_copies_keep_their_receive_times(
        tmp_path: Path, step: str) -> None:
    """Events the sink stores while prune works (after its mirroring: copied with the rest;
    after the copy: the tail, under the lock) land in the new file after the pruned lines,
    which grew (``"note":null`` and ``pruned_at`` are longer than a short
    note), so past the byte their receipts name. Each still gets its receive time as
    outcome time (clock ``sink_received``), not its own ``created``."""
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    sink = config.webhooks.sink
    append_events(sink, [created(f"evt_{i}", str(100 + i), f"T{i}", "n") for i in range(60)])
    received = "2026-11-30T10:00:00.000Z"
    arriving = [created(f"evt_late_{i}", str(900 + i), f"L{i}", "n", when=RECENT)
                for i in range(5)]

    wanted = step

    def checkpoint(step: str) -> None:
        if step == wanted:
            store_with_the_sink(sink, arriving, received)

    before = os.stat(sink).st_ino
    done = prune(config, 30, checkpoint=checkpoint)
    assert done.events_pruned == 60
    assert os.stat(sink).st_ino != before
    assert [e["id"] for e in events_in(sink)][-5:] == [e["id"] for e in arriving]
    ledger = Ledger(config.state.ledger)
    try:
        ingest(ledger, sink, "test_clinic")  # (prune's own rewrite of old reports may have)
        found = {e.event_id: e for e in ledger.events()}
        assert len(found) == 65
        assert ledger.event_tally().get("(repeated)", 0) == 0
    finally:
        ledger.close()
    assert [(found[e["id"]].outcome_clock, found[e["id"]].outcome_at) for e in arriving] == [
        ("sink_received", received)] * 5


def test_a_reconcile_that_reads_on_during_a_prune_keeps_its_position(tmp_path: Path) -> None:
    """A reconcile mirrors events appended while prune copies the file: its position is
    further on than the one prune started from, so prune does not put its own (mapped
    into the new file) over it; the next read takes the new file from its start, and no
    event is stored twice or counted as a repeated delivery."""
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    sink = config.webhooks.sink
    append_events(sink, [created(f"evt_{i}", str(100 + i), f"T{i}", "n") for i in range(30)])
    later = [created(f"evt_later_{i}", str(900 + i), f"L{i}", "n", when=RECENT)
             for i in range(10)]

    def checkpoint(step: str) -> None:
        if step == "copied":
            append_events(sink, later)
            ledger = Ledger(config.state.ledger)
            try:
                assert ingest(ledger, sink, "test_clinic") == 10
            finally:
                ledger.close()

    assert prune(config, 30, checkpoint=checkpoint).events_pruned == 30
    ledger = Ledger(config.state.ledger)
    try:
        assert ingest(ledger, sink, "test_clinic") == 0
        assert len(ledger.events()) == 40
        assert ledger.event_tally().get("(repeated)", 0) == 0
    finally:
        ledger.close()


def test_a_rotated_sink_file_put_back_as_the_readme_says_is_all_mirrored(
        tmp_path: Path) -> None:
    """The README's recovery of a sink file rotated by hand: the copy's lines put back in
    front of the current file; the next reconcile reads the merged file from its start and
    mirrors every event, each with its receive time, and counts no repeat."""
    sink = tmp_path / "state" / "webhooks.jsonl"
    received = "2026-11-30T10:00:00.000Z"
    first = [created(f"evt_r1_{i}", str(i), f"T{i}", "n", when=RECENT) for i in range(10)]
    second = [created(f"evt_r2_{i}", str(50 + i), f"U{i}", "n", when=RECENT) for i in range(10)]
    store_with_the_sink(sink, first[:4], received)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ingest(ledger, sink, "test_clinic") == 4
        store_with_the_sink(sink, first[4:], received)
        sink.rename(sink.with_name("webhooks.jsonl.1"))  # rotated by hand
        store_with_the_sink(sink, second, received)
        assert ingest(ledger, sink, "test_clinic") == 10  # the 6 moved away are missing
        merged = sink.with_name("merged")
        merged.write_bytes(sink.with_name("webhooks.jsonl.1").read_bytes() + sink.read_bytes())
        merged.rename(sink)
        assert ingest(ledger, sink, "test_clinic") == 6
        found = {e.event_id: e for e in ledger.events()}
        assert ledger.event_tally().get("(repeated)", 0) == 0
    finally:
        ledger.close()
    assert len(found) == 20
    assert {(e.outcome_clock, e.outcome_at) for e in found.values()} == {
        ("sink_received", received)}
