"""Several clinics in one run (api.accounts): a token per clinic, limits per clinic, and one
clinic's trouble never stops the others. Real emulator on loopback, real SQLite."""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline import jobs
from pipeline.cli import build_parser, main
from pipeline.client import NoteAccepted
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError
from pipeline.events import compact_json
from pipeline.faults import Behaviour, Faults, knobs_from_args
from pipeline.open_items import ledger_status
from pipeline.state import Ledger, NewRow, row_key
from pipeline.submit import Job, Submitter
from tests.helpers import (
    CREDENTIALS,
    EmulatorThread,
    ThreadedServer,
    config_dict,
    read_results,
    read_sink,
    read_summary,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)

TOKENS = {"north": "tok-north", "south": "tok-south", "west": "tok-west"}
HEADERS = {"client_id": CREDENTIALS["client_id"], "client_secret": CREDENTIALS["client_secret"]}
HEADER = ("emr_task_id", "note", "clinic")


def emulator(**options: Any) -> EmulatorThread:
    """The emulator knowing the three clinics' tokens, each with its reference id."""
    return EmulatorThread(access_token=TOKENS["north"], account_reference="ref-north",
                          tokens=(("tok-south", "ref-south"), ("tok-west", "ref-west")),
                          **options)


def accounts_config(tmp: Path, base_url: str = "http://127.0.0.1:9",
                    south: dict[str, Any] | None = None, north: dict[str, Any] | None = None,
                    **overrides: Any) -> RunConfig:
    data = config_dict(tmp, **overrides)
    data["api"] = {"base_url": base_url, "client_id": CREDENTIALS["client_id"],
                   "client_secret": CREDENTIALS["client_secret"], "timeout_s": 5,
                   "connect_timeout_s": 2,
                   "accounts": {"north": {"access_token": TOKENS["north"], **(north or {})},
                                "south": {"access_token": TOKENS["south"], **(south or {})},
                                "west": {"access_token": TOKENS["west"]}}}
    data["input"]["columns"] = {"emr_task_id": "emr_task_id", "note": "note",
                                "account": "clinic"}
    return RunConfig.model_validate(data)


def rows_for(account: str, n: int) -> list[list[str]]:
    return [[f"{account}-{i}", f"Note {i} for {account}: called back, see chart.", account]
            for i in range(n)]


def by_account(results: list[dict[str, str]]) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {}
    for r in results:
        found.setdefault(r["account"], Counter())[r["final_status"]] += 1
    return found


def test_each_account_reaches_cobalt_with_its_own_token(tmp_path: Path) -> None:
    """Rows of three clinics are sent with their own clinic's token, and the reports count
    them per account."""
    csv_path = write_csv(tmp_path / "input.csv",
                         rows_for("north", 4) + rows_for("south", 3) + rows_for("west", 2),
                         header=HEADER)
    with emulator() as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url), str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 4, "ref-south": 3, "ref-west": 2}
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    assert list(results[0])[15] == "account"  # after the contract's columns
    assert by_account(results) == {"north": {"awaiting_outcome": 4},
                                   "south": {"awaiting_outcome": 3},
                                   "west": {"awaiting_outcome": 2}}
    summary = read_summary(outcome.report.directory)
    assert summary["accounts"]["south"] == {"rows": 3, "awaiting_outcome": 3}
    html = (outcome.report.directory / "report.html").read_text()
    assert 'id="accounts"' in html


def test_a_revoked_token_stops_only_its_own_account(tmp_path: Path) -> None:
    """South's token is refused: its rows end send_failed saying so, north and west all
    end confirmed, and the run exits 3 naming south."""
    csv_path = write_csv(tmp_path / "input.csv",
                         rows_for("south", 6) + rows_for("north", 5) + rows_for("west", 5),
                         header=HEADER)
    config = accounts_config(tmp_path, submit={"concurrency": 2},
                             sandbox={"enabled": True, "wait_s": 30, "emulator": {
                                 "latency_ms": [0, 0], "outcome_delay_ms": [5, 30],
                                 "revoked_accounts": ["south"]}})
    outcome = run_pipeline(config, str(csv_path))
    assert outcome.exit_code == 3
    assert outcome.stop_reason is not None
    assert "south" in outcome.stop_reason
    assert "north" not in outcome.stop_reason
    assert "check api.accounts.south.access_token" in outcome.stop_reason  # not "<name>"
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    assert by_account(results) == {"north": {"confirmed": 5}, "west": {"confirmed": 5},
                                   "south": {"send_failed": 6}}
    for row in results:
        if row["account"] == "south":
            assert "account south: credentials refused" in row["error"] + row["detail"]
    summary = read_summary(outcome.report.directory)
    assert summary["accounts"]["south"] == {"rows": 6, "send_failed": 6}
    assert ledger_status(config).kind("send_failed").by_account == {"south": 6}


