"""``tasknotes status``: what is still open over every run in the ledger, and what settles it.

Open items, by kind. Each note (ledger key) is counted once, under the first
of these kinds that holds it (this precedence), so the counts add up to the
notes open; a run is listed under a kind only for the notes counted there:

    in_progress       rows of a run in progress not sent yet (never ``send_failed``):
                      that run settles them.
    awaiting_outcome  Cobalt took the note, no outcome event yet; ``stale`` of them
                      wait longer than ``report.stale_after``, measured from the
                      note's latest send (the send every report follows too).
                      Settled by webhooks, or by ``tasknotes poll``.
    ambiguous         a request may have reached Cobalt and nothing settles it
                      (held rows wait on these), or a ``conflict`` (events that
                      contradict each other, or name another account's connection).
                      Settled by review in the chart, or by a ``task_note.created``
                      event ``poll`` brings back.
    send_failed       not sent (retries ran out, or the run stopped), not sent by
                      any run since, and not written off. Settled only by a run
                      whose input holds the row again (its run's redrive.csv, or
                      its source file: ``rows`` names run, file and line); a row
                      no input holds any more is closed without sending it by
                      ``tasknotes status CONFIG --write-off RUN_ID`` (``write_off``).
    failed_retryable  failed in the EMR with a reason in ``report.retryable_failures``
                      and not delivered by any run since. Settled by running the
                      run's redrive.csv.
    not_read          input files a run stopped reading before their end (a full
                      disk, a signal, an input error) and no later run has read to
                      the end; counted per file, as the rows past the stop were never
                      counted. Settled by running again.

In a sandbox the emulator ends with its run, so nothing settles awaiting or
ambiguous rows there and their ``settle`` text says so instead of naming poll.

A note any run delivered (confirmed, or taken and awaiting its outcome) is in
no kind but ``awaiting_outcome``. ``redrive_files`` lists a run's redrive.csv
only while it offers exactly the rows of that run open now (the fingerprint its
report recorded); a stale one is left out until ``tasknotes reconcile`` rewrites
it. Reading the status mirrors what the sink file gained into the ledger first,
as ``reconcile`` does; no report is written and no note text is read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pipeline import exits
from pipeline.config import RunConfig
from pipeline.errors import StateError
from pipeline.state import OpenGroup, OpenItems, OpenRow, ReportStore
from pipeline.state.store import has_store, open_store, state_location

SCHEMA: Final = 1
ROWS_SHOWN: Final = 20  # send_failed rows named (run, file, line) by status
KINDS: Final = ("awaiting_outcome", "ambiguous", "send_failed", "failed_retryable",
                "in_progress", "not_read")
# Which kind counts a note open in several ways (module docstring).
PRECEDENCE: Final = ("in_progress", "awaiting_outcome", "ambiguous", "send_failed",
                     "failed_retryable")


@dataclass(frozen=True, slots=True)
class UnsentRow:
    """One row behind ``send_failed``: its run, the path of its input file as the run
    recorded it (None if the run never recorded its file) and its line there."""

    run_id: str
    source_file: str | None
    line: int

    def to_dict(self) -> dict[str, str | int | None]:
        """The ``--json`` shape: ``{"run_id", "source_file", "line"}``."""
        return {"run_id": self.run_id, "source_file": self.source_file, "line": self.line}


@dataclass(frozen=True, slots=True)
class OpenKind:
    """One kind of open item over every run.

    ``count``: notes (input files, for ``not_read``); ``stale``: how many of them
    wait longer than ``report.stale_after`` (``awaiting_outcome`` only, else 0);
    ``oldest_age_s``: seconds since the oldest was submitted (or its run ended),
    None when there is none; ``run_ids``: the runs whose reports list them;
    ``redrive_files``: existing ``reports/<run_id>/redrive.csv`` files of those
    runs; ``settle``: the command (or action) that settles this kind; ``rows``
    (``send_failed`` only, else empty): the first ``ROWS_SHOWN`` rows behind it
    (``UnsentRow``; ``rows_total`` counts them all: rows, where ``count`` counts notes).
    """

    kind: str
    count: int
    stale: int
    oldest_age_s: int | None
    run_ids: tuple[str, ...]
    redrive_files: tuple[str, ...]
    settle: str
    rows: tuple[UnsentRow, ...] = ()
    rows_total: int = 0
    by_account: dict[str, int] | None = None  # api.accounts: ``count`` per account

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "count": self.count, "stale": self.stale, "oldest_age_s": self.oldest_age_s,
            "run_ids": list(self.run_ids), "redrive_files": list(self.redrive_files),
            "settle": self.settle, "rows": [r.to_dict() for r in self.rows],
            "rows_total": self.rows_total}
        if self.by_account is not None:
            found["by_account"] = dict(self.by_account)
        return found


@dataclass(frozen=True, slots=True)
class LedgerStatus:
    """What is open over every run of one ledger, as of ``generated_at`` (ISO 8601 UTC).

    ``kinds`` holds every kind of ``KINDS``, in that order, even when empty.
    """

    generated_at: str
    ledger: str
    stale_after_s: float
    kinds: tuple[OpenKind, ...]

    @property
    def open(self) -> bool:
        """True when anything at all is open (a run in progress included)."""
        return any(k.count for k in self.kinds)

    @property
    def exit_code(self) -> int:
        """``tasknotes status``'s exit code: 0 nothing open, 1 something open."""
        return exits.for_rows(self.open)

    def kind(self, name: str) -> OpenKind:
        """The entry for one kind of ``KINDS``; KeyError for another name."""
        for k in self.kinds:
            if k.kind == name:
                return k
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` shape (README, "tasknotes status"): stable; fields only added."""
        return {
            "schema": SCHEMA,
            "generated_at": self.generated_at,
            "ledger": self.ledger,
            "stale_after_s": self.stale_after_s,
            "open": self.open,
            "exit_code": self.exit_code,
            "open_total": sum(k.count for k in self.kinds),
            "kinds": {k.kind: k.to_dict() for k in self.kinds},
        }


def ledger_status(config: RunConfig, *, config_path: str = "CONFIG",
                  now: datetime | None = None) -> LedgerStatus:
    """Open items over every run in ``config``'s ledger (see the module docstring).

    ``config_path`` is only written into the ``settle`` commands. A missing ledger
    means nothing was run: nothing is open. Raises StateError if the ledger
    cannot be read.
    """
    now = now or datetime.now(UTC)
    if not has_store(config):
        empty = OpenGroup(0, 0, None, ())
        groups = dict.fromkeys(KINDS, empty)
        return _assemble(config, config_path, now, groups, {})
    from pipeline.reconciliation import Reconciler  # noqa: PLC0415 - pandas, for status only

    ledger = open_store(config)
    try:
        latest = ledger.latest_run()
        if latest is not None:  # learn what the sink file gained: outcomes settle rows
            Reconciler.of(ledger, config).refresh(ledger.run(latest).account)
        running = ledger.runs_in_progress()
        stale_before = _iso(now - timedelta(seconds=config.report.stale_after))
        rows = ledger.open_rows(running)
        rows["failed_retryable"] = _retryable(ledger, config.report.retryable_failures)
        groups = _by_precedence(rows, stale_before)
        per_account = (_per_account(rows, ledger.key_accounts()) if config.api.multi
                       else None)
        groups["not_read"] = _not_read(ledger)
        redrive = _current_redrive(ledger, config, groups)
        # the rows listed are those of the notes counted under send_failed: one truth
        before = PRECEDENCE[:PRECEDENCE.index("send_failed")]
        counted_before = {key for kind in before for _, key, _ in rows[kind]}
        unsent = ledger.send_failed_rows(running, ROWS_SHOWN, skip=counted_before)
        holder = ledger.lock_holder() if running else None
        foreign = {kind: _foreign_runs(config, ledger, groups[kind].run_ids)
                   for kind in ("awaiting_outcome", "ambiguous", "send_failed",
                                "failed_retryable")}
    finally:
        ledger.close()
    return _assemble(config, config_path, now, groups,
                     {} if holder is None else {"pid": str(holder)}, redrive=redrive,
                     unsent=unsent, per_account=per_account, foreign=foreign)


def _foreign_runs(config: RunConfig, ledger: ReportStore, run_ids: Sequence[str]
                  ) -> tuple[str, ...]:
    """The runs of ``run_ids`` sent under none of ``config``'s accounts (nor their former
    names): another config's, sharing the state (``state.other_accounts``). This config's
    poll asks Cobalt with its own tokens, which see only their own connections' events,
    so it cannot settle their rows. None when the config's label is a token's fingerprint
    and the token is not set (status needs none): this config's runs could not be told."""
    api = config.api
    if not (api.multi or api.account or (api.access_token and api.access_token.get_secret_value())):
        return ()
    names = set(api.known_names())
    found = []
    for run_id in run_ids:
        label = ledger.run(run_id).account
        if names.isdisjoint({label, *label.split(",")}):
            found.append(run_id)
    return tuple(found)


def write_off(config: RunConfig, run_id: str, *, now: datetime | None = None) -> int:
    """Close the ``send_failed`` rows of ``run_id`` without sending them; returns how many.

    For a row no input holds any more (its redrive.csv removed, a later export without
    it), which no run can settle. Recorded in the ledger with the time (ISO 8601 UTC):
    the row's final status stays ``send_failed`` and its detail says it was written
    off by the operator at that time; it is never shown as sent. Outcomes in the sink
    file are learned first, so a note some run delivered is not touched. Done under the
    run lock (as a run): while a run is sending, it may be sending these very notes, so
    the write-off is refused naming it. Raises StateError for an unknown run, a run in
    progress or holding the lock, or no ledger.
    """
    from pipeline.reconciliation import Reconciler  # noqa: PLC0415 - pandas, for write-off only

    if not has_store(config):
        raise StateError(f"no ledger at {config.state.ledger}: nothing has been run yet")
    ledger = open_store(config)
    try:
        record = ledger.run(run_id)
        if config.another_configs(record.account):
            raise StateError(f"run {run_id} was sent under account {record.account}, another "
                             "config's (state.other_accounts): write it off with that config")
        # before the lock: held by this store, it would make every run of its accounts
        # look alive (a crashed one too)
        if run_id in ledger.runs_in_progress():
            raise StateError(f"run {run_id} is in progress: its unsent rows are not failures "
                             "yet; write off after it ends")
        try:
            ledger.lock(holder="tasknotes status --write-off")
        except StateError as exc:
            raise StateError(f"{exc}: it may be sending run {run_id}'s notes; write off "
                             "after it ends") from None
        Reconciler.of(ledger, config).refresh(record.account)
        return ledger.write_off(run_id, _iso(now or datetime.now(UTC)))
    finally:
        ledger.close()


def _by_precedence(rows: dict[str, list[OpenRow]], stale_before: str) -> dict[str, OpenGroup]:
    """Each note under the first kind of PRECEDENCE that holds it; ``stale``: awaiting
    notes whose latest send is older than ``stale_before``."""
    taken: set[bytes] = set()
    out: dict[str, OpenGroup] = {}
    for kind in PRECEDENCE:
        latest: dict[bytes, str | None] = {}
        runs: set[str] = set()
        oldest: str | None = None
        for run_id, key, since in rows[kind]:
            if key in taken:
                continue
            runs.add(run_id)
            if key not in latest or (since or "") > (latest[key] or ""):
                latest[key] = since
            if since is not None and (oldest is None or since < oldest):
                oldest = since
        stale = 0
        if kind == "awaiting_outcome":
            stale = sum(1 for since in latest.values() if since is not None
                        and since < stale_before)
            oldest = min((v for v in latest.values() if v is not None), default=None)
        taken.update(latest)
        out[kind] = OpenGroup(len(latest), stale, oldest, tuple(sorted(runs)))
    return out


def _per_account(rows: dict[str, list[OpenRow]], accounts: dict[bytes, str]
                 ) -> dict[str, dict[str, int]]:
    """kind -> account -> notes, each note under the first kind that holds it (as
    ``_by_precedence`` counts them); a note of a single-account run is not counted."""
    taken: set[bytes] = set()
    out: dict[str, dict[str, int]] = {}
    for kind in PRECEDENCE:
        keys = {key for _, key, _ in rows[kind] if key not in taken}
        taken |= keys
        counts = Counter(accounts[k] for k in keys if k in accounts)
        out[kind] = dict(sorted(counts.items()))
    return out


def _not_read(ledger: ReportStore) -> OpenGroup:
    found = ledger.not_read()
    starts = [ledger.run(run_id).started_at for run_id, _ in found]
    return OpenGroup(sum(len(paths) for _, paths in found), 0, min(starts, default=None),
                     tuple(run_id for run_id, _ in found))


def _retryable(ledger: OpenItems, patterns: tuple[str, ...]) -> list[OpenRow]:
    """EMR failures worth sending again: a reason code or phrase in ``patterns`` (as the
    report's redrive.csv chooses them)."""
    wanted = tuple(p.lower() for p in patterns)
    return [(run_id, key, at) for run_id, key, reason, codes, at in ledger.emr_failures()
            if _is_retryable(reason, codes, wanted)]


def _is_retryable(reason: str | None, codes: str | None, wanted: tuple[str, ...]) -> bool:
    text = f"{reason or ''};{codes or ''}".lower()
    return any(p in text for p in wanted)


def _current_redrive(ledger: ReportStore, config: RunConfig,
                     groups: dict[str, OpenGroup]) -> dict[str, str]:
    """run_id -> its redrive.csv, for the runs under send_failed or failed_retryable whose
    file offers exactly the rows open now (the fingerprint its report recorded)."""
    from pipeline.report import redrive_digest  # noqa: PLC0415 - pandas, for status only

    wanted = tuple(p.lower() for p in config.report.retryable_failures)
    out: dict[str, str] = {}
    for run_id in {*groups["send_failed"].run_ids, *groups["failed_retryable"].run_ids}:
        path = config.report.dir / run_id / "redrive.csv"
        recorded = ledger.run(run_id).info.redrive_digest
        if recorded is None or not path.exists():
            continue
        ids = [row_id for row_id, status, reason, codes in ledger.redrive_row_ids(run_id)
               if status != "accepted" or _is_retryable(reason, codes, wanted)]
        if redrive_digest(ids) == recorded:
            out[run_id] = str(path)
    return out


def _assemble(config: RunConfig, config_path: str, now: datetime,
              groups: dict[str, OpenGroup], extra: dict[str, str], *,
              redrive: dict[str, str] | None = None,
              unsent: tuple[int, list[tuple[str, str | None, int]]] = (0, []),
              per_account: dict[str, dict[str, int]] | None = None,
              foreign: dict[str, tuple[str, ...]] | None = None) -> LedgerStatus:
    pid = f" (pid {extra['pid']})" if "pid" in extra else ""
    settle = {
        "awaiting_outcome": f"tasknotes poll {config_path}",
        "ambiguous": ("review: check each listed task in the EMR (report.html, 'Rows that "
                      f"need attention'); tasknotes poll {config_path} settles those an "
                      "event shows landed"),
        "send_failed": (f"tasknotes run {config_path} --input FILE, with an input that holds "
                        "these rows (the source file each row above names, or the run's "
                        "redrive.csv where one is listed; rows already sent are skipped). "
                        "A row no input holds any more: "
                        f"tasknotes status {config_path} --write-off RUN_ID closes the run's "
                        "unsent rows without sending them (recorded; its report says so)"),
        "failed_retryable": f"tasknotes run {config_path} --input <redrive.csv>",
        "in_progress": f"wait for the run to end{pid}",
        "not_read": f"tasknotes run {config_path} (reads the input again; rows already "
                    "sent are skipped)",
    }
    if config.sandbox.enabled:  # poll has nothing to ask: the emulator ended with its run
        settle["awaiting_outcome"] = (
            "nothing will: in the sandbox the emulator that would deliver these outcomes "
            "ended with its run (sandbox test data; a new sandbox run waits "
            "sandbox.wait_s for its outcomes)")
        settle["ambiguous"] = ("nothing will: sandbox test data, its emulator ended with "
                               "its run (no EMR to review, nothing to poll)")
    kinds = []
    for name in KINDS:
        group = groups[name]
        offered: tuple[str, ...] = ()
        if name in ("send_failed", "failed_retryable"):
            files = redrive or {}
            offered = tuple(files[r] for r in group.run_ids if r in files)
        rows: tuple[UnsentRow, ...] = ()
        if name == "send_failed":
            rows = tuple(UnsentRow(r, f, n) for r, f, n in unsent[1])
        how = settle[name]
        if name == "failed_retryable" and group.count and len(offered) < len(group.run_ids):
            how = (f"tasknotes run {config_path} --input FILE, with the run's redrive.csv "
                   "where one is listed; a run with none listed (pruned, removed, or not "
                   "yet rewritten by tasknotes reconcile): its source files (rows "
                   "already sent are skipped)")
        others = (foreign or {}).get(name, ())
        if others and not config.sandbox.enabled:
            listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more"
                                              if len(others) > 3 else "")
            action = ("the poll of the config that sent them settles those"
                      if name in ("awaiting_outcome", "ambiguous") else
                      "send those with the config that sent them (its token), never with "
                      "this one, which would put them in another clinic's chart")
            if set(others) >= set(group.run_ids):  # none of them is this config's to settle
                how = (f"not this config's: run(s) {listed} were sent under accounts it "
                       f"does not name; {action}")
            else:
                how += (f"; not the rows of run(s) {listed}, sent under accounts this "
                        f"config does not name: {action}")
        kinds.append(OpenKind(name, group.count, group.stale, _age_s(group.oldest, now),
                              group.run_ids, offered, how, rows,
                              unsent[0] if name == "send_failed" else 0,
                              None if per_account is None else per_account.get(name, {})))
    return LedgerStatus(_iso(now), state_location(config), config.report.stale_after,
                        tuple(kinds))


def _iso(moment: datetime) -> str:
    """The ledger's time format (ledger.utcnow): ISO 8601 UTC with milliseconds."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _age_s(oldest: str | None, now: datetime) -> int | None:
    if oldest is None:
        return None
    try:
        then = datetime.fromisoformat(oldest.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(int((now - then).total_seconds()), 0)


def describe_age(seconds: int) -> str:
    """A short human age: "42 s", "7 min", "3 h 5 min", "4 days"."""
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"
