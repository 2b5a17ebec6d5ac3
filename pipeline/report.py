"""The files a run leaves for its reviewer: results.csv, summary.json, report.html,
rejects.csv and redrive.csv, under ``reports/<run_id>/``.

Only rejects.csv and redrive.csv hold note text (they are copies of input
rows, to be fixed and fed back), so they are created 0600; every other file
is free of note text and safe to share. results.csv and summary.json are
byte-for-byte the same for the same ledger and sink file; only the
``report`` block of summary.json (when it was made, what was stale then) moves.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import jinja2
import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline.config import InputConfig, ReportConfig
from pipeline.errors import PipelineError, StateError
from pipeline.reconcile import FINAL_STATUSES, GOOD_STATUSES, RunResult
from pipeline.rejects import private_file
from pipeline.source import CsvFile, clean_name

log = logging.getLogger(__name__)

RESULT_COLUMNS: Final = (
    "source_file", "line", "emr_task_id", "final_status", "submit_status", "http_status",
    "task_note_id", "job_id", "outcome", "emr_note_id", "failure_reason", "event_id",
    "submitted_at", "outcome_at", "error",
)  # fmt: skip
ERROR_STATUSES: Final = frozenset({"rejected", "api_rejected", "ambiguous", "failed", "sending",
                                   "pending"})
REDRIVE_STATUSES: Final = frozenset({"send_failed"})


@dataclass(frozen=True, slots=True)
class Written:
    """Where one run's report went."""

    directory: Path
    files: tuple[str, ...]


def report_dir(base: Path, run_id: str) -> Path:
    return base / run_id


def write_report(
    result: RunResult, settings: ReportConfig, *, input_settings: InputConfig,
    now: datetime | None = None,
) -> Written:
    """(Re)write results.csv, summary.json, report.html and redrive.csv for one run."""
    now = now or datetime.now(UTC)
    directory = report_dir(settings.dir, result.run["run_id"])
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"report directory {directory} cannot be created: {exc}") from None
    table = results_table(result)
    written = ["results.csv", "summary.json", "report.html"]
    _atomic_write(directory / "results.csv", table.to_csv(index=False, lineterminator="\n"))
    summary = summarise(result, table, settings, now)
    _atomic_write(directory / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    previews = None
    if settings.show_note_preview:
        previews = note_previews(result, _attention(table, settings, now).head(
            settings.attention_rows), settings, input_settings)
    _atomic_write(directory / "report.html",
                  render_html(result, table, summary, settings, now, previews=previews))
    if write_redrive(result, table, settings, input_settings, directory / "redrive.csv"):
        written.append("redrive.csv")
    if (directory / "rejects.csv").exists():
        written.append("rejects.csv")
    return Written(directory, tuple(written))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def results_table(result: RunResult) -> pd.DataFrame:
    """results.csv as a frame: DESIGN.md's columns, then passthrough columns, then detail."""
    rows = result.rows
    out = pd.DataFrame(index=rows.index)
    for column in RESULT_COLUMNS:
        out[column] = rows.get(column, "")
    out["error"] = rows["error"].where(rows["status"].isin(ERROR_STATUSES), None)
    out["http_status"] = rows["http_status"].astype("Int64").astype("string")
    for i, name in enumerate(result.run["info"].get("passthrough", [])):
        values = rows["passthrough"].map(lambda v, i=i: json.loads(v)[i] if v else "")
        out[name] = values
    out["detail"] = rows["detail"]
    return out.fillna("").reset_index(drop=True)


# -- summary.json ----------------------------------------------------------------------------


def summarise(
    result: RunResult, table: pd.DataFrame, settings: ReportConfig, now: datetime
) -> dict[str, Any]:
    run, info = result.run, result.run["info"]
    counts = result.counts
    latency = _latencies(table)
    stale = _stale(table, settings, now)
    failed = table[table["final_status"] == "failed_in_emr"]
    return {
        "tool": f"tasknotes {__version__}",
        "run_id": run["run_id"],
        "state": run["state"],
        "stop_reason": info.get("stop_reason"),
        "account": run["account"],
        "config_fingerprint": run["fingerprint"],
        "dry_run": bool(info.get("dry_run")),
        "limit": info.get("limit"),
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "timings_s": info.get("timings_s", {}),
        "throughput_per_s": info.get("throughput_per_s"),
        "inputs": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["size"]}
                   for f in result.files],
        "rows": len(table),
        "blank_rows_skipped": info.get("blank_rows", 0),
        "final_status": counts,
        "ended_well": int(sum(counts[s] for s in GOOD_STATUSES)),
        "submit_status": {k: int(v) for k, v in
                          table["submit_status"].replace("", np.nan).value_counts().items()},
        "problems": info.get("problems", {}),
        "failure_reasons": _ranked(failed["failure_reason"]),
        "settled_by_evidence": int((result.rows["settled_by"] == "evidence").sum()),
        "conflicts": int((table["outcome"] == "conflict").sum()),
        "latency_s": latency,
        "events": {
            "sink_lines": result.events.lines,
            "duplicates_collapsed": result.events.duplicates,
            "other_types": dict(sorted(result.events.other_types.items())),
            "orphans": len(result.orphans),
        },
        "exit_code": result.exit_code,
        "report": {
            "generated_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "stale_after_s": settings.stale_after,
            "stale": len(stale),
            "oldest_waiting_s": int(stale["age_s"].max()) if len(stale) else None,
        },
    }


