"""The files a run leaves for its reviewer: results.csv, summary.json, report.html,
rejects.csv and redrive.csv, under ``reports/<run_id>/``.

Only rejects.csv and redrive.csv hold note text (they are copies of input
rows, to be fixed and fed back), so they are created 0600; every other file
is free of note text and safe to share. results.csv and summary.json are
byte-for-byte the same for the same ledger and sink file; only what the clock
decides in summary.json moves: the ``report`` block (when it was made, what was
stale then) and what staleness decides (``needs_attention``, ``verdict``,
``exit_code_now``).

Over 400 lines: the five files share one pass over the run's rows (``Tally``), and
splitting them apart would mean passing that pass's state between modules.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jinja2
import markupsafe
import numpy as np
import pandas as pd

from pipeline import exits
from pipeline._version import __version__
from pipeline.config import (
    RESULT_COLUMNS,
    TRAILING_COLUMNS,
    InputConfig,
    ReportConfig,
    RunConfig,
)
from pipeline.errors import PipelineError, StateError, StorageFull
from pipeline.events import PRUNED_MARK
from pipeline.reconciliation import (
    FINAL_STATUSES,
    GOOD_STATUSES,
    FinalStatus,
    Reconciler,
    RunResult,
)
from pipeline.rejects import copy_encoding, private_file
from pipeline.source import CsvFile, clean_name
from pipeline.state import InputFile, InputRecords
from pipeline.state.store import existing_store

if TYPE_CHECKING:
    from pipeline.state import ReportStore

log = logging.getLogger(__name__)

ERROR_STATUSES: Final = frozenset({"rejected", "api_rejected", "ambiguous", "failed", "sending",
                                   "pending"})


@dataclass(frozen=True, slots=True)
class Written:
    """Where one run's report went, and what it says."""

    directory: Path
    files: tuple[str, ...]
    counts: dict[str, int]
    exit_code: int  # 0 nothing needs attention now (stale awaiting rows do), else 1
    needs_attention: int = 0
    stale: int = 0
    redrive_digest: str | None = None  # of the rows redrive.csv offers; None: no redrive.csv
    written_off: int = 0  # send_failed rows an operator closed unsent (status --write-off)
    stale_due: float | None = None  # Unix s when an awaiting row turns stale; None: none will


def write_report(
    result: RunResult, settings: ReportConfig, *, input_settings: InputConfig,
    now: datetime | None = None, process_exit_code: int | None = None,
) -> Written:
    """(Re)write results.csv, summary.json, report.html and redrive.csv for one run.

    One pass over the run's rows, a chunk at a time: results.csv is written as
    it goes, and everything else is built from what the pass tallied.
    ``process_exit_code``: the exit code of the run's own process, when the run
    writes its report as it ends (3 when it was aborted); a later rewrite takes
    the one the ledger recorded (summary.json's ``exit_code``).
    """
    now = now or datetime.now(UTC)
    directory = settings.dir / result.run.run_id
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateError(f"report directory {directory} cannot be created: {exc}") from None
    with _full_disk(directory / "results.csv"):
        tally = write_results(result, directory / "results.csv", settings, now)
    summary = summarise(result, tally, settings, now, process_exit_code=process_exit_code)
    with _full_disk(directory / "summary.json"):
        _atomic_write(directory / "summary.json",
                      json.dumps(summary.as_json(), indent=2, sort_keys=True) + "\n")
    # Pruned (``tasknotes prune``): its input copies went for good, and no note text
    # comes back from the input into this directory.
    pruned = (directory / PRUNED_MARK).exists()
    previews = None
    if settings.show_note_preview and not pruned:
        previews = note_previews(result, tally.attention, settings, input_settings)
    with _full_disk(directory / "report.html"):
        _atomic_write(directory / "report.html",
                      render_html(result, tally, summary, now, previews=previews,
                                  pruned=pruned))
    written = ["results.csv", "summary.json", "report.html"]
    with _full_disk(directory / "redrive.csv"):
        offered = write_redrive(result, {} if pruned else tally.redrive, input_settings,
                                directory / "redrive.csv")
    if offered:
        written.append("redrive.csv")
    if (directory / "rejects.csv").exists():
        written.append("rejects.csv")
    counts: dict[str, int] = {status: tally.counts[status] for status in FINAL_STATUSES}
    return Written(directory, tuple(written), counts, summary.exit_code_now,
                   tally.attention_total, tally.stale,
                   redrive_digest(tally.redrive_ids) if offered else None, tally.written_off,
                   tally.stale_due)


