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
  a torn last line left by a crash mid-write is moved to ``<file>.torn``
  (0600: a fragment may hold note text), so the next line starts on a fresh line;
- a failed write (disk full, I/O error) is undone (the file is cut back to
  its last whole line) and reported to every caller of the batch; the next
  append tries again, so storage resumes as soon as the disk has room;
- each stored line gets a receipt in ``<file>.received`` (``receipts_path``),
  written and fsync'ed in the same group commit BEFORE its line is written, so
  a line a reader can see always has its receipt: the sink file itself stays
  exactly the bytes Cobalt sent, so the time the sink received an event (UTC,
  milliseconds) lives beside it, keyed by event id as ``safe_id`` keeps it
  (``read_receipts``). An event ``poll`` fetched has a receipt saying so
  (``via: poll``) and when it was fetched, not a receive time.

Reading (``read_sink``, ``read_sink_from``): a torn last line is skipped with a
warning; any other line the codec refuses is set aside (``SetAside``: its byte
offset, a code, its bytes), so one bad line never stops a reader. A reader that
wants receive times measures the sink file first, then reads the receipts, then
the lines up to that size only (``read_sink_from``'s ``stop``): every such line's
receipt was on disk before the line was, so none is missed to a race.

Pruned events (``tasknotes prune``, pipeline/retention.py): past the retention limit a
``task_note.*`` event keeps its line, its id and every field but the ones that
can hold note text, and gains a top-level ``"pruned_at"`` (ISO 8601 UTC):
``data.note`` becomes ``null`` in a ``task_note.created`` event (``data.emr_note_id``
is kept when it looks like an id, else redacted), and ``data.failure_reason`` and
each ``data.reasons[].description`` become ``null`` in a ``task_note.failed`` one
(the reason codes stay). A pruned event is an ordinary event to the codec and to
every reader (``is_pruned`` tells it apart); it still matches its row by job id,
but no longer carries the note text that settles an ambiguous row (the ledger
keeps the hash it took of it before the prune).

The event codec (``decode_event``) is the one parse used by the receiver, the
sink file's own index and every reader, so the sink never acknowledges a body
a reader would refuse. It accepts exactly: strict UTF-8 (RFC 8259 section 8.1:
no BOM, no UTF-16/32 detection, no encoded surrogates), one JSON object, at
most ``MAX_DEPTH`` levels deep and ``MAX_EVENT_BYTES`` long, finite numbers only
(no ``NaN``/``Infinity``, no integer longer than Python's 4,300-digit limit), and
no string holding a lone surrogate escape such as ``"\\ud83d"`` (RFC 8259
section 8.2 leaves those undefined; they cannot be encoded as UTF-8, so the
ledger could not store them).

Over 400 lines because the sink file's writer (group commit, flock, receipts) and its
reader (offsets, set-aside lines, the codec) must agree byte for byte on the format.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import orjson

from pipeline._group import GroupCommit
from pipeline.errors import StateError
from pipeline.redaction import safe_id

log = logging.getLogger(__name__)

Verdict = Literal["stored", "duplicate"]

# Cobalt's envelope nests four levels (event, data, reasons, a reason); 32 leaves room
# for other event types and stays far below the parser's recursion limit (~1,000).
MAX_DEPTH: Final = 32
# The receiver refuses bodies over ``webhooks.max_body_bytes`` (at most this) before
# parsing; this bounds what any reader parses, whatever a hand edit put in the file.
MAX_EVENT_BYTES: Final = 16 * 1024 * 1024


class SinkWriteError(StateError):
    """An event could not be made durable (the caller must not acknowledge it)."""


class UnreadableEvent(ValueError):
    """Bytes the event codec refuses; ``code`` says why, in kebab-case:

    ``too-large``, ``not-utf8``, ``too-deep``, ``not-json``, ``not-finite``,
    ``not-an-object``, ``lone-surrogate`` (and ``no-id`` / ``bad-id`` from
    ``check_event_id``, ``unstorable`` from a store refusing the row). The
    message never quotes the bytes.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# An event id is a key in every store: the sink file's index and PostgreSQL's unique
# btree (whose entries hold at most ~2,700 bytes; text there cannot hold NUL). Cobalt's
# ids are short ("evt_" and 24 characters); this bound leaves room and fits everywhere.
MAX_EVENT_ID_CHARS: Final = 255


# Unicode category Cc is exactly these 65 code points (C0, DEL, C1); one regex search
# instead of a category lookup per character of every id the sink receives.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_event_id(value: object) -> str:
    """``value`` if it can be an event id in every store: a non-empty string of at most
    ``MAX_EVENT_ID_CHARS`` characters with no control character (Unicode category Cc,
    NUL included). Raises UnreadableEvent ``no-id`` (missing, empty, not a string) or
    ``bad-id``; the receiver answers either with 400, whichever backend stores events."""
    if not isinstance(value, str) or not value:
        raise UnreadableEvent("no-id", "an event needs a non-empty string id")
    if len(value) > MAX_EVENT_ID_CHARS:
        raise UnreadableEvent("bad-id", f"an event id of {len(value):,} characters, more "
                                        f"than {MAX_EVENT_ID_CHARS}")
    if _CONTROL.search(value):
        raise UnreadableEvent("bad-id", "an event id holding a control character")
    return value


def decode_event(raw: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> dict[str, Any]:
    """One JSON event object from ``raw`` (UTF-8 bytes, no trailing newline needed).

    The only parse of an event in tasknotes (module docstring lists the rules).
    Raises UnreadableEvent; never RecursionError, UnicodeError or a bare ValueError.

    Parsed by orjson (strict RFC 8259: UTF-8 checked, no surrogates, no ``NaN``/
    ``Infinity``, no BOM) where it gives what the standard library's ``json`` gives:
    a line holding a bare number of 19 or more digits (which orjson reads as a float
    past 64 bits), many brackets, or anything orjson refuses goes to ``json``, which
    says why (``decode_event_stdlib``). The same bytes give the same event or the same
    refusal either way, only about three times faster (a million events per
    reconcile of 1M rows, and every webhook the sink receives).
    """
    if len(raw) > max_bytes:
        raise UnreadableEvent("too-large", f"{len(raw):,} bytes, more than {max_bytes:,}")
    if raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH and not _long_number(raw):
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # refused: the standard library's parse below says why, with its code
        else:
            if isinstance(event, dict):
                return event
    return decode_event_stdlib(raw)


def _long_number(raw: bytes) -> bool:
    """Whether ``raw`` may hold a bare number of 19 or more digits, which orjson reads as a
    float past 64 bits where ``json`` reads the integer it is: 19 digits in a row that start
    a token (after ``[ , :`` or whitespace, a ``-`` allowed between, or at the start). Such
    a run inside a string after a space counts too: that line only goes the slower way.
    Found in ``raw`` reduced to token starts, minus signs and digits (C speed: a regex
    scans a line ten times slower)."""
    shape = raw.translate(_NUMBER_SHAPE)
    return (_BARE in shape or _BARE_NEGATIVE in shape or shape.startswith(_BARE[1:])
            or shape.startswith(_BARE_NEGATIVE[1:]))


# Each byte as _long_number reads it: a digit 0, a minus sign -, a token start (``[ , :``
# or JSON whitespace) a space, anything else x.
_NUMBER_SHAPE: Final = bytes(
    0x30 if chr(b).isdigit() and b < 0x80 else 0x2D if b == 0x2D
    else 0x20 if bytes([b]) in b"[,: \t\r\n" else 0x78 for b in range(256))
_BARE: Final = b" " + b"0" * 19
_BARE_NEGATIVE: Final = b" -" + b"0" * 19


def decode_event_stdlib(raw: bytes) -> dict[str, Any]:
    """``decode_event`` by the standard library's ``json`` alone (no size check): the
    definition the orjson path is held to, and what says why a line is refused."""
    try:
        text = raw.decode("utf-8")  # strict: no BOM sniffing, no UTF-16/32, no surrogates
    except UnicodeDecodeError as exc:
        raise UnreadableEvent("not-utf8", f"invalid UTF-8 at byte {exc.start}") from None
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise UnreadableEvent("too-deep", f"nested more than {MAX_DEPTH} levels")
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it (a BOM is not JSON)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        event = _DECODER.decode(text)  # json.loads with these hooks, its decoder made once
    except _NotFinite:
        raise UnreadableEvent("not-finite", "NaN, Infinity or an overflowing number") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; int digit limit
        raise UnreadableEvent("not-json", str(exc).split(":")[0][:80]) from None
    if not isinstance(event, dict):
        raise UnreadableEvent("not-an-object", f"a JSON {type(event).__name__}, not an object")
    if "\\u" in text:  # only an escape can produce a lone surrogate after strict decoding
        try:
            compact_json(event)
        except UnicodeEncodeError:
            raise UnreadableEvent("lone-surrogate",
                                  "a \\uD800-\\uDFFF escape outside a surrogate pair") from None
    return event


def encode_event(event: dict[str, Any]) -> bytes:
    """``event`` as one sink line (compact JSON, no newline), checked by ``decode_event``.

    Raises UnreadableEvent when the result is something no reader would accept
    (a lone surrogate in a string, a non-finite float, too deep or too large).
    """
    try:
        line = compact_json(event)
    except UnicodeEncodeError:
        raise UnreadableEvent("lone-surrogate",
                              "a string holds a lone surrogate") from None
    except (ValueError, RecursionError):
        raise UnreadableEvent("not-json", "not representable as JSON") from None
    decode_event(line)
    return line


PRUNED_AT: Final = "pruned_at"
# Left by ``tasknotes prune`` in a pruned run's report directory (JSON, no note text): its
# input copies are gone for good and its report was rewritten without note text, so no
# later report of the run writes any again (report.write_report). Here, beside the pruned
# event format, so that report.py and retention.py both read it without importing each other.
PRUNED_MARK: Final = "pruned.json"


def is_pruned(event: dict[str, Any]) -> bool:
    """True if ``tasknotes prune`` removed the note text from ``event`` (module docstring)."""
    return isinstance(event.get(PRUNED_AT), str)


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotFinite(text)
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings, counted until it passes MAX_DEPTH."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            break
    return depth


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
    received_at: str | None = None  # None: fetched by poll
    verdict: Verdict = "stored"


class SinkFile:
    """An append-only, de-duplicated, durable JSON Lines file of event envelopes."""

    def __init__(self, path: Path, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self.path = path
        self._fsync = fsync
        self._fd = -1
        self._receipts = -1
        self._known = 0
        self._ids: set[str] = set()
        self._digests: set[bytes] = set()
        self._inflight: dict[str | bytes, anyio.Event] = {}
        self._group: GroupCommit[_Line] = GroupCommit(self._write, stop_on_error=False)
        self._cut_to: int | None = None
        self.broken: str | None = None

    # -- opening ------------------------------------------------------------------------

    def open(self) -> None:
        """Create or open the file, repair a torn tail, and load what it holds."""
        try:
            created = self._create()
            with self._locked():
                self._repair_tail()
                _drop_torn_tail(self._receipts)
                self._catch_up()
        except OSError as exc:
            raise StateError(f"sink file {self.path} cannot be opened: {exc.strerror}") from None
        if created:
            log.info("created sink file %s", self.path)

    def _create(self) -> bool:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            fsync_dir(directory.parent)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        receipts = receipts_path(self.path)
        new_receipts = not receipts.exists()
        self._receipts = os.open(receipts, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if created or new_receipts:
            os.fsync(self._fd)
            os.fsync(self._receipts)
            fsync_dir(directory)
        return created

    def close(self) -> None:
        for fd in (self._fd, self._receipts):
            if fd >= 0:
                os.close(fd)
        self._fd = self._receipts = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive ``flock`` on the sink file, following a replacement first.

        ``tasknotes prune`` (pipeline/retention.py) replaces the file by a rename while it
        holds this same lock on the file it replaces; whoever takes the lock next finds
        the path naming another file, and moves to it before writing a line.
        """
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._follow_replacement()
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _follow_replacement(self) -> None:
        """Called under the lock: if the path now names another file (a prune renamed its
        rewrite over it), lock and use that file; the caller's ``_catch_up`` then indexes
        it from its start (the ids and digests already known stay: the rewrite keeps every
        event id)."""
        while not _same_file(self.path, self._fd):
            # O_CREAT: moved away (a rotation by hand), the path starts afresh, 0600
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self._known = fd, 0
            log.info("sink file %s was replaced (pruned, or moved away): writing to the file"
                     " now at that path", self.path)

    def _repair_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        cut = last_line_end(self._fd, size)
        fragment = os.pread(self._fd, size - cut, cut)
        _append_private(self.path.with_name(self.path.name + ".torn"), fragment + b"\n")
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

    @property
    def destination(self) -> str:
        """Where the events go, for people: the file's path."""
        return str(self.path)

    def count(self) -> int:
        """Events on file (distinct ids), as read when opened plus those appended since."""
        return len(self._ids)

    async def run(self) -> None:
        """The group-commit loop; run it in a task group while appending."""
        await self._group.run()

    def stop(self) -> None:
        self._group.close()

    async def append(self, body: bytes, event_id: str, *, received_at: str | None = None
                     ) -> Verdict:
        """Store one event body durably, unless it is already stored.

        ``body`` must be one that ``decode_event`` accepts (the receiver checks it).
        ``received_at`` (ISO 8601, UTC, milliseconds) is when the receiver got the
        delivery; None means ``poll`` fetched the event (its receipt then says so, with
        the time of the fetch). Raises SinkWriteError when it cannot be stored now
        (the next call tries again).
        """
        if b"\n" in body or b"\r" in body:  # one event per line, content unchanged
            body = encode_event(decode_event(body))
        digest = body_digest(body)
        if event_id in self._ids or digest in self._digests:
            return "duplicate"
        waiting = self._inflight.get(event_id) or self._inflight.get(digest)
        if waiting is not None:
            await waiting.wait()
            if event_id in self._ids or digest in self._digests:
                return "duplicate"
            raise SinkWriteError("the same event, arriving at the same time, was not stored")
        return await self._append_new(_Line(body + b"\n", event_id, digest, received_at))

    async def _append_new(self, line: _Line) -> Verdict:
        done = anyio.Event()
        self._inflight[line.event_id] = self._inflight[line.digest] = done
        try:
            await self._group.put(line)
        except OSError as exc:
            if self.broken is None:
                log.error("sink file %s cannot be written: %s; answering 503 and trying"  # noqa: TRY400 - no traceback: the cause is the disk
                          " again with each delivery", self.path, exc.strerror or exc)
            self.broken = f"sink file {self.path} cannot be written: {exc.strerror or exc}"
            raise SinkWriteError(self.broken) from None
        else:
            if self.broken is not None:
                log.warning("sink file %s is written again", self.path)
                self.broken = None
        finally:
            del self._inflight[line.event_id], self._inflight[line.digest]
            done.set()
        return line.verdict

    def _write(self, lines: list[_Line]) -> None:
        """Runs in a worker thread: one write per line, one fsync for the batch.

        On any OSError the batch's bytes are cut off again (none was acknowledged),
        so the file ends on a whole line and the next batch can simply try again.
        """
        with self._locked():
            if self._cut_to is not None:  # an earlier cut failed: no line may follow a fragment
                self._cut_back(self._cut_to)
            self._catch_up()
            start = self._known
            receipts_start = os.fstat(self._receipts).st_size
            try:
                self._write_batch(lines)
            except OSError:
                self._known = start
                _cut_receipts(self._receipts, receipts_start)
                try:
                    self._cut_back(start)
                except OSError as exc:
                    log.error("sink file %s: cannot cut a failed write back to %d bytes: %s;"  # noqa: TRY400 - the cause is the disk
                              " trying again before the next write", self.path, start,
                              exc.strerror or exc)
                raise

    def _write_batch(self, lines: list[_Line]) -> None:
        """Receipts first, made durable, then the lines: a reader (reconcile, without the
        lock) that sees a line always finds its receipt, since it reads the receipts
        after measuring the sink file (``ingest``). A receipt without its line (a batch
        cut back) is harmless; a line without its receipt would lose its receive time.
        A receipt names its event by ``safe_id``: an id that does not look like one is
        kept withheld, as everywhere else."""
        receipts: list[bytes] = []
        fetched_at = None
        offset = self._known
        for line in lines:
            if line.event_id in self._ids or line.digest in self._digests:
                line.verdict = "duplicate"
                continue
            receipt: dict[str, Any] = {"id": safe_id(line.event_id), "offset": offset}
            if line.received_at is not None:
                receipt["received_at"] = line.received_at
            else:
                fetched_at = fetched_at or receive_time()
                receipt |= {"via": "poll", "fetched_at": fetched_at}
            receipts.append(compact_json(receipt) + b"\n")
            offset += len(line.data)
        if receipts:
            data = b"".join(receipts)
            if os.write(self._receipts, data) != len(data):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            self._fsync(self._receipts)
        for line in lines:
            if line.verdict != "stored":
                continue
            written = os.write(self._fd, line.data)
            if written != len(line.data):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            self._known += written
        self._fsync(self._fd)
        for line in lines:
            if line.verdict == "stored":
                self._ids.add(line.event_id)
                self._digests.add(line.digest)

    def _cut_back(self, size: int) -> None:
        """Truncate to ``size`` after a failed batch (shrinking needs no free space).

        Raises OSError if it cannot; ``_cut_to`` then remembers the cut still owed.
        """
        self._cut_to = size
        if os.fstat(self._fd).st_size > size:
            os.ftruncate(self._fd, size)
            self._fsync(self._fd)
        self._cut_to = None

    def probe(self) -> str | None:
        """None if an event could be stored now, else why not (for ``/healthz``).

        After a failed write this writes and fsyncs 4 KiB into a scratch file beside
        the sink file (0600, removed at once), at the sink file's own end offset (a
        sparse file): so a per-file size limit (RLIMIT_FSIZE, EFBIG) that stops the sink
        file stops the probe too, and health turns good when the disk has room again,
        before the next delivery proves it.
        """
        if self.broken is None:
            return None
        scratch = self.path.with_name(f".{self.path.name}.probe")
        try:
            end = os.fstat(self._fd).st_size if self._fd >= 0 else 0
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if os.pwrite(fd, b"\0" * 4096, end) != 4096:
                    raise OSError(errno.ENOSPC, "short write")
                self._fsync(fd)
            finally:
                os.close(fd)
                scratch.unlink(missing_ok=True)
        except OSError as exc:
            return f"sink file {self.path} cannot be written: {exc.strerror or exc}"
        return None


def receive_time() -> str:
    """Now as ISO 8601 UTC with milliseconds, as the ledger writes ``submitted_at``."""
    # isoformat, not strftime: the same text (``...+00:00`` becomes ``Z``) in a third of
    # the time, paid by every delivery the sink takes
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _cut_receipts(fd: int, size: int) -> None:
    """Cut the receipts file back to ``size`` after a failed batch (see ``_cut_back``).

    Best effort: a receipt left behind names an event that is not in the sink file (or
    is stored later, by a retry, under an earlier receive time), which no reader
    mistakes for a stored event.
    """
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)


def _drop_torn_tail(fd: int) -> None:
    """Cut a receipts file's torn last line (a crash mid-write: never acknowledged).

    A receipt holds no note text, so the fragment is dropped, not kept.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.ftruncate(fd, last_line_end(fd, size))
        os.fsync(fd)


def receipts_path(sink: Path) -> Path:
    """Where the sink keeps its receipts (receive times): ``<sink>.received``."""
    return sink.with_name(sink.name + ".received")


@dataclass(frozen=True, slots=True)
class Receipt:
    """When the sink got an event: ``received_at`` (UTC, ms) for a webhook delivery, or
    ``fetched_at`` with ``polled`` True for an event ``poll`` fetched."""

    received_at: str | None
    polled: bool
    fetched_at: str | None = None


_RECEIPT_TIME: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_EARLIEST: Final = "2000-01-01T00:00:00.000Z"  # a receive time before this is not one


def receipt_time(value: object) -> str | None:
    """``value`` if it is a receive time as the sink writes it (``receive_time``: UTC,
    ``YYYY-MM-DDTHH:MM:SS.mmmZ``, a real date, not before 2000 nor more than a day
    ahead of now), else None: a receipt edited by hand or garbled on disk is no time."""
    if not isinstance(value, str) or not _RECEIPT_TIME.fullmatch(value):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value < _EARLIEST or when > datetime.now(UTC) + timedelta(days=1):
        return None
    return value


def read_receipts(sink: Path, since: int = 0) -> dict[str, Receipt] | None:
    """Receipts of the events stored at byte ``since`` of ``sink`` or later, by event id
    (as ``safe_id`` keeps it: the sink writes them so).

    The first receipt of an id wins. None when the receipts file does not exist (a
    sink file written before receipts were kept). Unreadable lines are skipped, and so is
    a receipt whose time is not one (``receipt_time``): its event has no usable receive
    time, and a warning counts them. A receipt whose sink line is not there (a batch cut
    back) is harmless. Only receipts at ``since`` or later are kept, so memory follows
    what is new.
    """
    path = receipts_path(sink)
    if not path.exists():
        return None
    found: dict[str, Receipt] = {}
    bad = 0
    for record in _side_records(path):
        event_id, offset = record.get("id"), record.get("offset")
        if not isinstance(event_id, str) or event_id in found:
            continue
        if isinstance(offset, int) and offset < since:
            continue
        if record.get("via") == "poll":
            found[event_id] = Receipt(None, True, receipt_time(record.get("fetched_at")))
        elif (received := receipt_time(record.get("received_at"))) is not None:
            found[event_id] = Receipt(received, False)
        else:
            bad += 1
    if bad:
        log.warning("%s: %d receipt(s) with no readable receive time ignored: those events'"
                    " outcome times are their own created times", path, bad)
    return found


def carry_receipts(sink: Path, moved: dict[str, int], *, since: int, begin: int = 0,
                   end: int | None = None) -> int:
    """Give the events ``tasknotes prune`` moved a receipt naming where each now is.

    ``moved``: event id -> the byte offset of its line in the pruned rewrite of ``sink``.
    For each, the first receipt at ``since`` or later in the file it replaces (found
    between bytes ``begin`` and ``end`` of the receipts file; None: its end) is appended
    again with the new offset (same receive time), so that a reader going on from a
    position in the rewrite finds it: ``read_receipts`` keeps only the receipts at or
    after its position, and a line can move past it when pruned lines grow. Prune calls
    this before its rename (the tail's under the sink's lock): killed, one more receipt
    of an event, with the same time, is harmless. Returns how many were appended.
    """
    path = receipts_path(sink)
    wanted = {str(safe_id(event_id)): offset for event_id, offset in moved.items()}
    if not wanted or not path.exists():
        return 0
    found: dict[str, dict[str, Any]] = {}
    with path.open("rb") as fh:
        fh.seek(begin)
        at = begin
        for raw in fh:
            at += len(raw)
            if end is not None and at > end:
                break
            with contextlib.suppress(UnreadableEvent):
                record = decode_event(raw.rstrip(b"\n"))
                event_id, offset = record.get("id"), record.get("offset")
                if (isinstance(event_id, str) and event_id in wanted and event_id not in found
                        and isinstance(offset, int) and offset >= since):
                    found[event_id] = record
    out = [compact_json({**record, "offset": wanted[event_id]})
           for event_id, record in found.items() if record["offset"] != wanted[event_id]]
    if out:
        _append_private(path, b"\n".join(out) + b"\n")
    return len(out)


def _append_private(path: Path, data: bytes) -> None:
    """Append ``data`` to a side file created 0600 (and made 0600 if it was not), fsync'ed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def last_line_end(fd: int, size: int) -> int:
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
        event_id = decode_event(raw).get("id")
    except UnreadableEvent:
        return None
    return event_id if isinstance(event_id, str) else None


def _same_file(path: Path, fd: int) -> bool:
    """True if ``path`` names the file open as ``fd`` (same device and inode)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` itself: a file created or renamed in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class SetAside:
    """A line of the sink file that the codec refuses (an older file, a hand edit).

    ``offset`` is the byte offset of its start in the file, ``code`` the
    UnreadableEvent code, ``raw`` its bytes without the newline.
    """

    offset: int
    code: str
    raw: bytes


# The files tasknotes keeps beside the sink file ``<sink><suffix>``: its receipts, the lines
# a reader set aside, a torn tail, and prune's lock (retention.py).
SIDE_SUFFIXES: Final = (".received", ".set-aside", ".torn", ".prune.lock")


def rotated_copies(sink: Path) -> list[Path]:
    """Files beside ``sink`` named like copies of it (``<sink>.1``, ``<sink>-20261130``,
    ``<sink>.1.gz``: what logrotate or a hand leaves) that are none of tasknotes' own side
    files (``SIDE_SUFFIXES``), sorted. No reader reads them and prune does not prune them:
    the events in them are neither mirrored nor pruned (README, Retention)."""
    try:
        names = sorted(os.listdir(sink.parent))
    except OSError:
        return []
    return [sink.with_name(name) for name in names if _rotated_name(sink, name)]


def _rotated_name(sink: Path, name: str) -> bool:
    """``<sink>.1``, ``<sink>-DATE``... or, as logrotate's ``dateext`` with ``extension``
    names them, ``<stem>-DATE<suffix>`` / ``<stem>.1<suffix>`` (a digit after the stem:
    ``webhooks-north.jsonl`` is another config's sink file, not a copy)."""
    if name != sink.name and name.startswith(sink.name) and name[len(sink.name)] in ".-_":
        return name[len(sink.name):] not in SIDE_SUFFIXES
    stem = sink.stem
    if not sink.suffix or name == sink.name or not name.startswith(stem):
        return False
    rest = name[len(stem):]
    return (len(rest) > 1 and rest[0] in ".-_" and rest[1].isdigit()
            and sink.suffix in rest[1:])


def set_aside_path(sink: Path) -> Path:
    """Where a reader keeps the sink file's unreadable lines: ``<sink>.set-aside``."""
    return sink.with_name(sink.name + ".set-aside")


def keep_set_aside(sink: Path, lines: list[SetAside]) -> int:
    """Append ``lines`` to the side file (0600, fsync'ed), each once; returns how many new.

    One JSON object per line: ``{"offset", "code", "bytes", "sha256", "line_base64"}``;
    a line already kept (same offset and digest, as when a replaced sink file is
    read again) is not written twice. The side file may hold note text: never share it.
    """
    path = set_aside_path(sink)
    try:
        kept = {(r.get("offset"), r.get("sha256")) for r in _side_records(path)}
    except OSError:
        kept = set()
    out = []
    for line in lines:
        digest = hashlib.sha256(line.raw).hexdigest()
        if (line.offset, digest) in kept:
            continue
        kept.add((line.offset, digest))
        out.append(compact_json({"offset": line.offset, "code": line.code,
                                 "bytes": len(line.raw), "sha256": digest,
                                 "line_base64": base64.b64encode(line.raw).decode()}))
    if out:
        _append_private(path, b"\n".join(out) + b"\n")
    return len(out)


def _side_records(path: Path) -> Iterator[dict[str, Any]]:
    with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
        for raw in fh:
            with contextlib.suppress(UnreadableEvent):
                yield decode_event(raw.rstrip(b"\n"))


def read_sink_from(path: Path, start: int, stop: int | None = None, *, fd: int | None = None
                   ) -> Iterator[tuple[int, int, dict[str, Any] | SetAside]]:
    """(line number, offset after the line, envelope or SetAside) for each line from ``start``
    (bytes), up to byte ``stop`` (a line that would end past it is left for the next read;
    None: to the end).

    Every line goes through ``decode_event``; one it refuses comes back as a
    SetAside, and reading goes on. Line numbers count from ``start`` (1 is its
    first line). A torn last line (no newline, refused) ends the reading with a
    warning, without being passed: the sink moves it aside when it next opens.
    ``fd``: the file, open already (it is read through a duplicate of it; ``path`` only
    names it), so that a reader that measured the file reads that file, even if a
    prune renamed another one over its path meanwhile.
    """
    try:
        fh = path.open("rb") if fd is None else os.fdopen(os.dup(fd), "rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"sink file {path} cannot be read: {exc.strerror}") from None
    with fh:
        fh.seek(start)
        offset = start
        for number, raw in enumerate(fh, start=1):
            if stop is not None and offset + len(raw) > stop:
                return
            begin, offset = offset, offset + len(raw)
            line = raw.rstrip(b"\n")
            if not line or line.isspace():  # what line.strip() leaves empty, without a copy
                continue
            try:
                event: dict[str, Any] | SetAside = decode_event(line)
            except UnreadableEvent as exc:
                if not raw.endswith(b"\n") and not fh.peek(1):
                    log.warning("%s byte %d: torn last line ignored (a crash mid-write)",
                                path, begin)
                    return
                event = SetAside(begin, exc.code, line)
            yield number, offset, event
