"""PostgreSQL as tasknotes' shared state (``state.url``): connecting, the schema, migrations.

- ``connect(url)`` opens one psycopg 3 connection (autocommit; each write is an
  explicit transaction) with ``synchronous_commit=on`` for the session, so a
  commit is on the server's disk (WAL flushed) before it returns, whatever the
  server's default: an event acknowledged after a commit survives a crash of
  the database server. A failure to connect is a ``StateError`` (exit 2) of one
  line naming host:port and database, never the password.
- ``migrate(conn)`` creates and upgrades the schema. ``tasknotes_schema``
  holds one row per applied migration (version, description, applied_at); the
  migrations in ``MIGRATIONS`` whose version is not there are applied in order,
  each in its own transaction with its row, under a transaction-level advisory
  lock so two processes starting at once do not both apply one. A rerun applies
  nothing and runs no DDL (a least-privilege role can use a current schema).

psycopg is an optional dependency (``pip install -e '.[postgres]'``); this module
imports it only when called, so SQLite users never need it.

About 400 lines: the migrations (each one's SQL in full) are most of it.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit

from pipeline.errors import StateError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

SCHEMES: Final = ("postgresql", "postgres")
# Any constant shared by every tasknotes process: the key of the migration lock.
_MIGRATION_LOCK: Final = 0x7461736B6E6F7465  # "tasknote"
CONNECT_TIMEOUT_S: Final = 5


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: ``version`` (1, 2, ...), a one-line ``description``,
    and the SQL run in the step's transaction."""

    version: int
    description: str
    sql: str


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "the sink's event store", """
        CREATE TABLE sink_events (
            seq          bigserial PRIMARY KEY,     -- commit order of the sink's stores
            event_id     text NOT NULL,             -- the envelope's id
            body_sha256  bytea NOT NULL,            -- SHA-256 of body: the same body, once
            body         bytea NOT NULL,            -- the request body, byte for byte
            verdict      text NOT NULL,             -- how the sink accepted it
            received_at  timestamptz(3) NOT NULL,   -- when the sink read it, to the ms
            CONSTRAINT sink_events_event_id_key UNIQUE (event_id),
            CONSTRAINT sink_events_body_sha256_key UNIQUE (body_sha256)
        )
    """),
    Migration(2, "the ledger: runs, files, rows, the events mirror, the run locks", """
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE runs (
            run_id text PRIMARY KEY, started_at text NOT NULL, finished_at text,
            state text NOT NULL, account text NOT NULL, config_fingerprint text NOT NULL,
            info text NOT NULL DEFAULT '{}',
            seq bigserial NOT NULL                  -- insertion order (SQLite's rowid)
        );
        CREATE TABLE files (
            run_id text NOT NULL REFERENCES runs(run_id), file_no bigint NOT NULL,
            path text NOT NULL, sha256 text, size bigint, header text NOT NULL,
            PRIMARY KEY (run_id, file_no)
        );
        CREATE TABLE rows (
            id bigserial PRIMARY KEY, run_id text NOT NULL REFERENCES runs(run_id),
            file_no bigint NOT NULL, line bigint NOT NULL, emr_task_id text NOT NULL,
            key bytea, status text NOT NULL, attempts bigint NOT NULL DEFAULT 0,
            http_status bigint, task_note_id text, job_id text, error text, ref_id bigint,
            submitted_at text, answered_at text, outcome text, event_id text,
            emr_note_id text, failure_reason text, outcome_at text, settled_by text,
            passthrough text, reason_codes text, outcome_clock text, written_off_at text
        );
        CREATE TABLE events (
            event_id text PRIMARY KEY, kind text NOT NULL, job_id text, task_note_id text,
            created text, emr_note_id text, failure_reason text, reason_codes text,
            ekey bytea, line bigint, outcome_at text, outcome_clock text
        );
        CREATE TABLE orphans (event_id text PRIMARY KEY, kind text, job_id text, created text);
        CREATE TABLE event_tally (name text PRIMARY KEY, count bigint NOT NULL);
        CREATE INDEX rows_run ON rows (run_id, id);
        CREATE INDEX rows_key ON rows (key) WHERE key IS NOT NULL;
        CREATE INDEX rows_job ON rows (job_id) WHERE job_id IS NOT NULL;
        CREATE INDEX rows_sending ON rows (status) WHERE status = 'sending';
        CREATE INDEX rows_task_note ON rows (task_note_id) WHERE task_note_id IS NOT NULL;
        CREATE INDEX rows_ambiguous ON rows (id) WHERE status = 'ambiguous';
        CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL;
        CREATE INDEX events_ekey ON events (ekey) WHERE ekey IS NOT NULL;
        -- Who holds an account's run lock (a session-level advisory lock): for messages.
        CREATE TABLE run_locks (
            account text PRIMARY KEY, backend_pid integer NOT NULL, host text NOT NULL,
            pid integer NOT NULL, run_id text, since timestamptz NOT NULL DEFAULT now()
        );
    """),
    Migration(3, "several clinics: each row's and each event's account (api.accounts)", """
        ALTER TABLE rows ADD COLUMN IF NOT EXISTS account text;
        ALTER TABLE events ADD COLUMN IF NOT EXISTS account text;
    """),
    Migration(4, "cost follows change: runs.rev, bumped by row changes (schema.TRIGGERS)", """
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS rev bigint NOT NULL DEFAULT 0;
        CREATE OR REPLACE FUNCTION tasknotes_rows_changed() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                UPDATE runs SET rev = rev + 1 WHERE run_id = OLD.run_id;
                RETURN OLD;
            END IF;
            UPDATE runs SET rev = rev + 1 WHERE run_id = NEW.run_id;
            IF NEW.key IS NOT NULL AND (
                   OLD.status IS DISTINCT FROM NEW.status
                OR OLD.outcome IS DISTINCT FROM NEW.outcome
                OR OLD.job_id IS DISTINCT FROM NEW.job_id
                OR OLD.task_note_id IS DISTINCT FROM NEW.task_note_id
                OR OLD.submitted_at IS DISTINCT FROM NEW.submitted_at
                OR OLD.outcome_at IS DISTINCT FROM NEW.outcome_at
                OR OLD.event_id IS DISTINCT FROM NEW.event_id
                OR OLD.emr_note_id IS DISTINCT FROM NEW.emr_note_id
                OR OLD.outcome_clock IS DISTINCT FROM NEW.outcome_clock
                OR OLD.key IS DISTINCT FROM NEW.key) THEN
                UPDATE runs SET rev = rev + 1 WHERE run_id IN (
                    SELECT run_id FROM rows WHERE key = NEW.key AND run_id <> NEW.run_id);
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        DROP TRIGGER IF EXISTS rows_changed ON rows;
        CREATE TRIGGER rows_changed AFTER UPDATE OR DELETE ON rows
            FOR EACH ROW EXECUTE FUNCTION tasknotes_rows_changed();
    """),
    # Version 4's trigger ran twice an UPDATE of the one ``runs`` row per changed row:
    # a group commit of the send (tens of rows) paid ~100 trigger statements on one hot
    # row, half of the commit's time (bench/state.py). Per statement, with the changed
    # rows as transition tables, the same runs are bumped, once per statement: ``rev``
    # is only ever compared for equality (a report's fingerprint, the match stamp), and
    # still grows with every change.
    Migration(5, "runs.rev bumped once per statement (transition tables), not per row", """
        DROP TRIGGER IF EXISTS rows_changed ON rows;
        DROP FUNCTION IF EXISTS tasknotes_rows_changed();
        CREATE FUNCTION tasknotes_rows_updated() RETURNS trigger AS $$
        BEGIN
            EXECUTE 'UPDATE runs SET rev = rev + 1
                      WHERE run_id IN (SELECT DISTINCT run_id FROM new_rows)';
            -- Runs showing a row of the same key: one rows_key lookup per moved row
            -- (OFFSET 0 keeps the lookup a subquery of its own, so the planner cannot
            -- turn it into a scan of rows). EXECUTE plans each statement for the rows it
            -- changed: a plan kept from a statement of one row would join 20,000 moved
            -- rows to their old versions by nested loops, quadratic.
            EXECUTE '
            WITH moved AS (
                SELECT n.key, n.run_id FROM new_rows n JOIN old_rows o ON o.id = n.id
                 WHERE n.key IS NOT NULL AND (
                       o.status IS DISTINCT FROM n.status
                    OR o.outcome IS DISTINCT FROM n.outcome
                    OR o.job_id IS DISTINCT FROM n.job_id
                    OR o.task_note_id IS DISTINCT FROM n.task_note_id
                    OR o.submitted_at IS DISTINCT FROM n.submitted_at
                    OR o.outcome_at IS DISTINCT FROM n.outcome_at
                    OR o.event_id IS DISTINCT FROM n.event_id
                    OR o.emr_note_id IS DISTINCT FROM n.emr_note_id
                    OR o.outcome_clock IS DISTINCT FROM n.outcome_clock
                    OR o.key IS DISTINCT FROM n.key))
            UPDATE runs SET rev = rev + 1 WHERE run_id IN (
                SELECT f.run_id FROM moved m CROSS JOIN LATERAL (
                    SELECT r.run_id FROM rows r WHERE r.key = m.key AND r.run_id <> m.run_id
                    OFFSET 0) f)';
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE FUNCTION tasknotes_rows_deleted() RETURNS trigger AS $$
        BEGIN
            EXECUTE 'UPDATE runs SET rev = rev + 1
                      WHERE run_id IN (SELECT DISTINCT run_id FROM old_rows)';
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER rows_updated AFTER UPDATE ON rows
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION tasknotes_rows_updated();
        CREATE TRIGGER rows_deleted AFTER DELETE ON rows
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION tasknotes_rows_deleted();
    """),
    # The scan's check of the account labels the ledger holds (``sent_accounts``) reads
    # the rows that name their own account (api.accounts) through this index, as SQLite
    # does (schema.ACCOUNT_INDEX), not every row: flat as the ledger grows.
    Migration(6, "the rows that name their own account, indexed (sent_accounts)", """
        CREATE INDEX IF NOT EXISTS rows_account ON rows (account)
            WHERE account IS NOT NULL AND account <> '';
    """),
    # The join rules write up to every row's outcome in one UPDATE (reconcile of 1M rows):
    # the trigger's lookup of each moved row's key, one rows_key probe per row, was a
    # quarter of that UPDATE. ``PgLedger.match_outcomes`` bumps the same runs itself, by
    # one set-based statement (a hash join where many rows moved), and says so for its
    # UPDATE alone with ``SET LOCAL tasknotes.outcomes_bumped = 'on'`` (reset to 'off'
    # right after, in the same transaction). Any other UPDATE runs the trigger as before.
    Migration(7, "runs.rev of the join rules' write bumped by the statement that writes", """
        CREATE OR REPLACE FUNCTION tasknotes_rows_updated() RETURNS trigger AS $$
        BEGIN
            IF current_setting('tasknotes.outcomes_bumped', true) = 'on' THEN
                RETURN NULL;
            END IF;
            EXECUTE 'UPDATE runs SET rev = rev + 1
                      WHERE run_id IN (SELECT DISTINCT run_id FROM new_rows)';
            EXECUTE '
            WITH moved AS (
                SELECT n.key, n.run_id FROM new_rows n JOIN old_rows o ON o.id = n.id
                 WHERE n.key IS NOT NULL AND (
                       o.status IS DISTINCT FROM n.status
                    OR o.outcome IS DISTINCT FROM n.outcome
                    OR o.job_id IS DISTINCT FROM n.job_id
                    OR o.task_note_id IS DISTINCT FROM n.task_note_id
                    OR o.submitted_at IS DISTINCT FROM n.submitted_at
                    OR o.outcome_at IS DISTINCT FROM n.outcome_at
                    OR o.event_id IS DISTINCT FROM n.event_id
                    OR o.emr_note_id IS DISTINCT FROM n.emr_note_id
                    OR o.outcome_clock IS DISTINCT FROM n.outcome_clock
                    OR o.key IS DISTINCT FROM n.key))
            UPDATE runs SET rev = rev + 1 WHERE run_id IN (
                SELECT f.run_id FROM moved m CROSS JOIN LATERAL (
                    SELECT r.run_id FROM rows r WHERE r.key = m.key AND r.run_id <> m.run_id
                    OFFSET 0) f)';
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
    """),
    # Every row is written four times in its life: added (pending), marked sending, its
    # answer recorded, its outcome written by the join rules. None of the outcome's columns
    # is indexed, so that last write can be a heap-only tuple (HOT) update: the new
    # version in the same page, no entry in any of the 8 indexes of rows (PostgreSQL
    # docs, "Heap-Only Tuples (HOT)"), but only when the page has room for it. Packed
    # full (fillfactor 100, the default), every outcome moved its row to another page and
    # wrote 8 index entries: most of the time of the write of 1M outcomes. Pages
    # filled to a quarter by inserts keep room for the later versions of their rows, even
    # when the outcome is written before a vacuum reclaimed the send's. Existing pages
    # keep their fill: ``VACUUM FULL rows`` (an exclusive lock) re-packs them if wanted.
    Migration(8, "room in the pages of rows for their later versions (fillfactor 25)", """
        ALTER TABLE rows SET (fillfactor = 25);
    """),
    # ``migrate-state --sink`` copies a sink file's events into sink_events, beside the
    # ledger's events mirror, which already holds (and tallied) those the SQLite ledger
    # had read from that file. Mirrored again from sink_events, each would be counted a
    # second time: as a repeated delivery, or in the tally of other event types. The
    # copy lists their ``seq`` here, and the mirror reads past them (sink_events_after).
    Migration(9, "the sink events a migrated ledger had mirrored already", """
        CREATE TABLE IF NOT EXISTS sink_premirrored (seq bigint PRIMARY KEY);
    """),
    # The statement trigger of version 5 ran, for each of the send's two UPDATEs per group
    # commit, two more statements planned anew each time (EXECUTE) over transition tables
    # PostgreSQL had to fill: most of the server's work in the commit (bench/state_parts.py
    # prints what is left of it). Every UPDATE
    # of rows the ledger runs now bumps the same runs itself, in the same statement
    # (pg_ledger.bumping). A DELETE of rows (a refused run's) is rare and keeps
    # its trigger. An older tasknotes refuses to open a database at this version
    # (_refuse_newer); one already connected is stopped by migration 12.
    Migration(10, "runs.rev bumped by each UPDATE of rows itself, not by a trigger", """
        DROP TRIGGER IF EXISTS rows_updated ON rows;
        DROP FUNCTION IF EXISTS tasknotes_rows_updated();
    """),
    # A run lock held by something other than a run (migrate-state) says so in the message
    # of the run it refuses, rather than "run (starting)" (PgLedger.lock's ``holder``).
    Migration(11, "what holds a run lock when it is not a run", """
        ALTER TABLE run_locks ADD COLUMN IF NOT EXISTS holder text;
    """),
    # Migration 10 left a gap: a tasknotes older than it, already connected when another
    # process migrated the database (several clinics upgrade one at a time), kept sending
    # plain UPDATEs of rows that no longer bumped runs.rev, and the reports of runs
    # sharing their notes stayed stale (reviewer HIGH). Every session of this tasknotes
    # says it bumps by itself (SESSION_OPTIONS: tasknotes.bumps_rev); an UPDATE of rows
    # from any other session is refused, with a line saying why. A statement trigger
    # without transition tables whose WHEN is false costs one expression per statement.
    Migration(12, "an UPDATE of rows from a session that does not bump runs.rev is refused", """
        CREATE OR REPLACE FUNCTION tasknotes_refuse_unbumped() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'tasknotes: this database was upgraded by a newer tasknotes, '
                'whose rows no longer keep runs.rev by a trigger: upgrade this tasknotes '
                '(an UPDATE of rows by hand: SET tasknotes.bumps_rev = on, and bump '
                'runs.rev of the runs it changes)'
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END $$ LANGUAGE plpgsql;
        DROP TRIGGER IF EXISTS rows_unbumped ON rows;
        CREATE TRIGGER rows_unbumped BEFORE UPDATE ON rows FOR EACH STATEMENT
            WHEN (current_setting('tasknotes.bumps_rev', true) IS DISTINCT FROM 'on')
            EXECUTE FUNCTION tasknotes_refuse_unbumped();
    """),
    # A held or already-sent row refers to the earlier attempt it follows (ref_id), under
    # another key when that attempt was found under the account's former name (formerly)
    # or in the form a version before NFC gave the note: a change to that attempt bumps
    # the referring rows' runs too (pg_ledger.bumping), found by this index, as SQLite's
    # rows_linked trigger finds them (schema.py). Without it, a run that skipped a note
    # sent under a former name kept saying "already sent" after that send failed in the
    # EMR (attacker HIGH).
    Migration(13, "the rows that refer to an earlier attempt, indexed by it", """
        CREATE INDEX IF NOT EXISTS rows_ref ON rows (ref_id) WHERE ref_id IS NOT NULL;
    """),
    # The connections every config on this database named (reference id -> account): an
    # event is keyed under its own clinic whichever config mirrors it (schema.py).
    Migration(14, "the Cobalt connections the configs name, and their accounts", """
        CREATE TABLE IF NOT EXISTS connections (reference_id text PRIMARY KEY,
                                                account text NOT NULL, since text NOT NULL);
    """),
)