def _ranked(reasons: pd.Series) -> list[dict[str, Any]]:
    counts = reasons.replace("", "(no reason given)").value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"reason": str(k), "count": int(v)} for k, v in ranked]


def _seconds_between(start: pd.Series, end: pd.Series) -> pd.Series:
    a = pd.to_datetime(start.replace("", None), utc=True, errors="coerce", format="ISO8601")
    b = pd.to_datetime(end.replace("", None), utc=True, errors="coerce", format="ISO8601")
    return (b - a).dt.total_seconds()


def _latencies(table: pd.DataFrame) -> dict[str, float | None]:
    seconds = _seconds_between(table["submitted_at"], table["outcome_at"]).dropna().clip(lower=0)
    if seconds.empty:
        return {"count": 0, "p50": None, "p90": None, "max": None}
    return {
        "count": len(seconds),
        "p50": round(float(seconds.quantile(0.5)), 1),
        "p90": round(float(seconds.quantile(0.9)), 1),
        "max": round(float(seconds.max()), 1),
    }


def _stale(table: pd.DataFrame, settings: ReportConfig, now: datetime) -> pd.DataFrame:
    waiting = table[table["final_status"] == "awaiting_outcome"]
    since = pd.to_datetime(waiting["submitted_at"].replace("", None), utc=True,
                           errors="coerce", format="ISO8601")
    age = (pd.Timestamp(now) - since).dt.total_seconds()
    return waiting.assign(age_s=age)[age > settings.stale_after]


# -- report.html -------------------------------------------------------------------------------

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
STATUS_COLOURS: Final = {
    "confirmed": "#2e7d32", "awaiting_outcome": "#1565c0", "skipped_duplicate": "#78909c",
    "skipped_already_sent": "#90a4ae", "failed_in_emr": "#c62828", "rejected_invalid": "#ef6c00",
    "rejected_by_api": "#d84315", "ambiguous": "#6a1b9a", "send_failed": "#ad1457",
}  # fmt: skip


def render_html(
    result: RunResult, table: pd.DataFrame, summary: dict[str, Any], settings: ReportConfig,
    now: datetime, *, previews: dict[tuple[str, int], str] | None = None,
) -> str:
    """One self-contained page: no network, no external scripts, fonts or images."""
    attention = _attention(table, settings, now)
    shown = attention.head(settings.attention_rows)
    total = len(table)
    return _ENV.get_template("report.html.j2").render(
        summary=summary,
        total=total,
        confirmed=summary["final_status"]["confirmed"],
        bars=_bars(summary["final_status"], total),
        reasons=summary["failure_reasons"][:20],
        histogram=_histogram(table),
        attention=[{**r, "preview": (previews or {}).get((r["source_file"], int(r["line"])), "")}
                   for r in shown.to_dict("records")],
        attention_total=len(attention),
        orphans=result.orphans.head(50)[["event_id", "kind", "job_id", "created"]]
        .fillna("").to_dict("records"),
        previews=previews or {},
        generated=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
    )


def _attention(table: pd.DataFrame, settings: ReportConfig, now: datetime) -> pd.DataFrame:
    """Rows a reviewer must look at: every one that did not end well, and stale waiters."""
    since = pd.to_datetime(table["submitted_at"].replace("", None), utc=True, errors="coerce",
                           format="ISO8601")
    age = (pd.Timestamp(now) - since).dt.total_seconds()
    stale = (table["final_status"] == "awaiting_outcome") & (age > settings.stale_after)
    bad = ~table["final_status"].isin(GOOD_STATUSES)
    picked = table[bad | stale].assign(age=age[bad | stale].map(_age), stale=stale[bad | stale])
    picked["reason"] = (picked["failure_reason"].where(picked["failure_reason"] != "",
                                                       picked["error"]))
    picked["reason"] = picked["reason"].where(picked["reason"] != "", picked["detail"])
    return picked[["source_file", "line", "emr_task_id", "final_status", "reason", "age",
                   "stale", "job_id"]]


def _age(seconds: float) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"


def _bars(counts: dict[str, int], total: int) -> list[dict[str, Any]]:
    width = 230
    bars = []
    for i, status in enumerate(FINAL_STATUSES):
        n = counts[status]
        bars.append({
            "status": status, "count": n, "y": i * 26,
            "width": 0 if not total else max(1 if n else 0, round(width * n / total)),
            "colour": STATUS_COLOURS[status],
        })
    return bars


