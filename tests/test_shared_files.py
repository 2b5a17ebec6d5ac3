"""Hardening at the edges (issue 13): what the files we write may hold, and who may read them.

- results.csv carries no formula a spreadsheet would run (OWASP, "CSV Injection");
- what Cobalt says in an error is untrusted: the note and the secrets are cut out of it
  before it reaches the ledger, a report or the console;
- a full disk under the ledger aborts the run (exit 3, one line), it does not crash it;
- every state file and directory is private (0600/0700);
- report.html runs no inline script its CSP did not name by hash.

Cobalt is played by ``FakeCobalt``, a Starlette app served by uvicorn on 127.0.0.1, which
answers each task id as a test tells it.
"""

from __future__ import annotations

import csv
import errno
import itertools
import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from helpers import (
    CREDENTIALS,
    ThreadedServer,
    read_results,
    read_summary,
    run_pipeline,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.client import CobaltClient, redact
from pipeline.config import ApiConfig, load_config
from pipeline.errors import CredentialsRefused, NotSent, RequestRejected
from pipeline.redaction import MESSAGE_WITHHELD
from pipeline.report import FORMULA_STARTS, neutralise_formula, shareable
from pipeline.state import Ledger

PLAIN_NUMBER_CELLS = ("-3", "+1.5", "-2e5", "12", "+0.25")


class FakeCobalt:
    """POST /v1/tasks/notes: 200 with a job id, unless ``answers`` names the task id.

    ``answers[task_id] = (status, body)``, where ``body`` may be a callable of the note.
    ``before_answer(n)`` runs before the n-th request (1-based) is answered.
    """

    def __init__(self, answers: dict[str, tuple[int, Any]] | None = None,
                 before_answer: Callable[[int], None] | None = None) -> None:
        self.answers = answers or {}
        self.before_answer = before_answer
        self.jobs: dict[str, str] = {}
        self.stored: Counter[tuple[str, str]] = Counter()
        self.requests = 0
        self._job_ids = itertools.count(1001)

    def app(self) -> Starlette:
        async def notes(request: Request) -> JSONResponse:
            body = json.loads(await request.body())
            task_id, note = body["emr_task_id"], body["note"]
            self.requests += 1
            if self.before_answer is not None:
                self.before_answer(self.requests)
            if task_id in self.answers:
                status, answer = self.answers[task_id]
                return JSONResponse(answer(note) if callable(answer) else answer, status)
            job_id = next(self._job_ids)
            self.jobs[task_id] = str(job_id)
            self.stored[(task_id, note)] += 1
            return JSONResponse({"success": True, "message": "Task note processing.",
                                 "task_note_id": f"{job_id:024x}", "job_id": job_id})

        return Starlette(routes=[Route("/v1/tasks/notes", notes, methods=["POST"])])


def append_events(sink: Path, events: list[dict[str, Any]]) -> None:
    """Events as the sink stores them (one compact JSON envelope per line)."""
    sink.parent.mkdir(parents=True, exist_ok=True)
    with sink.open("a", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")


def envelope(event_id: str, kind: str, job_id: str, **data: Any) -> dict[str, Any]:
    return {"id": event_id, "object": "event", "created": "2026-11-30T10:00:00.000Z",
            "type": f"task_note.{kind}", "job_id": job_id, "data": data}


# -- 5. formulas -------------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "shown"), [
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
    ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
    ("@SUM(1)", "'@SUM(1)"),
    ("-1+2", "'-1+2"),
    ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"),
    ("-", "'-"),
    *((n, n) for n in PLAIN_NUMBER_CELLS),
    ("T-1", "T-1"),
    ("", ""),
])
def test_a_cell_that_could_be_a_formula_is_shown_as_text(cell: str, shown: str) -> None:
    assert neutralise_formula(cell) == shown


@pytest.mark.parametrize("start", FORMULA_STARTS)
def test_the_table_written_to_results_csv_neutralises_every_formula_start(start: str) -> None:
    """shareable (what results.csv is written from) picks cells by their first character in
    numpy: each start, a leading \r included, must reach neutralise_formula."""
    table = pd.DataFrame({"error": ["T1", f"{start}=1", ""], "line": [2, 3, 4]})
    shown = " " if start in "\t\r" else start  # control characters become a space first
    assert shareable(table)["error"].tolist() == ["T1", f"'{shown}=1", ""]


