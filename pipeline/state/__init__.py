"""State: the ledger (every input row of every run, what was sent, what came back).

The only package that speaks SQL. ``sqlite.py`` is the embedded store.
"""

from pipeline.state.sqlite import (
    RESERVE_BYTES,
    SCHEMA_VERSION,
    Attempt,
    Earlier,
    EventRecord,
    Ledger,
    NewRow,
    OpenGroup,
    OpenRow,
    Status,
    row_key,
    utcnow,
)

__all__ = [
    "RESERVE_BYTES", "SCHEMA_VERSION", "Attempt", "Earlier", "EventRecord", "Ledger", "NewRow",
    "OpenGroup", "OpenRow", "Status", "row_key", "utcnow",
]
