"""Retention: ``tasknotes prune`` removes note text kept at rest past ``state.retention_days``.

What goes (for events and runs older than the limit):

- the note text in the sink file's ``task_note.*`` events (the pruned-event
  format is in pipeline/events.py): an event's age is its envelope's ``created``
  time; an event with no readable ``created`` is kept whole, and counted;
- the run's 0600 input copies, ``reports/<run_id>/rejects.csv`` and
  ``redrive.csv`` (a run's age is its start); the directory keeps a
  ``pruned.json`` marker instead, so no later ``reconcile`` writes its redrive.csv
  (or note previews) again from the input; a copy that is a symbolic link is not
  followed (the link goes, its target stays, and the summary says so);
- the note previews in such a run's report.html (``report.show_note_preview``): its
  report is rewritten once, under the marker, which then says ``"report":
  "rewritten"`` (a prune killed before that rewrites it next time); the page no
  longer points to the removed rejects.csv;
- the sink file's side files ``<sink>.set-aside`` and ``<sink>.torn`` (lines a
  reader could not decode, a torn tail: both may hold note text) when last
  written before the limit (their records carry no date; one written since is
  kept, and counted).

Then ``VACUUM`` gives the ledger's free pages back, and the summary says the
ledger's bytes before and after.

What stays: every ledger row (key, status, run id, job id, outcome), so a rerun of
an old input still finds each note sent and sends nothing; every event's id,
type, job id and outcome, so reports still match rows to outcomes. Before it
rewrites anything, prune mirrors the sink file into the ledger (as ``reconcile``
does), so the hash the ledger keeps of each event's note still settles an
ambiguous row after the text is gone; lines appended after that mirroring are
copied as they are.

Safe while the sink runs. The sink file is rewritten into
``.<name>.prune.tmp`` beside it and renamed over it. The sink (``events.SinkFile``)
writes each group commit under an exclusive ``flock`` on the sink file, and
under that lock first checks that the path still names the file it has open,
moving to the new one if not. Prune copies the lines present when it starts
without the lock, then takes the same lock on the file it replaces, copies
what was appended meanwhile, fsyncs the copy, renames it over the path and
fsyncs the directory before letting go. An event acknowledged before the lock
is in the copy; one arriving after waits for the lock and is written to the
new file. Two prunes at once are kept apart by ``<sink>.prune.lock``.

Safe to interrupt. Until the rename the sink file is untouched (a stale
``.prune.tmp``, which may hold note text, is removed by the next prune); the
rename replaces it whole. The ledger's reading position in the sink file is
fingerprinted with the file's inode (reconciliation.py), so a prune killed between
the rename and recording the new position only makes the next reconcile read
the new file from its start (counting no event it had mirrored as a repeat).
Prune records that position only if the ledger's is still the one it started
from (a reconcile that read further meanwhile leaves the new file to be read
afresh). A pruned line can grow, so an unmirrored event may land past the byte
its receipt names (and readers drop receipts before their position): before the
rename prune appends, for each unmirrored event, a copy of its receipt naming
its new offset (``events.carry_receipts``; the tail's under the lock).

Files beside the sink file that look like rotated copies of it (``<sink>.1``,
``<sink>-DATE``: ``events.rotated_copies``) are neither read nor pruned: the
summary lists them, and reconcile warns.

In PostgreSQL (``state.url``): the events the sink stored in ``sink_events`` are
pruned by the same rules, in batches of ``db_batch`` events by commit order, each batch
one ``UPDATE`` in its own transaction, after mirroring them into the ledger
(``reconcile``'s step): an event committed after that mirroring is kept whole and
counted. Only ``body`` changes; the event id and ``body_sha256`` (the hash of the
body as received) stay, so a redelivery of the original is still a duplicate.
Safe while the sink inserts (an update touches only stored rows, and no column the
unique constraints read) and safe to interrupt (a killed prune leaves each batch
done whole or not at all; the next one carries on). One prune at a time per
database (an advisory lock).

Over 400 lines because the sink file's rewrite protocol (lock, rename, the sink
following it), the PostgreSQL batches and the input copies must agree on one cutoff
and one rule for what may lose its note text.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final

from pipeline.config import RunConfig
from pipeline.errors import StateError, StorageFull
from pipeline.events import (
    PRUNED_AT,
    PRUNED_MARK,
    UnreadableEvent,
    carry_receipts,
    decode_event,
    encode_event,
    fsync_dir,
    is_pruned,
    last_line_end,
    receipts_path,
    rotated_copies,
)
from pipeline.reasons import safe_emr_note_id
from pipeline.reconciliation import Reconciler, sink_head
from pipeline.report import rewrite_report
from pipeline.state import StateStore
from pipeline.state.store import existing_store, open_event_table, open_store

log = logging.getLogger(__name__)
# state.url: stored events read, and rewritten in one transaction, at a time
DB_BATCH: Final = 1000

INPUT_COPIES = ("rejects.csv", "redrive.csv")
# The sink file's side files that may hold note text (pipeline/events.py): unreadable lines
# set aside by a reader, and a torn last line cut off by the sink after a crash.
SIDE_FILES = (".set-aside", ".torn")


def _no_checkpoint(step: str) -> None:
    """The default ``checkpoint`` of ``prune``: nothing happens between the steps."""


@dataclass
class PruneResult:
    """What a prune removed (or, with ``dry_run``, would remove); never any note text.

    ``cutoff``: ISO 8601 UTC, events and runs older than it were pruned;
    ``events_pruned``: events whose note text was removed; ``already_pruned``:
    old events pruned before; ``undated``: ``task_note.*`` events kept whole for
    want of a readable ``created``; ``not_mirrored``: old events kept whole because
    the ledger had not read them yet; ``unreadable``: lines the codec refuses,
    copied as they are; ``sink_bytes``: the sink file's size before and after;
    ``files``: input copies and side files removed; ``links``: those that were symbolic
    links, of which only the link was removed (its target, never followed, is left);
    ``reports``: the report.html of each pruned run rewritten without note text;
    ``rotated``: files beside the sink file that look like rotated copies of it, left as
    they are (``events.rotated_copies``: their note text is not pruned); ``failed``: a
    run's directory that could not be pruned (not a directory, a marker or report path
    taken by something else...), with why, left for the next prune (the others are pruned);
    ``side_kept``: side files of the
    sink file written to within the limit, kept; ``ledger_bytes``: the SQLite ledger's
    size (its file and WAL) before and after; ``ledger_freed``: bytes VACUUM gave back.
    """

    cutoff: str
    dry_run: bool
    events_pruned: int = 0
    already_pruned: int = 0
    undated: int = 0
    not_mirrored: int = 0
    unreadable: int = 0
    sink_bytes: tuple[int, int] = (0, 0)
    old_runs: int = 0
    files: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    rotated: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    side_kept: int = 0
    ledger_bytes: tuple[int, int] = (0, 0)
    ledger_freed: int = 0


def prune(config: RunConfig, older_than_days: float, *, dry_run: bool = False,
          now: datetime | None = None,
          checkpoint: Callable[[str], None] = _no_checkpoint,
          db_batch: int = DB_BATCH) -> PruneResult:
    """Prune note text older than ``older_than_days`` days (module docstring).

    ``checkpoint`` is called with the name of each step of the sink file's rewrite as it
    is reached ("mirrored", "copied", "synced", "renamed"), and with ``state.url`` with
    "event" before each stored event is looked at: the tests kill the process there, to
    prove each is safe to be killed at. ``db_batch`` (``state.url``): events rewritten per
    transaction.

    Raises StateError when another prune holds the sink file, or the sink file is
    replaced by something else while it is rewritten (nothing is lost: run it again);
    StorageFull when the disk has no room for the copy.
    """
    cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
    result = PruneResult(cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"), dry_run)
    if config.state.url is not None:
        runs = _prune_database(config, cutoff, result, checkpoint=checkpoint, batch=db_batch)
        result.old_runs = len(runs)
        _input_copies(config.report.dir, runs, result)
        if dry_run:  # lists them only: no store needed
            _rewrite_reports(config, None, runs, result)
            return result
        store = open_store(config)
        try:
            _rewrite_reports(config, store, runs, result)
        finally:
            store.close()
        return result
    sink = config.webhooks.sink
    ledger = existing_store(config, readonly=dry_run)
    try:
        with _prune_lock(sink, dry_run=dry_run):
            limit, head = _mirror(config, ledger, sink, dry_run=dry_run)
            checkpoint("mirrored")
            if sink.exists():
                _SinkPruner(sink, cutoff, (limit, head), result, ledger,
                            checkpoint=checkpoint).run()
            _side_files(sink, cutoff, result)
            result.rotated = rotated_copies(sink)
            if ledger is not None:
                runs = _own_runs(config, ledger, ledger.runs_started_before(result.cutoff))
                result.old_runs = len(runs)
                _input_copies(config.report.dir, runs, result)
                _rewrite_reports(config, ledger, runs, result)
                size = _ledger_size(config.state.ledger)
                if not dry_run:
                    result.ledger_freed = ledger.vacuum()
                result.ledger_bytes = (size, _ledger_size(config.state.ledger))
    finally:
        if ledger is not None:
            ledger.close()
    return result


def _own_runs(config: RunConfig, ledger: StateStore, runs: list[str]) -> list[str]:
    """``runs`` but another config's (``RunConfig.another_configs``): their input copies
    and reports are in that config's report.dir, for its own prune."""
    return [r for r in runs if not config.another_configs(ledger.run(r).account)]


