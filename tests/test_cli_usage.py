"""Using the command: help, flags, verbosity, --limit, and what validate checks and writes."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import config_dict, notes, write_config, write_csv
from pipeline.cli import build_parser, main, result_line
from pipeline.reconciliation import FINAL_STATUSES

EXIT_CODE_LINES = ("0  every row ended well", "1  the command finished", "2  bad usage",
                   "3  aborted")


def tasknotes(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **commands.choices}


def test_bare_tasknotes_prints_the_help_with_the_exit_codes(tmp_path: Path) -> None:
    """`tasknotes` alone shows the help (commands and exit codes), not an error; exit 2."""
    done = tasknotes(cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout.startswith("usage: tasknotes")
    for name in ("run", "validate", "sink", "poll", "reconcile", "emulator"):
        assert f"    {name} " in done.stdout
    for line in EXIT_CODE_LINES:
        assert line in done.stdout
    assert "error" not in done.stderr


@pytest.mark.parametrize("command", ["", "run", "validate", "sink", "poll", "reconcile",
                                     "emulator"])
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    """Each option of each command has a help text, and the help shows its default (a default
    of None is described in the help's own words); every --help lists exit codes (each
    command its own: test_each_command_help_gives_its_own_exit_codes)."""
    parser = _subparsers()[command]
    text = parser.format_help()
    assert "exit codes" in text
    for line in EXIT_CODE_LINES if command in ("", "run") else ():
        assert line in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) or (
                not action.option_strings):
            continue
        assert action.help, action.option_strings
        shown = parser._get_formatter()._get_help_string(action) or ""
        assert "(default:" in shown, action.option_strings


@pytest.mark.parametrize(
    ("argv", "verbose", "quiet"),
    [(["run", "c.yaml"], 0, False),
     (["run", "c.yaml", "-q"], 0, True),
     (["validate", "c.yaml", "-v", "-v"], 2, False),
     (["-v", "poll", "c.yaml"], 1, False),
     (["-q", "reconcile", "c.yaml", "-v"], 1, True)],
)
def test_quiet_and_verbose_work_before_or_after_the_subcommand(
    argv: list[str], verbose: int, quiet: bool
) -> None:
    """-q/-v are accepted after the subcommand too; one given before is not reset by it."""
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


@pytest.mark.slow
def test_a_sandbox_run_is_quiet_by_default_and_tells_each_webhook_with_v(
    tmp_path: Path,
) -> None:
    """Default stderr of a sandbox run is a handful of lines, not one per webhook; `run -v`
    (after the subcommand) shows a line per webhook."""
    rows = 40
    write_csv(tmp_path / "input.csv", notes(rows))
    config = write_config(tmp_path, sandbox={
        "enabled": True, "wait_s": 30, "emulator": {"outcome_delay_ms": [1, 20]}})
    quiet = tasknotes("run", str(config), "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stderr.splitlines()) <= 8, quiet.stderr
    assert "webhook evt_" not in quiet.stderr
    assert "40 of 40 notes confirmed" in quiet.stdout
    write_csv(tmp_path / "input.csv", notes(rows, prefix="again"))
    loud = tasknotes("run", str(config), "--no-progress", "-v", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert sum("webhook evt_" in line for line in loud.stderr.splitlines()) == rows


def test_a_limit_run_says_where_it_stopped_and_how_much_was_left_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--limit N: the output says reading stopped (file, line) and how many rows were left
    unread, also across further files; rows past the cut reach neither rejects.csv nor the
    problem table."""
    first = [*notes(5), ["bad id", "x"], ["", "no id"]]  # the bad rows come after the cut
    write_csv(tmp_path / "a.csv", first)
    write_csv(tmp_path / "b.csv", [*notes(4, prefix="b"), ["", "no id"]])
    config = write_config(tmp_path, input={"path": str(tmp_path / "*.csv")})
    assert main(["run", str(config), "--dry-run", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert (f"--limit 3 reached: stopped reading at {tmp_path / 'a.csv'} line 5; 9 rows "
            "left unread") in out
    assert "problem" not in out
    assert "rejects:" not in out
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    ("api", "env", "message"),
    [pytest.param({"access_token": "${TASKNOTES_TEST_TOKEN}"}, {},
                  "api.access_token: environment variable TASKNOTES_TEST_TOKEN is not set",
                  id="variable-unset"),
     pytest.param({"client_id": None}, {}, "api.client_id: required to send requests, but not set",
                  id="credential-missing"),
     pytest.param({"access_token": "${TASKNOTES_TEST_TOKEN}"},
                  {"TASKNOTES_TEST_TOKEN": "from-env"}, None, id="variable-set")],
)
@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_validate_and_dry_run_check_the_secrets_run_would_need(
    tmp_path: Path, api: dict[str, str | None], env: dict[str, str], message: str | None,
    command: list[str],
) -> None:
    """validate and --dry-run stop, exit 2, naming the key and the variable, where run would
    stop for want of a credential; with it they go on to count the rows."""
    write_csv(tmp_path / "input.csv", notes(3))
    config = write_config(tmp_path, api={**config_dict(tmp_path)["api"], **api})
    clean = {k: v for k, v in os.environ.items() if k != "TASKNOTES_TEST_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "pipeline", *command[:1], str(config),
                           *command[1:]], cwd=tmp_path, text=True, capture_output=True,
                          timeout=120, check=False, env={**clean, **env})
    if message is None:
        assert done.returncode == 0, done.stderr
        assert "would send 3" in done.stdout
        return
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"tasknotes: {message}"]
    assert "would send" not in done.stdout
    assert "from-env" not in done.stdout + done.stderr


