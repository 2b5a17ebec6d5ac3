"""State on PostgreSQL (``state.url``) against a real server (tests/pg.py): the schema and its
migrations, connection errors, and the sink's event store behind a real ``tasknotes sink``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from helpers import (
    WEBHOOK_SECRET,
    free_port,
    make_config,
    wait_until,
    wait_until_healthy,
    write_config,
)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.emulator import sign
from pipeline.errors import ConfigError
from pipeline.events import SinkFile, UnreadableEvent
from pipeline.events import compact_json as compact
from pipeline.state.pg_events import PgEventStore
from pipeline.state.postgres import (
    MIGRATIONS,
    connect,
    describe_failure,
    migrate,
    where,
)
from pipeline.state.store import open_event_store

pytestmark = pytest.mark.slow


def event(n: int, note: str = "café 🙂 “quoted”") -> dict[str, Any]:
    return {"id": f"evt_{n:024d}", "object": "event", "type": "task_note.created",
            "created": "2026-06-15T12:02:40Z", "job_id": str(10000 + n),
            "data": {"task_note_id": f"{n:024x}", "emr_task_id": f"T{n}", "note": note}}


def headers(body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "cobalt-verification": sign(body, WEBHOOK_SECRET),
            "webhook-attempt": "1"}


def rows(url: str) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        return conn.execute("SELECT event_id, body, body_sha256, verdict, received_at, xmin::text"
                            " FROM sink_events ORDER BY seq").fetchall()


# -- config ------------------------------------------------------------------------------------


def test_state_url_must_be_postgres_and_is_never_echoed(tmp_path: Path) -> None:
    bad = write_config(tmp_path, state={"url": "mysql://u:secret-pw@db/x"})
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert "state.url" in str(caught.value)
    assert "secret-pw" not in str(caught.value)
    for scheme in ("postgresql", "postgres"):
        good = write_config(tmp_path, state={"url": f"{scheme}://u:pw@db:5432/x"})
        assert load_config(good).state.url is not None
    # a Unix socket: no host (libpq's default directory), or the directory in the query
    for url in ("postgresql:///tasknotes", "postgresql://u@/tasknotes?host=/var/run/postgresql",
                "postgresql://u:p%20w@[::1]:5432/tasknotes"):
        socket = write_config(tmp_path, state={"url": url})
        assert load_config(socket).state.url is not None, url


@pytest.mark.parametrize("url", [
    "postgresql://u:pw@db.prod.internal:5432/r5?host=127.0.0.1&port=35133&dbname=r4",
    "postgresql://u:pw@db.prod.internal/r5?host=127.0.0.2",
    "postgresql://u:pw@db:5432/r5?port=9",
    "postgresql://u:pw@db/r5?dbname=other",
    "postgresql://u:pw@db/r5?hostaddr=10.0.0.9",
    "postgresql://u:pw@db/r5?service=prod",
])
def test_a_query_overriding_the_urls_host_port_or_database_is_refused(
        tmp_path: Path, url: str) -> None:
    """libpq lets the query override the host, port or database the URL names before it,
    so messages and ``status --json`` named a server the tool did not use (attacker LOW).
    Refused as config, naming the keys; a query that only adds (sslmode, a socket
    directory for a URL with no host) is fine, and an empty state.url is refused (attacker
    MEDIUM: it fell back to a fresh local ledger, which would send every note again)."""
    bad = write_config(tmp_path, state={"url": url})
    with pytest.raises(ConfigError, match=r"state\.url: is refused: its query sets"):
        load_config(bad)
    for fine in ("postgresql://u:pw@db:5432/x?sslmode=require",
                 "postgresql:///r5?host=127.0.0.1&port=35133"):
        assert load_config(write_config(tmp_path, state={"url": fine})).state.url is not None
    for empty in (None, "", "  "):
        with pytest.raises(ConfigError, match=r"state\.url: is empty"):
            load_config(write_config(tmp_path, state={"url": empty}))


@pytest.mark.parametrize(("url", "secret_parts"), [
    ("postgresql://tasknotes:Wintq@2026!x@127.0.0.1:5432/tasknotes", ("Wintq", "2026!x")),
    ("postgresql://tasknotes:abq/dxf#ghz@127.0.0.1:5432/tasknotes", ("abq", "dxf", "ghz")),
    ("postgresql://tasknotes:Pz7q@sz:w/rk9@127.0.0.1:5432/tasknotes", ("Pz7q", "sz:w", "rk9")),
    ("postgresql://tasknotes:Pz7q?rk9@127.0.0.1:5432/tasknotes", ("Pz7q", "rk9")),
    # a % not starting a percent-encoded byte: libpq quotes the raw token in its error
    ("postgresql://tasknotes:p%40ss%word@127.0.0.1:5432/tasknotes", ("p%40ss", "ss%word")),
    ("postgresql://tasknotes@127.0.0.1:5432/tasknotes?password=QuerySecret%zz1",
     ("QuerySecret", "zz1")),
    ("postgresql://tasknotes:Pz7q%@127.0.0.1:5432/tasknotes", ("Pz7q",)),
    ("postgresql://tasknotes:Pz7q%00x@127.0.0.1:5432/tasknotes", ("Pz7q",)),
    # characters RFC 3986 does not allow unencoded: libpq quotes the token, or urlsplit does
    ("postgresql://tasknotes:correct horse battery@127.0.0.1:5432/tasknotes",
     ("correct", "horse", "battery")),
    ("postgresql://tasknotes:Pz7q[rk9]@127.0.0.1:5432/tasknotes", ("Pz7q", "rk9")),
    ("postgresql://tasknotes:Pz7q\"rk9@127.0.0.1:5432/tasknotes", ("Pz7q", "rk9")),
])
def test_a_password_with_unencoded_url_characters_is_refused_showing_none_of_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str,
        secret_parts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq ends the password at the first @ / ? #: the rest would be read (and shown) as
    the host, port or database. Refused as config, before anything is sent or connected."""
    monkeypatch.setenv("TASKNOTES_STATE_URL", url)
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    assert main(["-q", "status", str(config)]) == 2
    err = capsys.readouterr().err
    assert "state.url" in err
    assert "percent-encode" in err
    assert ("write a literal % as %25" in err) == ("%" in url)  # refused as config, not by libpq
    assert "Pz7q" not in err
    assert "rk9" not in err
    assert "Traceback" not in err
    for part in secret_parts:
        assert part not in err, part
    encoded = write_config(tmp_path, "ok.yaml", state={
        "url": "postgresql://tasknotes:Wintq%402026%21x@127.0.0.1:5432/tasknotes"})
    assert load_config(encoded).state.url is not None  # percent-encoded: accepted


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql://tn:Secr%e9tPw@127.0.0.1:5432/tasknotes", "UTF-8"),  # Latin-1 é
    ("postgresql://tn:%ff%fe@127.0.0.1:5432/tasknotes", "UTF-8"),
    ("postgresql://tn:Secr3tPw@127.0.0.1:99999/tasknotes", "a port is a number"),
    ("postgresql://tn:Secr3tPw@127.0.0.1:54x2/tasknotes", "a port is a number"),
])
def test_a_url_psycopg_cannot_decode_or_a_bad_port_is_refused_as_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, says: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Percent-encoded bytes that are not UTF-8 (psycopg decodes the URL as UTF-8: it
    stopped validate, status and run with a traceback) and a port out of range or not a
    number: one line naming state.url and the rule, exit 2, none of the password."""
    monkeypatch.setenv("TASKNOTES_STATE_URL", url)
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    for command in ("validate", "status"):
        assert main(["-q", command, str(config)]) == 2
        err = capsys.readouterr().err
        assert "state.url" in err
        assert says in err
        assert "Traceback" not in err
        assert "Secr" not in err
        assert len(err.strip().splitlines()) == 1


def test_state_url_without_the_postgres_driver_is_one_line_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without the [postgres] extra: a config error naming the fix, for every
    command (here status, run and sink), never a traceback, never exit 1."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.setenv("TASKNOTES_STATE_URL", "postgresql://u:pw-x@127.0.0.1:9/db")
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    for argv in (["status", str(config)], ["run", str(config), "--no-progress"],
                 ["sink", str(config), "--port", "9"]):
        assert main(["-q", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "state.url" in err
        assert "pip install -e '.[postgres]'" in err
        assert "Traceback" not in err
        assert "pw-x" not in err


def test_state_url_from_the_environment_is_required_once_named(tmp_path: Path) -> None:
    """An unset ${VAR} would otherwise fall back silently to local files."""
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    with pytest.raises(ConfigError, match=r"state\.url: environment variable "
                                          r"TASKNOTES_STATE_URL is not set"):
        load_config(config, env={})
    loaded = load_config(config, env={"TASKNOTES_STATE_URL": "postgresql://u:pw-x@h/db"})
    assert loaded.state.url is not None
    assert loaded.state.url.get_secret_value() == "postgresql://u:pw-x@h/db"
    assert "pw-x" not in repr(loaded)


def test_every_command_keeps_its_state_in_postgres_and_says_so_when_it_cannot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status, reconcile, poll and run open the database, never a local ledger instead."""
    config = write_config(tmp_path, state={"url": "postgresql://u:pw-9c1d@127.0.0.1:9/x"})
    write_csv = tmp_path / "input.csv"
    write_csv.write_text("emr_task_id,note\nT1,hello\n")
    for argv in (["status"], ["reconcile"], ["poll"], ["run", "--input", str(write_csv)]):
        assert main([argv[0], str(config), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert "cannot connect to PostgreSQL at 127.0.0.1:9/x" in err, argv
        assert "pw-9c1d" not in err
        assert "Traceback" not in err
    assert not (tmp_path / "state").exists()


# -- schema ------------------------------------------------------------------------------------


def test_a_database_holding_another_applications_tables_is_refused_untouched(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A database with its own ``runs`` table and no tasknotes_schema (state.url pointed
    at another application's database): one line naming the table, exit 2, and nothing
    of tasknotes created in it (the first migration's tables were left: attacker)."""
    with connect(pg_url) as conn:
        conn.execute("CREATE TABLE runs (id serial PRIMARY KEY, what text)")
    config = write_config(tmp_path, state={"url": pg_url})
    assert main(["-q", "status", str(config)]) == 2
    err = capsys.readouterr().err
    assert "already has tables named as tasknotes' (runs)" in err
    assert len(err.strip().splitlines()) == 1
    with connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('tasknotes_schema'), to_regclass('sink_events')"
                            ).fetchone() == (None, None)


def test_a_tasknotes_schema_table_tasknotes_did_not_make_is_one_line_exit_2(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another application's table named ``tasknotes_schema`` (versions that are not
    numbers): one line, exit 2, not a traceback (retest finding)."""
    with connect(pg_url) as conn:
        conn.execute("CREATE TABLE tasknotes_schema (version text, note text)")
        conn.execute("INSERT INTO tasknotes_schema VALUES ('abc', 'x')")
    config = write_config(tmp_path, state={"url": pg_url})
    assert main(["-q", "status", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tasknotes_schema table was not made by tasknotes" in err
    assert "Traceback" not in err


def test_schema_is_created_with_its_version_and_a_rerun_migrates_nothing(pg_url: str) -> None:
    with connect(pg_url) as conn:
        assert migrate(conn) == [m.version for m in MIGRATIONS]
        versions = conn.execute("SELECT version, description FROM tasknotes_schema"
                                " ORDER BY version").fetchall()
        assert [v for v, _ in versions] == [m.version for m in MIGRATIONS]
        assert migrate(conn) == []
        assert conn.execute("SELECT count(*) FROM tasknotes_schema").fetchone() == (
            len(MIGRATIONS),)
        constraints = {name for (name,) in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'sink_events'::regclass"
            " AND contype = 'u'")}
        assert constraints == {"sink_events_event_id_key", "sink_events_body_sha256_key"}



def test_the_account_labels_of_the_scan_are_read_through_an_index(pg_url: str) -> None:
    """sent_accounts (the scan's formerly warning) reads the rows that name their own
    account through rows_account, as on SQLite, so it stays flat as the ledger grows: with
    sequential scans priced out, the planner has that index to use."""
    with connect(pg_url) as conn:
        migrate(conn)
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(str(r[0]) for r in conn.execute(
            "EXPLAIN SELECT DISTINCT account FROM rows"
            " WHERE account IS NOT NULL AND account != ''"))
        assert "rows_account" in plan, plan

def test_a_least_privilege_role_uses_a_current_schema_without_ddl(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A role with USAGE on the schema and SELECT/INSERT/UPDATE/DELETE on its tables (how a
    sink or a reviewer is deployed) may not CREATE: once the schema is current, migrate()
    only reads tasknotes_schema, so status and export-events run."""
    database = pg_url.rsplit("/", 1)[1]
    role, password = f"{database}_ro", "ro-pw-51c2"
    with connect(pg_url) as conn:
        migrate(conn)
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'".encode())
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}".encode())
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}".encode())
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
                     f" TO {role}".encode())
        conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}".encode())
    try:
        ro_url = pg_url.replace("tn_admin:admin-pw-4b1e@", f"{role}:{password}@")
        assert ro_url != pg_url
        with connect(ro_url) as conn:
            assert migrate(conn) == []
            with pytest.raises(Exception, match="permission denied for schema public"):
                conn.execute(b"CREATE TABLE probe_ddl (x int)")  # the role really cannot
        monkeypatch.setenv("TASKNOTES_STATE_URL", ro_url)
        config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
        assert main(["-q", "status", str(config)]) == 0, capsys.readouterr().err
        out = tmp_path / "events.jsonl"
        assert main(["-q", "export-events", str(config), "--out", str(out)]) == 0, (
            capsys.readouterr().err)
        assert out.read_bytes() == b""
    finally:
        with connect(pg_url) as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


# -- connection errors -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sink", "export-events"])
@pytest.mark.parametrize("fault", ["wrong-password", "dead-port"])
def test_a_connection_error_is_one_line_without_the_password(
        pg_cluster: Any, pg_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, command: str, fault: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    password = "Wr0ng-pa55word-7f3a"
    if fault == "wrong-password":
        port, url = pg_cluster.port, pg_cluster.url(database, password=password)
    else:
        port = free_port()
        url = pg_cluster.url(database, password=password, port=port)
    monkeypatch.setenv("TASKNOTES_STATE_URL", url)
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    args = [command, str(config)] + (["--port", str(free_port())] if command == "sink" else [])
    assert main(args) == 2
    out, err = capfd.readouterr()
    assert password not in out + err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"127.0.0.1:{port}/{database}" in lines[0]
    assert lines[0].startswith("tasknotes: state.url: cannot connect to PostgreSQL")


def failure(url: str, sql: str | None = None) -> str:
    """describe_failure of the real error psycopg raises connecting to ``url`` (then running
    ``sql``)."""
    import psycopg  # noqa: PLC0415 - optional: the tests skip without it

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            if sql is not None:
                conn.execute(sql.encode())
    except psycopg.Error as exc:
        return describe_failure(url, exc)
    raise AssertionError("no error")


def test_a_failure_withholds_whole_secret_tokens_and_no_other_word(
        pg_cluster: Any, pg_url: str) -> None:
    """The password and query values are withheld as whole tokens: a 1-character password is
    not cut out of every word it occurs in (which garbled the line and spelled it out)."""
    database = pg_url.rsplit("/", 1)[1]
    assert failure(pg_cluster.url(database, password="t")) == (
        'password authentication failed for user "tn_admin"')
    # a password equal to a word of the message (here the user name) is withheld there
    assert failure(pg_cluster.url(database, password="tn_admin")) == (
        'password authentication failed for user "***"')
    # libpq quotes a query parameter's value back: withheld (it may be ?password= or
    # sslpassword=), but for settings libpq documents as plain: "SSL was required" stays
    assert failure(pg_url + "?sslrootcert=x&sslkey=Sm9xSecret&sslmode=verify-full") != ""
    assert "Sm9xSecret" not in failure(pg_url + "?options=Sm9xSecret")
    assert failure(pg_url + "?sslmode=require") == (
        "server does not support SSL, but SSL was required")
    assert failure(pg_url + "?sslmode=Sm9xSecret") == 'invalid sslmode value: "Sm9xSecret"'
    assert failure(pg_cluster.url(database, port=free_port())) == "Connection refused"


def test_where_names_a_sockets_directory_and_port_as_libpq_reads_them() -> None:
    """The label of a URL naming its Unix socket directory and port in the query (the
    usual form for a local server): that port, not 5432 (attacker finding)."""
    assert where("postgresql://tn@/tn27?host=/tmp/pg&port=55861") == "/tmp/pg:55861/tn27"
    assert where("postgresql://tn@db.internal/tn") == "db.internal:5432/tn"
    assert where("postgresql://tn@%2Ftmp%2Fpg:55861/tn2") == "/tmp/pg:55861/tn2"
    # a host given in the query alone (no host before it) is the one libpq connects to
    assert where("postgresql:///r5?host=127.0.0.1&port=35133") == "127.0.0.1:35133/r5"
    assert where("postgresql://u:p@127.0.0.1:35149?dbname=r9") == "127.0.0.1:35149/r9"
    # libpq's list of hosts (failover): named as given; it stopped every command with a
    # traceback (urlsplit cannot read its port)
    assert where("postgresql://tn:pw@10.0.0.1:5432,10.0.0.2:5433/tn") == (
        "10.0.0.1:5432,10.0.0.2:5433/tn")


def test_a_list_of_hosts_that_cannot_be_reached_is_one_line_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """libpq's failover form (``h1:p1,h2:p2``): tried, and refused in one line naming the
    hosts, exit 2, never a traceback nor the password."""
    url = f"postgresql://u:pw-5e2b@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/x"
    config = write_config(tmp_path, state={"url": url})
    for command in ("status", "reconcile"):
        assert main(["-q", command, str(config)]) == 2
        err = capsys.readouterr().err
        assert "cannot connect to PostgreSQL at 127.0.0.1:" in err
        assert "Traceback" not in err
        assert "pw-5e2b" not in err
        assert len(err.strip().splitlines()) == 1


def test_a_server_error_is_its_primary_message_not_the_caret_or_context_line(
        pg_url: str) -> None:
    """A multi-line server error (LINE / caret / CONTEXT after it) is told by its first line."""
    assert failure(pg_url, "SELECT 1 FROM no_such_table") == (
        'relation "no_such_table" does not exist')
    assert failure(pg_url, "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected'; END $$") == (
        "deadlock detected")


# -- the event store ---------------------------------------------------------------------------


async def test_events_go_to_the_sink_file_or_to_state_urls_table_marked_as_they_came(
        pg_url: str, tmp_path: Path) -> None:
    """open_event_store: without state.url the sink file; with it the database's
    sink_events, where the sink's events are kept as signed and poll's as polled."""
    async def put(store: Any, n: int) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run)
            assert await store.append(compact(event(n)), f"evt_{n}") == "stored"
            store.stop()

    local = make_config(tmp_path)
    on_file = open_event_store(local)
    try:
        assert isinstance(on_file, SinkFile)
        await put(on_file, 1)
    finally:
        on_file.close()
    assert local.webhooks.sink.read_bytes() == compact(event(1)) + b"\n"
    config = make_config(tmp_path, state={"url": pg_url})
    for n, polled in ((2, False), (3, True)):
        store = open_event_store(config, polled=polled)
        try:
            await put(store, n)
        finally:
            store.close()
    with connect(pg_url) as conn:
        assert conn.execute("SELECT event_id, verdict FROM sink_events ORDER BY seq").fetchall() \
            == [("evt_2", "signature-verified"), ("evt_3", "polled")]


async def test_store_dedupes_by_id_and_by_body_and_keeps_the_body(pg_url: str) -> None:
    store = PgEventStore(pg_url)
    store.open()
    first, other = compact(event(1)), compact(event(2))
    pretty = json.dumps(event(3), indent=2, ensure_ascii=False).encode()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run)
            assert await store.append(first, "evt_1") == "stored"
            assert await store.append(first, "evt_1") == "duplicate"         # same id and body
            assert await store.append(other, "evt_1") == "duplicate"         # same id
            assert await store.append(first, "another-id") == "duplicate"    # same body
            assert await store.append(pretty, "evt_3") == "stored"
            verdicts: list[str] = []
            same = compact(event(4))

            async def append_same() -> None:
                verdicts.append(await store.append(same, "evt_4"))

            async with anyio.create_task_group() as both:  # one batch: one row, one "stored"
                both.start_soon(append_same)
                both.start_soon(append_same)
            assert sorted(verdicts) == ["duplicate", "stored"]
            store.stop()
    finally:
        store.close()
    stored = rows(pg_url)
    assert [(r[0], bytes(r[1]), r[3]) for r in stored] == [
        ("evt_1", first, "signature-verified"), ("evt_3", pretty, "signature-verified"),
        ("evt_4", compact(event(4)), "signature-verified")]
    assert all(r[4].microsecond % 1000 == 0 and r[4].tzinfo is not None for r in stored)