def rewrite_report(ledger: ReportStore, reconciler: Reconciler, run_id: str,
                   config: RunConfig) -> Written:
    """Reconcile ``run_id`` now and (re)write its report, then record in ``ledger`` that it
    was written (``Ledger.report_written``): what ``tasknotes reconcile`` does per run, and
    a run for earlier runs its sends changed. Raises StorageFull (a disk full) and
    StateError (a run the ledger does not hold, a report directory not creatable)."""
    result = reconciler.run(run_id)
    context = report_context(config)
    marker = ledger.report_marker(run_id, context)  # before: a change meanwhile shows later
    written = write_report(result, config.report, input_settings=config.input)
    ledger.report_written(run_id, redrive_digest=written.redrive_digest, context=context,
                          marker=marker, stale_due=written.stale_due,
                          exit_code=written.exit_code)
    return written


def report_context(config: RunConfig) -> str:
    """What a report is made from besides the ledger: the tool's version and the report and
    input settings (a digest; ``Ledger.reports_to_rewrite`` rewrites a report when it
    changes). Holds no secret: neither section has one."""
    text = repr((__version__, config.report, config.input))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _full_disk(path: Path) -> Iterator[None]:
    """ENOSPC/EDQUOT while writing ``path`` -> StorageFull naming it (exit 3, one line)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        if path.name == "redrive.csv":  # written in place: never leave a part of it
            path.unlink(missing_ok=True)
        raise StorageFull(f"disk full: the report file {path} cannot be written") from None


def redrive_digest(row_ids: Iterable[int]) -> str:
    """A fingerprint of the ledger rows a redrive.csv offers (their ids, sorted): the run
    record keeps the one its report wrote, and ``tasknotes status`` lists the file only
    while the rows open now give the same fingerprint (open_items.py)."""
    text = ",".join(str(i) for i in sorted(set(row_ids)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _atomic_write(path: Path, text: str) -> None:
    """``text`` at ``path`` whole or not at all; the temporary file (it may hold note
    previews) never outlives a failed rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_results(result: RunResult, path: Path, settings: ReportConfig,
                  now: datetime) -> Tally:
    """Write results.csv of ``result`` at ``path`` (through a temporary file renamed over
    it), one chunk of the run's rows at a time, and return what that pass counted
    (``Tally``: what ``summarise`` and ``render_html`` are given). ``now``: the time the
    report speaks for (aware UTC; rows waiting past ``settings``' limit turn stale)."""
    passthrough = list(result.run.info.passthrough)
    tally = Tally(settings, now)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        header = True
        accounts: bool | None = None  # the run's rows name their accounts (api.accounts)
        for chunk in result.chunks():
            if accounts is None:
                accounts = bool("account" in chunk and chunk["account"].notna().any())
            table = results_table(chunk, passthrough, accounts=accounts)
            shareable(table).to_csv(fh, index=False, header=header, lineterminator="\n")
            header = False
            tally.add(chunk, table)
        if header:  # a run with no rows still gets the columns
            shareable(pd.DataFrame(columns=[*RESULT_COLUMNS, *passthrough,
                                            *TRAILING_COLUMNS])).to_csv(
                fh, index=False, lineterminator="\n")
    os.replace(tmp, path)
    return tally


def known_counts(config: RunConfig, run_id: str) -> dict[str, int]:
    """Rows of ``run_id`` per final status (every status of FINAL_STATUSES), as the
    config's ledger (state.store) has them now, read only: what a run prints when its
    report could not be written (a full disk), where nothing may be written.

    Outcomes are those the ledger learned last (nothing is read from the sink file).
    Raises StateError if the ledger cannot be read.
    """
    ledger = existing_store(config)
    counts: Counter[str] = Counter()
    if ledger is None:
        return dict.fromkeys(FINAL_STATUSES, 0)
    try:
        record = ledger.run(run_id)
        record = dataclasses.replace(record, state=ledger.effective_state(record))
        result = RunResult(record, [], 0, [], {}, ledger)
        for chunk in result.chunks():
            counts.update(chunk["final_status"])
    finally:
        ledger.close()
    return {status: int(counts[status]) for status in FINAL_STATUSES}


def results_table(rows: pd.DataFrame, passthrough: list[str], *,
                  accounts: bool = False) -> pd.DataFrame:
    """results.csv rows: the README's columns, ``account`` (``accounts``: a run of
    api.accounts), then the passthrough columns, then detail and outcome_clock."""
    out = pd.DataFrame(index=rows.index)
    for column in RESULT_COLUMNS:
        out[column] = rows.get(column, "")
    if accounts:
        out["account"] = rows["account"]
    out["error"] = rows["error"].where(rows["status"].isin(ERROR_STATUSES), None)
    out["http_status"] = rows["http_status"].astype("Int64").astype("string")
    for i, name in enumerate(passthrough):
        out[name] = rows["passthrough"].map(lambda v, i=i: json.loads(v)[i] if v else "")
    # detail says what error does not: for a rejected row they were the same sentence twice.
    repeats = rows["detail"].fillna("") == out["error"].fillna("")
    out["detail"] = rows["detail"].where(~repeats, "")
    # What outcome_at is (state.schema.OUTCOME_CLOCKS): last, so no earlier column moves.
    out["outcome_clock"] = rows.get("outcome_clock")
    return out.fillna("").reset_index(drop=True)


