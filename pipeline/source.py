"""CSV file(s) -> a header, then batches of raw records with physical line numbers.

Every cell is a ``str`` exactly as written: ``NA``, ``null``, ``0001`` stay text.
Tokenising is done by the C tokenizer of the standard ``csv`` module rather
than ``pandas.read_csv``: at the same speed on this machine (PERF-NOTES.md,
and ``bench/validate.py``) it reports the physical line on which each record
starts, keeps a row with a field too many as a row (pandas' C engine drops or
pads it), and lets an undecodable byte be pinned to its line. Memory is
bounded by the batch size, not by the file. (pandas does the set work
downstream: reconciliation and reports.)

A record's line number is the physical line where it starts, counting every
line of the file from 1 (header, blank lines and the lines inside multi-line
quoted notes included), so ``sed -n 17p`` on the file shows where row 17 begins.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from pipeline.config import InputConfig
from pipeline.errors import InputError

log = logging.getLogger(__name__)

UTF8_BOM = codecs.BOM_UTF8
# A field longer than this is a runaway quote, not a note (max_note_chars is far below).
FIELD_LIMIT = 16 * 1024 * 1024
csv.field_size_limit(FIELD_LIMIT)
# Every byte but the C0 controls other than tab, LF and CR: ``data.translate(None,
# _NOT_CONTROL)`` leaves only the control bytes that make a line need the slow checks.
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 0x20 and b not in b"\t\n\r"))


@dataclass(frozen=True, slots=True)
class Header:
    """A file's header row: names as written, and the positions of the fields we use."""

    names: tuple[str, ...]
    line: int
    task_col: int
    note_col: int
    passthrough_cols: tuple[int, ...]

    @property
    def width(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Consecutive records of one file: ``lines[i]`` is where ``rows[i]`` starts.

    ``careful`` lists the records that need the slow checks: those spanning
    several lines (a CRLF inside to normalise) or touching a line that holds a
    control character, a lone CR or an undecodable byte. The rest are plain.
    """

    file_no: int
    lines: list[int]
    rows: list[list[str]]
    careful: list[int]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or globs, in a stable order; InputError if one matches nothing."""
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            names = glob.glob(pattern, recursive=True)
            matches = sorted(p for p in map(Path, names) if p.is_file())
            if not matches:
                raise InputError(f"no input file matches {pattern!r}")
            found.extend(matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                what = "is not a file" if path.exists() else "not found"
                raise InputError(f"input file {what}: {path}")
            found.append(path)
    if len({p.resolve() for p in found}) != len(found):
        raise InputError("the same input file is named twice")
    return found


class _Watched(io.RawIOBase):
    """The file's bytes on their way to the decoder: hashed, and searched for control bytes.

    Decoding and splitting into lines is left to ``io.TextIOWrapper`` (C, and
    it splits on LF, CRLF and CR only, as the csv module needs). Each raw read
    (1 MiB) is hashed and searched for C0 control bytes other than tab, LF and
    CR with ``bytes.translate``. A read that has some marks a conservative
    range of lines as suspect: from the first line not yet handed to the csv
    tokenizer, to the line it has reached two reads later (by then the text
    layer, which holds at most a few KiB ahead, has passed every byte of it).
    A lone CR needs no search: it always makes its record span two lines.
    """

    def __init__(self, raw: IO[bytes], lines_consumed: Callable[[], int]) -> None:
        self._raw = raw
        self._lines_consumed = lines_consumed
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.suspect: list[list[int]] = []  # [first line, last line, reads until last is known]
        self._open: list[list[int]] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = int(self._raw.readinto(buffer) or 0)  # type: ignore[attr-defined]
        consumed = self._lines_consumed()
        for span in self._open:
            span[2] -= 1
            if span[2] == 0:
                span[1] = consumed + 1
        self._open = [span for span in self._open if span[2] > 0]
        if n:
            chunk = bytes(memoryview(buffer)[:n])
            self.sha256.update(chunk)
            self.size += n
            if chunk.translate(None, _NOT_CONTROL):
                span = [consumed + 1, sys.maxsize, 2]
                self.suspect.append(span)
                self._open.append(span)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class CsvFile:
    """One input file, opened for one pass: ``header``, then ``batches()``.

    Use as a context manager. After the pass, ``sha256`` and ``size`` describe
    the bytes read and ``blank_lines`` counts the empty lines skipped.
    """

    def __init__(self, path: Path, settings: InputConfig, *, file_no: int = 0) -> None:
        self.path = path
        self.file_no = file_no
        self._settings = settings
        self._errors = "surrogateescape" if settings.on_bad_encoding == "reject" else "strict"
        self.blank_lines = 0
        self.had_bom = False
        self._raw: IO[bytes] | None = None
        self._lines: _Watched | None = None
        self._reader: Iterator[list[str]] | None = None
        self._line_num = 0
        self.header: Header

    @property
    def sha256(self) -> str:
        assert self._lines is not None
        return self._lines.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._lines.size if self._lines is not None else 0

    def __enter__(self) -> Self:
        try:
            self._raw = self.path.open("rb", buffering=0)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror})") from None
        self._lines = _Watched(self._raw, self._line_num_now)
        buffered = io.BufferedReader(self._lines, buffer_size=1 << 20)
        self.had_bom = buffered.peek(3)[:3] == UTF8_BOM
        if self.had_bom:
            buffered.read(3)
            if codecs.lookup(self._settings.encoding).name != "utf-8":
                log.warning("%s starts with a UTF-8 byte-order mark, but input.encoding is %s",
                            self.path, self._settings.encoding)
        if self._errors != "strict":  # undecodable bytes become surrogates: check every row
            self._lines.suspect.append([1, sys.maxsize, 0])
        text = io.TextIOWrapper(buffered, encoding=self._settings.encoding, errors=self._errors,
                                newline="")
        self._reader = csv.reader(
            text, delimiter=self._settings.delimiter, quotechar='"', doublequote=True,
            skipinitialspace=False, strict=False,
        )
        try:
            self.header = self._read_header()
        except BaseException:
            self._raw.close()
            raise
        return self

    def _line_num_now(self) -> int:
        reader = self._reader
        return int(reader.line_num) if reader is not None else 0  # type: ignore[attr-defined]

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._raw is not None:
            self._raw.close()

    def batches(self, size: int = 8192) -> Iterator[RawBatch]:
        """Records after the header, ``size`` at a time, blank lines left out."""
        while True:
            batch = RawBatch(self.file_no, [], [], [])
            self._fill(batch, size)
            if batch.rows:
                yield batch
            if len(batch.rows) < size:
                return

    def _fill(self, batch: RawBatch, size: int) -> None:
        reader, lines = self._reader, self._lines
        assert reader is not None
        assert lines is not None
        prev = self._line_num
        append_line, append_row, rows = batch.lines.append, batch.rows.append, batch.rows
        suspect = lines.suspect
        try:
            for row in reader:
                end = reader.line_num  # type: ignore[attr-defined]
                if row:
                    append_line(prev + 1)
                    append_row(row)
                    if end != prev + 1 or (suspect and end >= suspect[0][0]):
                        self._mark_careful(batch, prev + 1, end)
                else:
                    self.blank_lines += 1
                prev = end
                if len(rows) >= size:
                    break
        except UnicodeDecodeError:
            line, hexed = self._locate_bad_bytes()
            raise InputError(
                f"{self.path} line {line}: bytes {hexed} are not valid {self._settings.encoding}; "
                "set input.encoding (e.g. cp1252) to the file's encoding, or "
                "input.on_bad_encoding: reject to set such rows aside"
            ) from None
        except csv.Error as exc:
            raise InputError(
                f"{self.path} line {prev + 1}: cannot be parsed as CSV ({exc}); "
                "look for a quote that is opened and never closed"
            ) from None
        except OSError as exc:
            raise InputError(f"{self.path}: read failed ({exc.strerror})") from None
        self._line_num = prev

    def _mark_careful(self, batch: RawBatch, start: int, end: int) -> None:
        suspect = self._lines.suspect if self._lines is not None else []
        while suspect and suspect[0][1] < start:
            del suspect[0]
        if end != start or (suspect and suspect[0][0] <= end):
            batch.careful.append(len(batch.rows) - 1)

    def _read_header(self) -> Header:
        batch = RawBatch(self.file_no, [], [], [])
        self._fill(batch, 1)
        if not batch.rows:
            raise InputError(f"{self.path}: the file is empty (no header row)")
        return make_header(self.path, batch.rows[0], batch.lines[0], self._settings)

    def _locate_bad_bytes(self) -> tuple[int, str]:
        """Physical line and bytes of the first undecodable sequence (slow path, errors only)."""
        decoder = codecs.getincrementaldecoder(self._settings.encoding)("strict")
        with self.path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                chunk = raw[3:] if number == 1 and raw.startswith(UTF8_BOM) else raw
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    return number, chunk[exc.start : exc.end].hex(" ")
        return self._line_num + 1, "?"


