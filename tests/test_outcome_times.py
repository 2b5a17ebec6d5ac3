"""outcome_at is the time the sink received the event (UTC, ms), kept in the sink's receipts;
events poll fetched and sink files older than receipts say what their time is instead, and
latency is measured on receive times only."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    make_config,
    notes,
    read_results,
    read_summary,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.emulator import Faults, sign
from pipeline.events import SinkFile, read_receipts, receipts_path, receive_time
from pipeline.events import compact_json as compact
from pipeline.sink import WebhookReceiver

MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LONG_AGO = "2020-01-01T00:00:00.000Z"  # a created time with milliseconds, years before any send


def _envelope(item: dict[str, Any], created: str) -> dict[str, Any]:
    return {"id": item["event_id"], "access_token_reference_id": "u", "object": "event",
            "created": created, "type": item["event_type"], "job_id": item["job_id"],
            "data": item["data"]}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_outcome_at_is_when_the_sink_received_the_signed_event(tmp_path: Path) -> None:
    """Cobalt's webhooks, signed, reach a real sink (uvicorn on loopback) after the run: each
    row's outcome_at is the sink's receive time (ms, between the test's clock readings around
    the deliveries, never before submitted_at), not the event's own created time (set years
    back, with milliseconds too), and the latency is measured from it."""
    rows = 4
    write_csv(tmp_path / "input.csv", notes(rows))
    sink_path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(sink_path)
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api, \
            ThreadedServer(receiver.app()) as hooks:
        config = make_config(tmp_path, api={"base_url": api.url})
        run = run_pipeline(config)
        wait_until(lambda: len(api.emulator.events) == rows, what="the outcomes")
        before = receive_time()
        with httpx.Client(base_url=hooks.url) as client:
            for item in list(api.emulator.events):
                body = compact(_envelope(item, LONG_AGO))
                answer = client.post("/webhooks/cobalt", content=body, headers={
                    "content-type": "application/json",
                    "cobalt-verification": sign(body, WEBHOOK_SECRET)})
                assert answer.status_code == 200, answer.text
        after = receive_time()
        path = write_config(tmp_path, api={"base_url": api.url})
        assert main(["-q", "reconcile", str(path)]) == 0
    sink.close()
    receipts = read_receipts(sink_path)
    assert receipts is not None
    assert len(receipts) == rows
    report = config.report.dir / run.run_id
    results = read_results(report)
    assert {r["final_status"] for r in results} == {"confirmed"}
    for r in results:
        assert MS.fullmatch(r["outcome_at"]), r["outcome_at"]
        assert r["outcome_at"] == receipts[r["event_id"]].received_at
        assert before <= r["outcome_at"] <= after
        assert r["outcome_at"] >= r["submitted_at"]
        assert r["outcome_clock"] == "sink_received"
    latency = read_summary(report)["latency_s"]
    seconds = [(_at(r["outcome_at"]) - _at(r["submitted_at"])).total_seconds() for r in results]
    assert latency["count"] == rows
    assert latency["max"] == round(max(seconds), 1)
    assert (latency["outcome_clocks"], latency["not_measured"]) == ({"sink_received": rows}, 0)


def test_events_poll_fetched_have_their_created_time_and_are_not_measured(
        tmp_path: Path) -> None:
    """Every webhook lost; poll brings the events back: outcome_at is each event's own
    created time, marked event_created_polled, counted apart from the latency."""
    rows = 3
    write_csv(tmp_path / "input.csv", notes(rows))
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        path = write_config(tmp_path, api={"base_url": api.url})
        config = make_config(tmp_path, api={"base_url": api.url})
        run = run_pipeline(config)
        wait_until(lambda: len(api.emulator.events) == rows, what="the outcomes")
        created = {e["event_id"]: e["created_at"] for e in api.emulator.events}
        assert main(["-q", "poll", str(path)]) == 0
    report = config.report.dir / run.run_id
    results = read_results(report)
    assert {r["final_status"] for r in results} == {"confirmed"}
    assert {r["outcome_clock"] for r in results} == {"event_created_polled"}
    assert all(r["outcome_at"] == created[r["event_id"]] for r in results)
    latency = read_summary(report)["latency_s"]
    assert (latency["count"], latency["not_measured"]) == (0, rows)
    assert latency["outcome_clocks"] == {"event_created_polled": rows}
    assert "not measured" in (report / "report.html").read_text()


def test_a_sink_file_without_receipts_still_reconciles(tmp_path: Path) -> None:
    """A sink file written before receipts were kept (no <sink>.received): every row still
    settles; outcome_at falls back to the event's created time, marked
    event_created_no_receipt, and summary.json says none of them was measured."""
    rows = 4
    write_csv(tmp_path / "input.csv", notes(rows))
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        run = run_pipeline(config)
        wait_until(lambda: len(api.emulator.events) == rows, what="the outcomes")
        listed = list(api.emulator.events)
        sink_path = tmp_path / "state" / "webhooks.jsonl"
        with sink_path.open("a", encoding="utf-8") as sink:
            for item in listed:  # by hand, as an older tasknotes wrote them: no receipts
                sink.write(json.dumps(_envelope(item, item["created_at"])) + "\n")
        assert not receipts_path(sink_path).exists()
        assert main(["-q", "reconcile", str(write_config(tmp_path,
                                                           api={"base_url": api.url}))]) == 0
    report = config.report.dir / run.run_id
    results = read_results(report)
    assert {r["final_status"] for r in results} == {"confirmed"}
    created = {e["event_id"]: e["created_at"] for e in listed}
    assert all(r["outcome_at"] == created[r["event_id"]] for r in results)
    assert {r["outcome_clock"] for r in results} == {"event_created_no_receipt"}
    latency = read_summary(report)["latency_s"]
    assert (latency["count"], latency["not_measured"]) == (0, rows)
    assert latency["outcome_clocks"] == {"event_created_no_receipt": rows}
    assert "not measured" in (report / "report.html").read_text()
