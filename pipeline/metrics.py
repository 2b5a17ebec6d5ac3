"""``report.metrics_file``: what the ledger says now, as Prometheus text-format metrics.

Written at the end of every ``run``, ``reconcile`` (and so ``poll``) and ``status``
in the text format of the official client library (``prometheus_client``: its own
registry, ``generate_latest``), as its ``write_to_textfile`` does it (a temporary file
in the same directory, renamed over the old one) but created owner-only (0600) whatever
the process's umask, the convention of node_exporter's textfile collector
(https://github.com/prometheus/node_exporter#textfile-collector): a scrape never
sees half a file. Every metric is a gauge of the state after the command::

    tasknotes_last_run_info{run_id}                  1 (the run the figures below are of)
    tasknotes_last_run_rows{final_status}            rows by final status (summary.json's
                                                     final_status, every status listed)
    tasknotes_last_run_requests                      HTTP requests sent (retries included)
    tasknotes_last_run_retries                       of which retries
    tasknotes_last_run_duration_seconds              from start to end of the run
    tasknotes_last_run_exit_code                     the run process's exit code
    tasknotes_last_run_end_timestamp_seconds         when it ended (Unix time)
    tasknotes_last_success_timestamp_seconds         when the latest run that ran to its
                                                     end (exit 0 or 1) ended
    tasknotes_open_items{kind}                       ``tasknotes status``'s counts by kind
    tasknotes_open_items_stale                       awaiting an outcome past stale_after

"The last run" is the latest run in the ledger that is not in progress. Only
``tasknotes_last_run_info`` carries the run id: a new run id every night on every
series would make a new series a night (unbounded cardinality); the other labels
take a fixed set of values (final statuses, open-item kinds). The file holds counts
and run ids only, never a note or a secret, and is created readable by its owner
only (mode 0600, also under a Python host's umask 022; a directory it creates is
0700), like every file tasknotes writes: run node_exporter as that user, or give
the directory a group the collector is in.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from pipeline import exits
from pipeline.config import RunConfig
from pipeline.open_items import KINDS, LedgerStatus
from pipeline.reconciliation import FINAL_STATUSES
from pipeline.state import RunRecord
from pipeline.state.store import existing_store

log = logging.getLogger(__name__)


def write_metrics(config: RunConfig, open_items: LedgerStatus | None) -> Path | None:
    """Rewrite ``config.report.metrics_file`` from the ledger, the last run's summary.json
    and ``open_items`` (``status.ledger_status``; None: no ``tasknotes_open_items``).

    Returns the path written, or None when no metrics file is configured. Raises
    OSError when the file cannot be written (the caller logs it: a metrics file
    never changes a command's outcome) and StateError when the ledger cannot be read.
    """
    path = config.report.metrics_file
    if path is None:
        return None
    registry = collect(config, open_items)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomically(path, generate_latest(registry))
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` as ``prometheus_client.write_to_textfile`` does (a temporary
    file beside it, renamed over it: a scrape never reads half a file), the temporary
    file created 0600 by ``os.open`` so no umask widens it. Raises OSError."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an older temporary file left with other bits
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def collect(config: RunConfig, open_items: LedgerStatus | None) -> CollectorRegistry:
    """The metrics of the module docstring, in a registry of their own."""
    registry = CollectorRegistry()

    def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, text, labels, registry=registry)

    if open_items is not None:
        items = gauge("tasknotes_open_items",
                      "Open items over every run, by kind (tasknotes status)", ("kind",))
        for kind in KINDS:
            items.labels(kind=kind).set(open_items.kind(kind).count)
        gauge("tasknotes_open_items_stale",
              "Notes awaiting an outcome longer than report.stale_after").set(
            open_items.kind("awaiting_outcome").stale)
    ledger = existing_store(config)
    if ledger is None:
        return registry
    try:
        runs = [ledger.run(r) for r in ledger.run_ids()]
        live = set(ledger.runs_in_progress())
    finally:
        ledger.close()
    ended = [r for r in runs if r.run_id not in live and r.finished_at]
    succeeded = [r for r in ended if _exit_code(r) in (0, 1)]
    if succeeded:
        gauge("tasknotes_last_success_timestamp_seconds",
              "When the latest run that ran to its end (exit 0 or 1) ended, Unix time").set(
            _unix(str(succeeded[-1].finished_at)))
    if ended:
        _last_run(gauge, ended[-1], config.report.dir)
    return registry


def _last_run(gauge: Any, run: RunRecord, reports: Path) -> None:
    gauge("tasknotes_last_run_info", "The run the tasknotes_last_run_* figures are of",
          ("run_id",)).labels(run_id=run.run_id).set(1)
    send = run.info.send
    gauge("tasknotes_last_run_requests",
          "HTTP requests the last run sent to Cobalt, retries included").set(
        send.get("requests", 0))
    gauge("tasknotes_last_run_retries", "Of those requests, retries").set(
        send.get("retries", 0))
    gauge("tasknotes_last_run_duration_seconds", "From the last run's start to its end").set(
        _unix(str(run.finished_at)) - _unix(run.started_at))
    gauge("tasknotes_last_run_end_timestamp_seconds", "When the last run ended, Unix time").set(
        _unix(str(run.finished_at)))
    code = _exit_code(run)
    if code is not None:
        gauge("tasknotes_last_run_exit_code", "The last run process's exit code").set(code)
    counts = _summary_counts(reports / run.run_id / "summary.json")
    if counts is not None:
        rows = gauge("tasknotes_last_run_rows",
                     "Rows of the last run by final status, as its summary.json says now",
                     ("final_status",))
        for status in FINAL_STATUSES:
            rows.labels(final_status=status).set(counts.get(status, 0))


def _exit_code(run: RunRecord) -> int | None:
    """The exit code the run's process ended with (exits.for_recorded_run), None when not
    known (a run recorded before the code was kept, unless aborted; in progress; crashed)."""
    if run.info.exit_code is None and run.state != "aborted":
        return None
    return exits.for_recorded_run(run.state, run.info.exit_code, exits.OK)


def _summary_counts(path: Path) -> dict[str, int] | None:
    """summary.json's ``final_status`` counts; None when the report was not written."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    counts = summary.get("final_status") if isinstance(summary, dict) else None
    return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else None


def _unix(iso: str) -> float:
    """An ISO 8601 time of the ledger (UTC, ``Z`` or an offset) as Unix seconds."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