def _histogram(table: pd.DataFrame) -> dict[str, Any]:
    seconds = _seconds_between(table["submitted_at"], table["outcome_at"]).dropna().clip(lower=0)
    if seconds.empty:
        return {"bins": [], "max": 0, "unit": "s"}
    top = float(seconds.max())
    scale, unit = (60.0, "min") if top > 600 else (1.0, "s")
    edges = np.linspace(0, max(top / scale, 1e-9), 11)
    counts, _ = np.histogram(seconds / scale, bins=edges)
    peak = int(counts.max()) or 1
    digits = 0 if edges[-1] >= 10 else 1
    bins = [{"x": i * 50, "height": round(140 * int(c) / peak), "count": int(c),
             "label": f"{edges[i]:.{digits}f}", "end": f"{edges[i + 1]:.{digits}f}"}
            for i, c in enumerate(counts)]
    return {"bins": bins, "max": peak, "unit": unit, "last": bins[-1]["end"]}


# -- redrive.csv -------------------------------------------------------------------------------


def redrive_rows(table: pd.DataFrame, codes: pd.Series, settings: ReportConfig) -> pd.DataFrame:
    """Rows worth sending again: send failures, and EMR failures whose reason is retryable.

    A reason is retryable when one of its codes (``reasons[].code``) or a
    phrase of its ``failure_reason`` is in ``report.retryable_failures``.
    """
    retryable = tuple(p.lower() for p in settings.retryable_failures)
    text = (table["failure_reason"].fillna("") + ";" + codes.fillna("")).str.lower()
    again = (table["final_status"] == "failed_in_emr") & text.map(
        lambda r: any(p in r for p in retryable))
    return table[table["final_status"].isin(REDRIVE_STATUSES) | again]


def write_redrive(
    result: RunResult, table: pd.DataFrame, settings: ReportConfig, input_settings: InputConfig,
    path: Path,
) -> bool:
    """Copy those rows out of the input files (still unchanged), as they were; False if none."""
    wanted = redrive_rows(table, result.rows["reason_codes"].reset_index(drop=True), settings)
    if wanted.empty:
        path.unlink(missing_ok=True)
        return False
    found = read_input_rows(result.files, _lines_by_file(result.files, wanted), input_settings)
    if found is None:
        return False
    headers = {tuple(f["header"]) for f in result.files if f["file_no"] in found.files}
    if len(headers) != 1:
        log.warning("redrive.csv not written: the input files have different headers")
        return False
    with private_file(path, input_settings.encoding) as fh:
        writer = csv.writer(fh, delimiter=input_settings.delimiter)
        writer.writerow(headers.pop())
        writer.writerows(found.rows.values())
    log.info("redrive.csv: %d rows worth sending again", len(found.rows))
    return True


def _lines_by_file(files: list[dict[str, Any]], rows: pd.DataFrame) -> dict[int, set[int]]:
    by_file: dict[int, set[int]] = {}
    for f in files:
        lines = set(rows.loc[rows["source_file"] == f["path"], "line"].astype(int))
        if lines:
            by_file[f["file_no"]] = lines
    return by_file


@dataclass(frozen=True, slots=True)
class InputRows:
    """Rows read back from the input files, keyed by (file_no, line), in input order."""

    rows: dict[tuple[int, int], list[str]]
    files: frozenset[int]


def read_input_rows(
    files: list[dict[str, Any]], wanted: dict[int, set[int]], settings: InputConfig
) -> InputRows | None:
    """The cells of the wanted lines, or None (with a warning) if a file is gone or changed.

    The ledger holds no note text, so reports that need it (redrive.csv, note
    previews) read it back from the input, and only while the file is the very
    one the run read (same SHA-256).
    """
    rows: dict[tuple[int, int], list[str]] = {}
    for f in files:
        lines = wanted.get(f["file_no"])
        if not lines:
            continue
        try:
            with CsvFile(Path(f["path"]), settings, file_no=f["file_no"]) as reader:
                for batch in reader.batches():
                    rows.update({(f["file_no"], line): r for line, r
                                 in zip(batch.lines, batch.rows, strict=True) if line in lines})
                changed = reader.sha256 != f["sha256"]
        except PipelineError as exc:
            log.warning("input rows not read back: %s", exc)
            return None
        if changed:
            log.warning("input rows not read back: %s changed since the run", f["path"])
            return None
    return InputRows(rows, frozenset(wanted))


def note_previews(
    result: RunResult, rows: pd.DataFrame, settings: ReportConfig, input_settings: InputConfig
) -> dict[tuple[str, int], str]:
    """The first ``preview_chars`` of each row's note, for reviewers allowed to see them."""
    found = read_input_rows(result.files, _lines_by_file(result.files, rows), input_settings)
    if found is None:
        return {}
    names = {f["file_no"]: f["path"] for f in result.files}
    notes = {f["file_no"]: _note_column(f["header"], input_settings) for f in result.files}
    previews = {}
    for (file_no, line), cells in found.rows.items():
        column = notes[file_no]
        note = cells[column].strip() if column is not None and column < len(cells) else ""
        cut = settings.preview_chars
        previews[(names[file_no], line)] = note[:cut] + ("…" if len(note) > cut else "")
    return previews


def _note_column(header: list[str], settings: InputConfig) -> int | None:
    clean = [clean_name(n) for n in header]
    return clean.index(settings.columns.note) if settings.columns.note in clean else None
