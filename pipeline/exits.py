"""Every exit code tasknotes gives is decided here, and only here (the README's contract).

    0  OK         every row ended well (accepted, confirmed, or rightly skipped); for
                  ``status``: nothing open
    1  ATTENTION  the command finished, but some rows were rejected, failed, are
                  ambiguous, not sent, or await an outcome too long; ``status``:
                  something is open
    2  USAGE      bad usage, config or input: nothing was sent (a PipelineError)
    3  ABORTED    the run stopped early: credentials refused, too many failures,
                  interrupted, disk full (a RunAborted, or a stop the run recorded)

The other modules say what happened (counts, a stop reason, an exception); the
functions below turn that into the number. This module imports nothing of tasknotes:
errors.py reads its numbers (each error class's ``exit_code`` constant), not the
other way round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from typing import Final

OK: Final = 0
ATTENTION: Final = 1
USAGE: Final = 2
ABORTED: Final = 3


def for_rows(needs_attention: bool) -> int:
    """A finished command over rows: 1 when any row needs attention, else 0."""
    return ATTENTION if needs_attention else OK


def for_run(*, stopped: bool, report_code: int | None) -> int:
    """A run that ended: 3 when it stopped early or wrote no report (``report_code`` None),
    else its report's code (``for_rows`` of its rows)."""
    return ABORTED if stopped or report_code is None else report_code


def for_dry_run(rejected: int) -> int:
    """A dry run (``validate``, ``run --dry-run``): 1 when any row was rejected, else 0."""
    return for_rows(rejected > 0)


def for_counts(counts: Mapping[str, int], good: Set[str]) -> int:
    """Final-status counts (``{status: rows}``): 0 when every counted status is in
    ``good`` (reconcile.GOOD_STATUSES), else 1."""
    return for_rows(any(n and status not in good for status, n in counts.items()))


def for_recorded_run(state: str, recorded: int | None, now_code: int) -> int | None:
    """The exit code a run's own process ended with: ``recorded`` when the ledger kept it;
    for runs recorded before it was kept, 3 for an aborted run, else ``now_code``; None
    while the run is in progress or after it crashed (``state`` "running"/"crashed")."""
    if recorded is not None:
        return int(recorded)
    if state in ("running", "crashed"):
        return None
    return ABORTED if state == "aborted" else now_code


def for_error(exc: BaseException) -> int | None:
    """The code for an exception a command raised: 3 for an interrupt (KeyboardInterrupt),
    else a tasknotes error's own ``exit_code`` class constant (errors.py: 3 for RunAborted,
    StorageFull included, 2 for any other PipelineError); None for an exception that is
    not tasknotes' own (a bug: it propagates as a traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return ABORTED
    if not any(c.__module__ == "pipeline.errors" and c.__name__ == "PipelineError"
               for c in type(exc).__mro__):  # by name: errors.py imports this module
        return None
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) else None


def worst(codes: Iterable[int]) -> int:
    """Several runs' codes as one: the highest, 0 for none."""
    return max(codes, default=OK)