def where(url: str) -> str:
    """``host:port/database`` of a ``postgresql://`` URL, for messages (no user, no password).

    A missing host is ``localhost`` and a missing port 5432 (or the query's ``port=``), as
    libpq assumes; several hosts (``h1:5432,h2:5433``) are named as given, decoded.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    database = (unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
                or unquote(parts.username or "") or "?")
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts:  # libpq's list of hosts: urlsplit's hostname and port cannot read it
        return f"{unquote(hosts)}/{database}"
    socket_dir = query.get("host", [""])[0]
    host = unquote(parts.hostname or "") or socket_dir or "localhost"
    port: int | str
    try:
        port = parts.port or 0
    except ValueError:
        port = "?"
    named = query.get("port", [""])[0]  # ?port=N, as libpq takes it (a socket's too)
    if not port:
        port = int(named) if named.isdigit() else 5432
    return f"{host}:{port}/{database}"


def check_url(url: str) -> None:
    """Raise ValueError (message without the URL) unless ``url`` is a postgresql:// (or
    postgres://) URL with a host that libpq and this module read the same way.

    libpq ends the user name and password at the first ``@`` and the host list at the
    first ``/``, ``?`` or ``#`` (RFC 3986 3.2); Python's ``urlsplit`` takes the last
    ``@``. A password holding an unencoded ``@ / ? #`` would be read as part of the host,
    port or database, and a message naming "the host" would show part of it. So such a
    URL is refused whole, naming nothing taken from it: its special characters must be
    percent-encoded (``@`` as ``%40``), as the PostgreSQL docs ("Connection URIs") say.
    So is a ``%`` not followed by two hex digits (RFC 3986 2.1), or ``%00``, anywhere in
    the URL: libpq's error for it quotes the raw token, which may be the password.
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in SCHEMES or not sep:
        raise ValueError("must be a postgresql:// (or postgres://) URL, "
                         "such as postgresql://user:password@host:5432/tasknotes")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if any(c not in _URL_CHARS for c in url) or (any(
            c in authority.partition("@")[0] for c in "[]") and "@" in authority):
        raise ValueError("is not a valid postgresql:// URL: percent-encode spaces and "
                         "characters such as \" < > [ ] { } | ^ ` \\ in the user name and "
                         "password (RFC 3986; a space as %20)")
    try:
        parts = urlsplit(url)
    except ValueError:  # its message quotes the URL's text
        raise ValueError("is not a valid postgresql:// URL (RFC 3986); percent-encode "
                         "special characters in the user name and password") from None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    database = parts.path.removeprefix("/")
    # (an @ after the host part: a password with an unencoded / ? #, refused below)
    if "@" not in rest[len(authority):] and any(_bad_port(h) for h in hosts.split(",")):
        raise ValueError("is not a valid postgresql:// URL: a port is a number from 1 to "
                         "65535")
    # an empty host is libpq's default (a Unix socket), or the query's host=/dir
    if (parts.netloc.count("@") > 1 or parts.fragment or any(c in database for c in "@/:")
            or "[" in userinfo or "]" in userinfo
            or (hosts and not all(_host_port_ok(h) for h in hosts.split(",")))):
        raise ValueError("is not a valid postgresql:// URL as libpq reads it: percent-encode "
                         "the characters @ : / ? # in the user name and password "
                         "(e.g. @ as %40)")
    if _BAD_PERCENT.search(url):
        raise ValueError("is not a valid postgresql:// URL: a % must start a percent-encoded "
                         "byte (two hex digits, not %00); write a literal % as %25")
    # libpq lets the query override the host, port and database the URL names before it;
    # messages and `status` would then name a server the tool does not use.
    query = {k.lower() for k in parse_qs(parts.query, keep_blank_values=True)}
    named = {"host": bool(hosts), "hostaddr": True, "port": ":" in hosts.rpartition("]")[2],
             "dbname": bool(database), "service": True}
    clash = sorted(k for k in query if named.get(k))
    if clash:
        raise ValueError(f"is refused: its query sets {', '.join(clash)}, which libpq would "
                         "use instead of what the URL names before it (host, port, "
                         "database); give each once, in the URL's own parts")
    try:  # psycopg reads the decoded URL as UTF-8 (a Latin-1 %e9 would stop it with a traceback)
        unquote_to_bytes(url).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not a valid postgresql:// URL: percent-encoded bytes must spell "
                         "UTF-8 text (é is %C3%A9, not %E9)") from None


