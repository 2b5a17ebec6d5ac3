"""Ledger rows joined with sink events -> one final status per row.

Join rules (each a step below, in this order):

1. Events are read once and collapse by event id; only ``task_note.*``
   events take part, other types are counted and left alone.
2. A row is matched to events by ``job_id`` compared as text (an integer in
   Cobalt's response, a string in its webhooks), and, for a row with no
   ``job_id`` match, by ``task_note_id``. Matching runs over the rows of
   every run, so an event that belongs to another run is not an orphan.
3. A row with ``created`` events only is ``created``; ``failed`` only is
   ``failed``; both is a ``conflict`` (shown with both event ids).
4. Evidence: an ``ambiguous`` row (no answer came back) is settled when a
   ``task_note.created`` event that no row claims carries the same note for
   the same task (their ledger keys are equal). Rows and events sharing a key
   pair up in time order, so one event settles at most one row.
5. A ``held`` row follows the earlier attempt it waits on: if that one was
   confirmed, this one is ``skipped_already_sent``.
6. ``task_note.*`` events that match no row of any run are orphans.

The same ledger and sink file always give the same result (no clock is read
here; staleness is the report's business).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from pipeline.events import read_sink
from pipeline.ledger import Ledger, Outcome, row_key

log = logging.getLogger(__name__)

FINAL_STATUSES: Final = (
    "confirmed", "failed_in_emr", "awaiting_outcome", "rejected_invalid", "rejected_by_api",
    "ambiguous", "send_failed", "skipped_duplicate", "skipped_already_sent",
)  # fmt: skip
# Final statuses that end a row well (exit 0): delivered, on its way, or rightly not sent.
GOOD_STATUSES: Final = frozenset({
    "confirmed", "awaiting_outcome", "skipped_duplicate", "skipped_already_sent",
})
SUBMIT_STATUSES: Final = frozenset({
    "pending", "sending", "accepted", "api_rejected", "ambiguous", "failed",
})
_EVENT_COLUMNS: Final = (
    "event_id", "kind", "job_id", "task_note_id", "created", "emr_note_id", "failure_reason",
    "reason_codes", "ekey", "line",
)  # fmt: skip


@dataclass(slots=True)
class SinkEvents:
    """The sink file's ``task_note.*`` events as a frame, and a tally of the rest."""

    frame: pd.DataFrame
    other_types: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    lines: int = 0


def load_events(path: Path, account: str, *, evidence: bool) -> SinkEvents:
    """Read the sink once. ``evidence`` computes each created event's ledger key."""
    seen: set[str] = set()
    columns: dict[str, list[Any]] = {c: [] for c in _EVENT_COLUMNS}
    other: Counter[str] = Counter()
    duplicates = lines = 0
    for number, event in read_sink(path):
        lines += 1
        event_id = event.get("id")
        if not isinstance(event_id, str) or event_id in seen:
            duplicates += isinstance(event_id, str)
            continue
        seen.add(event_id)
        kind = _kind(event.get("type"))
        if kind is None:
            other[str(event.get("type"))] += 1
            continue
        _append_event(columns, event, event_id, kind, line=number,
                      account=account if evidence else None)
    frame = pd.DataFrame(columns, columns=list(_EVENT_COLUMNS), dtype=object)
    return SinkEvents(frame, other, duplicates, lines)


def _kind(event_type: object) -> str | None:
    if event_type == "task_note.created":
        return "created"
    if event_type == "task_note.failed":
        return "failed"
    return None


def _append_event(
    columns: dict[str, list[Any]], event: dict[str, Any], event_id: str, kind: str, *,
    line: int, account: str | None,
) -> None:
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    job_id = event.get("job_id")
    found = data.get("reasons")
    reasons: list[Any] = found if isinstance(found, list) else []
    ekey = None
    if account is not None and kind == "created":
        task_id, note = data.get("emr_task_id"), data.get("note")
        if isinstance(task_id, str) and isinstance(note, str):
            ekey = row_key(account, task_id, note)
    columns["event_id"].append(event_id)
    columns["kind"].append(kind)
    columns["job_id"].append(None if job_id is None else str(job_id).strip())
    columns["task_note_id"].append(_text(data.get("task_note_id")))
    columns["created"].append(_text(event.get("created")))
    columns["emr_note_id"].append(_text(data.get("emr_note_id")))
    columns["failure_reason"].append(_text(data.get("failure_reason")))
    columns["reason_codes"].append(";".join(str(r.get("code")) for r in reasons
                                            if isinstance(r, dict) and r.get("code")) or None)
    columns["ekey"].append(ekey)
    columns["line"].append(line)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(slots=True)
class Matched:
    """Outcomes for every ledger row that has one, and the events no row claims."""

    outcomes: pd.DataFrame  # index: row id
    orphans: pd.DataFrame
    events: SinkEvents