@pytest.mark.parametrize("status", [429, 503])
def test_a_429_storm_on_one_account_does_not_hold_up_the_others(
        tmp_path: Path, status: int) -> None:
    """South's notes all meet a 429 (or a 503) with a Retry-After: while south waits it
    out, every north and west note is answered (south's second request comes after them
    all)."""
    others = rows_for("north", 12) + rows_for("west", 12)
    csv_path = write_csv(tmp_path / "input.csv", rows_for("south", 3) + others,
                         header=HEADER)
    faults = {f"rate_{status}": 1.0, "only_references": frozenset({"ref-south"}),
              "only_first": 1, "retry_after_s": 1.0}
    with emulator(faults=Faults(**faults)) as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url, south={"concurrency": 1},
                                               submit={"concurrency": 3}), str(csv_path))
        log = list(server.emulator.answered_by)
        assert server.emulator.stored_by == {"ref-north": 12, "ref-west": 12, "ref-south": 3}
    south = [i for i, (ref, _) in enumerate(log) if ref == "ref-south"]
    assert log[south[0]][1] == status  # the storm began before the others were done
    assert south[0] < len(others) // 2
    last_other = max(i for i, (ref, _) in enumerate(log) if ref != "ref-south")
    assert last_other < south[1], "the other accounts waited for south's Retry-After"
    assert outcome.report is not None
    assert by_account(read_results(outcome.report.directory))["south"] == {
        "awaiting_outcome": 3}


def test_one_accounts_failure_streak_stops_that_account_alone(tmp_path: Path) -> None:
    """South meets a 429 on every request (max_attempts 1: each row gives up at once) while
    north sends slowly (rate 2/s): south's streak of submit.max_consecutive_failures stops
    south alone (its rows send_failed, naming it); every north row is sent; exit 3 and the
    stop reason names south (and west, whose token is refused: every account stopped
    alone is named)."""
    csv_path = write_csv(tmp_path / "input.csv",
                         rows_for("south", 10) + rows_for("north", 3) + rows_for("west", 2),
                         header=HEADER)
    faults = Faults(rate_429=1.0, only_references=frozenset({"ref-south"}), retry_after_s=0.01)
    with emulator(faults=faults, revoked=frozenset({TOKENS["west"]})) as server:
        config = accounts_config(tmp_path, server.url, north={"rate_per_second": 2},
                                 submit={"max_attempts": 1, "max_consecutive_failures": 3})
        outcome = run_pipeline(config, str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 3}
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    found = by_account(results)
    assert found["south"] == {"send_failed": 10}
    assert set(found["north"]) <= {"confirmed", "awaiting_outcome"}
    assert sum(found["north"].values()) == 3
    stopped = [r for r in results if "account south: 3 rows in a row" in r["error"]]
    assert 1 <= len(stopped) <= 7  # the rows not tried when the streak stopped south
    assert outcome.exit_code == 3
    assert outcome.stop_reason is not None
    assert "account south: too many rows in a row" in outcome.stop_reason
    # West's token is refused too: both stops are named, whichever came first.
    assert "for account west;" in outcome.stop_reason
    assert "api.accounts.west.access_token" in outcome.stop_reason
    assert found["west"] == {"send_failed": 2}
    assert "north" not in outcome.stop_reason


def test_a_row_of_an_account_not_configured_is_rejected_with_its_code(tmp_path: Path) -> None:
    """A clinic value that names no account of api.accounts: rejected_invalid,
    unknown-account, and nothing of it sent."""
    csv_path = write_csv(tmp_path / "input.csv",
                         [*rows_for("north", 1), ["t-9", "Note for east", "east"]],
                         header=HEADER)
    with emulator() as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url), str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 1}
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    assert results[1]["final_status"] == "rejected_invalid"
    assert results[1]["error"] == ("unknown-account: the 'clinic' column names no configured "
                                   "account; it must name one of api.accounts (3 configured)")
    assert outcome.rejects is not None
    with outcome.rejects.open(encoding="utf-8", newline="") as fh:
        assert [r["reasons"] for r in csv.DictReader(fh)] == ["unknown-account"]


def test_an_unknown_account_error_never_quotes_the_cell(tmp_path: Path) -> None:
    """A note with an unquoted comma and an empty clinic cell shifts the end of the note into
    the clinic column with the right field count: the unknown-account error names the
    column, never the value, so no note text reaches results.csv, report.html, summary.json
    or the ledger (rejects.csv keeps the raw record: that is its purpose)."""
    csv_path = tmp_path / "input.csv"
    csv_path.write_text("emr_task_id,note,clinic\n"
                        "t-1,Pt reports chest pain, SECRETPHI-LEAK\n"
                        "t-2,Pt reports fine,north\n", encoding="utf-8")
    with emulator() as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url), str(csv_path))
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    assert results[0]["final_status"] == "rejected_invalid"
    assert results[1]["final_status"] in ("confirmed", "awaiting_outcome")
    assert results[0]["error"].startswith("unknown-account: the 'clinic' column names no")
    shared = [*outcome.report.directory.iterdir(), tmp_path / "state" / "ledger.sqlite"]
    for path in shared:
        if path.is_file() and path.name not in ("rejects.csv", "redrive.csv"):
            assert b"SECRETPHI" not in path.read_bytes(), path.name


