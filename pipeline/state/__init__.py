"""State: every input row of every run, what was sent, what came back.

The only package that speaks SQL. ``records`` holds the values handed to and from
the stages, ``protocol`` the operations they call (``StateStore`` and the narrow
protocols each stage names), ``sqlite`` the
embedded store (``Ledger``), ``schema`` its tables and ``rules`` the join rules.
With ``state.url``: ``postgres`` (connection, schema versions), ``pg_ledger`` (the
ledger, ``PgLedger``), ``pg_events`` (the sink's event store) and ``pg_migrate`` (copying
a SQLite install in); psycopg is imported only there. ``store.open_store`` chooses.
"""

from pipeline.state.protocol import (
    OpenItems,
    OutcomeStore,
    ReportStore,
    RetentionStore,
    RunBook,
    ScanStore,
    SendStore,
    SinkEventsTable,
    StateStore,
)
from pipeline.state.records import (
    Attempt,
    Earlier,
    EventRecord,
    InputFile,
    InputRecords,
    NewRow,
    OpenGroup,
    OpenRow,
    Orphan,
    RunInfo,
    RunInfoChanges,
    RunRecord,
    RunState,
    ScanStopped,
    Status,
    row_key,
    utcnow,
)
from pipeline.state.schema import SCHEMA_VERSION
from pipeline.state.sqlite import RESERVE_BYTES, Ledger

__all__ = [
    "RESERVE_BYTES", "SCHEMA_VERSION", "Attempt", "Earlier", "EventRecord", "InputFile",
    "InputRecords", "Ledger", "NewRow", "OpenGroup", "OpenItems", "OpenRow", "Orphan",
    "OutcomeStore", "ReportStore", "RetentionStore", "RunBook", "RunInfo", "RunInfoChanges",
    "RunRecord", "RunState", "ScanStopped", "ScanStore", "SendStore", "SinkEventsTable",
    "StateStore", "Status", "row_key", "utcnow",
]