def _bad_port(host_port: str) -> bool:
    """``host:port`` whose port is given but is not a number from 1 to 65535."""
    rest = host_port.rpartition("]")[2] if host_port.startswith("[") else host_port
    port = rest.partition(":")[2]
    return bool(port) and not (port.isdigit() and 0 < int(port) < 65536)


# RFC 3986's characters: unreserved, reserved, and % (checked apart, _BAD_PERCENT).
_URL_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")


def _host_port_ok(host_port: str) -> bool:
    """``host[:port]`` (or ``[v6]:port``) with a host and, if given, a numeric port."""
    if host_port.startswith("["):
        host, _, rest = host_port[1:].partition("]")
        port = rest.removeprefix(":") if rest else ""
        if rest and not rest.startswith(":"):
            return False
    else:
        host, _, port = host_port.partition(":")
    return bool(host) and (port == "" or (port.isdigit() and 0 < int(port) < 65536))


_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})|%00")
# Where a token of a message ends: blanks, quotes and the punctuation libpq puts around one.
_TOKEN: Final = re.compile(r"""[^\s"'(),;]+""")
# Short secrets are withheld only as a whole token: inside a word they are chance, and
# cutting them out of words would spell them out (a password "t" in "connection").
_SHORT: Final = 4


def secrets_of(url: str) -> set[str]:
    """What a message about ``url`` must not show: the password as written and decoded,
    and every query parameter's value as written and decoded (``?password=...``,
    ``sslpassword=...``, or any other: their meaning is libpq's, so all are withheld),
    but for the parameters libpq documents as plain settings (``_PLAIN``: a message
    "SSL was required" is not cut to "SSL was ***" for ``sslmode=require``)."""
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0] if "@" in rest else ""
    found: set[str] = set()
    if ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    query = rest.partition("?")[2].partition("#")[0]
    for pair in query.split("&"):
        if "=" in pair and unquote(pair.partition("=")[0]) not in _PLAIN:
            found.add(pair.partition("=")[2])
    return {s for v in found for s in (v, unquote(v)) if s}