@pytest.mark.parametrize("label", [None, "north_clinic"])
def test_moving_to_api_accounts_under_a_new_name_sends_nothing_again(
        tmp_path: Path, label: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """A clinic run in the single form (label api.account, or ``token:<fingerprint>``
    without it), then under api.accounts as ``north``: without ``formerly`` the scan warns
    naming the exact old label; with ``formerly: [<old label>]`` nothing is sent again."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("north", 3), header=HEADER)
    data = config_dict(tmp_path)
    single = {"client_id": CREDENTIALS["client_id"], "timeout_s": 5,
              "client_secret": CREDENTIALS["client_secret"], "access_token": TOKENS["north"]}
    with emulator() as server:
        data["api"] = {**single, "base_url": server.url,
                       **({"account": label} if label else {})}
        first = RunConfig.model_validate(data)
        old = first.api.account_id()
        assert old.startswith(label or "token:")
        run_pipeline(first, str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 3}

        caplog.clear()
        run_pipeline(accounts_config(tmp_path, server.url), str(csv_path), dry_run=True)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                  and "sent notes under account" in r.getMessage()]
        assert len(warned) == 1
        assert f"account {old!r}" in warned[0]
        assert f"formerly: [{old!r}]" in warned[0]

        caplog.clear()
        moved = accounts_config(tmp_path, server.url, north={"formerly": [old]})
        outcome = run_pipeline(moved, str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 3}, "a note was sent twice"
        assert not [r for r in caplog.records if "sent notes under account" in r.getMessage()]
    assert outcome.report is not None
    statuses = {r["final_status"] for r in read_results(outcome.report.directory)}
    assert statuses <= {"skipped_already_sent", "awaiting_outcome"}


def test_renaming_an_account_key_with_formerly_sends_nothing_again(tmp_path: Path) -> None:
    """api.accounts ``north`` renamed ``Northside`` (the CSV's clinic cells too), with
    ``formerly: [north]``: every note north sent counts as sent."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("north", 2), header=HEADER)
    with emulator() as server:
        run_pipeline(accounts_config(tmp_path, server.url), str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 2}
        renamed = write_csv(tmp_path / "renamed.csv",
                            [[t, n, "Northside"] for t, n, _ in rows_for("north", 2)],
                            header=HEADER)
        data = config_dict(tmp_path)
        data["api"] = {"base_url": server.url, **HEADERS}
        data["input"]["columns"] = {"emr_task_id": "emr_task_id", "note": "note",
                                    "account": "clinic"}
        data["api"]["accounts"] = {
            "Northside": {"access_token": TOKENS["north"], "formerly": ["north"]},
            "south": {"access_token": TOKENS["south"]}}
        run_pipeline(RunConfig.model_validate(data), str(renamed))
        assert server.emulator.stored_by == {"ref-north": 2}, "a note was sent twice"


def test_two_accounts_on_one_cobalt_connection_are_a_config_error(tmp_path: Path) -> None:
    """Two accounts with one token, or one reference_id: Cobalt's webhooks name one
    connection, so an event could not say whose note it settles (attacker LOW: the
    ambiguous rows of one never settled, and nothing said so). Refused before anything is
    sent, naming the key, never the token."""
    with pytest.raises(ValueError, match=r"api\.accounts\.south\.access_token: the same "
                                         r"token as account 'north'") as caught:
        accounts_config(tmp_path, south={"access_token": TOKENS["north"]})
    assert TOKENS["north"] not in str(caught.value)
    with pytest.raises(ValueError, match=r"api\.accounts\.south\.reference_id: the same as "
                                         r"account 'north'"):
        accounts_config(tmp_path, north={"reference_id": "ref-1"},
                        south={"reference_id": "ref-1"})
    accounts_config(tmp_path, north={"reference_id": "ref-1"}, south={"reference_id": "ref-2"})


def test_the_connections_a_config_names_by_reference_id(tmp_path: Path) -> None:
    """``ApiConfig.connections``: reference id -> account, from api.accounts' reference_id
    or the single form's api.reference_id (recorded in the state so that every config
    sharing it keys an event under its own clinic); the single form's key is refused
    beside api.accounts, naming it."""
    assert accounts_config(tmp_path, north={"reference_id": "ref-n"}).api.connections() == {
        "ref-n": "north"}
    single = RunConfig.model_validate(config_dict(
        tmp_path, api={"account": "north", "reference_id": "ref-n"}))
    assert single.api.connections() == {"ref-n": "north"}
    assert RunConfig.model_validate(config_dict(tmp_path)).api.connections() == {}
    both = config_dict(tmp_path)
    both["api"] = {"reference_id": "ref-n",
                   "accounts": {"north": {"access_token": TOKENS["north"]}}}
    with pytest.raises(ValueError, match=r"api\.accounts: replaces api\.reference_id"):
        RunConfig.model_validate(both)


def test_a_former_name_is_one_accounts_and_no_current_name(tmp_path: Path) -> None:
    """``formerly`` naming a configured account, or the same old name under two accounts,
    is a config error naming the key."""
    with pytest.raises(ValueError, match=r"api\.accounts\.north\.formerly: 'south' is a "):
        accounts_config(tmp_path, north={"formerly": ["south"]})
    with pytest.raises(ValueError, match=r"'old' is also a former name of account 'north'"):
        accounts_config(tmp_path, north={"formerly": ["old"]}, south={"formerly": ["old"]})


def test_two_account_names_equal_in_nfc_are_a_config_error(tmp_path: Path) -> None:
    """``Clínica Sur`` written with é (NFC) and with e + U+0301 (NFD): one ledger key for
    both, so the config is refused, naming both keys."""
    nfc, nfd = "Cl\u00ednica Sur", "Cli\u0301nica Sur"
    data = config_dict(tmp_path)
    data["api"] = {**HEADERS, "accounts": {nfc: {"access_token": "a"},
                                           nfd: {"access_token": "b"}}}
    data["input"]["columns"] = {"emr_task_id": "emr_task_id", "note": "note",
                                "account": "clinic"}
    with pytest.raises(ValueError, match="two account names equal in Unicode NFC") as err:
        RunConfig.model_validate(data)
    assert repr(nfc) in str(err.value)
    assert repr(nfd) in str(err.value)


def test_the_same_note_for_two_accounts_is_two_notes(tmp_path: Path) -> None:
    """The same task and note for north and south is sent once for each; repeated for
    north, it is a duplicate, not a third send."""
    same = ["t-1", "Called patient, left message."]
    csv_path = write_csv(tmp_path / "input.csv",
                         [[*same, "north"], [*same, "south"], [*same, "north"]],
                         header=HEADER)
    with emulator() as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url), str(csv_path))
        assert server.emulator.stored_by == {"ref-north": 1, "ref-south": 1}
    assert outcome.report is not None
    assert [r["final_status"] for r in read_results(outcome.report.directory)] == [
        "awaiting_outcome", "awaiting_outcome", "skipped_duplicate"]
    assert row_key("north", *same) != row_key("south", *same)