async def test_a_batch_is_committed_in_one_round_trip_before_append_returns(
        pg_url: str) -> None:
    """Group commit on PostgreSQL: 20 events appended together are one batch, stored in one
    round trip (one message that waits for the server: a Sync or a simple Query; no BEGIN
    and COMMIT of their own), and committed when ``append`` returns: another session
    sees every one of them by then."""
    import tempfile  # noqa: PLC0415

    pq = pytest.importorskip("psycopg.pq")
    store = PgEventStore(pg_url)
    store.open()
    bodies = [compact(event(n)) for n in range(1, 21)]
    seen_on_return: list[int] = []

    async def append(body: bytes) -> None:
        assert await store.append(body, json.loads(body)["id"]) == "stored"
        with connect(pg_url) as other:  # committed: visible to another session now
            found = other.execute("SELECT count(*) FROM sink_events WHERE body = %s",
                                  (body,)).fetchone()
        seen_on_return.append(int(found[0]) if found else 0)

    try:
        assert store._conn is not None
        pgconn = store._conn.pgconn
        with tempfile.TemporaryFile("w+") as trace:
            pgconn.trace(trace.fileno())
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store.run)
                    async with anyio.create_task_group() as batch:  # one turn: one batch
                        for body in bodies:
                            batch.start_soon(append, body)
                    store.stop()
            finally:
                pgconn.untrace()
            trace.seek(0)
            sent = [line.split("\t")[2].strip() for line in trace if line.startswith("F\t")]
    finally:
        store.close()
    waits = [message for message in sent if message in ("Sync", "Query")]
    assert seen_on_return == [1] * 20
    assert waits == ["Sync"]
    assert len({r[5] for r in rows(pg_url)}) == 1  # one transaction (xmin) for the batch