# OWASP, "CSV Injection": a cell starting with one of these is read as a formula by
# spreadsheets (Excel, LibreOffice, Google Sheets); a leading single quote makes it text.
FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")
_FIRST: Final = np.array([*FORMULA_STARTS, " "], dtype="U1")  # a space may hide one
_PLAIN_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# What may split a row or hide a second line in a cell: C0 and C1 controls (CR, LF, tab...),
# DEL, and the Unicode line and paragraph separators.
_BREAKS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PRINTABLE_ASCII: Final = bytes(range(0x20, 0x7F))


def neutralise_formula(cell: str) -> str:
    """``cell`` as a spreadsheet will show it as text: a leading ``'`` if it could be a formula.

    A cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return (after any
    spaces) gets a single quote in front (OWASP's CSV-injection advice), except a plain
    number (``-3``, ``+1.5``, ``-2e5``), which stays a number. Other cells are returned
    as given.
    """
    bare = cell.lstrip(" ")
    if bare.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(bare):
        return "'" + cell
    return cell


def one_line(cell: str) -> str:
    """``cell`` with every control character (CR, LF, tab, other C0/C1 controls, DEL) and
    the Unicode line/paragraph separators replaced by a space: one physical line, so no
    spreadsheet or line-based reader starts a new row inside it."""
    return _BREAKS.sub(" ", cell)


def _all_one_line(cells: list[Any]) -> bool:
    """Whether no text cell holds a character ``one_line`` replaces (checked in C: a
    million-row column takes milliseconds when it is ASCII)."""
    joined = "".join(c for c in cells if isinstance(c, str))
    if joined.isascii():
        return not joined.encode("ascii").translate(None, _PRINTABLE_ASCII)
    return _BREAKS.search(joined) is None