def test_a_rerun_skips_per_account(tmp_path: Path) -> None:
    """A note north sent in an earlier run is skipped for north, and still sent for south."""
    same = ["t-1", "Called patient, left message."]
    first = write_csv(tmp_path / "first.csv", [[*same, "north"]], header=HEADER)
    second = write_csv(tmp_path / "second.csv", [[*same, "north"], [*same, "south"]],
                       header=HEADER)
    with emulator() as server:
        config = accounts_config(tmp_path, server.url)
        run_pipeline(config, str(first))
        outcome = run_pipeline(config, str(second))
        assert server.emulator.stored_by == {"ref-north": 1, "ref-south": 1}
    assert outcome.report is not None
    results = read_results(outcome.report.directory)
    # north's row follows the first run's send (awaiting its outcome, as that send is)
    assert [r["account"] for r in results] == ["north", "south"]
    assert results[0]["detail"].startswith("sent in run ")
    assert results[1]["submit_status"] == "accepted"


@pytest.mark.parametrize("keys", [
    pytest.param({"account": "main"}, id="account"),
    pytest.param({"access_token": "t"}, id="access_token"),
])
def test_both_forms_at_once_is_a_config_error_naming_the_keys(
        tmp_path: Path, keys: dict[str, str]) -> None:
    """api.accounts with api.account or api.access_token: refused, naming both keys."""
    path = write_config(tmp_path, api={"account": None, "access_token": None, **keys,
                                       "accounts": {"north": {"access_token": "x"}}},
                        input={"columns": {"account": "clinic"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"api.accounts: replaces api.{next(iter(keys))}" in str(caught.value)


def test_the_account_column_is_required_with_accounts(tmp_path: Path) -> None:
    """api.accounts without input.columns.account: a config error naming that key."""
    path = write_config(tmp_path, api={"account": None, "access_token": None,
                                       "accounts": {"north": {"access_token": "x"}}})
    with pytest.raises(ConfigError, match=r"input\.columns\.account: required"):
        load_config(path)


def test_the_shipped_clinic_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/clinics.example.yaml and sandbox-clinics.yaml are valid as shipped."""
    root = Path(__file__).parent.parent / "configs"
    for var in ("COBALT_CLIENT_ID", "COBALT_CLIENT_SECRET", "COBALT_TOKEN_NORTHSIDE",
                "COBALT_TOKEN_RIVERSIDE", "COBALT_TOKEN_EASTGATE", "COBALT_WEBHOOK_SECRET"):
        monkeypatch.setenv(var, f"value-of-{var}")
    example = load_config(root / "clinics.example.yaml", needs=("api", "webhooks"))
    assert example.api.credentials("Riverside Cardiology")[2] == (
        "value-of-COBALT_TOKEN_RIVERSIDE")
    sandbox = load_config(root / "sandbox-clinics.yaml", needs=("api",))
    assert sandbox.sandbox.emulator.revoked_accounts == ("Eastgate Pediatrics",)


def test_the_emulator_takes_tokens_revocations_and_faults_for_one_connection() -> None:
    """tasknotes emulator: --token TOKEN=REF, --revoked-token, --faults-only-reference."""
    args = build_parser().parse_args(["emulator", "--token", "tok-s=ref-s",
                                      "--token", "tok-w=ref-w", "--revoked-token", "tok-w",
                                      "--faults-only-reference", "ref-s,ref-x"])
    behaviour = knobs_from_args(Behaviour, args)
    assert behaviour.tokens == (("tok-s", "ref-s"), ("tok-w", "ref-w"))
    assert behaviour.revoked == frozenset({"tok-w"})
    assert knobs_from_args(Faults, args).only_references == frozenset({"ref-s", "ref-x"})


async def test_a_batch_of_skipped_jobs_only_does_not_stall_the_send(tmp_path: Path) -> None:
    """Every job of a batch skipped (its input changed since the scan): recorded failed,
    and the stage goes on to the next batch and ends, rather than waiting forever."""
    config = RunConfig.model_validate(config_dict(tmp_path))
    ledger = Ledger(config.state.ledger)
    ledger.start_run("r", "test_clinic", "fp", {})
    tasks = ["t-1", "t-2", "t-3"]
    ledger.add_rows("r", [NewRow(0, i + 2, t, row_key("test_clinic", t, "n"), "pending")
                          for i, t in enumerate(tasks)])
    ids = [row_id for row_id, *_ in ledger.rows_to_send("r")]

    async def jobs() -> AsyncIterator[list[Job]]:
        yield [Job(ids[0], "t-1", "", skip="the input file changed since it was read")]
        yield [Job(ids[1], "t-2", "", skip="the input file changed since it was read"),
               Job(ids[2], "t-3", "", skip="the input file changed since it was read")]

    try:
        with anyio.fail_after(30):
            stats = await Submitter(NeverCalled(), ledger, config.submit).run(jobs())
        assert stats.requests == 0
        assert ledger.status_counts("r") == {"failed": 3}
    finally:
        ledger.close()


class NeverCalled:
    """A NoteSender for a stage that must send nothing."""

    async def create_task_note(self, emr_task_id: str, note: str) -> NoteAccepted:
        raise AssertionError("nothing was to be sent")


def test_an_event_from_another_accounts_connection_is_a_conflict(tmp_path: Path) -> None:
    """South's note confirmed by an event of north's connection (reference ids configured):
    a conflict, not confirmed; north's own event confirms north's note."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("north", 1) + rows_for("south", 1),
                         header=HEADER)
    config = accounts_config(tmp_path, "http://127.0.0.1:9")
    accounts = {name: a.model_copy(update={"reference_id": f"ref-{name}"})
                for name, a in (config.api.accounts or {}).items()}
    with emulator() as server:
        config = config.model_copy(update={"api": config.api.model_copy(
            update={"base_url": server.url, "accounts": accounts})})
        outcome = run_pipeline(config, str(csv_path))
    assert outcome.report is not None
    sent = read_results(outcome.report.directory)
    config.webhooks.sink.parent.mkdir(parents=True, exist_ok=True)
    with config.webhooks.sink.open("ab") as fh:
        for i, row in enumerate(sent):
            fh.write(compact_json({
                "id": f"evt_{i:024d}", "access_token_reference_id": "ref-north",
                "object": "event", "created": "2026-01-01T00:00:00.000Z",
                "type": "task_note.created", "job_id": row["job_id"],
                "data": {"task_note_id": row["task_note_id"], "emr_note_id": f"n-{i}",
                         "emr_task_id": row["emr_task_id"], "note": "(not compared)"}})
                     + b"\n")
    reconciled = jobs.reconcile(config, outcome.run_id)
    report = reconciled.runs[0].report
    assert report is not None
    results = read_results(report.directory)
    assert [(r["account"], r["final_status"], r["outcome"]) for r in results] == [
        ("north", "confirmed", "created"), ("south", "ambiguous", "conflict")]
    assert "another account's connection" in results[1]["detail"]
    status = ledger_status(config)  # what the report calls ambiguous is open
    assert status.kind("ambiguous").by_account == {"south": 1}
    assert status.exit_code == 1


def test_an_accounts_concurrency_holds_under_the_global_one(tmp_path: Path) -> None:
    """South (concurrency 1) never has two requests in flight, while north, under the
    global bound of 4, has several at once."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("south", 6) + rows_for("north", 9),
                         header=HEADER)
    with emulator(latency_ms=(200.0, 200.0)) as server:
        run_pipeline(accounts_config(tmp_path, server.url, south={"concurrency": 1},
                                     submit={"concurrency": 4}), str(csv_path))
        most = server.emulator.max_in_flight_by
        assert server.emulator.stored_by == {"ref-south": 6, "ref-north": 9}
    assert most["ref-south"] == 1
    assert most["ref-north"] >= 2
    assert server.emulator.max_in_flight <= 4


# -- poll: each account's events with its own token -------------------------------------------


def accounts_config_file(tmp: Path, base_url: str, accounts: dict[str, dict[str, Any]],
                         **overrides: Any) -> Path:
    """A config file with ``api.accounts`` (tokens from TOKENS unless given)."""
    api = {"base_url": base_url, "account": None, "access_token": None,
           "accounts": {name: {"access_token": TOKENS[name], **extra}
                        for name, extra in accounts.items()}}
    return write_config(tmp, api=api, input={"columns": {
        "emr_task_id": "emr_task_id", "note": "note", "account": "clinic"}}, **overrides)


def sent_without_webhooks(tmp: Path, server: EmulatorThread, rows: list[list[str]],
                          accounts: dict[str, dict[str, Any]], **overrides: Any
                          ) -> tuple[Path, Path]:
    """``rows`` sent through ``server`` (whose webhooks are all lost) and their outcomes
    made; returns (the config's path, the run's report directory)."""
    write_csv(tmp / "input.csv", rows, header=HEADER)
    path = accounts_config_file(tmp, server.url, accounts, **overrides)
    outcome = run_pipeline(load_config(path, needs=("api",)))
    assert outcome.report is not None
    wait_until(lambda: len(server.emulator.events) == len(rows), what="the outcomes")
    return path, outcome.report.directory


def test_the_emulator_lists_each_connections_events_to_its_own_token() -> None:
    """GET /v1/webhook-events answers a token with its own connection's events only (as
    Cobalt scopes an access token to one EHR connection), and a revoked token with a 401."""
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        for clinic, token in (("north", TOKENS["north"]), ("south", TOKENS["south"]),
                              ("south", TOKENS["south"])):
            response = httpx.post(f"{server.url}/v1/tasks/notes", headers={
                **HEADERS, "access_token": token}, json={"emr_task_id": f"{clinic}-t",
                                                         "note": f"Note {token}"})
            assert response.status_code == 200
        wait_until(lambda: len(server.emulator.events) == 3, what="the outcomes")

        def listed(token: str) -> httpx.Response:
            return httpx.get(f"{server.url}/v1/webhook-events",
                             headers={**HEADERS, "access_token": token})

        refs = {name: [e["access_token_reference_id"]
                       for e in listed(token).json()["webhook_events"]]
                for name, token in TOKENS.items()}
        assert refs == {"north": ["ref-north"], "south": ["ref-south"] * 2, "west": []}
        server.emulator.options = replace(server.emulator.options,
                                          revoked=frozenset({TOKENS["south"]}))
        assert listed(TOKENS["south"]).status_code == 401
        assert listed(TOKENS["north"]).status_code == 200


@pytest.mark.parametrize("per_job_below", [pytest.param(20, id="per-job"),
                                           pytest.param(0, id="paging-by-date")])
def test_poll_asks_for_each_accounts_jobs_with_its_own_token(
        tmp_path: Path, per_job_below: int) -> None:
    """Every webhook lost: poll asks Cobalt once per account, with that account's token,
    for that account's jobs only; every row ends confirmed, and summary.json, report.html
    and status count them per account."""
    rows = rows_for("north", 3) + rows_for("south", 2) + rows_for("west", 2)
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        path, report = sent_without_webhooks(
            tmp_path, server, rows, {"north": {}, "south": {}, "west": {}},
            poll={"per_job_below": per_job_below, "page_size": 2})
        before = ledger_status(load_config(path)).kind("awaiting_outcome").by_account
        assert before == {"north": 3, "south": 2, "west": 2}
        assert main(["-q", "poll", str(path)]) == 0
        asked = list(server.emulator.queried_by)
    results = read_results(report)
    assert by_account(results) == {"north": {"confirmed": 3}, "south": {"confirmed": 2},
                                   "west": {"confirmed": 2}}
    assert {status for _, status, _ in asked} == {200}
    assert {ref for ref, _, _ in asked} == {"ref-north", "ref-south", "ref-west"}
    if per_job_below:  # each job asked for with its own account's token, and only so
        jobs_of = {f"ref-{r['account']}": set() for r in results}
        for r in results:
            jobs_of[f"ref-{r['account']}"].add(r["job_id"])
        asked_for: dict[str, set[str]] = {}
        for ref, _, query in asked:
            asked_for.setdefault(ref, set()).add(query["job_id"])
        assert asked_for == jobs_of
    events = [e for _, e in read_sink(tmp_path / "state" / "webhooks.jsonl")]
    assert sorted(e["job_id"] for e in events) == sorted(r["job_id"] for r in results)
    summary = read_summary(report)
    assert summary["accounts"] == {"north": {"rows": 3, "confirmed": 3},
                                   "south": {"rows": 2, "confirmed": 2},
                                   "west": {"rows": 2, "confirmed": 2}}
    assert html_accounts(report) == {"north": {"Rows": 3, "confirmed": 3},
                                     "south": {"Rows": 2, "confirmed": 2},
                                     "west": {"Rows": 2, "confirmed": 2}}
    assert ledger_status(load_config(path)).kind("awaiting_outcome").count == 0


def test_poll_goes_on_for_the_others_when_one_accounts_token_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """North's token is revoked after the run: poll still fetches south's and west's
    outcomes (their rows end confirmed), says north's credentials were refused, leaves
    north's rows awaiting their outcome, and exits 3 (aborted), as a run with a refused
    account does."""
    rows = rows_for("north", 2) + rows_for("south", 2) + rows_for("west", 3)
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        path, report = sent_without_webhooks(tmp_path, server, rows,
                                             {"north": {}, "south": {}, "west": {}})
        server.emulator.options = replace(server.emulator.options,
                                          revoked=frozenset({TOKENS["north"]}))
        capsys.readouterr()
        assert main(["poll", str(path)]) == 3
        assert server.emulator.refused["ref-north"] >= 1
    out = capsys.readouterr().out
    assert "stopped: account north: credentials refused by Cobalt (HTTP 401" in out
    assert "api.accounts.north.access_token" in out
    # only the jobs asked about count as polled; north's two are said not to be
    assert "polled 5 jobs and 0 ambiguous notes (2 of account north not polled)" in out
    assert "account south" not in out
    assert "account west" not in out
    assert by_account(read_results(report)) == {"north": {"awaiting_outcome": 2},
                                                "south": {"confirmed": 2},
                                                "west": {"confirmed": 3}}
    found = ledger_status(load_config(path)).kind("awaiting_outcome")
    assert found.by_account == {"north": 2}
    assert main(["status", str(path)]) == 1
    assert "awaiting an outcome: 2;" in (said := capsys.readouterr().out)
    assert "  accounts: north 2\n" in said
    assert read_summary(report)["accounts"]["north"] == {"rows": 2, "awaiting_outcome": 2}
    assert html_accounts(report)["south"] == {"Rows": 2, "confirmed": 2}


def test_a_polled_event_of_another_accounts_connection_stays_a_conflict(
        tmp_path: Path) -> None:
    """Cobalt lists, to south's token, an event for south's job that names north's
    connection: poll stores it as listed, and reconcile calls south's row a conflict,
    while north's own event confirms north's row."""
    rows = rows_for("north", 1) + rows_for("south", 1)
    accounts = {"north": {"reference_id": "ref-north"}, "south": {"reference_id": "ref-south"}}
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        path, report = sent_without_webhooks(tmp_path, server, rows, accounts)
    sent = {r["job_id"]: r for r in read_results(report)}

    async def listed(request: Request) -> JSONResponse:
        row = sent[request.query_params["job_id"]]
        item = {"event_id": f"evt_{row['job_id']}", "event_type": "task_note.created",
                "webhook_url": "https://x", "delivery_status": "failed",
                "created_at": "2026-11-30T10:00:00.000Z", "job_id": row["job_id"],
                "access_token_reference_id": "ref-north",  # for south's job too
                "data": {"task_note_id": row["task_note_id"], "emr_note_id": "n-1",
                         "emr_task_id": row["emr_task_id"], "note": "(not compared)"}}
        return JSONResponse({"success": True, "webhook_events": [item], "pagination": {
            "current_page": 1, "total_pages": 1, "total_count": 1, "page_size": 100}})

    with ThreadedServer(Starlette(routes=[Route("/v1/webhook-events", listed)])) as cobalt:
        path = accounts_config_file(tmp_path, cobalt.url, accounts)
        assert main(["-q", "poll", str(path)]) == 1
    results = read_results(report)
    assert [(r["account"], r["final_status"], r["outcome"]) for r in results] == [
        ("north", "confirmed", "created"), ("south", "ambiguous", "conflict")]
    assert "another account's connection" in results[1]["detail"]


def test_an_accounts_rate_holds_it_while_the_others_go_at_full_speed(tmp_path: Path) -> None:
    """South limited to 2 requests a second: its requests reach Cobalt at most that often,
    while north (no limit of its own) is not held to south's pace. Ratios from the
    emulator's own arrival times, measured in this one run."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("south", 5) + rows_for("north", 20),
                         header=HEADER)
    with emulator() as server:
        outcome = run_pipeline(accounts_config(tmp_path, server.url,
                                               south={"rate_per_second": 2}), str(csv_path))
        arrived = list(server.emulator.arrived_by)
        assert server.emulator.stored_by == {"ref-south": 5, "ref-north": 20}
    assert outcome.report is not None
    south = [t for t, ref in arrived if ref == "ref-south"]
    north = [t for t, ref in arrived if ref == "ref-north"]
    south_gap = (south[-1] - south[0]) / (len(south) - 1)  # seconds between requests
    north_gap = (north[-1] - north[0]) / (len(north) - 1)
    # 2/s: 0.5 s apart on average (a late wake-up may only stretch it; jitter in
    # arriving could at most shave the odd slot, hence 0.8)
    assert south_gap >= 0.8 * 0.5
    assert north_gap * 4 < south_gap, "north was held to south's rate"
    # north did not wait for south: most of its requests came before south's last one
    assert sum(t < south[-1] for t in north) > len(north) // 2