# Connection parameters whose values are settings, not secrets (PostgreSQL docs, libpq
# "Parameter Key Words"): shown in messages as they are.
_PLAIN: Final = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "connect_timeout", "application_name",
    "sslmode", "gssencmode", "target_session_attrs", "channel_binding", "load_balance_hosts",
    "sslnegotiation", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "client_encoding"})


def _withhold(text: str, secrets: set[str]) -> str:
    """``text`` with every token that is, or contains (if not short), a secret replaced
    by ``***`` whole, so no part of a secret is left and no other word is cut."""
    def hide(match: re.Match[str]) -> str:
        token = match.group(0)
        bare = token.strip(".:")
        if any(bare == s or (len(s) >= _SHORT and s in token) for s in secrets):
            return "***"
        return token
    return _TOKEN.sub(hide, text)


def describe_failure(url: str, exc: BaseException) -> str:
    """One line saying why an operation on ``url`` failed, without any secret of it.

    The server's primary message when there is one (``exc.diag.message_primary``:
    "deadlock detected", "permission denied for schema public"), never the LINE /
    caret / CONTEXT lines after it; else the first line of the error, with the
    "connection to server at ... failed:" prefix libpq repeats cut off. A client-side
    error about the URL itself gives only its kind, not the token libpq quotes.
    Tokens holding the password or a query parameter's value (``secrets_of``) are
    replaced by ``***`` whole. At most 200 characters.
    """
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = primary if isinstance(primary, str) and primary else (lines[0] if lines else text)
    reason = reason.rpartition("failed:")[2].strip() or reason
    reason = reason.removeprefix("connection is bad:").strip().removeprefix("FATAL:").strip()
    if any(word in reason for word in ("URI", "percent-encoded", "conninfo")):
        reason = reason.partition(":")[0] + " (state.url is not a URL libpq can read)"
    return _withhold(reason, secrets_of(url))[:200]


