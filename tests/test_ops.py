"""The operator's kit, as an operator meets it: the tasknotes command in a subprocess on a
sandbox copy, JSON log lines on stderr, the Prometheus metrics file, the run-ended
notification reaching a real loopback server (uvicorn) or a command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from helpers import ThreadedServer, free_port, read_summary
from pipeline.config import NotifyConfig
from pipeline.notify import RunSummary, notify

ROOT = Path(__file__).parent.parent
CANARY = "CANARY-9q7z"  # in every note: it must appear in no log line and no notification
MISSING_TASK = "5d0c7e2a-61f1-4b7e-9f0e-3c1a9b8e4d21"  # the sandbox EMR lacks it: failed_in_emr


class Hook:
    """A Slack-compatible incoming webhook on loopback: keeps each JSON body it is sent."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.status = status

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            self.raw.append(body)
            self.bodies.append(json.loads(body))
            return Response("ok" if self.status < 300 else "no", status_code=self.status)

        return Starlette(routes=[Route("/services/T0/B0/secret", hook, methods=["POST"])])


def tasknotes(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def sandbox(tmp: Path, **sections: dict[str, Any]) -> Path:
    """The shipped sandbox config in ``tmp``, sending a CSV whose every note holds the
    canary: 4 to confirm, 1 to fail in the EMR, 1 rejected (bad task id); ``sections``
    merged into the config. Returns the config's path."""
    shutil.copytree(ROOT / "configs", tmp / "configs")
    rows = [f"task-{i},Called back {CANARY} {i},Clinic" for i in range(4)]
    rows += [f"{MISSING_TASK},Left word {CANARY},Clinic", f"bad id!,Bad {CANARY},Clinic"]
    (tmp / "notes.csv").write_text("emr_task_id,note,clinic\n" + "\n".join(rows) + "\n")
    config = yaml.safe_load((tmp / "configs" / "sandbox.yaml").read_text())
    config["input"]["path"] = "notes.csv"
    config["sandbox"]["emulator"]["outcome_delay_ms"] = [20, 100]
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp / "configs" / "ops.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as JSON (a line that does not parse fails the test)."""
    return [json.loads(line) for line in stderr.splitlines()]


def metrics(path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The metrics file through the Prometheus client's own parser: name -> samples."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    [(labels, value)] = samples[name]
    assert labels == {}
    return value


@dataclass
class NightlyRun:
    cwd: Path
    config: Path
    done: subprocess.CompletedProcess[str]
    hook: Hook
    hook_url: str
    report: Path
    metrics_file: Path
    stdin_file: Path


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> NightlyRun:
    """One sandbox run with every piece on: --log-format json -v, a metrics file, a
    notification to a loopback webhook (its URL from ${VAR}) and to a command."""
    cwd = tmp_path_factory.mktemp("nightly")
    stdin_file = cwd / "notified.json"
    hook = Hook()
    with ThreadedServer(hook.app()) as server:
        url = f"{server.url}/services/T0/B0/secret"
        config = sandbox(
            cwd, report={"metrics_file": "textfile/tasknotes.prom"},
            notify={"url": "${TASKNOTES_TEST_HOOK}",
                    "command": [sys.executable, "-c",
                                f"import sys; open({str(stdin_file)!r}, 'wb')"
                                ".write(sys.stdin.buffer.read())"]})
        done = tasknotes("--log-format", "json", "-v", "run", str(config), "--no-progress",
                         cwd=cwd, env={"TASKNOTES_TEST_HOOK": url})
    [report] = (cwd / "reports").iterdir()
    return NightlyRun(cwd, config, done, hook, url, report, cwd / "textfile" / "tasknotes.prom",
                      stdin_file)


# -- JSON logs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_json_logs_are_one_object_a_line_without_note_text(nightly: NightlyRun) -> None:
    assert nightly.done.returncode == 1, nightly.done.stderr  # a rejected row, a failed one
    lines = json_lines(nightly.done.stderr)
    assert len(lines) > 5  # -v: a line per webhook and event, all JSON
    assert CANARY not in nightly.done.stderr
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
        assert line["time"].endswith("+00:00")  # ISO 8601, UTC
    run_id = nightly.report.name
    assert all(line.get("run_id") == run_id for line in lines if line["logger"] != "pipeline")
    [ended] = [line for line in lines if line.get("event") == "run_ended"]
    assert ended["exit_code"] == 1
    assert ended["counts"] == read_summary(nightly.report)["final_status"]


@pytest.mark.slow
def test_the_config_key_turns_json_on_and_the_error_line_is_json_too(tmp_path: Path) -> None:
    """logging.format: json without the flag; a bad config's one-line error (exit 2) is a
    JSON object too, so that a log shipper never meets a line it cannot parse."""
    config = sandbox(tmp_path, logging={"format": "json"}, submit={"concurrency": 0})
    done = tasknotes("run", str(config), cwd=tmp_path)
    assert done.returncode == 2
    [line] = json_lines(done.stderr)
    assert line["level"] == "ERROR"
    assert line["exit_code"] == 2
    assert "submit.concurrency" in line["message"]
    text = tasknotes("--log-format", "text", "run", str(config), cwd=tmp_path)  # flag wins
    assert text.stderr.startswith("tasknotes: ")
    assert text.returncode == 2


# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_metrics_file_parses_and_its_counts_are_summary_json_s(nightly: NightlyRun) -> None:
    summary = read_summary(nightly.report)
    found = metrics(nightly.metrics_file)
    rows = {labels["final_status"]: value for labels, value in found["tasknotes_last_run_rows"]}
    assert rows == summary["final_status"]
    assert rows["confirmed"] == 4
    assert rows["failed_in_emr"] == 1
    assert found["tasknotes_last_run_info"] == [({"run_id": summary["run_id"]}, 1.0)]
    assert one(found, "tasknotes_last_run_requests") == summary["send"]["requests"]
    assert one(found, "tasknotes_last_run_retries") == summary["send"]["retries"]
    assert one(found, "tasknotes_last_run_exit_code") == nightly.done.returncode
    assert one(found, "tasknotes_last_run_duration_seconds") > 0
    assert (one(found, "tasknotes_last_success_timestamp_seconds")
            == one(found, "tasknotes_last_run_end_timestamp_seconds"))
    status = json.loads(tasknotes("status", str(nightly.config), "--json",
                                  cwd=nightly.cwd).stdout)
    opened = {labels["kind"]: value for labels, value in found["tasknotes_open_items"]}
    assert opened == {kind: v["count"] for kind, v in status["kinds"].items()}
    # written by rename: no temporary file is left beside it
    assert [p.name for p in nightly.metrics_file.parent.iterdir()] == ["tasknotes.prom"]


@pytest.mark.slow
def test_status_and_reconcile_rewrite_the_metrics_file(nightly: NightlyRun) -> None:
    before = nightly.metrics_file.read_text()
    for command in ("status", "reconcile"):
        nightly.metrics_file.unlink()
        done = tasknotes(command, str(nightly.config), cwd=nightly.cwd)
        assert done.returncode in (0, 1), done.stderr
        found = metrics(nightly.metrics_file)
        rows = {lb["final_status"]: v for lb, v in found["tasknotes_last_run_rows"]}
        assert rows == read_summary(nightly.report)["final_status"], command
    assert before.count("tasknotes_open_items{") == 6


# -- notification -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_notification_reaches_the_webhook_and_the_command(nightly: NightlyRun) -> None:
    [body] = nightly.hook.bodies
    assert list(body) == ["text"]  # Slack's incoming-webhook body
    summary = read_summary(nightly.report)
    assert f"tasknotes run {summary['run_id']}: needs attention (exit 1)" in body["text"]
    assert "4 confirmed" in body["text"]
    assert "1 failed in EMR" in body["text"]
    assert f"report: reports/{summary['run_id']}" in body["text"]
    sent = json.loads(nightly.stdin_file.read_text())
    assert sent["exit_code"] == 1
    assert sent["counts"] == summary["final_status"]
    assert sent["run_id"] == summary["run_id"]
    assert sent["rows"] == 6
    for text in (nightly.hook.raw[0].decode(), nightly.stdin_file.read_text()):
        assert CANARY not in text
        assert MISSING_TASK not in text  # no task id either
    # the URL is a secret: neither printed nor logged
    assert nightly.hook_url not in nightly.done.stdout + nightly.done.stderr
    assert "/services/T0" not in nightly.done.stdout + nightly.done.stderr


@pytest.mark.slow
def test_a_dead_url_and_a_failing_command_leave_the_exit_code_alone(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/services/T0/B0/secret"  # nothing listens there
    config = sandbox(tmp_path, notify={"url": "${TASKNOTES_TEST_HOOK}",
                                       "command": [sys.executable, "-c", "raise SystemExit(4)"]})
    done = tasknotes("run", str(config), "--no-progress", cwd=tmp_path,
                     env={"TASKNOTES_TEST_HOOK": url})
    assert done.returncode == 1, done.stderr  # as with no notification: a row was rejected
    [report] = (tmp_path / "reports").iterdir()
    assert read_summary(report)["exit_code"] == 1
    warnings = [line for line in done.stderr.splitlines() if "notify." in line]
    assert len(warnings) == 2, done.stderr
    assert "notify.url: could not be reached" in warnings[0]
    assert "exited with code 4" in warnings[1]
    assert url not in done.stderr
    assert "/services/T0" not in done.stderr + done.stdout


def test_an_unset_notify_url_variable_stops_the_run_before_anything_is_sent(
        tmp_path: Path) -> None:
    config = sandbox(tmp_path, notify={"url": "${TASKNOTES_UNSET_HOOK}"})
    env = {k: v for k, v in os.environ.items() if k != "TASKNOTES_UNSET_HOOK"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=tmp_path,
                          text=True, capture_output=True, timeout=60, check=False, env=env)
    assert done.returncode == 2
    assert "notify.url: environment variable TASKNOTES_UNSET_HOOK is not set" in done.stderr
    assert not (tmp_path / "state").exists()


def test_a_non_2xx_answer_is_a_warning_naming_the_status_not_the_url() -> None:
    hook = Hook(status=500)
    summary = RunSummary(run_id="r1", exit_code=0, counts={"confirmed": 2},
                         report_dir="reports/r1")
    with ThreadedServer(hook.app()) as server:
        url = f"{server.url}/services/T0/B0/secret"
        problems = notify(NotifyConfig.model_validate({"url": url}), summary)
    assert problems == ["notify.url: answered HTTP 500; no notification sent there"]
    assert hook.bodies == [{"text": "tasknotes run r1: ok (exit 0)\n2 rows: 2 confirmed\n"
                                    "report: reports/r1"}]


def test_a_metrics_file_that_cannot_be_written_is_a_warning_not_a_failure(
        tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": "in.csv"}, "state": {"ledger": "state/ledger.sqlite"},
        "report": {"metrics_file": "not-a-directory/tasknotes.prom"}}))
    done = tasknotes("status", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # nothing open: as without a metrics file
    [warning] = done.stderr.splitlines()
    assert warning.startswith("tasknotes: WARNING: metrics file not-a-directory/tasknotes.prom")
    empty = tmp_path / "textfile" / "m.prom"  # and where it can: open items, no run yet
    config.write_text(config.read_text().replace("not-a-directory/tasknotes.prom", str(empty)))
    assert tasknotes("status", str(config), cwd=tmp_path).returncode == 0
    found = metrics(empty)
    assert {lb["kind"]: v for lb, v in found["tasknotes_open_items"]} == dict.fromkeys(
        ["awaiting_outcome", "ambiguous", "send_failed", "failed_retryable", "in_progress",
         "not_read"], 0.0)
    assert "tasknotes_last_run_rows" not in found