def _prune_database(config: RunConfig, cutoff: datetime, result: PruneResult, *,
                    checkpoint: Callable[[str], None], batch: int) -> list[str]:
    """With ``state.url``: prune the events in ``sink_events`` as the sink file's are, and
    return the runs started before ``cutoff`` (module docstring, "In PostgreSQL"; the SQL
    is state/pg_events.py's). ``result.sink_bytes``: the stored bodies' bytes before and
    after.

    Raises StateError when another prune holds the database's prune lock, or the
    database cannot be used (one line, no password)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    events = open_event_table(config, application="tasknotes prune")
    try:
        with events.prune_lock():
            ledger = open_store(config)
            try:
                if not result.dry_run:  # what the ledger has mirrored keeps its note's hash
                    latest = ledger.latest_run()
                    if latest is not None:
                        Reconciler.of(ledger, config).refresh(ledger.run(latest).account)
                mirrored = ledger.sink_position()[0]
                runs = _own_runs(config, ledger, ledger.runs_started_before(result.cutoff))
            finally:
                ledger.close()

            def rewrite(seq: int, body: bytes) -> bytes | None:
                checkpoint("event")
                return _pruned_body(body, cutoff, stamp, result,
                                    mirrored=result.dry_run or seq <= mirrored)

            result.sink_bytes = events.prune_bodies(rewrite, dry_run=result.dry_run,
                                                    batch=batch)
    finally:
        events.close()
    return runs


def _mirror(config: RunConfig, ledger: StateStore | None, sink: Path, *, dry_run: bool
            ) -> tuple[int, str]:
    """Read what the sink file gained into the ledger; returns the byte offset up to which
    the ledger has mirrored the file (-1: all of it may be pruned, a dry run's guess), and
    the fingerprint the ledger keeps with it ("" when it is not this file's)."""
    if dry_run:
        return -1, ""
    if ledger is None:
        return 0, ""  # no ledger: nothing mirrored, nothing of the text may go
    latest = ledger.latest_run()
    if latest is not None:
        Reconciler.of(ledger, config).refresh(ledger.run(latest).account)
    offset, head = ledger.sink_position()
    return (offset, head) if head and head == sink_head(sink) else (0, "")


@contextlib.contextmanager
def _prune_lock(sink: Path, *, dry_run: bool) -> Iterator[None]:
    if dry_run or not sink.parent.exists():
        yield
        return
    fd = os.open(sink.with_name(sink.name + ".prune.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"another tasknotes prune is rewriting {sink}") from None
        yield
    finally:
        os.close(fd)


class _SinkPruner:
    """One rewrite of the sink file (the protocol is in the module docstring)."""

    def __init__(self, sink: Path, cutoff: datetime, position: tuple[int, str],
                 result: PruneResult, ledger: StateStore | None, *,
                 checkpoint: Callable[[str], None]) -> None:
        self.sink, self.cutoff = sink, cutoff
        self.limit, self.head = position  # the ledger's reading position, mirror included
        self.checkpoint = checkpoint
        self.moved: dict[str, int] = {}  # event id -> its offset in the new file (unmirrored)
        self.result, self.ledger = result, ledger
        self.temp = sink.with_name(f".{sink.name}.prune.tmp")
        self.stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.mapped: int | None = None  # the ledger's position, in the new file

    def run(self) -> None:
        dry = self.result.dry_run
        if not dry:
            self.temp.unlink(missing_ok=True)  # a killed prune's copy (it may hold notes)
        fd = os.open(self.sink, os.O_RDONLY if dry else os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start_size = _whole_lines(fd)  # no lock needed below: the sink only appends
            receipts = _size(receipts_path(self.sink))  # theirs are before this byte
            fcntl.flock(fd, fcntl.LOCK_UN)
            if dry:
                self._copy(fd, 0, start_size, None)
                self.result.sink_bytes = (start_size, start_size)
                return
            out = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(out, "wb", closefd=False) as fh:
                    written = self._copy(fd, 0, start_size, fh)
                    if not self.result.events_pruned:
                        return  # nothing to remove: the sink file is left as it is
                    carry_receipts(self.sink, self.moved, since=self.limit, end=receipts)
                    self.checkpoint("copied")
                    self._swap(fd, fh, (start_size, receipts), written)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFull(f"disk full: the pruned copy {self.temp} cannot be "
                                      f"written; {self.sink} is unchanged") from None
                raise
            finally:
                os.close(out)
                self.temp.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _swap(self, fd: int, fh: BinaryIO, start: tuple[int, int], written: int) -> None:
        """Under the sink's lock: the lines appended since the copy began (``start``: the
        sink file's and its receipts' sizes then) and their receipts' new offsets, fsync,
        rename; then the ledger's position in the new file, unless it moved meanwhile."""
        start_size, receipts = start
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            named, opened = os.stat(self.sink), os.fstat(fd)
            if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                raise StateError(f"{self.sink} was replaced while it was pruned; "
                                 "nothing was changed: run tasknotes prune again")
            end = opened.st_size
            tail = os.pread(fd, end - start_size, start_size)
            fh.write(tail)  # appended meanwhile: copied as is (newer than any limit)
            if self.limit > 0:
                carry_receipts(self.sink, _ids_at(tail, written), since=self.limit,
                               begin=receipts)
            fh.flush()
            os.fsync(fh.fileno())
            if self.mapped is None and self.limit > start_size:
                self.mapped = written + self.limit - start_size
            self.checkpoint("synced")
            os.rename(self.temp, self.sink)
            fsync_dir(self.sink.parent)
            self.checkpoint("renamed")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.result.sink_bytes = (end, written + len(tail))
        # Only from where this prune found it: a reconcile that read further meanwhile (in
        # the old file) left a position that makes the next one read the new file afresh.
        if (self.ledger is not None and self.mapped is not None
                and self.ledger.sink_position() == (self.limit, self.head)):
            self.ledger.add_events([], {}, offset=self.mapped, head=sink_head(self.sink))

    def _copy(self, fd: int, start: int, end: int, out: BinaryIO | None) -> int:
        """Copy lines [start, end) to ``out`` (None: only count), pruning old events;
        returns the bytes written. Records where the ledger's position falls."""
        written = 0
        offset = start
        with os.fdopen(os.dup(fd), "rb") as fh:
            fh.seek(start)
            while offset < end:
                raw = fh.readline(end - offset)
                if not raw:
                    break
                begin, offset = offset, offset + len(raw)
                line = self._line(raw, mirrored=self.limit < 0 or offset <= self.limit)
                if 0 < self.limit <= begin:  # not mirrored yet: its receipt must follow it
                    self.moved.update(_ids_at(raw, written))
                if out is not None:
                    out.write(line)
                written += len(line)
                if offset == self.limit:
                    self.mapped = written
        return written

    def _line(self, raw: bytes, *, mirrored: bool) -> bytes:
        """The line as the new file holds it: pruned, or ``raw`` (each kind counted)."""
        pruned = _pruned_body(raw.rstrip(b"\n"), self.cutoff, self.stamp, self.result,
                              mirrored=mirrored)
        return raw if pruned is None else pruned + b"\n"


def _pruned_body(body: bytes, cutoff: datetime, stamp: str, result: PruneResult, *,
                 mirrored: bool) -> bytes | None:
    """The stored event ``body`` with its note text removed (``pruned_event``, encoded), or
    None when it stays as it is: not a ``task_note.*`` event, newer than ``cutoff``,
    pruned before, undated, not yet ``mirrored`` into the ledger, or unreadable (each
    of the last four counted in ``result``)."""
    try:
        event = decode_event(body)
    except UnreadableEvent:
        result.unreadable += 1
        return None
    created = _when(event.get("created"))
    if not str(event.get("type", "")).startswith("task_note."):
        kept = None
    elif created is None:
        kept = "undated"
    elif created >= cutoff:
        kept = None
    elif is_pruned(event):
        kept = "already_pruned"
    elif not mirrored:
        kept = "not_mirrored"
    else:
        pruned = pruned_event(event, stamp)
        if pruned is not None:
            result.events_pruned += 1
            return encode_event(pruned)
        kept = None
    if kept is not None:
        setattr(result, kept, getattr(result, kept) + 1)
    return None


def pruned_event(event: dict[str, Any], stamp: str) -> dict[str, Any] | None:
    """``event`` with every field that can hold note text removed, marked ``pruned_at``
    (the format is in pipeline/events.py); None if it is no ``task_note.*`` event."""
    data = event.get("data")
    data = dict(data) if isinstance(data, dict) else {}
    kind = event.get("type")
    if kind == "task_note.created":
        note = data.get("note")
        if "emr_note_id" in data:
            data["emr_note_id"] = safe_emr_note_id(data["emr_note_id"], note)
        data["note"] = None
    elif kind == "task_note.failed":
        if "failure_reason" in data:
            data["failure_reason"] = None
        if isinstance(data.get("reasons"), list):
            data["reasons"] = [{**r, "description": None} if isinstance(r, dict) else None
                               for r in data["reasons"]]
    else:
        return None
    return {**event, "data": data, PRUNED_AT: stamp}


def _when(value: object) -> datetime | None:
    """An event's ``created`` (ISO 8601) as an aware UTC datetime, or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _ids_at(lines: bytes, start: int) -> dict[str, int]:
    """Event id -> byte offset of its line, for the whole lines in ``lines``, the first of
    which begins at byte ``start`` (a line the codec refuses, or with no id, is skipped)."""
    found: dict[str, int] = {}
    at = start
    for raw in lines.splitlines(keepends=True):
        with contextlib.suppress(UnreadableEvent):
            event_id = decode_event(raw.rstrip(b"\n")).get("id")
            if isinstance(event_id, str):
                found.setdefault(event_id, at)
        at += len(raw)
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _whole_lines(fd: int) -> int:
    """The offset just past the file's last newline (a torn tail is left to the sink)."""
    return last_line_end(fd, os.fstat(fd).st_size)


def _input_copies(reports: Path, run_ids: list[str], result: PruneResult) -> None:
    """Remove (or, dry, list) the input copies of ``run_ids``' report directories, each
    marked ``PRUNED_MARK`` first (JSON: the ``cutoff`` it was pruned under), so that no
    later report of the run writes one again (an interrupted prune leaves the marker and
    the copies for the next one). Removed files go to ``result.files``; a copy that is a
    symbolic link is not followed: the link alone is removed, and listed in
    ``result.links`` (its target, which may hold note text, is not touched)."""
    for run_id in run_ids:
        directory = reports / run_id
        try:
            if not result.dry_run and not (directory / PRUNED_MARK).exists():
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write_mark(directory, {"cutoff": result.cutoff, "input_copies": "removed"})
            for name in INPUT_COPIES:
                _remove(directory / name, result)
        except OSError as exc:  # one run's odd directory must not stop the others' prune
            _failed(directory, exc, result)


def _failed(directory: Path, exc: OSError, result: PruneResult) -> None:
    """Record that ``directory`` (one run's) could not be pruned, and why (one line)."""
    where = Path(exc.filename) if exc.filename else directory
    result.failed.append((where, exc.strerror or type(exc).__name__))
    log.warning("prune: %s: %s; left for the next prune", where, exc.strerror or exc)


def _write_mark(directory: Path, mark: dict[str, str]) -> None:
    """Write ``PRUNED_MARK`` in ``directory`` whole (a temporary file, then a rename)."""
    temp = directory / f".{PRUNED_MARK}.tmp"
    try:
        temp.write_text(json.dumps(mark, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temp, directory / PRUNED_MARK)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def _remove(path: Path, result: PruneResult) -> None:
    """Remove (dry: list) ``path``: a regular file goes to ``result.files``; a symbolic
    link is never followed, the link alone goes (``result.links``); anything else, or
    nothing, is left."""
    if path.is_symlink():
        result.links.append(path)
    elif path.is_file():
        result.files.append(path)
    else:
        return
    if not result.dry_run:
        path.unlink(missing_ok=True)


def _rewrite_reports(config: RunConfig, ledger: StateStore | None, run_ids: list[str],
                     result: PruneResult) -> None:
    """Rewrite (dry: list) the report of each pruned run not rewritten since it was marked
    (its ``PRUNED_MARK`` lacks ``"report": "rewritten"``): report.html may hold note
    previews (``report.show_note_preview``) and send its reader to the removed rejects.csv;
    written again under the marker it holds neither (report.write_report). The marker
    says so only once the report is written, so a prune killed in between rewrites it
    next time. Each report.html rewritten (dry, or with no ``ledger``: to be rewritten)
    goes to ``result.reports``."""
    reconciler: Reconciler | None = None
    for run_id in run_ids:
        directory = config.report.dir / run_id
        try:
            mark = json.loads((directory / PRUNED_MARK).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            mark = {}
        if not isinstance(mark, dict):
            mark = {}
        if mark.get("report") == "rewritten":
            continue
        if any(directory in (path.parent, path) for path, _ in result.failed):
            continue  # its input copies could not be pruned: neither can its report be
        if result.dry_run or ledger is None:
            result.reports.append(directory / "report.html")
            continue
        reconciler = reconciler or Reconciler.of(ledger, config)
        try:
            rewrite_report(ledger, reconciler, run_id, config)
            _write_mark(directory, {**{str(k): str(v) for k, v in mark.items()},
                                    "cutoff": str(mark.get("cutoff", result.cutoff)),
                                    "report": "rewritten"})
        except OSError as exc:
            _failed(directory, exc, result)
            continue
        result.reports.append(directory / "report.html")


def _side_files(sink: Path, cutoff: datetime, result: PruneResult) -> None:
    """Remove (dry: list) the sink file's side files last written before ``cutoff``: their
    records carry no date of their own, so a file written to since is kept, and counted."""
    for suffix in SIDE_FILES:
        path = sink.with_name(sink.name + suffix)
        try:
            written = datetime.fromtimestamp(path.lstat().st_mtime, UTC)
        except FileNotFoundError:
            continue
        if written >= cutoff:
            result.side_kept += 1
            continue
        _remove(path, result)


def _ledger_size(path: Path) -> int:
    """The SQLite ledger's bytes on disk: its file and its WAL."""
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())