# Every session: a commit returns once its WAL is flushed (synchronous_commit=on), and its
# transactions are READ COMMITTED whatever the database's default: tasknotes' transactions
# are written for it (explicit locks where order matters). Under a database default of
# SERIALIZABLE, clinics writing disjoint rows failed each other's commits (40001), and a
# send's group commit failing at its Sync leaves psycopg's pipeline unusable (exit 3).
# And no JIT compilation (PostgreSQL docs, "JIT Compilation": on by default, for any
# statement whose estimated cost passes jit_above_cost): a statement of the send or of the
# join rules estimated high on a ledger without statistics yet spent tenths of a second
# compiling work that then took milliseconds; tasknotes' statements are index probes and hash
# joins, with little expression work for compiled code to save. ``tasknotes.bumps_rev``:
# this session's UPDATEs of rows bump runs.rev themselves (pg_ledger.bumping); migration
# 12 refuses those of any session that does not say so (an older tasknotes).
SESSION_OPTIONS: Final = ("-c synchronous_commit=on"
                          " -c default_transaction_isolation=read\\ committed -c jit=off"
                          " -c tasknotes.bumps_rev=on")


def connect(url: str, *, application: str = "tasknotes") -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to ``url`` with ``synchronous_commit=on``, READ
    COMMITTED transactions and no JIT (``SESSION_OPTIONS``).

    Raises StateError (exit 2) naming host:port/database on any failure, and
    StateError as well when psycopg is not installed (``pip install -e '.[postgres]'``).
    TCP keepalives make a silently dead server a failed call within about 20 s.
    """
    try:
        import psycopg
    except ImportError:
        raise StateError("state.url: PostgreSQL needs psycopg 3, the postgres extra: "
                         "pip install -e '.[postgres]' in the tasknotes checkout") from None
    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            application_name=application, options=SESSION_OPTIONS,
            keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
        )
    except psycopg.Error as exc:
        raise StateError(f"state.url: cannot connect to PostgreSQL at {where(url)}: "
                         f"{describe_failure(url, exc)}") from None


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """The schema versions recorded in ``tasknotes_schema`` (empty before the first run)."""
    row = conn.execute("SELECT to_regclass('tasknotes_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return []
    found = [str(v) for (v,) in conn.execute(
        "SELECT version FROM tasknotes_schema ORDER BY version").fetchall()]
    if not all(v.isdigit() for v in found):  # a table of that name, not made by tasknotes
        raise StateError("state.url: the database's tasknotes_schema table was not made by "
                         "tasknotes (its versions are not numbers): give tasknotes a "
                         "database of its own")
    return sorted(int(v) for v in found)


def migrate(conn: psycopg.Connection[tuple[object, ...]],
            migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations not yet recorded, in order; return their versions.

    Each runs in one transaction with its ``tasknotes_schema`` row, under
    ``pg_advisory_xact_lock`` (so concurrent starters wait, then find it done).
    Raises StateError when the database is at a version newer than this
    tasknotes knows (an older tasknotes must not write to a newer schema).
    When every migration is recorded already it only reads ``tasknotes_schema``
    and runs no DDL, so a role with just USAGE on the schema and SELECT / INSERT /
    UPDATE / DELETE on its tables (a sink's, a reviewer's) can use a current database.
    """
    applied: list[int] = []
    known = {m.version for m in migrations}
    done = set(applied_versions(conn))  # reads only: a current schema needs no DDL right
    _refuse_newer(done, known)
    if known <= done:
        return applied
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        if not applied_versions(conn):
            _refuse_foreign(conn)
        conn.execute("""CREATE TABLE IF NOT EXISTS tasknotes_schema (
                            version      integer PRIMARY KEY,
                            description  text NOT NULL,
                            applied_at   timestamptz NOT NULL DEFAULT now())""")
    for migration in sorted(migrations, key=lambda m: m.version):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            done = set(applied_versions(conn))
            _refuse_newer(done, known)
            if migration.version in done:
                continue
            conn.execute(migration.sql.encode())
            conn.execute("INSERT INTO tasknotes_schema (version, description) VALUES (%s, %s)",
                         (migration.version, migration.description))
            applied.append(migration.version)
            log.info("state: schema migrated to version %d (%s)", migration.version,
                     migration.description)
    return applied