def clean_name(name: str) -> str:
    """A header name as matched against the config: spaces and any BOM trimmed."""
    return name.replace("\ufeff", "").replace("ï»¿", "").strip()


def make_header(path: Path, names: list[str], line: int, settings: InputConfig) -> Header:
    """Find the configured columns in a header row; InputError naming what is missing."""
    clean = [clean_name(n) for n in names]
    seen: set[str] = set()
    for name in clean:
        if name and name in seen:
            raise InputError(f"{path} line {line}: the header names column {name!r} twice")
        seen.add(name)
    wanted = {
        "input.columns.emr_task_id": settings.columns.emr_task_id,
        "input.columns.note": settings.columns.note,
        **{f"input.passthrough ({p})": p for p in settings.passthrough},
    }
    missing = [f"{col!r} ({key})" for key, col in wanted.items() if col not in clean]
    if missing:
        found = ", ".join(repr(n) for n in clean if n) or "nothing"
        raise InputError(
            f"{path} line {line}: column {' and '.join(missing)} not found; the header has {found}"
        )
    return Header(
        names=tuple(names),
        line=line,
        task_col=clean.index(settings.columns.emr_task_id),
        note_col=clean.index(settings.columns.note),
        passthrough_cols=tuple(clean.index(p) for p in settings.passthrough),
    )
