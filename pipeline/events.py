"""The sink file: webhook event envelopes as JSON Lines, written durably, read by one reader.

Writing (``SinkFile``, used by the webhook receiver and by ``poll``):

- one ``os.write`` per line on an ``O_APPEND`` descriptor, then one ``fsync``
  per batch of lines (group commit); a caller hears "stored" only after its
  line is on disk, so a 2xx is never given for an event that a crash can lose;
- de-duplicated by event id and by a hash of the body, against everything in
  the file (loaded at open) and everything in flight, also across processes
  (an exclusive ``flock`` around each batch, catching up on lines another
  process appended since);
- the file is created 0600 in a 0700 directory, both fsync'ed on creation;
  a torn last line left by a crash mid-write is moved to ``<file>.torn``, so
  the next line starts on a fresh line.

Reading (``read_sink``): a torn last line is skipped with a warning; an
unparseable line anywhere else is an error naming its line number.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from pipeline._group import GroupCommit
from pipeline.errors import StateError

log = logging.getLogger(__name__)

Verdict = Literal["stored", "duplicate"]


class SinkWriteError(StateError):
    """An event could not be made durable (the caller must not acknowledge it)."""


def envelope_from_list_item(item: dict[str, Any]) -> dict[str, Any]:
    """A ``GET /v1/webhook-events`` item in the webhook envelope's shape and key order."""
    job_id = item.get("job_id")
    return {
        "id": item.get("event_id"),
        "access_token_reference_id": item.get("access_token_reference_id"),
        "object": "event",
        "created": item.get("created_at"),
        "type": item.get("event_type"),
        "job_id": None if job_id is None else str(job_id),
        "data": item.get("data") or {},
    }


def compact_json(payload: Any) -> bytes:
    """JSON as Cobalt writes it (``JSON.stringify``): no spaces, non-ASCII as is."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:16]


@dataclass(slots=True)
class _Line:
    data: bytes
    event_id: str
    digest: bytes
    verdict: Verdict = "stored"


class SinkFile:
    """An append-only, de-duplicated, durable JSON Lines file of event envelopes."""

    def __init__(self, path: Path, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self.path = path
        self._fsync = fsync
        self._fd = -1
        self._known = 0
        self._ids: set[str] = set()
        self._digests: set[bytes] = set()
        self._inflight: dict[str | bytes, anyio.Event] = {}
        self._group: GroupCommit[_Line] = GroupCommit(self._write, stop_on_error=False)
        self.broken: str | None = None

    # -- opening ------------------------------------------------------------------------

    def open(self) -> None:
        """Create or open the file, repair a torn tail, and load what it holds."""
        try:
            created = self._create()
            with self._locked():
                self._repair_tail()
                self._catch_up()
        except OSError as exc:
            raise StateError(f"sink file {self.path} cannot be opened: {exc.strerror}") from None
        if created:
            log.info("created sink file %s", self.path)

    def _create(self) -> bool:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            _fsync_dir(directory.parent)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            os.fsync(self._fd)
            _fsync_dir(directory)
        return created

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _repair_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        cut = _last_line_end(self._fd, size)
        fragment = os.pread(self._fd, size - cut, cut)
        with open(self.path.with_name(self.path.name + ".torn"), "ab") as torn:
            torn.write(fragment + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        os.ftruncate(self._fd, cut)
        os.fsync(self._fd)
        log.warning("sink file %s ended in a torn line (%d bytes, never acknowledged): moved to %s",
                    self.path, len(fragment), self.path.name + ".torn")

    def _catch_up(self) -> None:
        """Index lines appended since we last looked (at open, or by another process)."""
        size = os.fstat(self._fd).st_size
        if size <= self._known:
            return
        data = os.pread(self._fd, size - self._known, self._known)
        for raw in data.splitlines():
            self._digests.add(body_digest(raw))
            event_id = _event_id(raw)
            if event_id:
                self._ids.add(event_id)
        self._known = size

    # -- appending ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, event_id: str) -> bool:
        return event_id in self._ids

    async def run(self) -> None:
        """The group-commit loop; run it in a task group while appending."""
        await self._group.run()

    def stop(self) -> None:
        self._group.close()

    async def append(self, body: bytes, event_id: str) -> Verdict:
        """Store one event body durably, unless it is already stored; raises SinkWriteError."""
        if self.broken:
            raise SinkWriteError(self.broken)
        if b"\n" in body or b"\r" in body:
            body = compact_json(json.loads(body))  # one event per line, content unchanged
        digest = body_digest(body)
        if event_id in self._ids or digest in self._digests:
            return "duplicate"
        waiting = self._inflight.get(event_id) or self._inflight.get(digest)
        if waiting is not None:
            await waiting.wait()
            if event_id in self._ids or digest in self._digests:
                return "duplicate"
            raise SinkWriteError("the same event, arriving at the same time, was not stored")
        return await self._append_new(_Line(body + b"\n", event_id, digest))

    async def _append_new(self, line: _Line) -> Verdict:
        done = anyio.Event()
        self._inflight[line.event_id] = self._inflight[line.digest] = done
        try:
            await self._group.put(line)
        except OSError as exc:
            self.broken = f"sink file {self.path} cannot be written: {exc.strerror or exc}"
            log.error("%s; refusing events until restarted", self.broken)  # noqa: TRY400 - no traceback: the cause is the disk
            raise SinkWriteError(self.broken) from None
        finally:
            del self._inflight[line.event_id], self._inflight[line.digest]
            done.set()
        return line.verdict

    def _write(self, lines: list[_Line]) -> None:
        """Runs in a worker thread: one write per line, one fsync for the batch."""
        with self._locked():
            self._catch_up()
            for line in lines:
                if line.event_id in self._ids or line.digest in self._digests:
                    line.verdict = "duplicate"
                    continue
                written = os.write(self._fd, line.data)
                if written != len(line.data):
                    raise OSError(28, "short write (disk full?)")
                self._known += written
            self._fsync(self._fd)
            for line in lines:
                if line.verdict == "stored":
                    self._ids.add(line.event_id)
                    self._digests.add(line.digest)


def _last_line_end(fd: int, size: int) -> int:
    """Offset just past the last newline before ``size`` (0 if there is none)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _event_id(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    event_id = data.get("id") if isinstance(data, dict) else None
    return event_id if isinstance(event_id, str) else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_sink(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, envelope) for each event in the sink file; a missing file has none.

    A torn last line is skipped with a warning; any other unreadable line is
    a StateError naming the file and line.
    """
    for number, _, event in read_sink_from(path, 0):
        yield number, event


def read_sink_from(path: Path, start: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, offset after the line, envelope) for each event from byte ``start``.

    Line numbers count from ``start`` (1 is its first line), so they are the file's
    own only when reading from the beginning; errors name the byte offset as well.
    A torn last line ends the reading (with a warning) without being passed.
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"sink file {path} cannot be read: {exc.strerror}") from None
    with fh:
        fh.seek(start)
        offset = start
        for number, raw in enumerate(fh, start=1):
            where = f"line {number}" if start == 0 else f"byte {offset}"
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not raw.endswith(b"\n") and not fh.peek(1):
                    log.warning("%s %s: torn last line ignored (a crash mid-write)", path, where)
                    return
                raise StateError(f"sink file {path} {where}: not a JSON event") from None
            if not isinstance(event, dict):
                raise StateError(f"sink file {path} {where}: not a JSON object")
            yield number, offset, event