def html_accounts(report: Path) -> dict[str, dict[str, int]]:
    """report.html's per-account table: account -> {column: count}."""
    html = (report / "report.html").read_text()
    table = html[html.index('<table id="accounts">'):]
    table = table[:table.index("</table>")]
    heads = re.findall(r"<th>([^<]*)</th>", table)[1:]
    found = {}
    for cells in re.findall(r"<tr><td>(.*?)</tr>", table):
        name, *counts = re.findall(r"([^<>]+)</td>", "<td>" + cells)
        found[name] = {h: int(c.replace(",", "")) for h, c in zip(heads, counts, strict=True)
                       if c != "0"}
    return found


def test_poll_settles_an_accounts_ambiguous_row_by_its_own_note(tmp_path: Path) -> None:
    """South's note was stored, then answered 500 (ambiguous, no job id), and every webhook
    lost: poll looks for that note among south's events, by south's ledger key (its account,
    task and note), and the row ends confirmed by that evidence (the accounts' reference
    ids configured); nothing sent twice."""
    rows = rows_for("north", 2) + rows_for("south", 2)
    faults = Faults(rate_500_after_store=1.0, only_tasks=frozenset({"south-1"}),
                    drop_webhooks=1.0)
    with emulator(faults=faults) as server:
        path, report = sent_without_webhooks(tmp_path, server, rows, {
            "north": {"reference_id": "ref-north"}, "south": {"reference_id": "ref-south"}})
        assert by_account(read_results(report))["south"] == {"ambiguous": 1,
                                                             "awaiting_outcome": 1}
        assert main(["-q", "poll", str(path)]) == 0
        sent = [server.stored(task, note) for task, note, _ in rows]
    assert sent == [1, 1, 1, 1]
    results = {r["emr_task_id"]: r for r in read_results(report)}
    assert {r["final_status"] for r in results.values()} == {"confirmed"}
    assert results["south-1"]["detail"] == (
        "settled by evidence: a task_note.created event carries this note")


