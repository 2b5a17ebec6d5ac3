"""rejects.csv: the rejected input records as they were read, plus where and why.

Written while the input is validated, before anything is sent. It is a copy
of input rows (notes included), so it is created readable by its owner only.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.config import InputConfig
from pipeline.source import Header
from pipeline.validation import CheckedBatch

PREFIX = ("source_file", "line", "reasons")


def _copy_errors(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Encode errors of a copy never stop it: bytes kept by ``surrogateescape`` (undecodable
    input) go back as they were; a character the encoding cannot hold becomes ``\\uXXXX``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    if all("\udc80" <= c <= "\udcff" for c in bad) and codecs.lookup(
            exc.encoding).name not in ("utf-16-le", "utf-16-be", "utf-16"):
        return bytes(ord(c) - 0xDC00 for c in bad), exc.end
    return bad.encode("ascii", "backslashreplace").decode("ascii"), exc.end


codecs.register_error("tasknotes-copy", _copy_errors)


@contextmanager
def private_file(path: Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A new text file readable by its owner only (0600), for files that hold notes.
    Writing never fails on a character ``encoding`` cannot hold (see ``_copy_errors``)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w", encoding=encoding, errors="tasknotes-copy", newline="") as fh:
        yield fh


def copy_encoding(headers: Sequence[Header]) -> tuple[str, bool]:
    """The encoding of a copy of the inputs' rows, and whether it starts with a byte-order
    mark: the inputs' effective encoding (a mark decides) if they share one, else UTF-8."""
    found = {(h.encoding, h.bom is not None) for h in headers}
    if len(found) == 1:
        return found.pop()
    return "utf-8", any(h.bom for h in headers)


class RejectsWriter:
    """rejects.csv, written while validating: each rejected record as read, plus where and why.

    The first line is ``source_file, line, reasons`` then the input's header
    names; each rejected record is those three fields, the delimiter, then the
    record's physical lines exactly as they were read (quotes, spacing and
    line breaks untouched), in the input's effective encoding (with its
    byte-order mark, if it had one) and delimiter, so the file can be fixed and
    fed back with the same config. Fed back, a rejects.csv gets fresh
    ``source_file, line, reasons`` in place of its old ones. When the inputs
    have different headers, a record's cells are written one by one under the
    union of the header names instead (re-quoted as CSV, not as read).
    """

    def __init__(self, path: Path, settings: InputConfig, headers: Sequence[Header]) -> None:
        self.path = path
        self._settings = settings
        self._encoding, self._bom = copy_encoding(headers)
        self._skip = [tuple(h.names[:3]) == PREFIX for h in headers]
        self._same = len({h.names for h in headers}) <= 1
        names: list[str] = []
        for header, skip in zip(headers, self._skip, strict=True):
            names += [n for n in header.names[3 if skip else 0:] if n not in names]
        self._names = names
        self._positions = [[names.index(n) if n in names else -1 for n in h.names]
                           for h in headers]
        self._fh: IO[str] | None = None
        self._writer: Any = None
        self.rows = 0
        self._cm: Any = None
        d = re.escape(settings.delimiter)
        self._field = re.compile(rf'(?:"[^"]*+(?:""[^"]*+)*+"|[^"{d}\r\n]*+){d}')

    def write(self, batch: CheckedBatch, source_file: str) -> None:
        """The rejected rows of ``batch`` (from the file named ``source_file``)."""
        if not batch.problems:
            return
        writer = self._open()
        assert self._fh is not None
        skip = self._skip[batch.file_no]
        for i, problems in sorted(batch.problems.items()):
            prefix = [source_file, batch.lines[i], ";".join(p.code for p in problems)]
            raw = batch.raw.get(i)
            if raw is not None and self._same:
                raw = self._after_prefix(raw) if skip else raw
                if raw is not None:
                    buffer = io.StringIO()
                    csv.writer(buffer, delimiter=self._settings.delimiter,
                               lineterminator="").writerow([*prefix, ""])
                    ending = "" if raw.endswith(("\n", "\r")) else "\r\n"
                    self._fh.write(buffer.getvalue() + raw + ending)
                    self.rows += 1
                    continue
            cells = batch.cells[i][3:] if skip else batch.cells[i]
            positions = self._positions[batch.file_no][3 if skip else 0:]
            row = [""] * len(self._names)
            for pos, value in zip(positions, cells, strict=False):
                row[pos] = value
            writer.writerow([*prefix, *row, *cells[len(positions):]])
            self.rows += 1

    def _after_prefix(self, raw: str) -> str | None:
        """A fed-back rejects.csv record without its old source_file, line and reasons."""
        pos = 0
        for _ in PREFIX:
            m = self._field.match(raw, pos)
            if m is None:
                return None
            pos = m.end()
        return raw[pos:]

    def _open(self) -> Any:
        if self._writer is None:
            self._cm = private_file(self.path, self._encoding)
            self._fh = self._cm.__enter__()
            if self._bom:
                self._fh.write("\ufeff")
            self._writer = csv.writer(self._fh, delimiter=self._settings.delimiter)
            self._writer.writerow([*PREFIX, *self._names])
        return self._writer

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