def test_validate_in_a_sandbox_checks_the_webhook_secret_resolves(tmp_path: Path) -> None:
    """A sandbox run signs webhooks with webhooks.secret: validate names its unset variable."""
    write_csv(tmp_path / "input.csv", notes(2))
    config = write_config(tmp_path, webhooks={"secret": "${TASKNOTES_TEST_HOOK}"},
                          sandbox={"enabled": True})
    done = tasknotes("validate", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tasknotes: webhooks.secret: environment variable TASKNOTES_TEST_HOOK is not set"]
    ok = tasknotes("validate", str(config), cwd=tmp_path, env={"TASKNOTES_TEST_HOOK": "s"})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_an_empty_config_file_is_an_error_naming_input_path(tmp_path: Path, text: str) -> None:
    """An empty config is not a config of defaults: exit 2, naming input.path."""
    (tmp_path / "empty.yaml").write_text(text)
    done = tasknotes("validate", "empty.yaml", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("tasknotes: empty.yaml: the file is empty; input.path")


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_validate_and_dry_run_write_nothing_but_rejects_and_say_where(
    tmp_path: Path, command: list[str]
) -> None:
    """Without rejects, validate and --dry-run leave nothing under reports/ (nor state/); with
    rejects, only rejects.csv, whose path they print."""
    write_csv(tmp_path / "input.csv", notes(3))
    config = write_config(tmp_path)
    clean = tasknotes(command[0], str(config), *command[1:], cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert not (tmp_path / "reports").exists()
    assert not (tmp_path / "state").exists()
    assert "rejects" not in clean.stdout
    write_csv(tmp_path / "input.csv", [*notes(3), ["", "no id"]])
    rejected = tasknotes(command[0], str(config), *command[1:], cwd=tmp_path)
    assert rejected.returncode == 1
    (report,) = (tmp_path / "reports").iterdir()
    assert [p.name for p in report.iterdir()] == ["rejects.csv"]
    assert f"rejects: {report / 'rejects.csv'}" in rejected.stdout
    with (report / "rejects.csv").open(newline="") as fh:
        assert [r[1:3] for r in csv.reader(fh)][1:] == [["5", "missing-task-id"]]
    assert not (tmp_path / "state").exists()
    assert yaml.safe_load(config.read_text())["report"]["dir"] == str(tmp_path / "reports")


@pytest.mark.parametrize(
    ("command", "present", "absent"),
    [pytest.param("run", ["0  every row ended well", "report.stale_after",
                          "3  aborted"], [], id="run"),
     pytest.param("validate", ["0  the config, its secrets and every row are valid",
                               "1  some rows would be rejected", "2  bad usage"],
                  ["3  aborted", "0  every row ended well"], id="validate"),
     pytest.param("sink", ["0  stopped by Ctrl-C (SIGINT) or SIGTERM",
                           "host:port cannot be listened on"],
                  ["1  ", "0  every row ended well"], id="sink"),
     pytest.param("emulator", ["0  stopped by Ctrl-C (SIGINT) or SIGTERM",
                               "host:port cannot be listened on"],
                  ["1  ", "0  every row ended well"], id="emulator"),
     pytest.param("poll", ["0  every row of the runs reconciled ended well",
                           "report.stale_after", "3  aborted: credentials refused"],
                  ["0  every row ended well"], id="poll"),
     pytest.param("reconcile", ["0  every row of the runs reconciled ended well",
                                "report.stale_after", "2  bad usage or config",
                                "3  aborted: the database of state.url"],
                  ["3  aborted: credentials refused", "0  every row ended well"],
                  id="reconcile"),
     pytest.param("status", ["0  nothing is open over any run", "1  something is open",
                             "awaiting an outcome (stale or not)", "2  bad usage or config"],
                  ["3  aborted", "0  every row ended well"], id="status")],
)
def test_each_command_help_gives_its_own_exit_codes(
    command: str, present: list[str], absent: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`tasknotes COMMAND --help` lists that command's exit codes, not run's; the commands
    whose exit 1 can come from rows awaiting an outcome too long say so."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    epilog = out[out.index("exit codes"):]
    for text in present:
        assert text in epilog, (text, epilog)
    for text in absent:
        assert text not in epilog, (text, epilog)


def _config_with_env_refs(tmp_path: Path) -> Path:
    write_csv(tmp_path / "input.csv", notes(2))
    refs = {"client_id": "${T_CLIENT_ID}", "client_secret": "${T_CLIENT_SECRET}",
            "access_token": "${T_ACCESS_TOKEN}"}
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump(config_dict(
        tmp_path, api=refs, webhooks={"secret": "${T_WEBHOOK_SECRET}"}), sort_keys=False))
    return path


SECRETS = {"T_CLIENT_ID": "cid-4471", "T_CLIENT_SECRET": "csec-4472",
           "T_ACCESS_TOKEN": "tok-4473", "T_WEBHOOK_SECRET": "hook-4474"}


@pytest.mark.parametrize(
    ("env", "named"),
    [pytest.param({}, ["api.client_id: environment variable T_CLIENT_ID is not set",
                       "api.client_secret: environment variable T_CLIENT_SECRET is not set",
                       "api.access_token: environment variable T_ACCESS_TOKEN is not set"],
                  id="all-unset"),
     pytest.param({**SECRETS, "T_ACCESS_TOKEN": ""},
                  ["api.access_token: environment variable T_ACCESS_TOKEN is set but empty"],
                  id="set-but-empty")],
)
def test_validate_names_every_secret_variable_not_set_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str], named: list[str],
) -> None:
    """validate with secrets missing: one line, exit 2, naming every variable not set (not
    only the first) and a variable set to the empty string as such."""
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = _config_with_env_refs(tmp_path)
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line == "tasknotes: " + "; ".join(named)
    assert not any(value in captured.out + captured.err for value in SECRETS.values())


def test_validate_warns_that_the_sink_needs_the_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The api secrets set, the webhook secret not: validate passes (run does not need it)
    but says the sink will refuse to start without it, naming the key and the variable."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("T_WEBHOOK_SECRET")
    path = _config_with_env_refs(tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("warning: webhooks.secret: environment variable T_WEBHOOK_SECRET is not set; "
            "`tasknotes sink` will refuse to start without a webhook secret") in out
    monkeypatch.setenv("T_WEBHOOK_SECRET", SECRETS["T_WEBHOOK_SECRET"])
    assert main(["validate", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [pytest.param(["run", "c.yaml", "--limit", "abc"], "usage: tasknotes run ",
                  "tasknotes run: error: argument --limit: not a whole number: 'abc'",
                  id="limit-not-a-number"),
     pytest.param(["emulator", "--fail-rate", "lots"], "usage: tasknotes emulator ",
                  "tasknotes emulator: error: argument --fail-rate: Input should be a valid "
                  "number, unable to parse string as a number, not 'lots'",
                  id="fraction-not-a-number"),
     pytest.param(["validate", "c.yaml", "--limit", "5"], "usage: tasknotes validate ",
                  "tasknotes validate: error: unrecognized arguments: --limit 5",
                  id="flag-of-another-command")],
)
def test_a_usage_error_names_the_command_and_the_problem(
    argv: list[str], usage: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag value or a flag the command lacks: that command's usage and a plain
    reason (never a Python function's name such as _positive), exit 2."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert err.splitlines()[-1] == error
    assert "_positive" not in err


@pytest.mark.parametrize(
    ("counts", "line"),
    [pytest.param({"confirmed": 1, "skipped_duplicate": 1},
                  "1 of 2 notes confirmed; 1 duplicate skipped", id="one-duplicate"),
     pytest.param({"confirmed": 0, "skipped_duplicate": 1001},
                  "0 of 1,001 notes confirmed; 1,001 duplicates skipped", id="many"),
     pytest.param({"confirmed": 1}, "1 of 1 note confirmed", id="one-note")],
)
def test_the_result_line_says_one_in_the_singular(counts: dict[str, int], line: str) -> None:
    """Counts of one read "1 duplicate skipped", "of 1 note", never "1 duplicates"."""
    assert result_line({**dict.fromkeys(FINAL_STATUSES, 0), **counts}) == line