def test_polling_holds_an_account_to_its_rate(tmp_path: Path) -> None:
    """Polling per job, south (2 requests a second) is asked at most that often, while
    north's queries are not held to south's pace: ratios of the emulator's query times."""
    rows = rows_for("south", 4) + rows_for("north", 12)
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        path, _ = sent_without_webhooks(tmp_path, server, rows,
                                        {"north": {}, "south": {"rate_per_second": 2}})
        assert main(["-q", "poll", str(path)]) == 0
        times = [t for t, _ in server.emulator.event_queries]
        refs = [ref for ref, _, _ in server.emulator.queried_by]
    south = [t for t, ref in zip(times, refs, strict=True) if ref == "ref-south"]
    north = [t for t, ref in zip(times, refs, strict=True) if ref == "ref-north"]
    assert (len(south), len(north)) == (4, 12)  # one query a job (per_job_below: 20)
    south_gap = (south[-1] - south[0]) / (len(south) - 1)
    north_gap = (north[-1] - north[0]) / (len(north) - 1)
    assert south_gap >= 0.8 * 0.5  # see test_an_accounts_rate_holds_it_...
    assert north_gap * 4 < south_gap, "north was held to south's rate"


def test_a_sandbox_aims_429s_at_one_account_from_its_config(tmp_path: Path) -> None:
    """sandbox.emulator.faults.only_references names one account (in a sandbox its
    reference id is its name): every try of south's notes meets a 429 until
    submit.max_attempts, so they end send_failed; north's and west's are all confirmed."""
    csv_path = write_csv(tmp_path / "input.csv",
                         rows_for("south", 2) + rows_for("north", 3) + rows_for("west", 2),
                         header=HEADER)
    config = accounts_config(tmp_path, submit={"max_attempts": 2}, sandbox={
        "enabled": True, "wait_s": 30, "emulator": {
            "latency_ms": [0, 0], "outcome_delay_ms": [5, 30],
            "faults": {"rate_429": 1.0, "retry_after_s": 0, "only_references": ["south"]}}})
    outcome = run_pipeline(config, str(csv_path))
    assert outcome.report is not None
    assert by_account(read_results(outcome.report.directory)) == {
        "south": {"send_failed": 2}, "north": {"confirmed": 3}, "west": {"confirmed": 2}}


