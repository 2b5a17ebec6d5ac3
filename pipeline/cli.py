"""The ``tasknotes`` command: parse, load the config, call one front door (jobs.py), print.

Exit codes (the README's contract): 0 every row ended well; 1 the run finished but some
rows were rejected, failed or are ambiguous; 2 bad usage, config or input
(nothing was sent); 3 aborted (credentials refused, too many failures,
interrupted, disk full). ``status``: 0 nothing open, 1 something open, 2 bad
config; every command's own codes are in ``COMMAND_EXIT_CODES`` (its --help).
A user error is one line on stderr, never a traceback. This is the one
module that prints; nothing it prints holds a note's text. Every code is decided
by exits.py. Over 400 lines because every command's flags, help and printed
tables live here, and nothing else does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, cast

from pipeline import exits, logs
from pipeline._version import __version__
from pipeline.config import MAX_RETENTION_DAYS, RunConfig, load_config
from pipeline.errors import PipelineError, RunAborted
from pipeline.faults import Behaviour, Faults, add_knob_options, knob_values, knobs_from_args

if TYPE_CHECKING:
    from pipeline.jobs import ReconcileResult, RunResult
    from pipeline.plan import ScanCounts
    from pipeline.polling import PollStats

log = logging.getLogger("pipeline")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tasknotes`` and ``python -m pipeline``; returns the exit code.

    Everything the command creates (ledger, sink file, reports, their directories)
    is created readable by its owner only: umask 077 while it runs.
    """
    umask = os.umask(0o077)
    stdout = sys.stdout
    sys.stdout = _ClosedReaderSafe(stdout)  # `tasknotes status | head`: no traceback
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command they were given to, with that command's usage
            (getattr(args, "command_parser", None) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:  # bare `tasknotes`: the help, not an error message
            parser.print_help()
            return exits.USAGE
        _logging(args.verbose, args.quiet, args.log_format, getattr(args, "config", None))
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the run record's argv
        return int(args.handler(args))
    except (PipelineError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        error = _user_error(exc)
        if error is None:
            raise
        code = exits.for_error(error) or exits.USAGE
        if not logs.error_as_json(str(error), code):  # else every line is JSON
            print(f"tasknotes: {error}", file=sys.stderr)
        return code
    finally:
        sys.stdout = stdout
        os.umask(umask)  # for a caller that runs main() in its own process (the tests)


class _ClosedReaderSafe(io.TextIOBase):
    """stdout that goes quiet once its reader has gone (``| head``): the rest of the
    output is dropped, the command runs to its end and keeps its own exit code, and no
    BrokenPipeError traceback is printed (Python's docs, "Note on SIGPIPE")."""

    def __init__(self, inner: TextIO) -> None:
        self._inner: TextIO | None = inner

    def write(self, text: str) -> int:
        if self._inner is not None:
            try:
                self._inner.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if self._inner is not None:
            try:
                self._inner.flush()
            except BrokenPipeError:
                self._gone()

    def isatty(self) -> bool:
        return self._inner is not None and self._inner.isatty()

    @property
    def buffer(self) -> BinaryIO:
        """The binary side (export-events to stdout), as quiet once the reader has gone."""
        return cast("BinaryIO", _QuietBytes(None if self._inner is None else self._inner.buffer))

    def _gone(self) -> None:
        """Point the real stdout at /dev/null, so the interpreter's last flush is quiet."""
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._inner.fileno() if self._inner else 1)
            os.close(devnull)
        self._inner = None



class _QuietBytes(io.RawIOBase):
    """A binary stream whose writes stop (dropped) once its reader has gone."""

    def __init__(self, inner: BinaryIO | None) -> None:
        self._inner = inner

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._inner is not None:
            try:
                self._inner.write(data)
            except BrokenPipeError:
                self._inner = None
        return len(data)

    def flush(self) -> None:
        if self._inner is not None:
            try:
                self._inner.flush()
            except BrokenPipeError:
                self._inner = None


def _user_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError (or interrupt) behind ``exc``, looking inside task-group wrappers."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, KeyboardInterrupt):
        return RunAborted("interrupted")
    return exc if isinstance(exc, PipelineError) else None


def _logging(verbose: int, quiet: bool, log_format: str | None = None,
             config: Path | None = None) -> None:
    """stderr logging: INFO by default (a handful of lines a run), DEBUG with -v (a line per
    webhook and event), WARNING with -q; the HTTP libraries at WARNING below -vv. Text or
    JSON lines (--log-format, else the config's logging.format: pipeline/logs.py)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logs.configure(level, log_format, config)
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


EXIT_CODES = """\
exit codes:
  0  every row ended well (accepted, confirmed, or rightly skipped)
  1  the command finished, but some rows were rejected, failed or are ambiguous,
     or await an outcome longer than report.stale_after
  2  bad usage, bad config or unreadable input, another run holds the account's
     run lock, or the database of state.url cannot be reached: nothing was sent
  3  aborted: credentials refused, too many consecutive failures, interrupted,
     disk full, Cobalt's answers could not be read, or the database of state.url
     went away or kept conflicting (requests in flight are then ambiguous)"""
# Each command's own meaning of its exit codes, shown by its --help (the README's contract).
_RECONCILED = """\
  0  every row of the runs reconciled ended well (awaiting rows not yet stale)
  1  some row of them needs attention: rejected, failed, ambiguous, not sent, or
     awaiting an outcome longer than report.stale_after"""
COMMAND_EXIT_CODES = {
    "run": EXIT_CODES,
    "validate": """\
exit codes:
  0  the config, its secrets and every row are valid: run would send them
  1  some rows would be rejected (rejects.csv says which and why)
  2  bad usage, bad config, a secret not set, or unreadable input""",
    "sink": """\
exit codes:
  0  stopped by Ctrl-C (SIGINT) or SIGTERM, after a graceful shutdown
  2  bad usage or config (no webhook secret), host:port cannot be listened on, or
     the database of state.url cannot be reached""",
    "export-events": """\
exit codes:
  0  every stored event was written
  2  bad usage or config (no state.url), or the database cannot be read""",
    "migrate-state": """\
exit codes:
  0  copied (runs and events already in the database are left as they are)
  2  bad usage or config (no state.url), the ledger or sink file cannot be read,
     or the database cannot be used or already has rows with the ledger's row ids""",
    "poll": f"""\
exit codes (of the reconcile that follows the poll):
{_RECONCILED}
  2  bad usage or config, no ledger yet, or the database of state.url cannot be
     reached
  3  aborted: credentials refused, Cobalt kept failing, or a page could not be read
     (with api.accounts: for any account; the others are polled to the end); or
     the database of state.url went away or kept conflicting""",
    "reconcile": f"""\
exit codes:
{_RECONCILED}
  2  bad usage or config, no ledger yet, or the database of state.url cannot be
     reached
  3  aborted: the database of state.url went away or kept conflicting""",
    "status": """\
exit codes:
  0  nothing is open over any run
  1  something is open: awaiting an outcome (stale or not), ambiguous, not sent,
     failed in the EMR with a retryable reason, or a run in progress
  2  bad usage or config, or the database of state.url cannot be reached
  3  the database of state.url went away while it was read (ask again)""",
    "prune": """\
exit codes:
  0  pruned (or, with --dry-run, counted) what is older than the limit
  1  pruned, but some old run's directory could not be (each named as left)
  2  bad usage or config (no limit: neither --older-than nor state.retention_days),
     or another prune is running
  3  stopped: the disk has no room for the sink file's copy""",
    "emulator": """\
exit codes:
  0  stopped by Ctrl-C (SIGINT) or SIGTERM
  2  bad usage, or host:port cannot be listened on""",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default (``off`` for a switch; none shown when the default is
    None, whose help text says what happens) and the epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == [] or "(default:" in (action.help or ""):
            return action.help
        if action.default is False:
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


def _verbosity(parser: argparse.ArgumentParser, *, default: object) -> None:
    """-v/-q, before or after the subcommand: the subcommand's copy defaults to SUPPRESS,
    so it leaves the top-level value alone unless given."""
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more detail on stderr: a line per webhook and per event "
                             "(-vv: the HTTP libraries too) (default: off)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings and errors only on stderr (default: off)")
    parser.add_argument("--log-format", choices=logs.FORMATS,
                        default=None if default == 0 else default,
                        help="stderr as text lines, or one JSON object a line (default: the "
                             "config's logging.format, else text)")


