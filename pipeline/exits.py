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
functions below turn that into the number.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from pipeline.errors import PipelineError, RunAborted

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


def for_error(exc: BaseException) -> int | None:
    """The code for an exception a command raised: 3 for RunAborted (StorageFull included)
    and for an interrupt (KeyboardInterrupt), 2 for any other PipelineError; None for an
    exception that is not tasknotes' own (a bug: it propagates as a traceback)."""
    if isinstance(exc, RunAborted | KeyboardInterrupt):
        return ABORTED
    if isinstance(exc, PipelineError):
        return USAGE
    return None


def worst(codes: Iterable[int]) -> int:
    """Several runs' codes as one: the highest, 0 for none."""
    return max(codes, default=OK)