def test_poll_goes_on_for_the_others_when_one_accounts_page_cannot_be_read(
        tmp_path: Path) -> None:
    """Cobalt answers south's token with a page holding an item of neither documented
    shape: south's poll stops, with a line naming south, and north's outcome is still
    fetched and confirms north's row; exit 3."""
    rows = rows_for("north", 1) + rows_for("south", 1)
    accounts: dict[str, dict[str, Any]] = {"north": {}, "south": {}}
    with emulator(faults=Faults(drop_webhooks=1.0)) as server:
        path, report = sent_without_webhooks(tmp_path, server, rows, accounts)
    sent = {r["job_id"]: r for r in read_results(report)}

    async def listed(request: Request) -> JSONResponse:
        row = sent[request.query_params["job_id"]]
        item: dict[str, Any] = {"uuid": "u1", "kind": "task_note.created"}  # neither shape
        if request.headers["access_token"] == TOKENS["north"]:
            item = {"event_id": f"evt_{row['job_id']}", "event_type": "task_note.created",
                    "created_at": "2026-11-30T10:00:00.000Z", "job_id": row["job_id"],
                    "access_token_reference_id": "ref-north",
                    "data": {"task_note_id": row["task_note_id"], "emr_note_id": "n-1",
                             "emr_task_id": row["emr_task_id"], "note": "(not compared)"}}
        return JSONResponse({"success": True, "webhook_events": [item], "pagination": {
            "current_page": 1, "total_pages": 1, "total_count": 1, "page_size": 100}})

    with ThreadedServer(Starlette(routes=[Route("/v1/webhook-events", listed)])) as cobalt:
        path = accounts_config_file(tmp_path, cobalt.url, accounts)
        result = jobs.poll(path)
    assert result.exit_code == 3
    assert result.stats is not None
    (reason,) = result.stats.stopped.values()
    assert reason.startswith("account south: GET /v1/webhook-events (job_id=")
    assert "item 1 of 1 cannot be read: an item has fields kind, uuid" in reason
    assert by_account(read_results(report)) == {"north": {"confirmed": 1},
                                                "south": {"awaiting_outcome": 1}}