def shareable(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` made safe to open in a spreadsheet: every text cell and column
    name passed through ``one_line``, then ``neutralise_formula``. What a CSV file we call
    safe to share is written from.

    Everything upstream or in the input can reach such a file (task ids,
    passthrough cells, Cobalt's messages, webhook fields), so no column is trusted.
    A line break kept inside a cell would let a formula start the cell's second line,
    and a bare CR is not even quoted by the csv module: so no cell keeps one.
    """
    out = table.rename(columns=lambda name: neutralise_formula(one_line(str(name))))
    for column in out.columns:
        values = out[column]
        if values.dtype.kind in "biuf":
            continue  # numbers (line) cannot start a formula
        cells = values.tolist()
        if not _all_one_line(cells):
            cells = [one_line(c) if isinstance(c, str) else c for c in cells]
            values = pd.Series(cells, index=values.index, dtype=object)
            out[column] = values
        # First characters compared in numpy (the cast to "U1" keeps one character): a
        # loop over a million-row results.csv in Python cost a fifth of writing it.
        hits = np.flatnonzero(np.isin(values.to_numpy().astype("U1"), _FIRST))
        if not len(hits):
            continue
        cells = values.iloc[hits].tolist()
        fixed = [neutralise_formula(c) if isinstance(c, str) else c for c in cells]
        if fixed != cells:
            values = values.copy()
            values.iloc[hits] = fixed
            out[column] = values
    return out


def waiting_since(rows: pd.DataFrame) -> pd.Series:
    """When each row's wait for an outcome began (UTC timestamps, NaT where none): the
    latest send of its note, i.e. the send it follows (``via_submitted_at``, a later run's
    resend of a note that failed in the EMR) if any, else its own ``submitted_at``.
    Staleness is measured from this, in every report and in ``tasknotes status``."""
    own = rows["submitted_at"]
    if "via_submitted_at" in rows:
        own = rows["via_submitted_at"].where(rows["via_submitted_at"].notna(), own)
    return pd.to_datetime(own.replace("", None), utc=True, errors="coerce",
                          format="ISO8601").reset_index(drop=True)


class Tally:
    """What one pass over a run's rows tells the summary, the page and redrive.csv
    (``write_results`` makes one; ``summarise`` and ``render_html`` read it).

    ``rows``: rows seen; ``counts``: rows by final status; ``latencies``: arrays of
    seconds from submission to the sink's receipt (``latency``, ``histogram``); the
    rest as commented below. ``add(rows, table)`` counts one chunk.
    """

    def __init__(self, settings: ReportConfig, now: datetime) -> None:
        self._settings = settings
        self._now = pd.Timestamp(now)
        self._retryable = tuple(p.lower() for p in settings.retryable_failures)
        self.rows = 0
        self.counts: Counter[str] = Counter()
        self.by_account: dict[str, Counter[str]] = {}  # api.accounts: counts per account
        self.submit: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.evidence = 0
        self.conflicts = 0
        self.stale = 0
        self.stale_due: float | None = None  # Unix s when the next waiting row turns stale
        self.oldest_waiting: float | None = None
        self.latencies: list[np.ndarray] = []
        # Rows with an outcome time, by what it is (state.schema.OUTCOME_CLOCKS): only the time
        # the sink received the event is a latency; the events' own times are counted.
        self.clocks: Counter[str] = Counter()
        self.before_submission = 0
        self.attention: list[dict[str, Any]] = []
        self.attention_total = 0
        self.written_off = 0  # send_failed rows a human closed without sending them
        self.written_off_at: str | None = None
        self.redrive: dict[int, set[int]] = {}
        self.redrive_ids: list[int] = []  # their ledger row ids (redrive_digest)

    def add(self, rows: pd.DataFrame, table: pd.DataFrame) -> None:
        self.rows += len(table)
        self.counts.update(table["final_status"])
        if "account" in table:
            for account, status in zip(table["account"], table["final_status"], strict=True):
                self.by_account.setdefault(str(account) or "(unknown)", Counter())[status] += 1
        self.submit.update(s for s in table["submit_status"] if s)
        failed = table["final_status"] == "failed_in_emr"
        self.reasons.update(r or "(no reason given)" for r in table.loc[failed, "failure_reason"])
        self.evidence += int((rows["settled_by"] == "evidence").sum())
        self.conflicts += int((table["outcome"] == "conflict").sum())
        # Only the sink's receive time (UTC, ms) measures a latency: an event's own created
        # time (polled, or an older sink file without receipts) is Cobalt's clock in whole
        # seconds, up to 1 s early against a submission time; such rows are counted apart.
        # A run measures its own sends only: a row another run sent (skipped_already_sent)
        # shows that run's times, counted in that run's report, never twice over runs.
        seconds = _seconds_between(table["submitted_at"], table["outcome_at"])
        clock = table["outcome_clock"].replace("", "event_created_no_receipt")
        own = table["final_status"] != "skipped_already_sent"
        self.clocks.update(clock[(table["outcome_at"] != "") & own])
        seconds = seconds[((clock == "sink_received") & own).to_numpy()].dropna()
        # A receive time before the submission is not a latency (a clock stepped back, a
        # receipt edited): counted apart, never clipped into the statistics as 0.
        self.before_submission += int((seconds < 0).sum())
        self.latencies.append(seconds[seconds >= 0].to_numpy(dtype=np.float32))
        # send_failed rows a human wrote off: closed, so neither attention nor redrive.
        off = rows.get("written_off_at", pd.Series(None, index=rows.index, dtype=object))
        closed = off.notna().reset_index(drop=True) & (table["final_status"] == "send_failed")
        self.written_off += int(closed.sum())
        if closed.any():  # when the operator closed them (the latest write-off)
            latest = str(off.reset_index(drop=True)[closed].max())
            self.written_off_at = max(self.written_off_at or latest, latest)
        self._waiting_and_attention(table, waiting_since(rows), closed)
        self._redrive(rows, table, failed, closed)

    def _waiting_and_attention(self, table: pd.DataFrame, since: pd.Series,
                               closed: pd.Series) -> None:
        age = (self._now - since).dt.total_seconds()
        waiting = table["final_status"] == "awaiting_outcome"
        stale = waiting & (age > self._settings.stale_after)
        self.stale += int(stale.sum())
        fresh = since[(waiting & ~stale).to_numpy()].dropna()
        if not fresh.empty:
            due = fresh.min().timestamp() + self._settings.stale_after
            self.stale_due = min(due, self.stale_due or due)
        if waiting.any():
            oldest = float(age[waiting].max())
            self.oldest_waiting = max(self.oldest_waiting or oldest, oldest)
        mask = (~table["final_status"].isin(GOOD_STATUSES) & ~closed) | stale
        self.attention_total += int(mask.sum())
        room = max(self._settings.attention_rows - len(self.attention), 0)
        picked = table[mask].head(room)
        for r, seconds, late in zip(picked.to_dict("records"), age[mask].head(room),
                                    stale[mask].head(room), strict=True):
            self.attention.append({
                "source_file": r["source_file"], "line": int(r["line"]),
                "emr_task_id": r["emr_task_id"], "final_status": r["final_status"],
                "reason": r["failure_reason"] or r["error"] or r["detail"],
                "age": _age(seconds), "stale": bool(late), "job_id": r["job_id"]})

    def _redrive(self, rows: pd.DataFrame, table: pd.DataFrame, failed: pd.Series,
                 closed: pd.Series) -> None:
        """Send failures, and EMR failures whose reason (a code or a phrase) is retryable."""
        codes = rows["reason_codes"].fillna("").reset_index(drop=True)
        text = (table["failure_reason"] + ";" + codes).str.lower()
        retryable = failed & text.map(lambda r: any(p in r for p in self._retryable))
        wanted = ((table["final_status"] == "send_failed") & ~closed) | retryable
        for file_no, line in zip(rows["file_no"].reset_index(drop=True)[wanted],
                                 table.loc[wanted, "line"], strict=True):
            self.redrive.setdefault(int(file_no), set()).add(int(line))
        self.redrive_ids.extend(int(i) for i in rows["id"].reset_index(drop=True)[wanted])

    def latency(self) -> Latency:
        """summary.json's ``latency_s`` (``Latency``) over the rows counted so far."""
        seconds = np.concatenate(self.latencies) if self.latencies else np.array([])
        clocks = dict(sorted(self.clocks.items()))
        not_measured = sum(n for c, n in self.clocks.items() if c != "sink_received")
        if not len(seconds):
            return Latency(0, None, None, None, clocks, not_measured, self.before_submission)
        return Latency(len(seconds), round(float(np.quantile(seconds, 0.5)), 1),
                       round(float(np.quantile(seconds, 0.9)), 1),
                       round(float(seconds.max()), 1), clocks, not_measured,
                       self.before_submission)

    def histogram(self) -> dict[str, Any]:
        """The latency chart: bins of an even, round width ("nice" steps of 1, 2, 2.5 or 5
        times a power of ten, at most 10 bins) and every position pre-computed, so that the
        template only places them: bars within the plot, count labels above the bars and tick
        labels below, all inside the SVG's viewBox (``CHART``)."""
        seconds = np.concatenate(self.latencies) if self.latencies else np.array([])
        if not len(seconds):
            return {"bins": [], "ticks": [], "unit": "s"}
        top = float(seconds.max())
        scale, unit = (60.0, "min") if top > 600 else (1.0, "s")
        step = nice_step(top / scale / 10)
        n = max(1, math.ceil(round(top / scale / step, 9)))
        edges = np.arange(n + 1) * step
        counts, _ = np.histogram(seconds / scale, bins=edges)
        peak = int(counts.max()) or 1
        c = CHART
        width = c["plot_width"] / n
        decimals = _decimals(step)
        bins = []
        for i, count in enumerate(counts):
            height = max(1 if count else 0, round(c["plot_height"] * int(count) / peak))
            bins.append({"x": round(c["left"] + i * width, 2), "width": round(width - 2, 2),
                         "y": c["baseline"] - height, "height": height, "count": int(count),
                         "label": f"{edges[i]:.{decimals}f}",
                         "end": f"{edges[i + 1]:.{decimals}f}",
                         "middle": round(c["left"] + (i + 0.5) * width, 2)})
        ticks = [{"x": round(c["left"] + i * width, 2), "label": f"{edge:.{decimals}f}"}
                 for i, edge in enumerate(edges)]
        return {"bins": bins, "ticks": ticks, "max": peak, "unit": unit, "step": step,
                **{k: v for k, v in c.items() if k in ("width", "height", "baseline")}}


# The latency chart's geometry (SVG user units): room above the tallest bar for its count,
# below the baseline for the tick labels, and on both sides for the first and last tick label.
CHART: Final = {"width": 540, "height": 190, "left": 30, "plot_width": 480, "plot_height": 140,
                "baseline": 162}


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= ``raw`` (0.1 when ``raw`` <= 0)."""
    if raw <= 0:
        return 0.1
    power = 10.0 ** math.floor(math.log10(raw))
    for mantissa in (1.0, 2.0, 2.5, 5.0, 10.0):
        if mantissa * power >= raw * (1 - 1e-12):
            return mantissa * power
    raise AssertionError("unreachable")


def _decimals(step: float) -> int:
    """How many decimals show every multiple of ``step`` exactly (0.25 -> 2, 5 -> 0)."""
    for decimals in range(6):
        if abs(round(step, decimals) - step) < 1e-9:
            return decimals
    return 6


# -- summary.json ----------------------------------------------------------------------------


# Final statuses that end a row for good: awaiting_outcome ends well for the exit code (the
# note was taken) but is not "ended well" until its outcome is in.
ENDED_WELL: Final[frozenset[FinalStatus]] = GOOD_STATUSES - {"awaiting_outcome"}


@dataclass(frozen=True, slots=True)
class SummaryInput:
    """One input file as summary.json names it: its path, SHA-256 (hex) and size in bytes
    (None while the file was not read to the end)."""

    path: str
    sha256: str | None
    bytes: int | None


@dataclass(frozen=True, slots=True)
class FailureReason:
    """One failure reason (reason codes, never note text) and how many rows gave it."""

    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class Latency:
    """summary.json's ``latency_s``: seconds from submission to the sink receiving the
    outcome over the ``count`` rows measured (``p50``, ``p90``, ``max``, to 0.1 s; None
    when none was), and ``outcome_clocks``: rows with an outcome time by what that time
    is (``state.schema.OUTCOME_CLOCKS``); ``not_measured`` counts those whose time is
    the event's own (polled, or no usable receipt: an older sink file, or a receipt whose
    time could not be read), and ``before_submission`` the receive times earlier than
    their submission (not measured either)."""

    count: int
    p50: float | None
    p90: float | None
    max: float | None
    outcome_clocks: dict[str, int]
    not_measured: int
    before_submission: int


@dataclass(frozen=True, slots=True)
class NotRead:
    """Where a run's scan stopped before the end of its input, while no later run has read
    the rest: ``stopped`` says so in words, ``after_line`` is the last line of ``path``
    recorded (None: before its first row), ``files`` the input files not read to the end."""

    stopped: str
    path: str
    after_line: int | None
    files: list[str]


@dataclass(frozen=True, slots=True)
class SummaryEvents:
    """The sink file's events around the run: repeated deliveries collapsed, other event
    types by count, events without an id, orphans (no row of any run), set-aside lines."""

    repeated_deliveries: int
    other_types: dict[str, int]
    without_id: int
    orphans: int
    set_aside: int


@dataclass(frozen=True, slots=True)
class ReportStamp:
    """When summary.json was made (ISO 8601 UTC) and what was stale then (seconds)."""

    generated_at: str
    stale_after_s: float
    stale: int
    oldest_waiting_s: int | None


@dataclass(frozen=True, slots=True)
class Summary:
    """summary.json, typed; ``as_json()`` gives the JSON object written (same keys).

    ``exit_code``: the run process's (see ``write_report``; None while it runs or after
    it crashed); ``exit_code_now``: 1 while any row needs attention (stale awaiting rows
    included), else 0; ``verdict``: ``ok`` (nothing awaits, nothing needs attention),
    ``waiting`` (rows await outcomes, none stale) or ``attention``. Times are ISO 8601
    UTC text; ``timings_s``, ``throughput_per_s``, ``latency_s`` in seconds and per second.
    """

    tool: str
    run_id: str
    state: str
    stop_reason: str | None
    account: str
    config_fingerprint: str
    dry_run: bool
    limit: int | None
    started_at: str
    finished_at: str | None
    timings_s: dict[str, float]
    throughput_per_s: float | None
    send: dict[str, int]
    inputs: tuple[SummaryInput, ...]
    rows: int
    blank_rows_skipped: int
    # Per input file: to_send + rejected + skipped + blank + beyond_limit == records.
    input_records: tuple[InputRecords, ...]
    final_status: dict[str, int]
    ended_well: int
    awaiting: int
    needs_attention: int
    # send_failed rows a human closed without sending (tasknotes status --write-off)
    written_off: int
    written_off_at: str | None  # the latest write-off of this run's rows (None: none)
    verdict: str
    submit_status: dict[str, int]
    problems: dict[str, int]
    failure_reasons: tuple[FailureReason, ...]
    settled_by_evidence: int
    conflicts: int
    latency_s: Latency
    events: SummaryEvents
    # The scan stopped before the end of an input no later run has read: where, and
    # the files whose rest was not read (None when every input was read).
    not_read: NotRead | None
    exit_code: int | None
    exit_code_now: int
    report: ReportStamp
    # api.accounts: rows per final status of each account ("(unknown)": unknown-account
    # rejects); None for a single-account run.
    accounts: dict[str, dict[str, int]] | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON object summary.json holds (nested records as objects)."""
        return dataclasses.asdict(self)


def summarise(
    result: RunResult, tally: Tally, settings: ReportConfig, now: datetime, *,
    process_exit_code: int | None = None,
) -> Summary:
    """summary.json's content (``Summary``); ``process_exit_code`` as ``write_report``."""
    run, info = result.run, result.run.info
    counts: dict[str, int] = {status: int(tally.counts[status]) for status in FINAL_STATUSES}
    ranked = sorted(tally.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    not_read = unread_input(result)
    still_open = {**counts, "send_failed": counts["send_failed"] - tally.written_off}
    now_code = exits.for_rows(bool(tally.attention_total
                                   or exits.for_counts(still_open, GOOD_STATUSES)
                                   or not_read))
    exited = (process_exit_code if process_exit_code is not None
              else exits.for_recorded_run(run.state, run.info.exit_code, now_code))
    awaiting = counts["awaiting_outcome"]
    verdict = "attention" if now_code else "waiting" if awaiting else "ok"
    return Summary(
        tool=f"tasknotes {__version__}",
        run_id=run.run_id,
        state=run.state,
        stop_reason=info.stop_reason,
        account=run.account,
        config_fingerprint=run.fingerprint,
        dry_run=info.dry_run,
        limit=info.limit,
        started_at=run.started_at,
        finished_at=run.finished_at,
        timings_s=info.timings_s,
        throughput_per_s=info.throughput_per_s,
        send=info.send,
        inputs=tuple(SummaryInput(f.path, f.sha256, f.size) for f in result.files),
        rows=tally.rows,
        blank_rows_skipped=info.blank_rows,
        input_records=info.input_records,
        final_status=counts,
        ended_well=int(sum(counts[s] for s in ENDED_WELL)),
        awaiting=awaiting,
        needs_attention=tally.attention_total,
        written_off=tally.written_off,
        written_off_at=tally.written_off_at,
        verdict=verdict,
        submit_status=dict(sorted(tally.submit.items())),
        problems=info.problems,
        failure_reasons=tuple(FailureReason(r, n) for r, n in ranked),
        settled_by_evidence=tally.evidence,
        conflicts=tally.conflicts,
        latency_s=tally.latency(),
        events=SummaryEvents(
            repeated_deliveries=result.tally.get("(repeated)", 0),
            other_types={k: v for k, v in result.tally.items() if not k.startswith("(")},
            without_id=result.tally.get("(no id)", 0),
            orphans=result.orphan_count,
            # lines of the sink file the event codec refuses, kept in <sink>.set-aside
            set_aside=result.tally.get("(set aside)", 0),
        ),
        not_read=not_read,
        exit_code=exited,
        exit_code_now=now_code,
        report=ReportStamp(
            generated_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            stale_after_s=settings.stale_after,
            stale=tally.stale,
            oldest_waiting_s=(int(tally.oldest_waiting)
                              if tally.oldest_waiting is not None else None),
        ),
        accounts={name: {"rows": sum(c.values()),
                         **{s: int(c[s]) for s in FINAL_STATUSES if c[s]}}
                  for name, c in sorted(tally.by_account.items())} or None,
    )


def unread_input(result: RunResult) -> NotRead | None:
    """Where the run's scan stopped (a full disk, a signal, an input error) and the input
    files whose rest it did not read, while no later run has read them to the end
    (``Ledger.not_read``); None when nothing is left unread."""
    stopped = result.run.info.scan_stopped
    if not stopped:
        return None
    left = dict(result.ledger.not_read()).get(result.run.run_id)
    if not left:
        return None
    line = stopped.after_line
    where = (f"reading stopped after line {line:,} of {stopped.path}" if line
             else f"reading stopped before the first row of {stopped.path}")
    return NotRead(where, stopped.path, line, left)




def _seconds_between(start: pd.Series, end: pd.Series) -> pd.Series:
    a = pd.to_datetime(start.replace("", None), utc=True, errors="coerce", format="ISO8601")
    b = pd.to_datetime(end.replace("", None), utc=True, errors="coerce", format="ISO8601")
    return (b - a).dt.total_seconds()


# -- report.html -------------------------------------------------------------------------------

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
STATUS_COLOURS: Final[Mapping[FinalStatus, str]] = {
    "confirmed": "#2e7d32", "awaiting_outcome": "#1565c0", "skipped_duplicate": "#78909c",
    "skipped_already_sent": "#90a4ae", "failed_in_emr": "#c62828", "rejected_invalid": "#ef6c00",
    "rejected_by_api": "#d84315", "ambiguous": "#6a1b9a", "send_failed": "#ad1457",
}  # fmt: skip


def _page_script() -> tuple[markupsafe.Markup, str]:
    """report.html's one script (templates/report.js), and its CSP source expression.

    The page's Content-Security-Policy allows this script by its SHA-256 hash
    (CSP Level 2, "hash-source"), not ``'unsafe-inline'``: text injected into
    the page can never run as a script, even if escaping were ever missed.
    """
    source, _, _ = _ENV.loader.get_source(_ENV, "report.js")  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
    return markupsafe.Markup(source), f"sha256-{digest}"  # noqa: S704 - our own file


PAGE_SCRIPT, PAGE_SCRIPT_HASH = _page_script()


def render_html(
    result: RunResult, tally: Tally, summary: Summary, now: datetime, *,
    previews: dict[tuple[str, int], str] | None = None, pruned: bool = False,
) -> str:
    """One self-contained page: no network, no external scripts, fonts or images.
    ``pruned``: ``tasknotes prune`` removed the run's input copies (retention.py), so the
    page does not send its reader to a rejects.csv that is gone."""
    total = tally.rows
    return _ENV.get_template("report.html.j2").render(
        summary=summary,
        total=total,
        confirmed=summary.final_status["confirmed"],
        bars=_bars(summary.final_status, total),
        account_statuses=[s for s in FINAL_STATUSES
                          if any(c.get(s) for c in (summary.accounts or {}).values())],
        reasons=summary.failure_reasons[:20],
        histogram=tally.histogram(),
        attention=[{**r, "preview": (previews or {}).get((r["source_file"], r["line"]), "")}
                   for r in tally.attention],
        attention_total=tally.attention_total,
        orphans=result.orphans,
        previews=previews or {},
        pruned=pruned,
        colours=STATUS_COLOURS,
        generated=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        script=PAGE_SCRIPT,
        script_hash=PAGE_SCRIPT_HASH,
    )


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


# -- redrive.csv and note previews: rows read back from the unchanged input ---------------------


def write_redrive(result: RunResult, wanted: dict[int, set[int]], input_settings: InputConfig,
                  path: Path) -> bool:
    """Copy the rows worth sending again out of the input files, as they were; False if none.

    When they cannot be copied (an input file changed, moved or has another header),
    an older redrive.csv at ``path`` is removed, saying so: it may offer rows that
    some run has delivered since, and following it would send those notes twice.
    """
    if not wanted:
        path.unlink(missing_ok=True)
        return False
    found = read_input_rows(result.files, wanted, input_settings)
    headers = ({f.header for f in result.files if f.file_no in found.files}
               if found is not None else set())
    if found is None or len(headers) != 1:
        if found is not None:
            log.warning("redrive.csv not written: the input files have different headers")
        if path.exists():
            path.unlink()
            log.warning("%s removed: it cannot be rewritten from the input, and may offer "
                        "rows delivered since; results.csv lists the rows to send again",
                        path)
        return False
    encoding, bom = found.encoding
    with private_file(path, encoding) as fh:
        if bom:
            fh.write("\ufeff")
        writer = csv.writer(fh, delimiter=input_settings.delimiter)
        writer.writerow(headers.pop())
        writer.writerows(found.rows.values())
    log.info("redrive.csv: %d rows worth sending again", len(found.rows))
    return True


@dataclass(frozen=True, slots=True)
class InputRows:
    """Rows read back from the input files, keyed by (file_no, line), in input order."""

    rows: dict[tuple[int, int], list[str]]
    files: frozenset[int]
    # What a copy of them is written in: the files' effective encoding (a byte-order mark
    # decides) and whether to start with a mark (rejects.copy_encoding).
    encoding: tuple[str, bool] = ("utf-8", False)


def read_input_rows(
    files: list[InputFile], wanted: dict[int, set[int]], settings: InputConfig
) -> InputRows | None:
    """The cells of the wanted lines, or None (with a warning) if a file is gone or changed.

    The ledger holds no note text, so reports that need it (redrive.csv, note
    previews) read it back from the input, and only while the file is the very
    one the run read (same SHA-256).
    """
    rows: dict[tuple[int, int], list[str]] = {}
    headers = []
    for f in files:
        lines = wanted.get(f.file_no)
        if not lines:
            continue
        try:
            with CsvFile(Path(f.path), settings, file_no=f.file_no) as reader:
                for batch in reader.batches():
                    rows.update({(f.file_no, line): r for line, r
                                 in zip(batch.lines, batch.rows, strict=True) if line in lines})
                changed = reader.sha256 != f.sha256
                headers.append(reader.header)
        except PipelineError as exc:
            log.warning("input rows not read back: %s", exc)
            return None
        if changed:
            log.warning("input rows not read back: %s changed since the run", f.path)
            return None
    return InputRows(rows, frozenset(wanted), copy_encoding(headers))


def note_previews(
    result: RunResult, rows: list[dict[str, Any]], settings: ReportConfig,
    input_settings: InputConfig,
) -> dict[tuple[str, int], str]:
    """The first ``preview_chars`` of each row's note, for reviewers allowed to see them."""
    numbers = {f.path: f.file_no for f in result.files}
    wanted: dict[int, set[int]] = {}
    for row in rows:
        wanted.setdefault(numbers[row["source_file"]], set()).add(row["line"])
    found = read_input_rows(result.files, wanted, input_settings)
    if found is None:
        return {}
    names = {f.file_no: f.path for f in result.files}
    notes = {f.file_no: _note_column(f.header, input_settings) for f in result.files}
    previews = {}
    for (file_no, line), cells in found.rows.items():
        column = notes[file_no]
        note = cells[column].strip() if column is not None and column < len(cells) else ""
        cut = settings.preview_chars
        previews[(names[file_no], line)] = (note[:cut].rstrip() + "…" if len(note) > cut
                                             else note)
    return previews


def _note_column(header: Sequence[str], settings: InputConfig) -> int | None:
    clean = [clean_name(n) for n in header]
    return clean.index(settings.columns.note) if settings.columns.note in clean else None