def build_parser() -> argparse.ArgumentParser:
    """``tasknotes``' argument parser: every command, its flags and their help, as ``main``
    parses them (its ``parse_args`` gives the Namespace a command's handler takes; a
    command's exit codes are in its epilog). For tools that check or document arguments
    without running a command."""
    parser = argparse.ArgumentParser(
        prog="tasknotes", formatter_class=_Formatter,
        epilog=EXIT_CODES + "\n\nEach command's --help gives its own exit codes.",
        description="Append notes to EMR tasks through Cobalt, from CSV, and prove what "
                    "happened to every row.")
    parser.add_argument("--version", action="version", version=f"tasknotes {__version__}")
    _verbosity(parser, default=0)
    parser.set_defaults(quiet=False)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, parents=[common],
                                  formatter_class=_Formatter, epilog=COMMAND_EXIT_CODES[name])
        sub.set_defaults(command_parser=sub)
        return sub

    run = command("run", "validate, send, collect outcomes, report")
    _config_arg(run)
    _inputs_arg(run)
    run.add_argument("--dry-run", action="store_true",
                     help="validate and count what would be sent; send nothing, write no ledger")
    run.add_argument("--limit", type=_positive, metavar="N",
                     help="send at most N rows (the first N that need sending), then stop "
                          "reading (default: no limit)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (it is shown only on a terminal anyway)")
    run.add_argument("--force", action="store_true",
                     help="DANGEROUS: send rows the ledger says were already sent; "
                          "each one lands in the chart again")
    run.set_defaults(handler=_run)

    validate = command("validate", "check the config, its secrets and the input; send nothing")
    _config_arg(validate)
    _inputs_arg(validate)
    validate.set_defaults(handler=_validate)

    sink = command("sink", "receive Cobalt's webhooks into the sink file (or state.url's "
                           "database)")
    _config_arg(sink)
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sink.add_argument("--port", type=int, default=8787, help="port to listen on")
    sink.set_defaults(handler=_sink)

    poll = command("poll", "fetch outcomes of unresolved jobs and ambiguous rows from Cobalt, "
                           "then reconcile as `reconcile` does")
    _config_arg(poll)
    poll.add_argument("--run-id", type=_run_id,
                      help="poll only this run's rows (default: every run with unresolved "
                           "rows); reconciling still covers every run whose report can change")
    poll.set_defaults(handler=_poll)

    reconcile = command("reconcile", "re-join ledger and sink; rewrite reports")
    _config_arg(reconcile)
    reconcile.add_argument("--run-id", type=_run_id,
                           help="only this run (default: runs with unresolved rows)")
    reconcile.set_defaults(handler=_reconcile)

    status = command(
        "status", "what is open over every run, and what settles it (exit 0 none, 1 some)")
    _config_arg(status)
    status.add_argument("--json", action="store_true",
                        help="print the documented JSON shape (README) instead of text")
    status.add_argument("--write-off", metavar="RUN_ID",
                        help="close this run's unsent (send_failed) rows without sending them,"
                             " recorded in the ledger, and rewrite its report (default: none)")
    status.set_defaults(handler=_status)

    _state_commands(command)

    emulator = command("emulator", "a local Cobalt look-alike, with faults")
    _emulator_args(emulator)
    emulator.set_defaults(handler=_emulator)
    return parser