async def test_an_unstorable_event_is_refused_alone_and_its_batch_is_stored(
        pg_url: str) -> None:
    """Values PostgreSQL cannot hold (NUL in text; an id over the btree's entry limit) fail
    the batch's INSERT: the batch is stored again row by row, so only those are refused
    (UnreadableEvent: the sink's 400) and the 30 valid events of the same batch stored."""
    import base64  # noqa: PLC0415

    store = PgEventStore(pg_url)
    store.open()
    nul_id, long_id = "evt_\u0000x", base64.b64encode(os.urandom(6000)).decode()
    good = [compact(event(n)) for n in range(1, 31)]
    verdicts: dict[str, str] = {}

    async def append(body: bytes, event_id: str) -> None:
        try:
            verdicts[event_id] = await store.append(body, event_id)
        except UnreadableEvent as exc:
            verdicts[event_id] = exc.code

    async def all_at_once() -> None:
        async with anyio.create_task_group() as tg:  # all queued in one turn: one batch
            for n, body in enumerate(good, 1):
                tg.start_soon(append, body, f"evt_{n:024d}")
            tg.start_soon(append, b'{"id":"nul"}', nul_id)
            tg.start_soon(append, b'{"id":"long"}', long_id)
        store.stop()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(all_at_once)
            tg.start_soon(store.run)
    finally:
        store.close()
    assert verdicts.pop(nul_id) == "unstorable"
    assert verdicts.pop(long_id) == "unstorable"
    assert set(verdicts.values()) == {"stored"}
    assert [bytes(r[1]) for r in rows(pg_url)] == good


