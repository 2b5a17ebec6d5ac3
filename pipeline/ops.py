"""The operator's hooks: what happens after a command ends (metrics, notification, the
``run_ended`` log line). Each command calls one of these once; none raises for a
failed metrics file or notification, and none changes an exit code.

    run_ended(config, ...)          after ``run`` (not a dry run): log line, metrics,
                                    notification
    reconciled(config)              after ``reconcile`` and ``poll``: metrics
    status_read(config, found)      after ``status``: metrics
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import RunConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.open_items import LedgerStatus

log = logging.getLogger("pipeline.ops")


def run_ended(config: RunConfig, *, run_id: str, exit_code: int,
              counts: Mapping[str, int] | None, report_dir: Path | None,
              stop_reason: str | None = None) -> None:
    """After a run that sent (or tried to): log ``run_ended`` with its figures as fields,
    rewrite ``report.metrics_file``, send the ``notify`` summary.

    ``counts``: rows by final status (None: no report was written); ``exit_code``: the
    process's. Failures of the metrics file or the notification are warning lines.
    """
    rows = dict(counts or {})
    log.info("run %s ended: exit code %d, %d rows", run_id, exit_code, sum(rows.values()),
             extra={"event": "run_ended", "run_id": run_id, "exit_code": exit_code,
                    "counts": rows, "stop_reason": stop_reason,
                    "report_dir": None if report_dir is None else str(report_dir)})
    wanted = config.report.metrics_file is not None or _notify_wanted(config)
    found = _open_items(config) if wanted else None
    _metrics(config, found)
    if _notify_wanted(config):
        from pipeline.notify import RunSummary, notify  # noqa: PLC0415 - only with notify set

        open_items = {} if found is None else {k.kind: k.count for k in found.kinds if k.count}
        notify(config.notify, RunSummary(
            run_id=run_id, exit_code=exit_code, counts=rows,
            report_dir=None if report_dir is None else str(report_dir),
            stop_reason=stop_reason, open_items=open_items, verdict=_verdict(report_dir)))


def _verdict(report_dir: Path | None) -> str | None:
    """summary.json's verdict, so the notification says what the report says (None: no
    report, or one that cannot be read)."""
    if report_dir is None:
        return None
    try:
        found = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    verdict = found.get("verdict") if isinstance(found, dict) else None
    return verdict if isinstance(verdict, str) else None


def reconciled(config: RunConfig) -> None:
    """After ``reconcile`` (and the reconcile ``poll`` ends with): rewrite the metrics."""
    if config.report.metrics_file is not None:
        _metrics(config, _open_items(config))


def status_read(config: RunConfig, found: LedgerStatus) -> None:
    """After ``status``: rewrite the metrics with the open items it just counted."""
    _metrics(config, found)


def _notify_wanted(config: RunConfig) -> bool:
    return bool(config.notify.command) or config.notify.url is not None


def _open_items(config: RunConfig) -> LedgerStatus | None:
    from pipeline.open_items import ledger_status  # noqa: PLC0415 - only with metrics set

    try:
        return ledger_status(config)
    except PipelineError as exc:
        log.warning("open items not counted for metrics/notification: %s", exc)
        return None


def _metrics(config: RunConfig, found: LedgerStatus | None) -> None:
    if config.report.metrics_file is None:
        return
    from pipeline.metrics import write_metrics  # noqa: PLC0415 - prometheus_client

    try:
        written = write_metrics(config, found)
    except (OSError, PipelineError) as exc:
        log.warning("metrics file %s not written: %s", config.report.metrics_file,
                    getattr(exc, "strerror", None) or exc, extra={"event": "metrics_failed"})
        return
    log.debug("metrics written: %s", written)