def _state_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The commands that look after stored state: export-events, migrate-state, prune."""
    export = command("export-events", "write the sink's events stored in PostgreSQL "
                                      "(state.url) as JSON Lines, as received")
    _config_arg(export)
    export.add_argument("--out", type=Path, metavar="FILE",
                        help="write to FILE (replaced whole, 0600) instead of stdout")
    export.set_defaults(handler=_export_events)

    _migrate_args(command("migrate-state", "copy a SQLite ledger (and a sink file's events) "
                                           "into PostgreSQL (state.url); safe to repeat"))

    prune = command("prune", "remove note text kept at rest past the retention limit "
                             "(sink events, input copies); never what was sent")
    _config_arg(prune)
    prune.add_argument("--older-than", type=_days, metavar="DAYS",
                       help="prune what is older than DAYS days (default: state.retention_days)")
    prune.add_argument("--dry-run", action="store_true",
                       help="say what would be removed; remove nothing")
    prune.set_defaults(handler=_prune)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG", help="YAML config file")


def _inputs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="PATH",
                        help="input CSV file or glob (repeatable); overrides input.path "
                             "(default: input.path)")


def _run_id(text: str) -> str:
    """A run id as given (an empty one would mean "every run": refused, as a usage error)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a run (a directory name under report.dir)")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _emulator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8788, help="port to listen on")
    add_knob_options(p)  # every knob of faults.py with a flag, checked as the config is


