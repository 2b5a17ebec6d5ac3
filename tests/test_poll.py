"""poll: outcomes whose webhooks never arrived are fetched into the sink file, once each."""

from __future__ import annotations

from pathlib import Path

import pytest

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
