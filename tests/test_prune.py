"""Retention (``tasknotes prune``): note text at rest goes, what was sent stays, the sink
keeps every event it acknowledged while the file is rewritten, and a kill -9 at any step
leaves a readable sink file and a ledger that reads it right."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import pipeline
from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    free_port,
    ledger_rows,
    make_config,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    wait_until_healthy,
    write_config,
    write_csv,
)
from pipeline.emulator import sign
from pipeline.events import SetAside, SinkFile, is_pruned, read_sink_from
from pipeline.events import compact_json as compact
from pipeline.reconciliation import ingest
from pipeline.state import Attempt, Ledger, NewRow, row_key

OLD = "2026-01-05T10:00:00Z"  # far older than any limit below
SECRET_NOTE = "Zoë's PHI: called patient about the biopsy"


def created(event_id: str, job_id: str, task_id: str, note: str, when: str = OLD
            ) -> dict[str, Any]:
    return {"id": event_id, "access_token_reference_id": "user_1", "object": "event",
            "created": when, "type": "task_note.created", "job_id": job_id,
            "data": {"task_note_id": f"tn_{event_id}", "emr_note_id": "f862b0a0",
                     "emr_task_id": task_id, "note": note}}


def append_events(sink: Path, events: list[dict[str, Any]]) -> None:
    sink.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with sink.open("ab") as fh:
        fh.writelines(compact(e) + b"\n" for e in events)


def events_in(sink: Path) -> list[dict[str, Any]]:
    """Every line of the sink file, decoded; a line the codec refuses fails the test."""
    found = []
    for _, _, event in read_sink_from(sink, 0):
        assert not isinstance(event, SetAside), event
        found.append(event)
    return found


def tasknotes(*args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd,
                          env={**os.environ, **(env or {})})


def ledger_with_a_run(path: Path, account: str = "test_clinic") -> None:
    """A ledger holding one finished run, started long ago (prune mirrors the sink with
    its account)."""
    ledger = Ledger(path)
    ledger.start_run("run-0", account, "x", {})
    ledger.finish_run("run-0", "finished", {})
    ledger.close()
    # No store operation backdates a run: this write is SQLite's own (prune works on the
    # SQLite ledger only, cli.py says so).
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET started_at=?", ("2026-01-05T09:00:00.000Z",))


# -- what goes, what stays ------------------------------------------------------------------


def test_prune_removes_old_note_text_and_a_rerun_of_the_old_input_sends_nothing(
        tmp_path: Path) -> None:
    """The created events of a sent input, dated long ago, lose their note text (``note``
    null, ``pruned_at`` set), a recent event keeps its own, the run's rejects.csv goes;
    the ledger rows stay as they were, so the same input sent again sends nothing."""
    rows = [*notes(5), ["bad id with space", SECRET_NOTE]]
    rows[0][1] = SECRET_NOTE
    data = write_csv(tmp_path / "input.csv", rows)
    with EmulatorThread() as server:
        config = make_config(tmp_path, api={"base_url": server.url})
        first = run_pipeline(config, str(data))
        assert first.scan.to_send == 5
        sent = [(job, task) for job, task in ledger_rows(config, "job_id", "emr_task_id")
                if job is not None]
        before = ledger_rows(config, "key", "status", "run_id", "job_id")
        # The run happened long ago. No store operation backdates a run: this one write
        # is SQLite's own (prune works on the SQLite ledger only, cli.py says so).
        with sqlite3.connect(config.state.ledger) as db:
            db.execute("UPDATE runs SET started_at=?", ("2026-01-05T09:00:00.000Z",))
        db.close()
        by_task = dict(map(tuple, rows))
        append_events(config.webhooks.sink, [
            created(f"evt_{i}", job, task, by_task[task]) for i, (job, task) in enumerate(sent)])
        append_events(config.webhooks.sink, [created("evt_new", "999", "T-new", SECRET_NOTE,
                                                     when="2099-01-01T00:00:00Z")])
        report_dir = config.report.dir / first.run_id
        assert (report_dir / "rejects.csv").exists()

        path = write_config(tmp_path, api={"base_url": server.url})
        done = tasknotes("prune", str(path), "--older-than", "30")
        assert done.returncode == 0, done.stderr
        assert "removed the note text of 5 events" in done.stdout
        assert str(report_dir / "rejects.csv") in done.stdout
        assert SECRET_NOTE not in done.stdout + done.stderr

        found = {e["id"]: e for e in events_in(config.webhooks.sink)}
        assert len(found) == 6
        for i in range(5):
            pruned = found[f"evt_{i}"]
            assert is_pruned(pruned)
            assert pruned["data"]["note"] is None
            assert pruned["job_id"] == sent[i][0]  # what matches it to its row stays
        assert found["evt_new"]["data"]["note"] == SECRET_NOTE
        assert not is_pruned(found["evt_new"])
        assert config.webhooks.sink.read_bytes().count(SECRET_NOTE.encode()) == 1
        assert not (report_dir / "rejects.csv").exists()
        assert ledger_rows(config, "key", "status", "run_id", "job_id") == before

        again = run_pipeline(config, str(data))
        assert again.scan.to_send == 0
        assert again.scan.already_sent == 5
        for task, note in rows[:5]:
            assert server.stored(task, note) == 1


def test_a_row_left_ambiguous_is_still_settled_after_its_event_was_pruned(
        tmp_path: Path) -> None:
    """Prune mirrors the sink into the ledger before it removes any text, so the hash the
    ledger keeps of the event's note still settles the ambiguous row afterwards."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger = Ledger(config.state.ledger)
    ledger.start_run("run-1", "test_clinic", "x", {})
    ledger.add_file("run-1", 0, "input.csv", ["emr_task_id", "note"], sha256="0", size=0)
    ledger.add_rows("run-1", [NewRow(0, 2, "T1", row_key("test_clinic", "T1", SECRET_NOTE),
                                     "pending")])
    ledger.apply([], [Attempt(1, "ambiguous", None, None, None, "timed out",
                              "2026-01-05T09:59:00.000Z")])
    ledger.finish_run("run-1", "finished", {})
    ledger.close()
    append_events(config.webhooks.sink, [created("evt_1", "777", "T1", SECRET_NOTE)])

    done = tasknotes("prune", str(config_path), "--older-than", "30")
    assert done.returncode == 0, done.stderr
    assert "removed the note text of 1 event" in done.stdout
    assert SECRET_NOTE.encode() not in config.webhooks.sink.read_bytes()
    with config.webhooks.sink.open("ab") as fh:  # a line no reader can use
        fh.write(b"not an event\n")
    again = tasknotes("prune", str(config_path), "--older-than", "30")
    assert again.returncode == 0, again.stderr
    # what was left, each count with its own noun ("1 event pruned before", not "...befores")
    assert "left: 1 event pruned before; 1 unreadable line copied as it is\n" in again.stdout

    reconciled = tasknotes("reconcile", str(config_path), "--run-id", "run-1")
    assert reconciled.returncode == 0, reconciled.stderr
    [row] = read_results(config.report.dir / "run-1")
    assert row["final_status"] == "confirmed"
    assert row["detail"].startswith("settled by evidence")