# -- commands ----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from pipeline import jobs

    config = jobs.load(args.config, "run")
    result = jobs.run(config, inputs=args.input, dry_run=args.dry_run, limit=args.limit,
                      progress=not args.no_progress, force=args.force, argv=args.argv)
    if args.dry_run:
        _print_scan(result, dry_run=True, limit=args.limit)
        return result.exit_code
    if result.scan.problems.counts:
        _print_problems(result)
    if result.report is not None:
        _print_result(result.report.counts, str(result.report.directory),
                      result.report.files)
    else:  # no report (a full disk): what the ledger knows, which needs no writing
        _print_unwritten(config, result.run_id)
    _print_limit(result.scan, args.limit)
    if result.stop_reason:
        print(f"stopped: {result.stop_reason}")
    return result.exit_code


def _validate(args: argparse.Namespace) -> int:
    from pipeline import jobs

    config = jobs.load(args.config, "validate")  # the secrets run would need, resolved
    result = jobs.validate(config, args.input)
    _print_scan(result, dry_run=False)
    if not config.sandbox.enabled:  # the sink runs apart, but refuses to start without it
        try:
            missing = not load_config(args.config, needs=("webhooks",)).webhooks.all_secrets()
            problem = "webhooks.secret: not set"
        except PipelineError as exc:
            missing, problem = True, str(exc)
        if missing:
            print(f"warning: {problem}; `tasknotes sink` will refuse to start without a "
                  "webhook secret (run itself does not need it)")
    return result.exit_code


def _print_limit(scan: ScanCounts, limit: int | None) -> None:
    """The one line saying --limit stopped the reading, where, and how much is left."""
    if scan.truncated_at is None:
        return
    where, line = scan.truncated_at
    left = _n(scan.unread, "row") if scan.unread_exact else f"at least {_n(scan.unread, 'row')}"
    print(f"--limit {limit:,} reached: stopped reading at {where} line {line}; {left} "
          "left unread (not checked, not sent, not in this report)")


def _print_scan(result: RunResult, *, dry_run: bool, limit: int | None = None) -> None:
    c = result.scan
    _print_problems(result)
    valid = c.rows - c.rejected
    if c.rows == 0:
        print("0 rows: the input has a header and no data")
        return
    print(f"{_n(c.rows, 'row')}: {valid:,} valid, {c.rejected:,} rejected"
          + (f", {_n(c.blank, 'blank line')} skipped" if c.blank else ""))
    print(f"would send {c.to_send:,}; skip {_n(c.duplicates, 'duplicate')}, "
          f"{c.already_sent:,} already sent; hold {c.held:,}"
          + (" (dry run: nothing sent, ledger untouched)" if dry_run else ""))
    _print_limit(c, limit)
    if result.rejects is not None:
        print(f"rejects: {result.rejects}")


