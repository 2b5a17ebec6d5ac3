"""poll: outcomes whose webhooks never arrived are fetched into the sink file, once each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    free_port,
    notes,
    read_results,
    read_sink,
    read_summary,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.emulator import Faults
from pipeline.events import SinkFile
from pipeline.polling import read_list_item
from pipeline.sink import WebhookReceiver

SHAPES = pytest.mark.parametrize("shape", ["event_id", "envelope"])


@SHAPES
@pytest.mark.parametrize(
    ("rows", "per_job_below"),
    [pytest.param(5, 20, id="per-job"), pytest.param(60, 0, id="paging-by-date")],
)
def test_poll_fills_in_outcomes_whose_webhooks_were_lost(
    tmp_path: Path, rows: int, per_job_below: int, shape: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Half the webhooks are dropped; poll fetches exactly the missing outcomes, and a second
    poll adds nothing: whichever documented shape Cobalt lists its events in."""
    write_csv(tmp_path / "input.csv", notes(rows))
    sink_path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(sink_path)
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            faults=Faults(drop_webhooks=0.5), seed=9, events_shape=shape) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            poll={"per_job_below": per_job_below, "page_size": 7})
        config = load_config(path, needs=("api",))
        first = run_pipeline(config)
        wait_until(lambda: sum(api.emulator.deliveries.values()) == rows, what="outcomes")
        delivered = api.emulator.deliveries["success"]
        assert 0 < delivered < rows
        assert main(["-q", "poll", str(path)]) == 0
        assert main(["-q", "poll", str(path)]) == 0
    sink.close()
    events = [e for _, e in read_sink(sink_path)]
    job_ids = [e["job_id"] for e in events]
    assert len(job_ids) == len(set(job_ids)) == rows
    out = capsys.readouterr().out
    assert f"{rows - delivered:,} events stored" in out
    assert "nothing to poll" in out
    results = read_results(first.report.directory)
    assert {r["final_status"] for r in results} == {"confirmed"}


@SHAPES
def test_polled_events_have_the_webhook_envelope_shape(tmp_path: Path, shape: str) -> None:
    """An event fetched by polling is stored as the webhook envelope Cobalt would have sent,
    from either list shape."""
    write_csv(tmp_path / "input.csv", notes(1))
    with EmulatorThread(faults=Faults(drop_webhooks=1.0), events_shape=shape) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        run_pipeline(load_config(path, needs=("api",)))
        wait_until(lambda: len(api.emulator.events) == 1, what="the outcome")
        assert main(["-q", "poll", str(path)]) == 0
    (event,) = [e for _, e in read_sink(tmp_path / "state" / "webhooks.jsonl")]
    assert list(event) == ["id", "access_token_reference_id", "object", "created", "type",
                           "job_id", "data"]
    assert event["object"] == "event"
    assert event["type"] == "task_note.created"
    assert isinstance(event["job_id"], str)
    assert event["id"].startswith("evt_")
    assert event["created"].endswith("Z")
    assert event["access_token_reference_id"] == "user_sandbox"
    assert set(event["data"]) == {"task_note_id", "emr_note_id", "emr_task_id", "note"}


def test_both_list_shapes_map_to_the_same_envelope() -> None:
    """An item of either documented shape of GET /v1/webhook-events becomes the same webhook
    envelope (job_id as a string), and its delivery status is read from either field name."""
    data = {"task_note_id": "a" * 24, "failure_reason": "Task is locked by another user"}
    flat = {"event_id": "evt_1", "event_type": "task_note.failed", "webhook_url": "https://x",
            "delivery_status": "failed", "data": data, "created_at": "2026-11-30T10:00:00Z",
            "job_id": 12345, "access_token_reference_id": "user_1"}
    envelope = {"id": "evt_1", "access_token_reference_id": "user_1", "object": "event",
                "created": "2026-11-30T10:00:00Z", "type": "task_note.failed",
                "job_id": "12345", "status": "failed", "delivered": False,
                "delivery_attempts": 2, "last_delivery_attempt": "2026-11-30T10:00:01Z",
                "response_status_code": 503, "data": data}
    expected = {"id": "evt_1", "access_token_reference_id": "user_1", "object": "event",
                "created": "2026-11-30T10:00:00Z", "type": "task_note.failed",
                "job_id": "12345", "data": data}
    assert read_list_item(flat) == (expected, "failed")
    assert read_list_item(envelope) == (expected, "failed")
    assert list(read_list_item(envelope)[0]) == list(expected)
    without_status = {k: v for k, v in envelope.items() if k != "status"}
    assert read_list_item({**without_status, "delivered": True})[1] == "success"
    other = {"id": "evt_2", "type": "patient.updated", "created": "x", "job_id": None}
    assert read_list_item(other) == ({"id": "evt_2", "access_token_reference_id": None,
                                      "object": "event", "created": "x",
                                      "type": "patient.updated", "job_id": None, "data": {}},
                                     None)