def test_results_csv_carries_no_formula_from_ids_passthrough_webhooks_or_the_api(
        tmp_path: Path) -> None:
    """Task ids, passthrough cells, webhook emr_note_id/failure_reason and Cobalt's messages
    reach results.csv with a leading quote when they start like a formula; numbers stay."""
    hyperlink, calc, total = '=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1)"
    write_csv(tmp_path / "input.csv", [
        [hyperlink, "first note", calc],
        [total, "second note", "-3"],
        [calc, "third note", "+1.5"],
        ["T4", "fourth note", "\t=1+2"],
        ["T5", "fifth note", "-2e5"],
    ], header=("emr_task_id", "note", "=ref"))
    fake = FakeCobalt({calc: (400, {"success": False, "message": "@SUM(1) is not a task"})})
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            input={"path": str(tmp_path / "input.csv"), "passthrough": ["=ref"]},
                            validation={"emr_task_id_pattern": "^.+$"})
        run_pipeline(load_config(path, needs=("api",)))
    append_events(tmp_path / "state" / "webhooks.jsonl", [
        envelope("evt-1", "created", fake.jobs[hyperlink], emr_note_id=total,
                 task_note_id=f"{int(fake.jobs[hyperlink]):024x}"),
        envelope("evt-2", "failed", fake.jobs[total], failure_reason=hyperlink,
                 task_note_id=f"{int(fake.jobs[total]):024x}"),
        envelope("evt-4", "created", fake.jobs["T4"], emr_note_id="-7"),
    ])
    assert main(["-q", "reconcile", str(path)]) == 1
    report = next((tmp_path / "reports").iterdir())
    rows = {int(r["line"]): r for r in read_results(report)}
    assert rows[2]["emr_task_id"] == "'" + hyperlink
    assert rows[2]["'=ref"] == "'" + calc
    assert rows[2]["emr_note_id"].startswith("withheld-")  # not id-like (redaction.safe_id)
    assert rows[3]["emr_task_id"] == "'" + total
    assert rows[3]["failure_reason"] == "'" + hyperlink
    assert rows[3]["'=ref"] == "-3"
    assert rows[4]["emr_task_id"] == "'" + calc
    assert rows[4]["'=ref"] == "+1.5"
    assert rows[4]["error"] == "HTTP 400 request-rejected: @SUM(1) is not a task"
    assert rows[5]["'=ref"] == "' =1+2"  # the tab is a space in a shared file (one line)
    # No Cobalt id starts with "-": withheld (redaction.looks_like_id), never a formula.
    assert re.fullmatch(r"withheld-[0-9a-f]{16}", rows[5]["emr_note_id"])
    assert rows[6]["'=ref"] == "-2e5"
    with (report / "results.csv").open(encoding="utf-8", newline="") as fh:
        for cells in csv.reader(fh):
            for cell in cells:
                assert not cell.startswith(FORMULA_STARTS) or cell in (*PLAIN_NUMBER_CELLS,
                                                                       "-7"), cell
    # summary.json is JSON, not a spreadsheet: the reason is kept as Cobalt sent it
    assert read_summary(report)["failure_reasons"] == [{"reason": hyperlink, "count": 1}]


# -- 6. upstream text is untrusted -----------------------------------------------------------

NOTE = "Patient CANARY-7f3e9c-PHI called about the lisinopril refill, left a message."
TOKEN = "TOKEN-CANARY-5d1e2a9b7c"


@pytest.mark.parametrize(("text", "private", "kept"), [
    (f"Invalid note: {NOTE}", [NOTE], "Invalid note: [redacted]"),
    # a fragment of 16+ characters, cut short, upper-cased and re-spaced
    (f"Invalid note: '{NOTE[8:40].upper().replace(' ', '  ')}...'", [NOTE],
     "Invalid note: '[redacted]...'"),
    (f"bad access_token {TOKEN}\r\nsee docs", [NOTE, TOKEN],
     "bad access_token [redacted] see docs"),
    ("Invalid note: ok", ["ok"], "Invalid note: [redacted]"),
    ("Unexpected fields in request body: x", ["n", "x y"],
     "Unexpected fields in request body: x"),  # "n" inside a word is not the note
    ("x" * 400, [NOTE], "x" * 299 + "…"),
])
def test_redact_removes_notes_and_secrets_and_caps_the_length(
        text: str, private: list[str], kept: str) -> None:
    assert redact(text, private) == kept


@settings(derandomize=True)
@given(note=st.text(min_size=16, max_size=200), start=st.integers(0, 184),
       length=st.integers(16, 200), before=st.text(max_size=40), after=st.text(max_size=40))