# The tables the migrations create: in a database without tasknotes_schema, one of them
# there already is another application's, and the first migration that creates it would
# stop half-way, with tasknotes' first tables left in that database.
_TABLES: Final = ("sink_events", "meta", "runs", "files", "rows", "events", "orphans",
                  "event_tally", "run_locks", "sink_premirrored")


def _refuse_foreign(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """StateError naming them, before anything is created, if tables tasknotes would create
    are in the database (its search path) although it has no ``tasknotes_schema``."""
    found = [name for name in _TABLES if conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)]
    if found:
        raise StateError(f"state.url: the database already has tables named as tasknotes' "
                         f"({', '.join(found)}) but no tasknotes_schema: is it another "
                         "application's? give tasknotes a database of its own; nothing was "
                         "created")


def _refuse_newer(done: set[int], known: set[int]) -> None:
    newer = sorted(done - known)
    if newer:
        raise StateError(f"state.url: the database's schema is at version {newer[-1]},"
                         f" newer than this tasknotes knows ({max(known)}); upgrade "
                         "tasknotes")


def open_state(url: str, *, application: str = "tasknotes") -> psycopg.Connection[
        tuple[object, ...]]:
    """``connect`` then ``migrate``: a connection to a database whose schema is current.

    Raises StateError (one line, no password) if either fails.
    """
    conn = connect(url, application=application)  # StateError if psycopg is missing
    import psycopg

    try:
        migrate(conn)
    except psycopg.Error as exc:
        conn.close()
        raise StateError(f"state.url: cannot prepare the schema at {where(url)}: "
                         f"{describe_failure(url, exc)}") from None
    except BaseException:
        conn.close()
        raise
    return conn