def match(rows: pd.DataFrame, events: SinkEvents) -> Matched:
    """Apply join rules 2-4 and 6 to every ledger row (``Ledger.key_frame()``)."""
    tn = events.frame
    by_job = _merge(rows, tn, "job_id", "job_id")
    rest = rows[~rows["id"].isin(by_job["id"])]
    by_note = _merge(rest, tn, "task_note_id", "task_note_id")
    matches = pd.concat([by_job, by_note], ignore_index=True)
    outcomes = _outcomes(matches)
    claimed = set(matches["event_id"])
    evidence = _evidence(rows, tn, claimed, set(outcomes.index))
    outcomes = pd.concat([outcomes, evidence])
    used = claimed | set(evidence["event_id"])
    orphans = tn[~tn["event_id"].isin(used)]
    return Matched(outcomes, orphans, events)


def _merge(rows: pd.DataFrame, tn: pd.DataFrame, on: str, settled_by: str) -> pd.DataFrame:
    left = rows.loc[rows[on].notna(), ["id", on]].astype({on: object})
    right = tn.loc[tn[on].notna()].drop(columns=[c for c in ("job_id", "task_note_id")
                                                   if c != on])
    found = left.merge(right, on=on, how="inner")
    found["settled_by"] = settled_by
    return found.drop(columns=[on])


def _outcomes(matches: pd.DataFrame) -> pd.DataFrame:
    """One outcome per row id: created, failed, or conflict (both)."""
    if matches.empty:
        return _empty_outcomes()
    ordered = matches.sort_values(["id", "created", "event_id"], kind="stable")
    first = ordered.groupby(["id", "kind"], sort=False).first().reset_index()
    created = first[first["kind"] == "created"].set_index("id")
    failed = first[first["kind"] == "failed"].set_index("id")
    both = created.index.intersection(failed.index)
    out = pd.concat([created.drop(both), failed.drop(both)])
    out["outcome"] = out["kind"]
    conflict = created.loc[both].copy()
    conflict["outcome"] = "conflict"
    conflict["event_id"] = conflict["event_id"] + ";" + failed.loc[both, "event_id"]
    conflict["failure_reason"] = failed.loc[both, "failure_reason"]
    conflict["reason_codes"] = failed.loc[both, "reason_codes"]
    out = pd.concat([out, conflict])
    return out[["outcome", "event_id", "emr_note_id", "failure_reason", "reason_codes",
                "created", "settled_by"]]


def _evidence(
    rows: pd.DataFrame, tn: pd.DataFrame, claimed: set[str], resolved: set[int]
) -> pd.DataFrame:
    """Rule 4: ambiguous rows settled by an unclaimed created event with the same key."""
    doubtful = rows[(rows["status"] == "ambiguous") & ~rows["id"].isin(resolved)
                    & rows["key"].notna()]
    spare = tn[(tn["kind"] == "created") & tn["ekey"].notna() & ~tn["event_id"].isin(claimed)]
    if doubtful.empty or spare.empty:
        return _empty_outcomes()
    doubtful = doubtful.sort_values("id").assign(rank=lambda f: f.groupby("key").cumcount())
    spare = spare.sort_values(["created", "event_id"]).assign(
        rank=lambda f: f.groupby("ekey").cumcount())
    paired = doubtful[["id", "key", "rank"]].merge(
        spare, left_on=["key", "rank"], right_on=["ekey", "rank"], how="inner")
    paired["outcome"] = "created"
    paired["settled_by"] = "evidence"
    return paired.set_index("id")[["outcome", "event_id", "emr_note_id", "failure_reason",
                                   "reason_codes", "created", "settled_by"]]


def _empty_outcomes() -> pd.DataFrame:
    return pd.DataFrame(
        columns=["outcome", "event_id", "emr_note_id", "failure_reason", "reason_codes",
                 "created", "settled_by"],
        index=pd.Index([], dtype="int64", name="id"),
    )


@dataclass(slots=True)
class RunResult:
    """One run, reconciled: a frame of every row with its final status."""

    run: dict[str, Any]
    files: list[dict[str, Any]]
    rows: pd.DataFrame
    orphans: pd.DataFrame
    events: SinkEvents

    @property
    def counts(self) -> dict[str, int]:
        found = self.rows["final_status"].value_counts()
        return {status: int(found.get(status, 0)) for status in FINAL_STATUSES}

    @property
    def exit_code(self) -> int:
        """0 when every row ended well, else 1 (DESIGN.md)."""
        return 0 if self.rows["final_status"].isin(GOOD_STATUSES).all() else 1