def test_no_run_of_16_characters_of_the_note_survives_redaction(
        note: str, start: int, length: int, before: str, after: str) -> None:
    """Whatever surrounds it, a quoted run of 16+ characters of the note is gone."""
    quoted = note[start:start + length]
    assume(len(quoted) >= 16)
    kept = redact(before + quoted + after, [note], limit=10_000)
    assert quoted not in kept
    assert "[redacted]" in kept or kept == MESSAGE_WITHHELD  # withheld whole when in doubt


@settings(derandomize=True)
@given(st.text(max_size=30))
def test_no_neutralised_cell_starts_like_a_formula_unless_it_is_a_number(cell: str) -> None:
    shown = neutralise_formula(cell)
    assert shown in (cell, "'" + cell)
    if shown.startswith(FORMULA_STARTS):
        assert float(shown) == float(cell)


API = ApiConfig.model_validate({"base_url": "https://api.usecobalt.test", **CREDENTIALS})


async def test_the_client_redacts_the_note_and_the_credentials_from_every_error() -> None:
    """httpx.MockTransport as Cobalt: a 400 quoting the note, a 401 quoting the token (on a
    note and on the events list), a connection error quoting the client secret."""
    answers = iter([
        httpx.Response(400, json={"success": False, "message": f"Invalid note: {NOTE}"}),
        httpx.Response(401, json={"message": f"bad token {CREDENTIALS['access_token']}"}),
        httpx.Response(401, json={"message": f"bad token {CREDENTIALS['access_token']}"}),
    ])

    def answer(request: httpx.Request) -> httpx.Response:
        return next(answers)

    async with CobaltClient(API, transport=httpx.MockTransport(answer),
                            more_secrets=["hook-secret-1234"]) as client:
        with pytest.raises(RequestRejected) as rejected:
            await client.create_task_note("T1", NOTE)
        with pytest.raises(CredentialsRefused) as refused:
            await client.create_task_note("T1", NOTE)
        with pytest.raises(CredentialsRefused) as listing:
            await client.webhook_events(job_id="1")
    assert rejected.value.message == "HTTP 400 request-rejected: Invalid note: [redacted]"
    assert str(rejected.value) == rejected.value.message
    assert refused.value.message == "HTTP 401 credentials-refused: bad token [redacted]"
    assert listing.value.message == "HTTP 401 credentials-refused: bad token [redacted]"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy said {CREDENTIALS['client_secret']} hook-secret-1234")

    async with CobaltClient(API, transport=httpx.MockTransport(refuse),
                            more_secrets=["hook-secret-1234"]) as client:
        with pytest.raises(NotSent) as unsent:
            await client.create_task_note("T1", NOTE)
    assert unsent.value.message == "not sent: ConnectError: proxy said [redacted] [redacted]"


def _canary_holders(tmp_path: Path, canaries: tuple[str, ...]) -> set[str]:
    """Files under tmp_path (input and config aside) that hold any canary."""
    found = set()
    for file in tmp_path.rglob("*"):
        if not file.is_file() or file.name in ("input.csv", "config.yaml"):
            continue
        data = file.read_bytes()
        if any(c.encode() in data for c in canaries):
            found.add(file.name)
    return found