def _print_problems(result: RunResult) -> None:
    tally = result.scan.problems
    if not tally.counts:
        return
    width = max(len(code) for code in tally.counts)
    print(f"{'problem':<{width}}  {'rows':>7}  first lines")
    for code, n in sorted(tally.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines = ", ".join(str(line) for _, line in tally.examples.get(code, []))
        more = ", …" if n > len(tally.examples.get(code, [])) else ""
        print(f"{code:<{width}}  {n:>7,}  {lines}{more}")


def _print_result(counts: dict[str, int], directory: str, files: Sequence[str],
                  written_off: int = 0) -> None:
    shown = {k: v for k, v in counts.items() if v}
    if shown:
        width = max(len(k) for k in shown)
        print(f"{'final status':<{width}}  {'rows':>7}")
        for status, n in shown.items():
            print(f"{status:<{width}}  {n:>7,}")
    print(f"report: {directory}/ ({', '.join(files)})")
    print(result_line(counts, written_off))


def _print_unwritten(config: RunConfig, run_id: str) -> None:
    from pipeline.report import known_counts

    try:
        counts = known_counts(config, run_id)
    except PipelineError as exc:
        print(f"run {run_id}: no report, and the ledger cannot be read: {exc}")
        return
    shown = {k: v for k, v in counts.items() if v}
    if shown:
        width = max(len(k) for k in shown)
        print(f"{'final status':<{width}}  {'rows':>7}")
        for status, n in shown.items():
            print(f"{status:<{width}}  {n:>7,}")
    print(f"report: not written (run {run_id}); `tasknotes reconcile` writes it once "
          "there is room")
    print(result_line(counts))


def result_line(counts: dict[str, int], written_off: int = 0) -> str:
    """The one line ``run`` and ``reconcile`` print for a run: ``counts`` (rows by final
    status, every status of ``FINAL_STATUSES`` present) as "N of M notes confirmed" and
    each other nonzero status by its label (``FINAL_STATUS_LABELS``), counts of one in the
    singular; ``written_off``: how many of them an operator wrote off."""
    from pipeline.reconciliation import FINAL_STATUS_LABELS

    total = sum(counts.values())
    parts = [f"{counts['confirmed']:,} of {_n(total, 'note')} confirmed"]
    labels = {k: v for k, v in FINAL_STATUS_LABELS.items() if k != "confirmed"}
    parts += [f"{_n(counts[k], 'duplicate')} skipped" if k == "skipped_duplicate"
              else f"{counts[k]:,} {label}" for k, label in labels.items() if counts[k]]
    if written_off:
        parts.append(f"{written_off:,} of them written off by the operator, never sent")
    return "; ".join(parts)


def _sink(args: argparse.Namespace) -> int:
    from pipeline import jobs

    return jobs.serve_sink(args.config, host=args.host, port=args.port).exit_code


def _export_events(args: argparse.Namespace) -> int:
    from pipeline import jobs

    result = jobs.export_events(args.config, sys.stdout.buffer if args.out is None
                                else args.out)
    return result.exit_code


def _migrate_args(migrate: argparse.ArgumentParser) -> None:
    _config_arg(migrate)
    migrate.add_argument("--from-sqlite", type=Path, metavar="LEDGER", required=True,
                         help="the SQLite ledger to copy (state.ledger of the old install)")
    migrate.add_argument("--sink", type=Path, metavar="FILE",
                         help="also copy this sink file's events, with their receipts "
                              "(default: none)")
    migrate.set_defaults(handler=_migrate_state)


def _migrate_state(args: argparse.Namespace) -> int:
    from pipeline import jobs

    result = jobs.migrate_state(load_config(args.config), args.from_sqlite, args.sink)
    ledger, sink = result.ledger, result.sink
    print(f"ledger {args.from_sqlite}: {ledger.runs:,} runs ({ledger.rows:,} rows) and "
          f"{ledger.events:,} mirrored events copied; {ledger.runs_there:,} runs were in "
          "the database already")
    if sink is not None:
        print(f"sink {args.sink}: {sink.sink_events:,} events copied; {sink.sink_there:,} "
              "were in the database already")
    return result.exit_code


def _poll(args: argparse.Namespace) -> int:
    from pipeline import jobs

    result = jobs.poll(args.config, args.run_id)
    if result.sandbox:
        print("nothing to poll: the sandbox's Cobalt emulator lives only while `tasknotes run` "
              "runs (outcomes it never delivered ended with it); `tasknotes reconcile "
              f"{args.config}` re-reads the sink")
    elif result.stats is None:
        print("nothing to poll: every accepted row has an outcome event in the sink, and "
              "no ambiguous row waits for one")
    else:
        _print_poll(result.stats)
    if result.reconciled is not None:
        _print_reconciled(result.reconciled)
    return result.exit_code


def _print_poll(stats: PollStats) -> None:
    skipped = "".join(f" ({n:,} of account {a} not polled)"
                      for a, n in sorted(stats.not_polled.items()))
    print(f"polled {_n(stats.wanted, 'job')} and {_n(stats.ambiguous, 'ambiguous note')}"
          f"{skipped} with {_n(stats.requests, 'request')}: {_n(stats.stored, 'event')} "
          "stored, "
          f"{stats.duplicates:,} already in the event store (not stored again), "
          f"{_n(stats.still_missing, 'job')} still "
          f"without an outcome, {stats.ambiguous_found:,} ambiguous "
          f"{'note' if stats.ambiguous_found == 1 else 'notes'} found in a "
          "task_note.created event")
    if stats.delivered_but_missing:
        print(f"{stats.delivered_but_missing:,} of the events stored are listed by Cobalt "
              "as delivered: to another webhook URL, or to a receiver that did not keep them")
    for account in sorted(stats.stopped):  # api.accounts: the others were polled
        print(f"stopped: {stats.stopped[account]}")


def _n(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is one: "1 job"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _reconcile(args: argparse.Namespace) -> int:
    from pipeline import jobs

    result = jobs.reconcile(args.config, args.run_id)
    _print_reconciled(result)
    return result.exit_code


def _print_reconciled(result: ReconcileResult) -> None:
    if result.settled is not None:
        print("nothing changed since the reports were written: every run is settled "
              f"(reports left as they are; latest run {result.settled})")
    elif not result.runs and not result.unchanged:
        print("nothing to reconcile: the ledger has no runs")
    if result.unchanged:
        print(f"{len(result.unchanged):,} run(s) with rows not confirmed (awaiting an outcome, "
              "failed, rejected or not sent) unchanged since their reports were written "
              f"(left as they are; oldest {result.unchanged[0]})")
    for run in result.runs:
        written = run.report
        if written is None:
            print(f"run {run.run_id}: in progress (pid {run.holder_pid}); not reconciled, "
                  "it writes its own report when it ends")
            continue
        print(f"run {run.run_id}:")
        _print_result(written.counts, str(written.directory), written.files,
                      written.written_off)
        if written.stale:
            print(f"{written.stale:,} awaiting an outcome longer than report.stale_after "
                  f"({result.stale_after_s:g} s): they need attention")


def _status(args: argparse.Namespace) -> int:
    import json

    from pipeline import jobs
    from pipeline.open_items import describe_age

    config = jobs.load(args.config, "status")
    if args.write_off is not None:
        return _write_off(config, args.write_off, as_json=args.json)
    found = jobs.status(config, config_path=str(args.config))
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))  # in the documented order
        return found.exit_code
    if not found.open:
        print(f"nothing open: every note in {found.ledger} is settled")
        return found.exit_code
    labels = {"awaiting_outcome": "awaiting an outcome", "ambiguous": "ambiguous (held)",
              "send_failed": "send_failed, not sent since",
              "failed_retryable": "failed in the EMR, retryable",
              "in_progress": "in progress, not sent yet",
              "not_read": "input files not read to the end"}
    for kind in found.kinds:
        if not kind.count:
            continue
        stale = (f" ({kind.stale:,} stale, older than {found.stale_after_s:g} s)"
                 if kind.stale else "")
        oldest = ("" if kind.oldest_age_s is None
                  else f"; oldest {describe_age(kind.oldest_age_s)}")
        print(f"{labels[kind.kind]}: {kind.count:,}{stale}{oldest}")
        print(f"  runs: {', '.join(kind.run_ids)}")
        if kind.by_account:
            print("  accounts: " + ", ".join(f"{name} {n:,}"
                                             for name, n in kind.by_account.items()))
        if kind.redrive_files:
            print(f"  redrive: {', '.join(kind.redrive_files)}")
        for row in kind.rows:
            source = row.source_file or "(input file not recorded)"
            print(f"  row: run {row.run_id}, {source} line {row.line}")
        if kind.rows_total > len(kind.rows):
            print(f"  ... {kind.rows_total - len(kind.rows):,} more rows (--json, or the "
                  "runs' reports)")
        print(f"  settle: {kind.settle}")
    return found.exit_code