class Reconciler:
    """Reconciles runs of one ledger against one sink file, reading each once."""

    def __init__(self, ledger: Ledger, sink: Path) -> None:
        self._ledger = ledger
        self._sink = sink
        self._matched: Matched | None = None
        self._all: pd.DataFrame | None = None

    def _prepare(self, account: str) -> tuple[pd.DataFrame, Matched]:
        if self._matched is None or self._all is None:
            self._all = self._ledger.key_frame()
            evidence = bool((self._all["status"] == "ambiguous").any())
            events = load_events(self._sink, account, evidence=evidence)
            self._matched = match(self._all, events)
            self._save_outcomes(self._matched.outcomes)
        return self._all, self._matched

    def _save_outcomes(self, outcomes: pd.DataFrame) -> None:
        """Remember outcomes in the ledger: the next run must know what already landed."""
        self._ledger.record_outcomes(
            Outcome(int(str(r.Index)), str(r.outcome), _opt(r.event_id), _opt(r.emr_note_id),
                    _opt(r.failure_reason), _opt(r.created), str(r.settled_by))
            for r in outcomes.itertuples()
        )

    def refresh(self, account: str) -> None:
        """Learn every outcome the sink file holds (a run does so before choosing what to send)."""
        self._prepare(account)

    def run(self, run_id: str) -> RunResult:
        """Every row of ``run_id`` with its final status, outcome and evidence."""
        record = self._ledger.run(run_id)
        all_rows, matched = self._prepare(record["account"])
        rows = self._ledger.frame(run_id)
        files = self._ledger.files(run_id)
        return RunResult(record, files, _finalise(rows, all_rows, matched, files, record),
                         matched.orphans, matched.events)


def _opt(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _finalise(
    rows: pd.DataFrame, all_rows: pd.DataFrame, matched: Matched, files: list[dict[str, Any]],
    record: dict[str, Any],
) -> pd.DataFrame:
    out = rows.drop(columns=["outcome", "event_id", "emr_note_id", "failure_reason",
                             "outcome_at", "settled_by"])
    outcomes = matched.outcomes.rename(columns={"created": "outcome_at"})
    out = out.join(outcomes, on="id")
    out["source_file"] = out["file_no"].map({f["file_no"]: f["path"] for f in files})
    refs = _references(out, all_rows, matched)
    out = out.join(refs, on="ref_id")
    final, detail = _final_status(out, record)
    out["final_status"] = final
    out["detail"] = detail
    out["submit_status"] = out["status"].where(out["status"].isin(SUBMIT_STATUSES), "")
    out.loc[out["status"] == "accepted", "outcome"] = out["outcome"].fillna("pending")
    already = out["status"] == "already_sent"
    out.loc[already, "job_id"] = out.loc[already, "ref_job_id"]
    return out


def _references(out: pd.DataFrame, all_rows: pd.DataFrame, matched: Matched) -> pd.DataFrame:
    """For rows pointing at an earlier row (already sent, held): that row's run, job, outcome."""
    ref_ids = out["ref_id"].dropna().astype("int64").unique()
    base = all_rows[all_rows["id"].isin(ref_ids)].set_index("id")
    refs = pd.DataFrame(index=base.index)
    refs["ref_run_id"] = base["run_id"]
    refs["ref_job_id"] = base["job_id"]
    refs["ref_outcome"] = matched.outcomes["outcome"].reindex(base.index).fillna(base["outcome"])
    refs.index = refs.index.astype("float64")  # ref_id holds NaN, so it is float
    return refs


def _final_status(out: pd.DataFrame, record: dict[str, Any]) -> tuple[pd.Series, pd.Series]:
    status, outcome = out["status"], out["outcome"]
    stopped = record["info"].get("stop_reason") or f"the run {record['state']}"
    rules: list[tuple[pd.Series, str, pd.Series | str]] = [
        (status == "rejected", "rejected_invalid", out["error"].fillna("")),
        (status == "duplicate", "skipped_duplicate", out["error"].fillna("")),
        (status == "already_sent", "skipped_already_sent", out["error"].fillna("")),
        ((status == "held") & (out["ref_outcome"] == "created"), "skipped_already_sent",
         "an earlier attempt (run " + out["ref_run_id"].fillna("?") + ") was confirmed"),
        (status == "held", "ambiguous", out["error"].fillna("")),
        ((status == "accepted") & (outcome == "created"), "confirmed", ""),
        ((status == "accepted") & (outcome == "failed"), "failed_in_emr", ""),
        ((status == "accepted") & (outcome == "conflict"), "ambiguous",
         "conflict: both task_note.created and task_note.failed for this job"),
        (status == "accepted", "awaiting_outcome", "no outcome event yet"),
        (status == "api_rejected", "rejected_by_api", ""),
        ((status == "ambiguous") & (outcome == "created"), "confirmed",
         "settled by evidence: a task_note.created event carries this note"),
        (status.isin(["ambiguous", "sending"]), "ambiguous",
         "the request may have reached Cobalt; check the chart before sending again"),
        (status == "failed", "send_failed", ""),
        (status == "pending", "send_failed", f"not sent: {stopped}; the next run sends it"),
    ]
    final = pd.Series("", index=out.index, dtype=object)
    detail = pd.Series("", index=out.index, dtype=object)
    for mask, name, text in rules:
        todo = mask & (final == "")
        final[todo] = name
        detail[todo] = text[todo] if isinstance(text, pd.Series) else text
    return final, detail


def reconcile_runs(ledger: Ledger, sink: Path, run_ids: Iterable[str]) -> list[RunResult]:
    """Reconcile several runs against one reading of the sink file."""
    reconciler = Reconciler(ledger, sink)
    return [reconciler.run(r) for r in run_ids]
