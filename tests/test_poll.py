"""poll: outcomes whose webhooks never arrived are fetched into the sink file, once each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import stamina

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    notes,
    read_results,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.emulator import Faults
from pipeline.events import SinkFile, read_sink
from pipeline.sink import WebhookReceiver


@pytest.mark.parametrize(
    ("rows", "per_job_below"),
    [pytest.param(5, 20, id="per-job"), pytest.param(60, 0, id="paging-by-date")],
)
def test_poll_fills_in_outcomes_whose_webhooks_were_lost(
    tmp_path: Path, rows: int, per_job_below: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half the webhooks are dropped; poll fetches exactly the missing outcomes, and a second
    poll adds nothing."""
    write_csv(tmp_path / "input.csv", notes(rows))
    sink_path = tmp_path / "state" / "webhooks.jsonl"
    sink = SinkFile(sink_path)
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt",
            faults=Faults(drop_webhooks=0.5), seed=9) as api:
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


def test_polled_events_have_the_webhook_envelope_shape(tmp_path: Path) -> None:
    """An event fetched by polling is stored as the webhook envelope Cobalt would have sent."""
    write_csv(tmp_path / "input.csv", notes(1))
    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
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
    """With real waits (stamina's test mode off), the query after a 429 with Retry-After: 1
    comes no sooner than 1 s later, though the backoff alone would be at most 50 ms."""
    with EmulatorThread(faults=Faults(drop_webhooks=1.0, events_429=1, retry_after_s=1)) as api:
        path = _accepted_without_outcome(tmp_path, api, backoff_base_s=0.01,
                                         backoff_max_s=0.05)
        with stamina.set_testing(False):
            assert main(["-q", "poll", str(path)]) == 0
        (refused, first), (retried, second) = api.emulator.event_queries
    assert (first, second) == (429, 200)
    # A lower bound on one clock: a loaded machine can only make the gap longer.
    assert retried - refused >= 1.0


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
