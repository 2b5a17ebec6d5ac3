"""``tasknotes status``: what is still open over every run in the ledger, and what settles it.

Open items, by kind (each counted once per note, i.e. per ledger key, unless said):

    awaiting_outcome  Cobalt took the note, no outcome event yet (counted per job);
                      ``stale`` of them older than ``report.stale_after``. Settled
                      by webhooks, or by ``tasknotes poll``.
    ambiguous         a request may have reached Cobalt and nothing settles it
                      (held rows wait on these). Settled by review in the chart, or
                      by a ``task_note.created`` event ``poll`` brings back.
    send_failed       not sent (retries ran out, or the run stopped) and not sent
                      by any run since. Settled by running again.
    failed_retryable  failed in the EMR with a reason in ``report.retryable_failures``
                      and not delivered by any run since. Settled by running the
                      run's redrive.csv.
    in_progress       rows of a run in progress not sent yet (never ``send_failed``).

A note any run delivered (confirmed, or taken and awaiting its outcome) is in
no kind but ``awaiting_outcome``. Reading the status mirrors what the sink file
gained into the ledger first, as ``reconcile`` does; no report is written and
no note text is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pipeline.config import RunConfig
from pipeline.ledger import Ledger, OpenGroup

SCHEMA: Final = 1
KINDS: Final = ("awaiting_outcome", "ambiguous", "send_failed", "failed_retryable",
                "in_progress")


@dataclass(frozen=True, slots=True)
class OpenKind:
    """One kind of open item over every run.

    ``count``: notes (jobs, for ``awaiting_outcome``); ``stale``: how many of them
    wait longer than ``report.stale_after`` (``awaiting_outcome`` only, else 0);
    ``oldest_age_s``: seconds since the oldest was submitted (or its run ended),
    None when there is none; ``run_ids``: the runs whose reports list them;
    ``redrive_files``: existing ``reports/<run_id>/redrive.csv`` files of those
    runs; ``settle``: the command (or action) that settles this kind.
    """

    kind: str
    count: int
    stale: int
    oldest_age_s: int | None
    run_ids: tuple[str, ...]
    redrive_files: tuple[str, ...]
    settle: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "stale": self.stale, "oldest_age_s": self.oldest_age_s,
                "run_ids": list(self.run_ids), "redrive_files": list(self.redrive_files),
                "settle": self.settle}


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
        return 1 if self.open else 0

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
    path = config.state.ledger
    if not path.exists():
        empty = OpenGroup(0, 0, None, ())
        groups = dict.fromkeys(KINDS, empty)
        return _assemble(config, config_path, now, groups, {})
    from pipeline.reconcile import Reconciler  # noqa: PLC0415 - pandas only when needed

    ledger = Ledger(path, synchronous=config.state.synchronous)
    try:
        latest = ledger.latest_run()
        if latest is not None:  # learn what the sink file gained: outcomes settle rows
            Reconciler.of(ledger, config).refresh(ledger.run(latest)["account"])
        running = ledger.runs_in_progress()
        stale_before = _iso(now - timedelta(seconds=config.report.stale_after))
        groups = ledger.open_groups(stale_before, running)
        groups["failed_retryable"] = _retryable(ledger, config.report.retryable_failures)
        holder = ledger.lock_holder() if running else None
    finally:
        ledger.close()
    return _assemble(config, config_path, now, groups,
                     {"pid": "?" if holder is None else str(holder)})


def _retryable(ledger: Ledger, patterns: tuple[str, ...]) -> OpenGroup:
    """EMR failures worth sending again: a reason code or phrase in ``patterns`` (as the
    report's redrive.csv chooses them)."""
    wanted = tuple(p.lower() for p in patterns)
    keys: set[bytes] = set()
    runs: set[str] = set()
    oldest: str | None = None
    for run_id, key, reason, codes, at in ledger.emr_failures():
        text = f"{reason or ''};{codes or ''}".lower()
        if any(p in text for p in wanted):
            keys.add(key)
            runs.add(run_id)
            if at is not None and (oldest is None or at < oldest):
                oldest = at
    return OpenGroup(len(keys), 0, oldest, tuple(sorted(runs)))


def _assemble(config: RunConfig, config_path: str, now: datetime,
              groups: dict[str, OpenGroup], extra: dict[str, str]) -> LedgerStatus:
    settle = {
        "awaiting_outcome": f"tasknotes poll {config_path}",
        "ambiguous": ("review: check each listed task in the EMR (report.html, 'Rows that "
                      f"need attention'); tasknotes poll {config_path} settles those an "
                      "event shows landed"),
        "send_failed": f"tasknotes run {config_path} (rows already sent are skipped)",
        "failed_retryable": f"tasknotes run {config_path} --input <redrive.csv>",
        "in_progress": f"wait for the run to end (pid {extra.get('pid', '?')})",
    }
    kinds = []
    for name in KINDS:
        group = groups[name]
        redrive: tuple[str, ...] = ()
        if name in ("send_failed", "failed_retryable"):
            redrive = tuple(str(p) for p in (config.report.dir / r / "redrive.csv"
                                             for r in group.run_ids) if p.exists())
        kinds.append(OpenKind(name, group.count, group.stale, _age_s(group.oldest, now),
                              group.run_ids, redrive, settle[name]))
    return LedgerStatus(_iso(now), str(config.state.ledger), config.report.stale_after,
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