def test_an_error_quoting_the_note_or_the_token_reaches_no_file_ledger_or_console(
        tmp_path: Path) -> None:
    """400 {"message": "Invalid note: <the note>"} and a 401 quoting the access token:
    results.csv, summary.json, report.html, the ledger, stdout and stderr keep the status,
    the code and the message without them."""
    write_csv(tmp_path / "input.csv", [["T1", NOTE], ["T2", NOTE + " Second row."],
                                       ["T3", "third"]])
    fake = FakeCobalt({
        "T1": (400, lambda note: {"success": False, "message": f"Invalid note: {note}"}),
        "T2": (422, lambda note: {"success": False,
                                  "message": f"Unprocessable: '{note[10:45]}'"}),
        "T3": (401, {"success": False, "message": f"access_token {TOKEN} is not valid"}),
    })
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url, "access_token": TOKEN},
                            submit={"concurrency": 1})
        done = subprocess.run([sys.executable, "-m", "pipeline", "-vv", "run", str(path),
                               "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    for output in (done.stdout, done.stderr):
        assert "CANARY" not in output
    # The stop reason keeps our own words only (ApiError.own): Cobalt's text stays out.
    assert "credentials refused by Cobalt (HTTP 401 credentials-refused); check" in done.stdout
    assert _canary_holders(tmp_path, ("CANARY",)) == set()
    report = next((tmp_path / "reports").iterdir())
    rows = {r["emr_task_id"]: r for r in read_results(report)}
    assert rows["T1"]["error"] == "HTTP 400 request-rejected: Invalid note: [redacted]"
    assert rows["T2"]["error"] == "HTTP 422 request-rejected: Unprocessable: '[redacted]'"
    assert rows["T3"]["final_status"] == "send_failed"
    assert read_summary(report)["stop_reason"].startswith(
        "credentials refused by Cobalt (HTTP 401 credentials-refused); check")


def test_a_run_redacts_the_webhook_secrets_from_cobalts_errors(tmp_path: Path) -> None:
    """The run hands webhooks.secret and webhooks.secrets to the client's redaction (tested
    on the client above): a 400 quoting either reaches no file, ledger or console."""
    hooks = ("HOOK-CANARY-3b8f1e0c", "OLD-HOOK-CANARY-9a2d7c4e")
    write_csv(tmp_path / "input.csv", [["T1", "first"], ["T2", "second"]])
    fake = FakeCobalt({"T1": (400, {"success": False, "message": f"bad secret {hooks[0]}"}),
                       "T2": (400, {"success": False, "message": f"bad secret {hooks[1]}"})})
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            webhooks={"secret": hooks[0], "secrets": [hooks[1]]})
        done = subprocess.run([sys.executable, "-m", "pipeline", "-vv", "run", str(path),
                               "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert "CANARY" not in done.stdout + done.stderr
    assert _canary_holders(tmp_path, ("CANARY",)) == set()
    report = next((tmp_path / "reports").iterdir())
    # The status and code stay; Cobalt's text is cut or, in doubt, withheld whole.
    assert {r["error"] for r in read_results(report)} <= {
        "HTTP 400 request-rejected: bad secret [redacted]",
        "HTTP 400 request-rejected: [message withheld: it quoted the request]"}


# -- 9. private files --------------------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask most shells have (022): what the code must not rely on."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


@pytest.mark.usefixtures("loose_umask")
def test_the_ledger_its_wal_shm_lock_and_directory_are_private_whatever_the_umask(
        tmp_path: Path) -> None:
    """Opened by library code under umask 022 (no CLI to set 077), while it is in use."""
    path = tmp_path / "state" / "ledger.sqlite"
    ledger = Ledger(path)
    try:
        ledger.lock()
        ledger.start_run("r1", "acct", "fp", {})
        wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
        assert (mode(path.parent), mode(path), mode(wal), mode(shm),
                mode(path.with_name("ledger.sqlite.lock")),
                mode(path.with_name("ledger.sqlite.reserve"))) == (
            "0o700", "0o600", "0o600", "0o600", "0o600", "0o600")
    finally:
        ledger.close()


@pytest.mark.usefixtures("loose_umask")
def test_a_looser_state_directory_made_beforehand_is_named_in_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    with caplog.at_level(logging.WARNING, logger="pipeline.state.connection"):
        Ledger(state / "ledger.sqlite").close()
    assert [r.getMessage() for r in caplog.records] == [
        f"state directory {state} is mode 0755: others may read the ledger's neighbours; "
        "chmod 700 it"]


@pytest.mark.usefixtures("loose_umask")
def test_everything_a_run_creates_is_0600_in_0700_directories(tmp_path: Path) -> None:
    """`tasknotes run` started from a shell with umask 022: the state directory, the ledger,
    the sink file, the report directory and every report file are its owner's alone."""
    write_csv(tmp_path / "input.csv", [["T1", "first"], ["bad id!", "rejected"],
                                       ["T3", "third"]])
    fake = FakeCobalt({"T3": (503, {"message": "busy"})})
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url}, submit={"max_attempts": 1})
        done = subprocess.run([sys.executable, "-m", "pipeline", "-q", "run", str(path),
                               "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    report = next((tmp_path / "reports").iterdir())
    created = [tmp_path / "state", *(tmp_path / "state").rglob("*"), tmp_path / "reports",
               *(tmp_path / "reports").rglob("*")]
    assert {str(p.relative_to(tmp_path)): mode(p) for p in created} == {
        "state": "0o700", "state/ledger.sqlite": "0o600", "state/ledger.sqlite.lock": "0o600",
        "state/ledger.sqlite.reserve": "0o600",
        "reports": "0o700", f"reports/{report.name}": "0o700",
        **{f"reports/{report.name}/{name}": "0o600" for name in (
            "results.csv", "summary.json", "report.html", "rejects.csv", "redrive.csv")},
    }


# -- 8. a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at ``tmp_path/state`` (the ledger's directory), for this test.

    Needs root and mount(2) (the test machine has both); skipped where they are missing.
    """
    mount = tmp_path / "state"
    mount.mkdir(mode=0o700)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tasknotes-test",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write ``directory/filler`` until at most ``leave`` bytes are free on its file system."""
    filler = directory / "filler"
    with filler.open("ab", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    space = os.statvfs(directory)
                    if space.f_bavail * space.f_frsize - size < leave:
                        break
                    fh.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def ledger_statuses(path: Path) -> tuple[str, dict[str, str]]:
    """The ledger's integrity check (the SQLite file's own, as a full disk may break it),
    and each row's status by task id (read through the store)."""
    db = sqlite3.connect(path)
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()
    ledger = Ledger(path, readonly=True)
    try:
        frame = ledger.frame()
    finally:
        ledger.close()
    return check, dict(zip(frame["emr_task_id"], frame["status"], strict=True))


def run_cli(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", "run", str(config),
                           "--no-progress"], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_disk_that_fills_while_sending_stops_the_run_with_exit_3_and_loses_nothing(
        tmp_path: Path, small_disk: Path) -> None:
    """The ledger's disk fills at the 60th request: one line naming the ledger, exit 3, the
    ledger intact, every note sent so far recorded as sent, the rest pending, the report
    written; once there is room, the next run sends the rest and nothing twice."""
    rows = [[f"T{i:04d}", f"note number {i}"] for i in range(400)]
    write_csv(tmp_path / "input.csv", rows)
    ledger = small_disk / "ledger.sqlite"
    fake = FakeCobalt(before_answer=lambda n: fill(small_disk) if n == 60 else None)
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url}, submit={"concurrency": 1},
                            webhooks={"sink": str(tmp_path / "hooks" / "webhooks.jsonl")})
        first = run_cli(path, tmp_path)
        sent = sum(fake.stored.values())
        assert first.returncode == 3, first.stderr
        # one at a time: the commit after the 60th answer fails, so no 61st request leaves
        assert (fake.requests, sent) == (60, 60)
        assert "Traceback" not in first.stderr
        line = (f"disk full: the ledger {ledger} cannot be written (database or disk is full); "
                f"{sent} rows were sent before it, {400 - sent} are left pending for the "
                "next run")
        assert first.stdout.splitlines()[-1] == f"stopped: {line}"
        assert first.stderr.splitlines() == [
            f"tasknotes: WARNING: stopping: disk full: the ledger {ledger} cannot be written "
            "(database or disk is full)"]
        report = next((tmp_path / "reports").iterdir())
        summary = read_summary(report)
        assert summary["stop_reason"] == line
        assert summary["final_status"]["send_failed"] == 400 - sent
        (small_disk / "filler").unlink()
        check, statuses = ledger_statuses(ledger)
        assert check == "ok"
        stored = {task for task, _ in fake.stored}
        assert {t for t, s in statuses.items() if s != "pending"} == stored
        assert {statuses[t] for t in stored} == {"accepted"}

        second = run_cli(path, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert sorted(fake.stored) == sorted((t, n) for t, n in rows)
    assert set(fake.stored.values()) == {1}


def test_a_disk_that_fills_during_the_scan_stops_before_sending_with_exit_3(
        tmp_path: Path, small_disk: Path) -> None:
    """The ledger's disk fills while the rows are being recorded: one line naming the ledger,
    exit 3, nothing sent, the ledger intact; with room again, the next run sends every row."""
    rows = [[f"T{i:04d}", f"note number {i}"] for i in range(3000)]
    write_csv(tmp_path / "input.csv", rows)
    ledger = small_disk / "ledger.sqlite"
    fake = FakeCobalt()
    with ThreadedServer(fake.app()) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            webhooks={"sink": str(tmp_path / "hooks" / "webhooks.jsonl")})
        Ledger(ledger).close()  # a ledger in use for a while, its reserve taken
        filler = fill(small_disk, leave=160 * 1024)
        first = run_cli(path, tmp_path)
        assert first.returncode == 3, first.stderr
        assert "Traceback" not in first.stderr
        assert fake.requests == 0
        line = (f"disk full: the ledger {ledger} cannot be written (database or disk is full); "
                "nothing was sent (the disk filled before sending began)")
        assert first.stdout.splitlines()[-1] == f"stopped: {line}"
        assert first.stderr.splitlines() == [
            f"tasknotes: WARNING: stopping: disk full: the ledger {ledger} cannot be written "
            "(database or disk is full)"]
        filler.unlink()
        check, statuses = ledger_statuses(ledger)
        assert check == "ok"
        assert set(statuses.values()) <= {"pending"}  # a batch recorded before it, or none
        assert read_summary(next((tmp_path / "reports").iterdir()))["stop_reason"] == line
        second = run_cli(path, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert sorted(fake.stored) == sorted((t, n) for t, n in rows)
    assert set(fake.stored.values()) == {1}