@pytest.mark.parametrize(
    ("item", "named"),
    [pytest.param({"uuid": "u1", "kind": "task_note.created", "payload": {}},
                  "fields kind, payload, uuid", id="unknown-fields"),
     pytest.param({"event_id": "evt_1", "type": "task_note.created"},
                  "fields event_id, type", id="mixed-shapes"),
     pytest.param({"id": "evt_1", "type": "task_note.created", "data": "PHI note text"},
                  "task_note.created item has no data object", id="data-not-an-object"),
     pytest.param(["evt_1"], "an item is a JSON list", id="not-an-object")],
)
def test_a_page_it_cannot_read_stops_poll_naming_the_fields(
    tmp_path: Path, item: object, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A page holding an item of neither documented shape is an error naming the fields found
    (never their values), exit 3, and nothing of that page is stored: the lost outcomes are
    not silently left lost."""
    write_csv(tmp_path / "input.csv", notes(2))

    async def odd_page(request: Request) -> JSONResponse:
        readable = {"event_id": "evt_ok", "event_type": "task_note.created",
                    "job_id": request.query_params["job_id"],  # a wanted job: storable
                    "created_at": "2026-11-30T10:00:00Z", "data": {"task_note_id": "b" * 24}}
        return JSONResponse({"success": True, "webhook_events": [readable, item],
                             "pagination": {"current_page": 1, "total_pages": 1,
                                            "total_count": 2, "page_size": 100}})

    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        run_pipeline(load_config(path, needs=("api",)))
        wait_until(lambda: len(api.emulator.events) == 2, what="the outcomes")
    capsys.readouterr()
    app = Starlette(routes=[Route("/v1/webhook-events", odd_page)])
    with ThreadedServer(app) as odd:
        path = write_config(tmp_path, api={"base_url": odd.url})
        assert main(["-q", "poll", str(path)]) == 3
    err = capsys.readouterr().err
    assert "item 2 of 2 cannot be read" in err
    assert named in err
    assert "event_id/event_type/created_at or id/type/created" in err
    assert "PHI" not in err
    assert list(read_sink(tmp_path / "state" / "webhooks.jsonl")) == []


def test_poll_in_the_sandbox_says_the_emulator_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a sandbox config, poll explains in one line that the emulator lived only during the
    run (exit 0) instead of failing to connect to the placeholder api.base_url."""
    write_csv(tmp_path / "input.csv", notes(3))
    path = write_config(tmp_path, sandbox={
        "enabled": True, "wait_s": 0.2,
        "emulator": {"outcome_delay_ms": [1, 5], "faults": {"drop_webhooks": 1.0}}})
    config = load_config(path, needs=("api",))
    assert config.api.base_url == "http://127.0.0.1:9"
    first = run_pipeline(config)
    assert first.report is not None
    assert first.report.counts["awaiting_outcome"] == 3  # something poll would want
    capsys.readouterr()
    assert main(["poll", str(path)]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    assert "emulator lives only while `tasknotes run` runs" in line
    assert "127.0.0.1:9" not in captured.out + captured.err
    assert captured.err == ""
    # a run id, as outside a sandbox: the run's own is fine, one naming no run is exit 2
    assert main(["-q", "poll", str(path), "--run-id", first.run_id]) == 0
    assert main(["-q", "poll", str(path), "--run-id", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def _accepted_without_outcome(tmp_path: Path, api: EmulatorThread, **submit: Any) -> Path:
    """One note accepted by ``api``, its webhook never delivered; the config's path."""
    write_csv(tmp_path / "input.csv", notes(1))
    path = write_config(tmp_path, api={"base_url": api.url}, submit=submit)
    run_pipeline(load_config(path, needs=("api",)))
    wait_until(lambda: len(api.emulator.events) == 1, what="the outcome")
    return path


def _sink_events(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for _, e in read_sink(tmp_path / "state" / "webhooks.jsonl")]


def test_poll_retries_429_and_503_then_stores_the_event(tmp_path: Path) -> None:
    """A GET answered 429, then 503 twice, is asked again until it succeeds (4 queries)."""
    faults = Faults(drop_webhooks=1.0, events_429=1, events_503=2, retry_after_s=0)
    with EmulatorThread(faults=faults) as api:
        path = _accepted_without_outcome(tmp_path, api, max_attempts=4)
        assert main(["-q", "poll", str(path)]) == 0
        statuses = [status for _, status in api.emulator.event_queries]
    assert statuses == [429, 503, 503, 200]
    assert [e["type"] for e in _sink_events(tmp_path)] == ["task_note.created"]


def test_poll_says_each_retry_in_one_line_of_its_own(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A retried query is one INFO line of poll's own naming the failure, the attempt and
    the wait, and nothing else is logged about it (no third-party retry warning)."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0, events_503=1, retry_after_s=0)) as api:
        path = _accepted_without_outcome(tmp_path, api, max_attempts=4)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["poll", str(path)]) == 0
    about_it = [r for r in caplog.records if "503" in r.getMessage()]
    assert [(r.name, r.levelno) for r in about_it] == [("pipeline.polling", logging.INFO)]
    assert "attempt 1 of 4, asking again in 0.00 s" in about_it[0].getMessage()


def test_poll_stops_after_max_attempts(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """A GET that keeps failing is tried submit.max_attempts times, then poll exits 3."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0, events_503=10, retry_after_s=0)) as api:
        path = _accepted_without_outcome(tmp_path, api, max_attempts=3)
        assert main(["-q", "poll", str(path)]) == 3
        statuses = [status for _, status in api.emulator.event_queries]
    assert statuses == [503, 503, 503]
    assert "polling failed after 3 attempts: HTTP 503" in capsys.readouterr().err
    assert _sink_events(tmp_path) == []


def test_poll_waits_as_long_as_retry_after_says(tmp_path: Path) -> None:
    """The query after a 429 with Retry-After: 1 comes no sooner than 1 s later, though the
    backoff alone would be at most 50 ms."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0, events_429=1, retry_after_s=1)) as api:
        path = _accepted_without_outcome(tmp_path, api, backoff_base_s=0.01,
                                         backoff_max_s=0.05)
        assert main(["-q", "poll", str(path)]) == 0
        (refused, first), (retried, second) = api.emulator.event_queries
    assert (first, second) == (429, 200)
    # A lower bound on one clock: a loaded machine can only make the gap longer.
    assert retried - refused >= 1.0


@pytest.mark.timeout(30)  # a stall of a day fails here rather than hangs the suite
def test_poll_caps_retry_after_at_max_retry_after_s(tmp_path: Path) -> None:
    """A 429 with Retry-After: 86400 waits submit.max_retry_after_s, not a day: the query is
    asked again and the event stored."""
    faults = Faults(drop_webhooks=1.0, events_429=1, retry_after_s=86400)
    with EmulatorThread(faults=faults) as api:
        path = _accepted_without_outcome(tmp_path, api, max_retry_after_s=0.05,
                                         backoff_base_s=0.01, backoff_max_s=0.05)
        assert main(["-q", "poll", str(path)]) == 0
        statuses = [status for _, status in api.emulator.event_queries]
    assert statuses == [429, 200]
    assert [e["type"] for e in _sink_events(tmp_path)] == ["task_note.created"]


def test_poll_does_not_retry_a_refused_query(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A 400 to the events query is final (asking again cannot help): asked once, exit 3."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0, events_400=5)) as api:
        path = _accepted_without_outcome(tmp_path, api, max_attempts=4)
        assert main(["-q", "poll", str(path)]) == 3
        statuses = [status for _, status in api.emulator.event_queries]
    assert statuses == [400]
    assert "Cobalt refused the events query" in capsys.readouterr().err


def test_poll_does_not_retry_refused_credentials(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A 401 to the events query is final: asked once, exit 3, credentials named."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        _accepted_without_outcome(tmp_path, api, max_attempts=4)
        wrong = write_config(tmp_path, "wrong.yaml",
                             api={"base_url": api.url, "access_token": "revoked"})
        assert main(["-q", "poll", str(wrong)]) == 3
        statuses = [status for _, status in api.emulator.event_queries]
    assert statuses == [401]
    assert "credentials refused by Cobalt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pagination", "named"),
    [pytest.param({"current_page": 1, "total_pages": "n/a"},
                  "pagination.total_pages is a JSON string, not an integer", id="n/a"),
     pytest.param({"current_page": 1, "total_pages": -3},
                  "pagination.total_pages is an integer outside 0..100,000", id="negative"),
     pytest.param({"current_page": 1, "total_pages": 10**15},
                  "pagination.total_pages is an integer outside 0..100,000", id="huge"),
     pytest.param({"current_page": "1", "total_pages": 2},
                  "pagination.current_page is a JSON string", id="page-a-string"),
     pytest.param({"current_page": 1, "total_pages": 50},
                  "pagination.current_page is not the page asked for", id="page-ignored")],
)
def test_odd_pagination_stops_poll_with_one_line_and_exit_3(
    tmp_path: Path, pagination: dict[str, object], named: str,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """A loopback Cobalt whose pagination numbers are text, negative, absurdly large, or
    that answers page 1 whatever page is asked: poll stops with one line naming the field
    (never its value), exit 3, and pages through nothing forever."""
    write_csv(tmp_path / "input.csv", notes(1))
    asked: list[str] = []

    async def odd_page(request: Request) -> JSONResponse:
        asked.append(request.query_params["page"])
        item = {"event_id": f"evt_other_{len(asked)}", "event_type": "task_note.created",
                "job_id": "not-ours", "created_at": "2026-11-30T10:00:00Z", "data": {}}
        return JSONResponse({"success": True, "webhook_events": [item],
                             "pagination": pagination})

    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        _accepted_without_outcome(tmp_path, api)
    capsys.readouterr()
    app = Starlette(routes=[Route("/v1/webhook-events", odd_page)])
    with ThreadedServer(app) as odd:
        path = write_config(tmp_path, api={"base_url": odd.url})
        assert main(["-q", "poll", str(path)]) == 3
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("tasknotes: ")
    assert named in line
    for value in pagination.values():
        if value not in (1, 2, 50):
            assert str(value) not in line.replace("100,000", "")
    assert "Traceback" not in err
    assert set(asked) <= {"1", "2"}
    assert _sink_events(tmp_path) == []


def test_poll_settles_an_ambiguous_row_by_the_event_carrying_its_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cobalt stored one note, then answered 500, and every webhook was lost: that row is
    ambiguous and has no job id. poll pages by date and event type, stores the
    task_note.created event carrying that note for that task, and the reconcile that follows
    settles the row as confirmed; every note was sent exactly once."""
    rows = notes(3)
    write_csv(tmp_path / "input.csv", rows)
    faults = Faults(rate_500_after_store=1.0, only_tasks=frozenset({"task-00001"}),
                    drop_webhooks=1.0)
    with EmulatorThread(faults=faults) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        first = run_pipeline(load_config(path, needs=("api",)))
        assert first.report is not None
        assert first.report.counts["ambiguous"] == 1
        assert first.report.counts["awaiting_outcome"] == 2
        wait_until(lambda: len(api.emulator.events) == 3, what="the outcomes")
        capsys.readouterr()
        assert main(["poll", str(path)]) == 0
        out = capsys.readouterr().out
        assert main(["-q", "reconcile", str(path)]) == 0
        sent = [api.stored(task, note) for task, note in rows]
    assert "polled 2 jobs and 1 ambiguous note" in out
    assert "3 events stored, 0 already in the event store (not stored again)" in out  # either store
    assert "1 ambiguous note found in a task_note.created event" in out
    assert sent == [1, 1, 1]  # nothing sent twice
    results = {r["emr_task_id"]: r for r in read_results(first.report.directory)}
    assert {r["final_status"] for r in results.values()} == {"confirmed"}
    assert results["task-00001"]["detail"] == (
        "settled by evidence: a task_note.created event carries this note")


def test_poll_rewrites_every_run_whose_truth_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run A could not reach Cobalt (5 rows send_failed); run B sent them and every webhook
    was lost. poll brings B's outcomes back and rewrites A's report too (reconcile's run
    selection): A's rows follow B's confirmed sends, nothing needs attention there."""
    write_csv(tmp_path / "input.csv", notes(5))
    down = write_config(tmp_path, api={"base_url": f"http://127.0.0.1:{free_port()}"},
                        submit={"max_attempts": 1})
    run_a = run_pipeline(load_config(down, needs=("api",)))
    assert run_a.report is not None
    assert run_a.report.counts["send_failed"] == 5
    assert read_summary(run_a.report.directory)["exit_code_now"] == 1
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        run_b = run_pipeline(load_config(path, needs=("api",)))
        assert run_b.report is not None
        wait_until(lambda: len(api.emulator.events) == 5, what="the outcomes")
        capsys.readouterr()
        assert main(["poll", str(path)]) == 0
    out = capsys.readouterr().out
    a_id, b_id = run_a.report.directory.name, run_b.report.directory.name
    assert f"run {a_id}:" in out
    assert f"run {b_id}:" in out
    summary = read_summary(run_a.report.directory)
    assert (summary["exit_code_now"], summary["needs_attention"]) == (0, 0)
    results = read_results(run_a.report.directory)
    assert {r["final_status"] for r in results} == {"skipped_already_sent"}
    assert all(r["detail"].startswith(f"sent in run {b_id} as job ")
               and r["detail"].endswith(": confirmed") for r in results)
    assert {r["final_status"] for r in read_results(run_b.report.directory)} == {"confirmed"}
