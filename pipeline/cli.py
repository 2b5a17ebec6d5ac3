"""The ``tasknotes`` command: parse, call, print, map errors to exit codes.

Exit codes (the README's contract): 0 every row ended well; 1 the run finished but some
rows were rejected, failed or are ambiguous; 2 bad usage, config or input
(nothing was sent); 3 aborted (credentials refused, too many failures,
interrupted, disk full). ``status``: 0 nothing open, 1 something open, 2 bad
config; every command's own codes are in ``COMMAND_EXIT_CODES`` (its --help).
A user error is one line on stderr, never a traceback. This is the one
module that prints; nothing it prints holds a note's text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError, RunAborted

if TYPE_CHECKING:
    from pipeline.ledger import Ledger
    from pipeline.poll import PollStats
    from pipeline.reconcile import Reconciler
    from pipeline.runner import RunOutcome, ScanCounts

log = logging.getLogger("pipeline")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tasknotes`` and ``python -m pipeline``; returns the exit code.

    Everything the command creates (ledger, sink file, reports, their directories)
    is created readable by its owner only: umask 077 while it runs.
    """
    umask = os.umask(0o077)
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command they were given to, with that command's usage
            (getattr(args, "command_parser", None) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:  # bare `tasknotes`: the help, not an error message
            parser.print_help()
            return 2
        _logging(args.verbose, args.quiet)
        return int(args.handler(args))
    except (PipelineError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"tasknotes: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        os.umask(umask)  # for a caller that runs main() in its own process (the tests)


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


def _logging(verbose: int, quiet: bool) -> None:
    """stderr logging: INFO by default (a handful of lines a run), DEBUG with -v (a line per
    webhook and event), WARNING with -q; the HTTP libraries at WARNING below -vv."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="tasknotes: %(levelname)s: %(message)s")
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


EXIT_CODES = """\
exit codes:
  0  every row ended well (accepted, confirmed, or rightly skipped)
  1  the command finished, but some rows were rejected, failed or are ambiguous,
     or await an outcome longer than report.stale_after
  2  bad usage, bad config or unreadable input: nothing was sent
  3  aborted: credentials refused, too many consecutive failures, interrupted,
     disk full, or Cobalt's answers could not be read"""
# Each command's own meaning of its exit codes, shown by its --help (DESIGN's contract).
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
  2  bad usage or config (no webhook secret), or host:port cannot be listened on""",
    "poll": f"""\
exit codes (of the reconcile that follows the poll):
{_RECONCILED}
  2  bad usage or config, or no ledger yet
  3  aborted: credentials refused, Cobalt kept failing, or a page could not be read""",
    "reconcile": f"""\
exit codes:
{_RECONCILED}
  2  bad usage or config, or no ledger yet""",
    "status": """\
exit codes:
  0  nothing is open over any run
  1  something is open: awaiting an outcome (stale or not), ambiguous, not sent,
     failed in the EMR with a retryable reason, or a run in progress
  2  bad usage or config""",
    "prune": """\
exit codes:
  0  pruned (or, with --dry-run, counted) what is older than the limit
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


def _parser() -> argparse.ArgumentParser:
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

    sink = command("sink", "receive Cobalt's webhooks into the sink file")
    _config_arg(sink)
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sink.add_argument("--port", type=int, default=8787, help="port to listen on")
    sink.set_defaults(handler=_sink)

    poll = command("poll", "fetch outcomes of unresolved jobs and ambiguous rows from Cobalt, "
                           "then reconcile as `reconcile` does")
    _config_arg(poll)
    poll.add_argument("--run-id", help="poll only this run's rows (default: every run with "
                                       "unresolved rows); reconciling still covers every run "
                                       "whose report can change")
    poll.set_defaults(handler=_poll)

    reconcile = command("reconcile", "re-join ledger and sink; rewrite reports")
    _config_arg(reconcile)
    reconcile.add_argument("--run-id", help="only this run (default: runs with unresolved rows)")
    reconcile.set_defaults(handler=_reconcile)

    status = command(
        "status", "what is open over every run, and what settles it (exit 0 none, 1 some)")
    _config_arg(status)
    status.add_argument("--json", action="store_true",
                        help="print the documented JSON shape (README) instead of text")
    status.set_defaults(handler=_status)

    prune = command("prune", "remove note text kept at rest past the retention limit "
                             "(sink events, input copies); never what was sent")
    _config_arg(prune)
    prune.add_argument("--older-than", type=_days, metavar="DAYS",
                       help="prune what is older than DAYS days (default: state.retention_days)")
    prune.add_argument("--dry-run", action="store_true",
                       help="say what would be removed; remove nothing")
    prune.set_defaults(handler=_prune)

    emulator = command("emulator", "a local Cobalt look-alike, with faults")
    _emulator_args(emulator)
    emulator.set_defaults(handler=_emulator)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG", help="YAML config file")


def _inputs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="PATH",
                        help="input CSV file or glob (repeatable); overrides input.path "
                             "(default: input.path)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _range(text: str) -> tuple[float, float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"A or A,B (numbers), not {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise argparse.ArgumentTypeError("A or A,B with 0 <= A <= B")
    low, high = parts[0], parts[-1]
    if high < low:
        raise argparse.ArgumentTypeError("A or A,B with 0 <= A <= B")
    return low, high


def _emulator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8788, help="port to listen on")
    p.add_argument("--webhook-url",
                   help="where to deliver task_note.* webhooks (default: none; outcomes "
                        "can only be polled)")
    p.add_argument("--webhook-secret", default="sandbox-webhook-secret",
                   help="key of the webhooks' HMAC-SHA256 signature")
    p.add_argument("--client-id", default="sandbox-client-id", help="accepted client_id")
    p.add_argument("--client-secret", default="sandbox-client-secret",
                   help="accepted client_secret")
    p.add_argument("--access-token", default="sandbox-access-token",
                   help="accepted access_token")
    p.add_argument("--latency-ms", type=_range, default=(0.0, 0.0), metavar="A[,B]",
                   help="delay before answering each request, uniform in [A, B] ms")
    p.add_argument("--outcome-delay-ms", type=_range, default=(200.0, 1500.0), metavar="A[,B]",
                   help="time from a stored note to its outcome webhook, uniform in [A, B] ms")
    p.add_argument("--fail-rate", type=_fraction, default=0.0,
                   help="fraction of notes that fail in the EMR (task_note.failed)")
    p.add_argument("--rate-limit", type=float, metavar="RPS",
                   help="answer 429 above this many requests per second (default: no limit)")
    p.add_argument("--error-rate", type=_fraction, default=0.0,
                   help="fraction of requests answered 503 before storing")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the timings and of which requests meet a fault")
    p.add_argument("--events-shape", choices=("event_id", "envelope"), default="event_id",
                   help="which documented shape GET /v1/webhook-events answers in: event_id "
                        "items (filter delivery_status) or envelope items (filter status)")
    p.add_argument("--missing-task", action="append", default=[], metavar="ID",
                   help="a task id the EMR does not have (task_note.failed); repeatable "
                        "(default: none)")
    faults = p.add_argument_group("faults (fractions of requests)")
    faults.add_argument("--fault-429", type=_fraction, default=0.0,
                        help="429 Too Many Requests, with Retry-After")
    faults.add_argument("--fault-503", type=_fraction, default=0.0,
                        help="503 Service Unavailable, with Retry-After")
    faults.add_argument("--fault-400", type=_fraction, default=0.0,
                        help="400: refused as a bad request (final)")
    faults.add_argument("--fault-drop", type=_fraction, default=0.0,
                        help="drop the connection after reading the request")
    faults.add_argument("--fault-500-after-store", type=_fraction, default=0.0,
                        help="store the note, then answer 500")
    faults.add_argument("--fault-slow-after-store", type=_fraction, default=0.0,
                        help="store the note, then answer after --slow-s")
    faults.add_argument("--fault-drop-after-store", type=_fraction, default=0.0,
                        help="store the note, then drop the connection")
    faults.add_argument("--fault-garbage-after-store", type=_fraction, default=0.0,
                        help="store the note, then answer 200 with a body that is not JSON")
    faults.add_argument("--fault-reset-after-store", type=_fraction, default=0.0,
                        help="store the note, then reset the connection (TCP RST)")
    faults.add_argument("--faults-only-first", type=int, default=0, metavar="N",
                        help="faults hit only the first N attempts of each note (0: all)")
    faults.add_argument("--retry-after", type=float, default=1.0, metavar="S",
                        help="Retry-After of a 429/503, in seconds")
    faults.add_argument("--retry-after-date", action="store_true",
                        help="send Retry-After as an HTTP date")
    faults.add_argument("--slow-s", type=float, default=30.0,
                        help="how long a slow answer takes, in seconds")
    faults.add_argument("--drop-webhooks", type=_fraction, default=0.0,
                        help="record outcomes but never deliver them (for poll)")


# -- commands ----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from pipeline.runner import Run, RunOptions

    config = _config_for_sending(args.config)
    options = RunOptions(inputs=tuple(args.input), dry_run=args.dry_run, limit=args.limit,
                         progress=not args.no_progress, force=args.force,
                         argv=tuple(sys.argv[1:]))
    if args.force:
        log.warning("--force: rows already sent in earlier runs will be sent again")
    outcome = Run(config, options).execute()
    if args.dry_run:
        _print_scan(outcome, dry_run=True, limit=args.limit)
        return outcome.exit_code
    if outcome.scan.problems.counts:
        _print_problems(outcome)
    if outcome.report is not None:
        _print_result(outcome.report.counts, str(outcome.report.directory),
                      outcome.report.files)
    _print_limit(outcome.scan, args.limit)
    if outcome.stop_reason:
        print(f"stopped: {outcome.stop_reason}")
    return outcome.exit_code


def _validate(args: argparse.Namespace) -> int:
    from pipeline.runner import validate_only

    config = _config_for_sending(args.config)  # the secrets run would need, resolved
    outcome = validate_only(config, args.input)
    _print_scan(outcome, dry_run=False)
    if not config.sandbox.enabled:  # the sink runs apart, but refuses to start without it
        try:
            missing = not load_config(args.config, needs=("webhooks",)).webhooks.all_secrets()
            problem = "webhooks.secret: not set"
        except PipelineError as exc:
            missing, problem = True, str(exc)
        if missing:
            print(f"warning: {problem}; `tasknotes sink` will refuse to start without a "
                  "webhook secret (run itself does not need it)")
    return outcome.exit_code


def _config_for_sending(path: Path) -> RunConfig:
    """The config as ``run`` needs it: the api section's ``${VAR}`` references resolved, and
    in a sandbox the webhooks section's too (the emulator signs with that secret)."""
    config = load_config(path, needs=("api",))
    if config.sandbox.enabled:
        config = load_config(path, needs=("api", "webhooks"))
    return config


def _print_limit(scan: ScanCounts, limit: int | None) -> None:
    """The one line saying --limit stopped the reading, where, and how much is left."""
    if scan.truncated_at is None:
        return
    where, line = scan.truncated_at
    left = _n(scan.unread, "row") if scan.unread_exact else f"at least {_n(scan.unread, 'row')}"
    print(f"--limit {limit:,} reached: stopped reading at {where} line {line}; {left} "
          "left unread (not checked, not sent, not in this report)")


def _print_scan(outcome: RunOutcome, *, dry_run: bool, limit: int | None = None) -> None:
    c = outcome.scan
    _print_problems(outcome)
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
    if outcome.rejects is not None:
        print(f"rejects: {outcome.rejects}")


def _print_problems(outcome: RunOutcome) -> None:
    tally = outcome.scan.problems
    if not tally.counts:
        return
    width = max(len(code) for code in tally.counts)
    print(f"{'problem':<{width}}  {'rows':>7}  first lines")
    for code, n in sorted(tally.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines = ", ".join(str(line) for _, line in tally.examples.get(code, []))
        more = ", …" if n > len(tally.examples.get(code, [])) else ""
        print(f"{code:<{width}}  {n:>7,}  {lines}{more}")


def _print_result(counts: dict[str, int], directory: str, files: Sequence[str]) -> None:
    shown = {k: v for k, v in counts.items() if v}
    if shown:
        width = max(len(k) for k in shown)
        print(f"{'final status':<{width}}  {'rows':>7}")
        for status, n in shown.items():
            print(f"{status:<{width}}  {n:>7,}")
    print(f"report: {directory}/ ({', '.join(files)})")
    print(_one_line(counts))


def _one_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{counts['confirmed']:,} of {_n(total, 'note')} confirmed"]
    labels = {
        "awaiting_outcome": "awaiting outcome", "failed_in_emr": "failed in EMR",
        "rejected_invalid": "rejected (invalid)", "rejected_by_api": "rejected by API",
        "ambiguous": "ambiguous", "send_failed": "not sent",
        "skipped_duplicate": "duplicates skipped", "skipped_already_sent": "already sent",
    }
    parts += [f"{_n(counts[k], 'duplicate')} skipped" if k == "skipped_duplicate"
              else f"{counts[k]:,} {label}" for k, label in labels.items() if counts[k]]
    return "; ".join(parts)


def _sink(args: argparse.Namespace) -> int:
    from pipeline.events import SinkFile
    from pipeline.servers import bind, serve_foreground
    from pipeline.sink import WebhookReceiver

    config = load_config(args.config, needs=("webhooks",))
    secrets = config.webhooks.all_secrets()
    if not secrets:
        raise PipelineError("webhooks.secret: the sink needs at least one webhook secret")
    sock = bind(args.host, args.port)  # before anything is created or said: one line if not
    sink = SinkFile(config.webhooks.sink)
    try:
        sink.open()
        receiver = WebhookReceiver(sink, secrets, path=config.webhooks.path,
                                   max_body_bytes=config.webhooks.max_body_bytes)
        log.info("sink: POST %s -> %s (%d events on file)", config.webhooks.path,
                 config.webhooks.sink, len(sink))
        serve_foreground(receiver.app(), host=args.host, port=args.port, sock=sock,
                         **receiver.serve_options())
    finally:
        sock.close()
        sink.close()
    return 0


def _poll(args: argparse.Namespace) -> int:
    from pipeline.reconcile import Reconciler

    config = load_config(args.config, needs=("api",))
    if config.sandbox.enabled:
        print("nothing to poll: the sandbox's Cobalt emulator lives only while `tasknotes run` "
              "runs (outcomes it never delivered ended with it); `tasknotes reconcile "
              f"{args.config}` re-reads the sink")
        return 0
    ledger = _open_ledger(config)
    try:
        runs = [args.run_id] if args.run_id else ledger.unresolved_runs()
        Reconciler.of(ledger, config).refresh(config.api.account_id())
        wanted: set[str] = set()
        for run_id in runs:
            ledger.run(run_id)
            wanted |= ledger.job_ids(run_id, unresolved=True)
        ambiguous, sent_since = ledger.ambiguous_keys(runs)
        if not wanted and not ambiguous:
            print("nothing to poll: every accepted row has an outcome event in the sink, and "
                  "no ambiguous row waits for one")
        else:
            since = min((t for t in (ledger.earliest_submission(wanted), sent_since) if t),
                        default=None)
            _poll_events(config, wanted, ambiguous, since)
    finally:
        ledger.close()
    # What the polled events settle can change any run (a note's evidence follows it):
    # reconcile as `tasknotes reconcile CONFIG` does, choosing the runs the same way.
    return _reconcile(argparse.Namespace(config=args.config, run_id=None))


def _poll_events(config: RunConfig, wanted: set[str], ambiguous: frozenset[bytes],
                 since: str | None) -> None:
    """Fetch the outcome events of ``wanted`` jobs and ``ambiguous`` notes into the sink."""
    import anyio

    from pipeline.client import CobaltClient
    from pipeline.events import SinkFile
    from pipeline.poll import Poller

    sink = SinkFile(config.webhooks.sink)
    sink.open()

    async def fetch() -> PollStats:
        webhook_secrets = [s.decode() for s in config.webhooks.all_secrets()]
        async with CobaltClient(config.api, max_connections=2,
                                more_secrets=webhook_secrets) as client:
            return await Poller(config, client, sink).run(wanted, since, ambiguous)

    try:
        stats = anyio.run(fetch, backend_options=config.submit.backend_options())
    finally:
        sink.close()
    print(f"polled {_n(stats.wanted, 'job')} and {_n(stats.ambiguous, 'ambiguous note')} "
          f"with {_n(stats.requests, 'request')}: {_n(stats.stored, 'event')} stored, "
          f"{stats.duplicates:,} already there, {_n(stats.still_missing, 'job')} still "
          f"without an outcome, {stats.ambiguous_found:,} ambiguous "
          f"{'note' if stats.ambiguous_found == 1 else 'notes'} found in a "
          "task_note.created event")
    if stats.delivered_but_missing:
        print(f"{stats.delivered_but_missing:,} of the events stored are listed by Cobalt "
              "as delivered: to another webhook URL, or to a receiver that did not keep them")


def _n(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is one: "1 job"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _reconcile(args: argparse.Namespace) -> int:
    from pipeline.reconcile import Reconciler

    config = load_config(args.config)
    ledger = _open_ledger(config)
    reconciler = Reconciler.of(ledger, config)
    try:
        if args.run_id:
            ledger.run(args.run_id)
            runs = [args.run_id]
        else:
            # Learn the outcomes first, then choose: every run whose report may be wrong
            # now, whoever refreshed the ledger since it was written (a run, status, poll).
            latest = ledger.latest_run()
            if latest is not None:
                reconciler.refresh(ledger.run(latest)["account"])
            runs = ledger.reports_to_rewrite() or [r for r in [latest] if r]
        if not runs:
            print("nothing to reconcile: the ledger has no runs")
            return 0
        return _reconcile_runs(config, ledger, runs, reconciler)
    finally:
        ledger.close()


def _open_ledger(config: RunConfig) -> Ledger:
    from pipeline.ledger import Ledger

    if not config.state.ledger.exists():
        raise PipelineError(f"no ledger at {config.state.ledger}: nothing has been run yet")
    return Ledger(config.state.ledger, synchronous=config.state.synchronous)


def _reconcile_runs(config: RunConfig, ledger: Ledger, runs: Sequence[str],
                    reconciler: Reconciler | None = None) -> int:
    from pipeline.reconcile import Reconciler
    from pipeline.report import write_report

    reconciler = reconciler or Reconciler.of(ledger, config)
    live = set(ledger.runs_in_progress())
    code = 0
    for run_id in runs:
        if run_id in live:  # its unsent rows are not failures: it writes its report at the end
            print(f"run {run_id}: in progress (pid {ledger.lock_holder()}); not reconciled, "
                  "it writes its own report when it ends")
            continue
        written = write_report(reconciler.run(run_id), config.report,
                               input_settings=config.input)
        ledger.report_written(run_id, redrive_digest=written.redrive_digest)
        print(f"run {run_id}:")
        _print_result(written.counts, str(written.directory), written.files)
        if written.stale:
            print(f"{written.stale:,} awaiting an outcome longer than report.stale_after "
                  f"({config.report.stale_after:g} s): they need attention")
        code = max(code, written.exit_code)
    return code


def _status(args: argparse.Namespace) -> int:
    import json

    from pipeline.status import describe_age, ledger_status

    config = load_config(args.config)
    found = ledger_status(config, config_path=str(args.config))
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))  # in the documented order
        return found.exit_code
    if not found.open:
        print(f"nothing open: every note in {found.ledger} is settled")
        return 0
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
        if kind.redrive_files:
            print(f"  redrive: {', '.join(kind.redrive_files)}")
        print(f"  settle: {kind.settle}")
    return found.exit_code


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more days: {text!r}")
    return value


def _prune(args: argparse.Namespace) -> int:
    from pipeline.prune import prune

    config = load_config(args.config)
    days = args.older_than if args.older_than is not None else config.state.retention_days
    if days is None:
        raise PipelineError("state.retention_days: not set, and no --older-than DAYS given: "
                            "nothing says what is old enough to prune")
    done = prune(config, days, dry_run=args.dry_run)
    verb = "would remove" if done.dry_run else "removed"
    print(f"prune of what is older than {days:g} days (before {done.cutoff})"
          f"{': dry run, nothing removed' if done.dry_run else ''}")
    before, after = done.sink_bytes
    print(f"sink file {config.webhooks.sink}: {verb} the note text of "
          f"{_n(done.events_pruned, 'event')}"
          + (f" ({before:,} -> {after:,} bytes)" if not done.dry_run and before else ""))
    kept = [f"{_n(n, what)}" for n, what in (
        (done.already_pruned, "event pruned before"),
        (done.not_mirrored, "event not yet in the ledger (reconcile, then prune again)"),
        (done.undated, "event with no readable 'created' time, kept whole"),
        (done.unreadable, "unreadable line, copied as it is")) if n]
    if kept:
        print(f"  left: {'; '.join(kept)}")
    print(f"input copies of {_n(done.old_runs, 'run')} started before the limit: {verb} "
          f"{_n(len(done.files), 'file')}")
    for path in done.files:
        print(f"  {path}")
    if done.ledger_freed:
        print(f"ledger {config.state.ledger}: {done.ledger_freed:,} bytes given back (VACUUM)")
    print("kept: every ledger row (key, status, run, job id, outcome): a note sent stays "
          "sent")
    return 0


def _emulator(args: argparse.Namespace) -> int:
    from pipeline.emulator import Emulator, EmulatorOptions, Faults
    from pipeline.servers import serve_foreground

    faults = Faults(
        rate_429=args.fault_429, rate_503=args.fault_503, rate_400=args.fault_400,
        drop_before_store=args.fault_drop,
        rate_500_after_store=args.fault_500_after_store,
        slow_after_store=args.fault_slow_after_store,
        drop_after_store=args.fault_drop_after_store,
        garbage_after_store=args.fault_garbage_after_store,
        reset_after_store=args.fault_reset_after_store, only_first=args.faults_only_first,
        retry_after_s=args.retry_after,
        retry_after_as_date=args.retry_after_date, slow_s=args.slow_s,
        drop_webhooks=args.drop_webhooks,
    )
    emulator = Emulator(EmulatorOptions(
        client_id=args.client_id, client_secret=args.client_secret,
        access_token=args.access_token, webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret, latency_ms=args.latency_ms,
        outcome_delay_ms=args.outcome_delay_ms, fail_rate=args.fail_rate,
        error_rate=args.error_rate, missing_tasks=frozenset(args.missing_task),
        rate_limit=args.rate_limit, seed=args.seed, faults=faults,
        events_shape=args.events_shape,
    ))
    serve_foreground(emulator.app(), host=args.host, port=args.port,
                     attach=lambda server: setattr(emulator, "server", server))
    return 0
