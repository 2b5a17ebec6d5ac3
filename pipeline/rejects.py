"""rejects.csv: the rejected input rows as they were, plus where and why.

Written while the input is validated, before anything is sent. It is a copy
of input rows (notes included), so it is created readable by its owner only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.config import InputConfig
from pipeline.source import Header
from pipeline.validate import CheckedBatch


@contextmanager
def private_file(path: Path, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A new text file readable by its owner only (0600), for files that hold notes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w", encoding=encoding, errors="surrogateescape", newline="") as fh:
        yield fh


class RejectsWriter:
    """rejects.csv, written while validating: the rows as read, plus where and why.

    Columns: ``source_file, line, reasons`` then the input's own header, in
    the input's own encoding and delimiter, so the file can be fixed and fed
    back with the same config. Cells map by header name when files differ.
    """

    def __init__(self, path: Path, settings: InputConfig, headers: Sequence[Header]) -> None:
        self.path = path
        self._settings = settings
        names: list[str] = []
        for header in headers:
            names += [n for n in header.names if n not in names]
        self._names = names
        self._positions = [[names.index(n) for n in h.names] for h in headers]
        self._fh: IO[str] | None = None
        self._writer: Any = None
        self.rows = 0
        self._cm: Any = None

    def write(self, batch: CheckedBatch, source_file: str) -> None:
        if not batch.problems:
            return
        writer = self._open()
        positions = self._positions[batch.file_no]
        for i, problems in sorted(batch.problems.items()):
            cells = batch.cells[i]
            row = [""] * len(self._names)
            for pos, value in zip(positions, cells, strict=False):
                row[pos] = value
            extra = cells[len(positions):]
            writer.writerow([source_file, batch.lines[i], ";".join(p.code for p in problems),
                             *row, *extra])
            self.rows += 1

    def _open(self) -> Any:
        if self._writer is None:
            self._cm = private_file(self.path, self._settings.encoding)
            self._fh = self._cm.__enter__()
            self._writer = csv.writer(self._fh, delimiter=self._settings.delimiter)
            self._writer.writerow(["source_file", "line", "reasons", *self._names])
        return self._writer

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