def _write_off(config: RunConfig, run_id: str, *, as_json: bool = False) -> int:
    import json

    from pipeline import jobs

    closed, result = jobs.write_off(config, run_id)
    if as_json:  # a sensor parses stdout: the outcome as one JSON object
        print(json.dumps({
            "run_id": run_id, "written_off": closed, "exit_code": result.exit_code,
            "reports": [{"run_id": r.run_id,
                         "report_dir": None if r.report is None else str(r.report.directory),
                         "counts": None if r.report is None else r.report.counts,
                         "written_off": 0 if r.report is None else r.report.written_off}
                        for r in result.runs]}, indent=2))
        return result.exit_code
    print(f"run {run_id}: {_n(closed, 'unsent row')} written off (not sent)")
    _print_reconciled(result)
    return result.exit_code


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 <= value <= MAX_RETENTION_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be 0 to {MAX_RETENTION_DAYS:,} days (100 years): {text!r}")
    return value


def _prune(args: argparse.Namespace) -> int:
    from pipeline import jobs

    result = jobs.prune(args.config, args.older_than, dry_run=args.dry_run)
    done, days = result.pruned, result.older_than_days
    verb = "would remove" if done.dry_run else "removed"
    print(f"prune of what is older than {days:g} days (before {done.cutoff})"
          f"{': dry run, nothing removed' if done.dry_run else ''}")
    before, after = done.sink_bytes
    print(f"{result.events}: {verb} the note text of "
          f"{_n(done.events_pruned, 'event')}"
          + (f" ({before:,} -> {after:,} bytes)" if not done.dry_run and before else ""))
    # _n pluralises its noun only: the phrase after the noun stays outside it.
    kept = [f"{_n(n, noun)} {rest}" for n, noun, rest in (
        (done.already_pruned, "event", "pruned before"),
        (done.not_mirrored, "event", "not yet in the ledger (reconcile, then prune again)"),
        (done.undated, "event", "with no readable 'created' time, kept whole"),
        (done.unreadable, "unreadable line", "copied as it is")) if n]
    if kept:
        print(f"  left: {'; '.join(kept)}")
    print(f"input copies of {_n(done.old_runs, 'run')} started before the limit, and old "
          f"side files of the sink file: {verb} {_n(len(done.files), 'file')}")
    for path in done.files:
        print(f"  {path}")
    for path in done.links:  # never followed: what it points to is as it was
        print(f"  {path}: a symbolic link; {verb} the link only, not the file it points to"
              " (which may hold note text: remove that yourself)")
    if done.reports:
        print(f"reports of pruned runs: {'would rewrite' if done.dry_run else 'rewrote'} "
              f"{_n(len(done.reports), 'report')} (report.html) without note previews")
        for path in done.reports:
            print(f"  {path}")
    for path, why in done.failed:
        print(f"  left: {path}: {why}; nothing of that run was pruned (the next prune tries"
              " again)")
    for path in done.rotated:
        print(f"  left: {path}: looks like a rotated copy of the sink file; prune does not"
              " prune it and reconcile does not read it (see the README, Retention)")
    if done.side_kept:
        print(f"  left: {_n(done.side_kept, 'side file')} of the sink file written to within "
              "the limit")
    ledger_before, ledger_after = done.ledger_bytes
    if ledger_before:
        print(f"ledger {result.ledger}: {ledger_before:,} -> {ledger_after:,} bytes"
              + (f" ({done.ledger_freed:,} given back by VACUUM)" if done.ledger_freed else ""))
    print("kept: every ledger row (key, status, run, job id, outcome): a note sent stays "
          "sent")
    return result.exit_code


def _emulator(args: argparse.Namespace) -> int:
    from pipeline.emulator import Emulator, EmulatorOptions
    from pipeline.servers import serve_foreground

    behaviour = knobs_from_args(Behaviour, args)
    emulator = Emulator(EmulatorOptions(**knob_values(behaviour),
                                        faults=knobs_from_args(Faults, args)))
    serve_foreground(emulator.app(), host=args.host, port=args.port,
                     attach=lambda server: setattr(emulator, "server", server))
    return exits.OK