def test_dry_run_changes_no_byte(tmp_path: Path) -> None:
    """``--dry-run`` says what it would remove and leaves the sink file, the ledger and
    the input copies byte for byte as they were."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    append_events(config.webhooks.sink, [created(f"evt_{i}", str(i), f"T{i}", SECRET_NOTE)
                                         for i in range(3)])
    copy = config.report.dir / "run-0" / "redrive.csv"
    copy.parent.mkdir(parents=True)
    copy.write_text(f"emr_task_id,note\nT1,{SECRET_NOTE}\n")
    watched = [config.webhooks.sink, config.state.ledger, copy]
    before = {p: p.read_bytes() for p in watched}
    listing = sorted(config.webhooks.sink.parent.iterdir())

    done = tasknotes("prune", str(config_path), "--older-than", "30", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would remove the note text of 3 events" in done.stdout
    assert str(copy) in done.stdout
    assert {p: p.read_bytes() for p in watched} == before
    assert sorted(config.webhooks.sink.parent.iterdir()) == listing  # no lock, no copy


def test_the_limit_comes_from_retention_days_and_one_is_needed(tmp_path: Path) -> None:
    """Without --older-than, state.retention_days is the limit; with neither, exit 2
    naming the key, and nothing removed."""
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    append_events(config.webhooks.sink, [created("evt_1", "1", "T1", SECRET_NOTE)])
    unset = write_config(tmp_path, "unset.yaml")
    refused = tasknotes("prune", str(unset))
    assert refused.returncode == 2
    assert "state.retention_days" in refused.stderr
    assert SECRET_NOTE.encode() in config.webhooks.sink.read_bytes()
    recent = write_config(tmp_path, "recent.yaml", state={
        "ledger": str(config.state.ledger), "retention_days": 36500})
    assert "note text of 0 events" in tasknotes("prune", str(recent)).stdout
    assert SECRET_NOTE.encode() in config.webhooks.sink.read_bytes()
    set_ = write_config(tmp_path, "set.yaml", state={
        "ledger": str(config.state.ledger), "retention_days": 30})
    done = tasknotes("prune", str(set_))
    assert done.returncode == 0, done.stderr
    assert SECRET_NOTE.encode() not in config.webhooks.sink.read_bytes()



@pytest.mark.parametrize("days", ["800000", "1e9", "inf", "-1", "nan", "abc"])
def test_a_limit_out_of_range_is_one_line_exit_2_and_removes_nothing(
        tmp_path: Path, days: str) -> None:
    """--older-than or state.retention_days past 100 years (a cutoff before year 1 cannot
    even be computed: it was an OverflowError traceback), negative or not a number: one
    line naming the limit, exit 2, before anything is touched; the API says the same."""
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    append_events(config.webhooks.sink, [created("evt_1", "1", "T1", SECRET_NOTE)])
    given = tasknotes("prune", str(write_config(tmp_path, "c.yaml")), "--older-than", days)
    assert (given.returncode, "Traceback" in given.stderr) == (2, False), given.stderr
    assert "--older-than" in given.stderr
    configured = tasknotes("prune", str(write_config(tmp_path, "r.yaml", state={
        "ledger": str(config.state.ledger), "retention_days": days})))
    assert (configured.returncode, "Traceback" in configured.stderr) == (2, False)
    assert "state.retention_days" in configured.stderr
    if days in ("800000", "1e9"):
        with pytest.raises(pipeline.ConfigError, match="older_than_days"):
            pipeline.prune(config, older_than_days=float(days))
    assert SECRET_NOTE.encode() in config.webhooks.sink.read_bytes()

def test_prune_from_python_is_the_command_without_the_printing(tmp_path: Path) -> None:
    """``pipeline.prune`` (the Python API): the limit from state.retention_days, a dry run
    that changes no byte, then the prune, each returning what it did; with no limit at
    all, ConfigError naming the key."""
    config = make_config(tmp_path, state={"ledger": str(tmp_path / "state" / "ledger.sqlite"),
                                          "retention_days": 30})
    ledger_with_a_run(config.state.ledger)
    append_events(config.webhooks.sink, [created(f"evt_{i}", str(i), f"T{i}", SECRET_NOTE)
                                         for i in range(2)])
    before = config.webhooks.sink.read_bytes()
    preview = pipeline.prune(config, dry_run=True)
    assert (preview.exit_code, preview.older_than_days, preview.pruned.events_pruned,
            preview.pruned.dry_run) == (0, 30, 2, True)
    assert config.webhooks.sink.read_bytes() == before
    done = pipeline.prune(config, older_than_days=30)
    assert isinstance(done, pipeline.PruneOutcome)
    assert (done.exit_code, done.pruned.events_pruned, done.events, done.ledger) == (
        0, 2, f"sink file {config.webhooks.sink}", str(config.state.ledger))
    assert SECRET_NOTE.encode() not in config.webhooks.sink.read_bytes()
    with pytest.raises(pipeline.ConfigError, match=r"state\.retention_days"):
        pipeline.prune(make_config(tmp_path))


# -- safe while the sink runs ------------------------------------------------------------------


@pytest.mark.slow
def test_prune_while_the_sink_receives_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """A real ``tasknotes sink`` takes a stream of signed events (dated long ago, so each
    prune rewrites the file) while prune runs again and again: every event answered 200
    is in the final file exactly once, and every line of it reads."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    port = free_port()
    with (tmp_path / "sink.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "sink",
                                 str(config_path), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    acknowledged: list[str] = []
    stop = threading.Event()

    def deliver(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            for n in range(5000):  # bounded: stops by itself
                if stop.is_set():
                    return
                body = compact(created(f"evt_{worker}_{n}", f"{worker}{n:05d}", f"T{n}",
                                       SECRET_NOTE))
                headers = {"content-type": "application/json",
                           "cobalt-verification": sign(body, WEBHOOK_SECRET)}
                try:
                    answer = client.post("/webhooks/cobalt", content=body, headers=headers)
                except httpx.HTTPError:
                    continue
                if answer.status_code == 200:
                    acknowledged.append(f"evt_{worker}_{n}")

    workers = [threading.Thread(target=deliver, args=(w,)) for w in range(4)]
    try:
        wait_until_healthy(proc, url, tmp_path / "sink.log", timeout=20)
        for worker in workers:
            worker.start()
        rewrites = 0
        during: list[int] = []
        for _ in range(4):
            wait_until(lambda: len(acknowledged) > 50 * (len(during) + 1), timeout=60,
                       what="events acknowledged")
            before = len(acknowledged)
            done = tasknotes("-q", "prune", str(config_path), "--older-than", "30")
            assert done.returncode == 0, done.stderr
            during.append(len(acknowledged) - before)
            rewrites += "note text of 0 events" not in done.stdout
        stop.set()
        for worker in workers:
            worker.join(30)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    ids = [e["id"] for e in events_in(config.webhooks.sink)]
    assert set(acknowledged) - set(ids) == set()
    assert len(ids) == len(set(ids))
    assert rewrites == 4
    assert sum(during) > 0  # events were acknowledged while prunes ran


# -- safe to interrupt ---------------------------------------------------------------------------


# A prune (retention.py, as `tasknotes prune --older-than 30` runs it) that kills its own
# process (SIGKILL) when it reaches the step named by argv[2]: its checkpoint, set only here.
KILLED_AT = """
import os, signal, sys
from pipeline.config import load_config
from pipeline.retention import prune

def checkpoint(step):
    if step == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)

prune(load_config(sys.argv[1]), 30, checkpoint=checkpoint)
"""


@pytest.mark.parametrize("step", ["copied", "synced", "renamed"])
def test_prune_killed_at_any_step_leaves_a_readable_sink_and_a_ledger_that_reads_it(
        tmp_path: Path, step: str) -> None:
    """kill -9 at a step: the sink file reads whole, with every event, its note text
    removed only once the rename happened; events appended afterwards are all mirrored
    by the next reconcile (the ledger's position names the file it was taken in), and
    the next prune finishes the job and removes the killed one's copy."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    sink = config.webhooks.sink
    # The first line is recent (not pruned), so the rewrite starts with the same line.
    append_events(sink, [created("evt_first", "1", "T0", "recent", when="2099-01-01T00:00:00Z")])
    append_events(sink, [created(f"evt_{i}", str(100 + i), f"T{i}", SECRET_NOTE * 4)
                         for i in range(200)])
    original = sink.read_bytes()

    killed = subprocess.run([sys.executable, "-c", KILLED_AT, str(config_path), step],
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ids = [e["id"] for e in events_in(sink)]
    assert ids == ["evt_first", *(f"evt_{i}" for i in range(200))]
    if step == "renamed":
        assert SECRET_NOTE.encode() not in sink.read_bytes()
    else:
        assert sink.read_bytes() == original

    later = [created(f"evt_later_{i}", str(900 + i), f"L{i}", "later note " * 20,
                     when="2099-01-01T00:00:00Z") for i in range(300)]
    append_events(sink, later)  # now longer than the file the ledger last read
    assert tasknotes("reconcile", str(config_path)).returncode in (0, 1)
    ledger = Ledger(config.state.ledger, readonly=True)
    try:
        mirrored = {e.event_id for e in ledger.events()}
    finally:
        ledger.close()
    assert {e["id"] for e in later} <= mirrored
    assert len(mirrored) == 501

    again = tasknotes("prune", str(config_path), "--older-than", "30")
    assert again.returncode == 0, again.stderr
    assert SECRET_NOTE.encode() not in sink.read_bytes()
    assert not sink.with_name(f".{sink.name}.prune.tmp").exists()
    assert len(events_in(sink)) == 501


def test_the_pruned_format_is_what_the_docs_say(tmp_path: Path) -> None:
    """A failed event loses its free text (failure_reason, each reason's description) and
    keeps its codes; an event of another type is left alone."""
    config_path = write_config(tmp_path)
    config = make_config(tmp_path)
    ledger_with_a_run(config.state.ledger)
    failed = {"id": "evt_f", "object": "event", "created": OLD, "type": "task_note.failed",
              "job_id": "5", "data": {"task_note_id": "tn", "failure_reason": SECRET_NOTE,
                                      "reasons": [{"code": "task_locked",
                                                   "description": SECRET_NOTE}]}}
    other = {"id": "evt_o", "object": "event", "created": OLD, "type": "appointment.updated",
             "job_id": "6", "data": {"appointment_id": 1}}
    append_events(config.webhooks.sink, [failed, other])
    done = tasknotes("prune", str(config_path), "--older-than", "1")
    assert done.returncode == 0, done.stderr
    found = {e["id"]: e for e in events_in(config.webhooks.sink)}
    assert found["evt_f"]["data"] == {"task_note_id": "tn", "failure_reason": None,
                                      "reasons": [{"code": "task_locked",
                                                   "description": None}]}
    assert is_pruned(found["evt_f"])
    assert found["evt_o"] == other
    assert json.dumps(found).count(SECRET_NOTE) == 0


def test_a_position_kept_before_heads_named_the_inode_is_still_trusted(tmp_path: Path) -> None:
    """A ledger whose sink head is the first-line hash alone (kept by an earlier version)
    goes on from its offset: nothing is read twice, no delivery counted as repeated."""
    config = make_config(tmp_path)
    sink = config.webhooks.sink
    append_events(sink, [created(f"evt_{i}", str(i), f"T{i}", "n", when="2099-01-01T00:00:00Z")
                         for i in range(3)])
    ledger = Ledger(config.state.ledger)
    assert ingest(ledger, sink, "test_clinic") == 3
    offset, head = ledger.sink_position()
    ledger.add_events([], {}, offset=offset, head=head.partition(":")[2])  # the older form
    assert ingest(ledger, sink, "test_clinic") == 0
    assert ledger.event_tally().get("(repeated)", 0) == 0
    append_events(sink, [created("evt_9", "9", "T9", "n", when="2099-01-01T00:00:00Z")])
    assert ingest(ledger, sink, "test_clinic") == 1  # and the head takes the new form
    assert ledger.sink_position() == (sink.stat().st_size, head)
    ledger.close()


@pytest.mark.anyio
async def test_the_sink_writes_to_whatever_file_its_path_names_now(tmp_path: Path) -> None:
    """The sink's writer follows its path: after a rename over it (as prune does) the next
    event goes to the new file, after its de-duplication index took the new file in; after
    the file is moved away, to a new file created at the path."""
    path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(path)
    sink.open()

    def body(n: int) -> bytes:
        return compact(created(f"evt_{n}", str(n), f"T{n}", "n"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run)
        assert await sink.append(body(1), "evt_1") == "stored"
        copy = path.with_name("copy.jsonl")
        copy.write_bytes(path.read_bytes() + body(2) + b"\n")  # written by another writer
        copy.rename(path)
        assert await sink.append(body(2), "evt_2") == "duplicate"
        assert await sink.append(body(3), "evt_3") == "stored"
        path.rename(path.with_name("rotated.jsonl"))
        assert await sink.append(body(4), "evt_4") == "stored"
        sink.stop()
    sink.close()
    assert [e["id"] for e in events_in(path.with_name("rotated.jsonl"))] == [
        "evt_1", "evt_2", "evt_3"]
    assert [e["id"] for e in events_in(path)] == ["evt_4"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
