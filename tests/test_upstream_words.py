"""Upstream words stay upstream: what Cobalt writes (an id, an error message) never reaches
a log line, a stop reason or a notification as given (issue 12, attacker findings 1 and 4)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from helpers import (
    EmulatorThread,
    ThreadedServer,
    read_results,
    read_summary,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.emulator import Faults
from pipeline.events import MAX_DEPTH

NOTE = "Patient has HIV diagnosis confirmed"
TASK = "TASK-7782-BRAVO"
NAME = "John Q Smith"


def _nested(depth: int) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for _ in range(depth):
        data = {"x": data}
    return data


def test_poll_never_logs_an_upstream_id_as_given(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An event poll cannot store (too deep) is named in the log by its withheld id: the
    note text Cobalt put in the id and the line break that would forge a log line are gone."""
    write_csv(tmp_path / "input.csv", [["T1", NOTE]])
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        run_pipeline(load_config(path, needs=("api",)))
        wait_until(lambda: len(api.emulator.events) == 1, what="the outcome")
    caplog.clear()

    async def hostile(request: Request) -> JSONResponse:
        job = request.query_params.get("job_id", "0")
        item = {"event_id": f"{NOTE}\nERROR forged line {job}", "event_type": "task_note.created",
                "job_id": job, "created_at": "2026-11-30T10:00:00Z",
                "data": _nested(MAX_DEPTH + 5)}
        return JSONResponse({"success": True, "webhook_events": [item],
                             "pagination": {"current_page": 1, "total_pages": 1,
                                            "total_count": 1, "page_size": 100}})

    with ThreadedServer(Starlette(routes=[Route("/v1/webhook-events", hostile)])) as odd:
        path = write_config(tmp_path, api={"base_url": odd.url})
        main(["poll", str(path)])
    lines = [record.getMessage() for record in caplog.records]
    [line] = [line for line in lines if "not stored" in line]
    assert "withheld-" in line
    for line in lines:
        assert "HIV" not in line
        assert "\n" not in line
        assert "forged" not in line


def test_a_stop_reason_keeps_our_words_only(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Cobalt's 400 names the task and the patient: the stop reason in summary.json, the
    run_ended log line and the notification say HTTP 400 request-rejected, nothing more."""
    write_csv(tmp_path / "input.csv", [[TASK, f"{NOTE} {i}"] for i in range(4)])
    notified = tmp_path / "notified.json"
    caplog.set_level(logging.INFO)

    async def refuse(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"success": False, "message": f"Task {body.get('emr_task_id')} of "
                             f"patient {NAME} (MRN 55512) is closed"}, status_code=400)

    with ThreadedServer(Starlette(routes=[Route("/v1/tasks/notes", refuse,
                                                methods=["POST"])])) as api:
        path = write_config(
            tmp_path, api={"base_url": api.url},
            submit={"concurrency": 1, "max_consecutive_failures": 2},
            notify={"command": [sys.executable, "-c", f"import sys; open({str(notified)!r}, "
                                "'wb').write(sys.stdin.buffer.read())"]})
        assert main(["run", str(path), "--no-progress"]) == 3
    [report] = (tmp_path / "reports").iterdir()
    summary = read_summary(report)
    assert summary["stop_reason"] == ("2 rows in a row did not go through (last: HTTP 400 "
                                      "request-rejected); submit.max_consecutive_failures")
    sent = json.loads(notified.read_text())
    [ended] = [record for record in caplog.records if getattr(record, "event", "") == "run_ended"]
    assert ended.stop_reason == summary["stop_reason"]  # type: ignore[attr-defined]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for where in (json.dumps(summary["stop_reason"]), json.dumps(sent), logged):
        assert NAME not in where
        assert TASK not in where
        assert "55512" not in where


@pytest.mark.parametrize("shape", [
    pytest.param(lambda note: "-" + note.replace(" ", "-"), id="dashed-leading-dash"),
    pytest.param(lambda note: "tn_" + note.replace(" ", "_"), id="underscored"),
    pytest.param(lambda note: "tn_" + note.replace(" ", ""), id="run-together"),  # the note rule
])
def test_a_200_whose_id_is_the_note_is_not_believed(tmp_path: Path, shape: Any) -> None:
    """A 200 whose task_note_id is the note joined by separators: the row is ambiguous and
    the value is kept nowhere (results.csv, the ledger), as for any id that is not one."""
    write_csv(tmp_path / "input.csv", [["T1", NOTE]])

    async def accept(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"success": True, "task_note_id": shape(body["note"]),
                             "job_id": 1001, "message": "queued"})

    with ThreadedServer(Starlette(routes=[Route("/v1/tasks/notes", accept,
                                                methods=["POST"])])) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        outcome = run_pipeline(load_config(path, needs=("api",)))
    [row] = read_results(outcome.report.directory)
    assert row["final_status"] == "ambiguous"
    assert "does not look like an id" in row["error"]
    ledger = (tmp_path / "state" / "ledger.sqlite").read_bytes()
    for where in (json.dumps(row), ledger.decode("latin-1")):
        assert "diagnosis" not in where.lower()
        assert "Patient" not in where