async def test_a_kept_connection_cut_by_a_restart_is_replaced_before_answering(
        pg_cluster: Any, pg_url: str) -> None:
    """After a database restart the first store reconnects and stores (the INSERT is
    idempotent), instead of failing the batch on the dead kept connection (a 503)."""
    store = PgEventStore(pg_url)
    store.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run)
            assert await store.append(compact(event(1)), "evt_1") == "stored"
            pg_cluster.stop("fast")
            pg_cluster.start()
            assert await store.append(compact(event(2)), "evt_2") == "stored"
            assert await store.append(compact(event(2)), "evt_2") == "duplicate"
            store.stop()
    finally:
        store.close()
        if not pg_cluster.ready():
            pg_cluster.start()
    assert [r[0] for r in rows(pg_url)] == ["evt_1", "evt_2"]


@pytest.fixture
def sink_on_pg(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``tasknotes sink`` in its own process, its events in ``pg_url``; (sink URL, pg_url)."""
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    port = free_port()
    log = tmp_path / "sink.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-q", "sink", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=out,
            env={**os.environ, "TASKNOTES_STATE_URL": pg_url})
    url = f"http://127.0.0.1:{port}"

    try:
        wait_until_healthy(proc, url, log)
        yield url, pg_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert not (tmp_path / "state" / "webhooks.jsonl").exists()  # nothing went to a file


async def test_signed_events_land_once_each_and_export_as_sent(
        sink_on_pg: tuple[str, str], tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, pg_url = sink_on_pg
    bodies = [compact(event(n)) for n in range(1, 65)]
    pretty = json.dumps(event(99), indent=1, ensure_ascii=False).encode()
    answers: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def post(body: bytes) -> None:
            response = await client.post("/webhooks/cobalt", content=body, headers=headers(body))
            answers.append(response.status_code)

        async with anyio.create_task_group() as tg:  # all at once: group commit
            for body in bodies:
                tg.start_soon(post, body)
        async with anyio.create_task_group() as tg:  # every one again, and a new body per id
            for n, body in enumerate(bodies, 1):
                tg.start_soon(post, body)
                tg.start_soon(post, compact({**event(n), "type": "task_note.failed"}))
        await post(pretty)
        bad = await client.post("/webhooks/cobalt", content=compact(event(500)),
                                headers={"cobalt-verification": "0" * 64})
    assert answers == [200] * (64 * 3 + 1)
    assert bad.status_code == 401
    stored = rows(pg_url)
    assert sorted(r[0] for r in stored) == sorted([f"evt_{n:024d}" for n in range(1, 65)]
                                                  + [f"evt_{99:024d}"])
    assert {bytes(r[1]) for r in stored} == {*bodies, pretty}
    # group commit: the 64 concurrent events took fewer transactions than events
    assert len({r[5] for r in stored[:64]}) < 64

    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = write_config(tmp_path, "export.yaml", state={"url": "${TASKNOTES_STATE_URL}"})
    capfdbinary.readouterr()
    assert main(["-q", "export-events", str(config)]) == 0
    exported = capfdbinary.readouterr().out
    lines = exported.splitlines(keepends=True)
    assert sorted(lines[:64]) == sorted(b + b"\n" for b in bodies)  # byte for byte
    assert lines[64] == compact(json.loads(pretty)) + b"\n"  # a multi-line body: one line
    assert len(lines) == 65
    assert main(["-q", "export-events", str(config), "--out", str(tmp_path / "ev.jsonl")]) == 0
    assert (tmp_path / "ev.jsonl").read_bytes() == exported
    assert (tmp_path / "ev.jsonl").stat().st_mode & 0o077 == 0


def test_healthz_follows_the_database_even_when_no_webhook_arrives(
        pg_cluster: Any, sink_on_pg: tuple[str, str]) -> None:
    """The README: while the database is down, /healthz answers 503; a monitor must learn it
    before Cobalt's next delivery fails, and learn the recovery without one either."""
    url, _ = sink_on_pg

    def health() -> int:
        return httpx.get(f"{url}/healthz", timeout=30).status_code

    assert health() == 200
    try:
        pg_cluster.stop("fast")
        wait_until(lambda: health() == 503, timeout=60, what="/healthz 503 with the database down")
    finally:
        if not pg_cluster.ready():
            pg_cluster.start()
    wait_until(lambda: health() == 200, timeout=60, what="/healthz 200 with the database back")


def test_database_down_mid_stream_is_503_then_heals_and_loses_no_acknowledged_event(
        pg_cluster: Any, sink_on_pg: tuple[str, str]) -> None:
    url, pg_url = sink_on_pg
    acked: set[str] = set()
    refused: list[str] = []
    others: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(1, 1_000_000))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                with lock:
                    n = next(counter)
                body = compact(event(n))
                status = client.post("/webhooks/cobalt", content=body,
                                     headers=headers(body)).status_code
                with lock:
                    if status == 200:
                        acked.add(f"evt_{n:024d}")
                    elif status == 503:
                        refused.append(f"evt_{n:024d}")
                    else:
                        others.append(status)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acked) >= 50, timeout=60, what="50 acknowledged events")
        pg_cluster.stop("immediate")  # as if the database crashed, requests in flight
        wait_until(lambda: len(refused) >= 10, timeout=60, what="503s while the database is down")
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 503
        after_down = len(acked)
        pg_cluster.start()
        wait_until(lambda: len(acked) >= after_down + 50, timeout=60,
                   what="acknowledgements once the database is back")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if not pg_cluster.ready():
            pg_cluster.start()
    assert others == []
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    stored = {r[0] for r in rows(pg_url)}
    assert acked <= stored  # every 2xx survived the crash
    # a refused event was never acknowledged; Cobalt's retry of it is stored once
    with httpx.Client(base_url=url, timeout=30) as client:
        for event_id in refused:
            body = compact(event(int(event_id.removeprefix("evt_"))))
            assert client.post("/webhooks/cobalt", content=body,
                               headers=headers(body)).status_code == 200
    ids = [r[0] for r in rows(pg_url)]
    assert set(refused) <= set(ids)
    assert len(ids) == len(set(ids))


def test_export_events_to_a_path_it_cannot_write_is_one_line_exit_2(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing directory, or a directory at --out: one line naming the path, exit 2, no
    temporary copy left behind (newcomer finding)."""
    monkeypatch.setenv("TASKNOTES_STATE_URL", pg_url)
    config = write_config(tmp_path, state={"url": "${TASKNOTES_STATE_URL}"})
    (tmp_path / "a-dir").mkdir()
    for out in (tmp_path / "missing" / "e.jsonl", tmp_path / "a-dir"):
        assert main(["-q", "export-events", str(config), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: cannot be written" in err
        assert "Traceback" not in err
    assert list((tmp_path / "a-dir").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a-dir.")]