def test_another_configs_account_on_shared_state_is_not_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Clinics with a config each on one state (the PostgreSQL topology): each run warned
    of every other clinic's notes as if a clinic of its own were renamed (attacker
    finding). Listed in ``state.other_accounts``, the other clinic's label is not warned
    of; an unlisted one still is, naming the key."""
    csv_path = write_csv(tmp_path / "input.csv", rows_for("north", 2), header=HEADER)
    data = config_dict(tmp_path)
    single = {"client_id": CREDENTIALS["client_id"], "timeout_s": 5,
              "client_secret": CREDENTIALS["client_secret"]}
    with emulator() as server:
        north = {**single, "base_url": server.url, "access_token": TOKENS["north"],
                 "account": "north_clinic"}
        run_pipeline(RunConfig.model_validate({**data, "api": north}), str(csv_path))
        south = {**single, "base_url": server.url, "access_token": TOKENS["south"],
                 "account": "south_clinic"}
        for others, warned in (((), 1), (("north_clinic",), 0)):
            caplog.clear()
            config = RunConfig.model_validate({**data, "api": south, "state": {
                **data.get("state", {}), "other_accounts": list(others)}})
            run_pipeline(config, str(csv_path), dry_run=True)
            found = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                     and "sent notes under account" in r.getMessage()]
            assert len(found) == warned, found
            if found:
                assert "'north_clinic'" in found[0]
                assert "state.other_accounts" in found[0]
