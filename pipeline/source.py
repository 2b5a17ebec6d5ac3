"""CSV file(s) -> a header, then batches of raw records with physical line numbers.

Every cell is a ``str`` exactly as written: ``NA``, ``null``, ``0001`` stay text.
Tokenising is done by the C tokenizer of the standard ``csv`` module, in its
strict mode, rather than ``pandas.read_csv``: at the same speed on this machine
(``bench/validate.py``) it reports the physical line on which each record
starts, keeps a row with a field too many as a row (pandas' C engine drops or
pads it), and lets an undecodable byte be pinned to its line. Memory is
bounded by the batch size, not by the file. (pandas does the set work
downstream: reconciliation and reports.)

A record's line number is the physical line where it starts, counting every
line of the file from 1 (header, blank lines and the lines inside multi-line
quoted notes included; LF, CRLF and a lone CR each end a line), so
``sed -n 17p`` on the file shows where row 17 begins.

**Structure is never guessed** (README "Input"). These are *findings*, not row
problems: the file's quoting is broken, so no row of it can be trusted to be
the row that was meant (a lost quote merges the rows after it, or cuts the
row before it short). Each is reported with the physical line where the
field opened, and the run stops before anything is sent (``InputError``,
exit 2):

- ``unclosed-quote``: a quoted field that never closes (it would swallow the
  rest of the file, or everything up to the next quote).
- ``stray-quote``: text right after the closing quote of a field
  (``"Pt said "no pain" today"``), or an unquoted field that *ends* with a
  quote, trailing whitespace aside (``abc"``: the close of a field whose
  opening quote is missing; `` "a"``: a quoted field with a space before it).
  A quote *inside* an unquoted field (``He said "ok" then``, ``5" wound``) is
  literal text, as in RFC 4180 readers that are lenient about it.
- ``field-too-long``: a field over ``FIELD_LIMIT``; reading stops there (the
  csv module cannot say whether its quote would have closed).

Encodings: a byte-order mark (UTF-8, UTF-16 LE or BE) decides the encoding
whatever ``input.encoding`` says; UTF-16 is read when declared or marked
(Excel's "Unicode Text" export); declared ``utf-16`` needs the mark. When a
single-byte code page such as cp1252 is declared and any bytes form a
multi-byte UTF-8 sequence (RFC 3629), wherever they are and whatever the rest
of the file holds, reading them as declared would send mojibake (``cafÃ©``):
the read stops naming the first such line, unless ``input.force_encoding``
says the declaration is right.

Over 400 lines because the encoding rules (BOMs, UTF-16, a multi-byte sequence under a
declared code page, C1 controls) and the strict record reader share one pass over the
bytes; splitting them would read each file twice.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import csv
import dataclasses
import difflib
import glob
import hashlib
import itertools
import logging
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from pipeline.config import InputConfig
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# Longest first: the UTF-16 marks are prefixes of nothing else we read.
BOMS: Final = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
               (codecs.BOM_UTF16_BE, "utf-16-be"))
# A field longer than this is a runaway quote, not a note (max_note_chars is far below).
FIELD_LIMIT = 16 * 1024 * 1024
csv.field_size_limit(FIELD_LIMIT)
# Small reads: blocks below malloc's mmap threshold reuse memory instead of faulting in
# fresh pages every time (measured: a tenth of the page faults, 5% less CPU than 1 MiB).
READ_SIZE = 1 << 15
# Every byte but the C0 controls other than tab, LF and CR: ``data.translate(None,
# _NOT_CONTROL)`` leaves only the control bytes that make a line need the slow checks.
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 0x20 and b not in b"\t\n\r"))
_CONTROL_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# DEL and the C1 controls, as decoded text: a code page declared wrongly (cp1252 read as
# latin-1) or UTF-8 C2 80-9F gives these, and no note holds them.
_C1_TEXT = re.compile("[\x7f-\x9f]")
# str.splitlines also breaks at these; the csv module (and a CSV file) does not.
_OTHER_BREAKS = "\x85\u2028\u2029"
_LINE_ENDS = frozenset("\r\n")
_LAST = operator.itemgetter(-1)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
STRUCTURE_CODES: Final = ("unclosed-quote", "stray-quote", "field-too-long")
# A multi-byte UTF-8 sequence (RFC 3629, section 4): in a file declared as a single-byte code
# page, such bytes are far likelier UTF-8 than two or more code-page characters in a row.
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}")
# The byte-order-mark warning is given once per file and process (a run opens a file
# more than once: headers first, then the scan).
_WARNED_BOM: set[tuple[str, str]] = set()
KEEP_FINDINGS = 20


@dataclass(frozen=True, slots=True)
class Header:
    """A file's header row: names as written, and the positions of the fields we use."""

    names: tuple[str, ...]
    line: int
    task_col: int
    note_col: int
    passthrough_cols: tuple[int, ...]
    account_col: int | None = None  # input.columns.account's field (with api.accounts)
    # The file's effective encoding (a byte-order mark decides) and its mark, if any: the
    # encoding in which a copy of its rows (rejects.csv) can always be written.
    encoding: str = "utf-8"
    bom: str | None = None

    @property
    def width(self) -> int:
        return len(self.names)

    @property
    def clean_names(self) -> tuple[str, ...]:
        """The names as matched against the config (what a repeated header is compared to)."""
        return tuple(clean_name(n) for n in self.names)


@dataclass(frozen=True, slots=True)
class Finding:
    """A structural fault of a file: ``code`` (STRUCTURE_CODES), the physical line where
    the field concerned opened, and a message without any cell text."""

    code: str
    line: int
    message: str


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Consecutive records of one file: ``lines[i]`` is where ``rows[i]`` starts.

    ``careful`` lists the records that need the slow checks: those spanning
    several lines (a CRLF or CR inside to normalise) or touching a line that
    holds a control character or an undecodable byte. The rest are plain.
    ``source`` is the file being read, while the batch is current (it can
    check the raw text of a record, see ``CsvFile.check_quote_end``).
    """

    file_no: int
    lines: list[int]
    rows: list[list[str]]
    careful: list[int]
    source: CsvFile | None = field(default=None, compare=False, repr=False)


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


def is_single_byte(encoding: str) -> bool:
    """True for code pages that map every byte to one character (cp1252, latin-1...)."""
    if codecs.lookup(encoding).name.startswith("utf"):
        return False
    return len(bytes(range(256)).decode(encoding, errors="replace")) == 256


def _ascii_compatible(encoding: str) -> bool:
    return "\n\r\t,;\"".encode(encoding, errors="replace") == b"\n\r\t,;\""


class CsvFile:
    """One input file, opened for one pass: ``header``, then ``batches()``.

    Use as a context manager. During the pass the decoded text is cut into
    lines (LF, CRLF or a lone CR) a 32 KiB read at a time, and the blocks
    holding the current batch are kept, so a record's raw text can be
    checked. After the pass, ``sha256`` and ``size`` describe the bytes read,
    ``records`` counts the physical records after the header and
    ``blank_lines`` the empty ones among them. ``batches()`` raises
    ``InputError`` at the end of the pass if the file has structural
    findings (``findings``) or looks like UTF-8 read as a code page.
    """

    def __init__(self, path: Path, settings: InputConfig, *, file_no: int = 0) -> None:
        self.path = path
        self.file_no = file_no
        self._settings = settings
        self._errors = "surrogateescape" if settings.on_bad_encoding == "reject" else "strict"
        self.encoding = settings.encoding
        self.bom: str | None = None
        self.blank_lines = 0
        self.records = 0
        self.findings: list[Finding] = []
        self.finding_count = 0
        self._sha = hashlib.sha256()
        self.size = 0
        self._raw: IO[bytes] | None = None
        self._reader: Iterator[list[str]] | None = None
        self._line_num = 0
        self._lines_read = 0
        self._blocks: collections.deque[tuple[int, list[str]]] = collections.deque()
        self._suspect: list[list[int]] = []
        self._utf8_check = False
        self._utf8_tail = b""  # the last bytes of the previous read (a sequence may span two)
        self._first_multibyte: int | None = None  # byte offset in the file
        self._bom_len = 0
        self._quote_end = _quote_end_pattern(settings.delimiter)
        self.header: Header

    @property
    def lines_read(self) -> int:
        """Physical lines the tokenizer has taken so far (the last record read ends there)."""
        return self._line_num

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def __enter__(self) -> Self:
        try:
            self._raw = self.path.open("rb", buffering=0)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror})") from None
        try:
            self._start()
            self.header = self._read_header()
        except BaseException:
            self._raw.close()
            raise
        return self

    def _start(self) -> None:
        assert self._raw is not None
        first = self._raw.read(4)
        skip = 0
        for mark, name in BOMS:
            if first.startswith(mark):
                self.bom, skip = name, len(mark)
                break
        declared = codecs.lookup(self._settings.encoding).name.replace("utf-8-sig", "utf-8")
        if (self.bom is not None and not self.bom.startswith(declared)
                and (str(self.path), self.bom) not in _WARNED_BOM):
            _WARNED_BOM.add((str(self.path), self.bom))
            log.warning("%s starts with a %s byte-order mark: read as %s, not as input.encoding %s",
                        self.path, self.bom.upper(), self.bom.upper(), self._settings.encoding)
        self._bom_len = skip
        self.encoding = self.bom or self._settings.encoding
        if self.bom is None and declared == "utf-16":
            raise InputError(
                f"{self.path}: input.encoding is utf-16 but the file has no byte-order mark; "
                f"set input.encoding: {_utf16_guess(first)} (or utf-16-"
                f"{'be' if _utf16_guess(first) == 'utf-16-le' else 'le'})")
        self._sha.update(first)
        self.size = len(first)
        if (self.bom is None and not self._settings.force_encoding
                and is_single_byte(self.encoding)):
            self._utf8_check = True
        if self._errors != "strict" or not _ascii_compatible(self.encoding):
            self._suspect.append([1, 2**62])  # every row gets the slow checks
        self._reader = csv.reader(
            itertools.chain.from_iterable(self._read_blocks(first[skip:])),
            delimiter=self._settings.delimiter, quotechar='"', doublequote=True,
            skipinitialspace=False, strict=True,
        )

    def _read_blocks(self, start: bytes) -> Iterator[list[str]]:
        """The file's text as lists of lines, a block (one read) at a time.

        Each block is decoded and cut into lines (LF, CRLF, lone CR) by
        ``str.splitlines``; the few blocks where that would also cut at VT, FF,
        U+0085, U+2028 and the like are cut again by a regex. A block's last
        line, if unfinished, goes to the front of the next block.
        """
        assert self._raw is not None
        decoder = codecs.getincrementaldecoder(self.encoding)(self._errors)
        ascii_compatible = _ascii_compatible(self.encoding)
        pending: list[str] = []  # the unfinished line, in pieces (a long line must not
        carried = False  # be copied once per block); whether they held a control byte
        raw = start
        while True:
            if not raw:
                raw = self._raw.read(READ_SIZE)
                self._sha.update(raw)
                self.size += len(raw)
            final = not raw
            text = decoder.decode(raw, final)
            control = (bool(raw.translate(None, _NOT_CONTROL))
                       or (not raw.isascii() and _C1_TEXT.search(text) is not None)
                       if ascii_compatible else _CONTROL_TEXT.search(text) is not None)
            if self._utf8_check and self._first_multibyte is None:
                self._check_utf8(raw)
            raw = b""
            lines = _split_lines(text, control)
            if pending and lines:
                if pending[-1].endswith("\r") and not lines[0].startswith("\n"):
                    lines.insert(0, "".join(pending))  # a line ended by a lone CR
                    pending = []
                elif len(lines) == 1 and not final and not lines[0].endswith("\n"):
                    pending.append(lines.pop())  # a long line, still unfinished
                else:
                    lines[0] = "".join([*pending, lines[0]])
                    pending = []
            if not final and lines and not lines[-1].endswith("\n"):
                pending.append(lines.pop())  # unfinished, or a CR that a LF may follow
            if lines:
                yield self._add_block(lines, text, control or carried)
                carried = control and bool(pending)
            else:
                carried = carried or control
            if final:
                if pending:
                    yield self._add_block(["".join(pending)], "".join(pending), carried)
                return

    def _add_block(self, lines: list[str], text: str, control: bool) -> list[str]:
        first = self._lines_read + 1
        self._lines_read += len(lines)
        if control:
            self._suspect.append([first, self._lines_read + 1])
        self._blocks.append((first, lines))
        return lines

    def _check_utf8(self, raw: bytes) -> None:
        """Note the file offset of the first multi-byte UTF-8 sequence (single-byte code
        pages only; ``raw`` is the read just taken, ``self.size`` counts it)."""
        tail = self._utf8_tail
        if raw.isascii() and tail.isascii():
            self._utf8_tail = b""
            return
        data = tail + raw
        m = _UTF8_MULTIBYTE.search(data)
        if m is not None:
            self._first_multibyte = self.size - len(data) + m.start()
        self._utf8_tail = data[-3:]

    def _line_of_offset(self, offset: int) -> int:
        """The physical line holding byte ``offset`` of an ASCII-compatible file (errors only)."""
        ends = 0
        cr = False
        with self.path.open("rb") as fh:
            left = offset
            while left > 0:
                data = fh.read(min(left, 1 << 20))
                if not data:
                    break
                left -= len(data)
                ends += data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
                if cr and data.startswith(b"\n"):
                    ends -= 1  # a CRLF cut by the read
                cr = data.endswith(b"\r")
        return ends + 1  # (the byte at ``offset`` starts a UTF-8 sequence: never a LF)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._raw is not None:
            self._raw.close()

    def batches(self, size: int = 8192) -> Iterator[RawBatch]:
        """Records after the header, ``size`` at a time, blank lines left out.

        Raises InputError once the file is read if it has structural findings.
        """
        while True:
            batch = RawBatch(self.file_no, [], [], [], self)
            self._fill(batch, size)
            if batch.rows:
                yield batch
            if len(batch.rows) < size:
                break
        self.check_structure()

    def check_structure(self) -> None:
        """InputError for the first structural finding so far (or for UTF-8 read as a code
        page, once the whole file is read), naming the others' lines; else nothing."""
        if self.findings:
            raise InputError(self._findings_message())
        if self._first_multibyte is not None:
            line = self._line_of_offset(self._first_multibyte)
            raise InputError(
                f"{self.path} line {line}: input.encoding is {self._settings.encoding}, but "
                "this line holds bytes that form a multi-byte UTF-8 character; read as "
                f"{self._settings.encoding} they would be sent as different characters. Save "
                "the file in one encoding and set input.encoding to it (utf-8?), or "
                "input.force_encoding: true if the file really is "
                f"{self._settings.encoding}; nothing was sent")

    def _findings_message(self) -> str:
        first = self.findings[0]  # the lowest line (_add_finding keeps them in line order)
        text = (f"{self.path} line {first.line}: {first.code}: {first.message}; the file's "
                "quoting is broken, so nothing was sent")
        others = self.findings[1:]
        if others:
            listed = ", ".join(f"line {f.line} {f.code}" for f in others[:9])
            more = self.finding_count - 1 - len(others[:9])
            text += f" (also {listed}{f' and {more} more' if more > 0 else ''})"
        return text

    def _fill(self, batch: RawBatch, size: int) -> None:
        reader = self._reader
        assert reader is not None
        self._forget_blocks(self._line_num + 1)
        prev = self._line_num
        append_line, append_row, rows = batch.lines.append, batch.rows.append, batch.rows
        suspect = self._suspect
        blank = errors = 0
        while True:
            try:
                for row in reader:
                    end = reader.line_num  # type: ignore[attr-defined]
                    if row:
                        append_line(prev + 1)
                        append_row(row)
                        if end != prev + 1 or (suspect and end >= suspect[0][0]):
                            self._mark_careful(batch, prev + 1, end)
                    else:
                        blank += 1
                    prev = end
                    if len(rows) >= size:
                        break
                break
            except csv.Error as exc:
                end = reader.line_num  # type: ignore[attr-defined]
                self._structure_error(prev + 1, end, str(exc))
                errors += 1
                prev = end
            except UnicodeError:
                line, hexed = self._locate_bad_bytes()
                raise InputError(
                    f"{self.path} line {line}: bytes {hexed} are not valid {self.encoding}; "
                    f"{self._encoding_hint()}, or input.on_bad_encoding: reject to set such "
                    "rows aside"
                ) from None
            except OSError as exc:
                raise InputError(f"{self.path}: read failed ({exc.strerror})") from None
        self.blank_lines += blank
        self.records += len(rows) + blank + errors
        self._line_num = prev

    def _encoding_hint(self) -> str:
        """What input.encoding to try: UTF-16 if the bytes look like it, else a code page."""
        if codecs.lookup(self.encoding).name.startswith("utf-16"):
            return ("the file is damaged (a byte added or lost, e.g. by a tool that "
                    "appends a newline byte)")
        with self.path.open("rb") as fh:
            head = fh.read(4096)
        if head.count(0) > len(head) // 4:
            return ("the file looks like UTF-16 (Excel's Unicode Text): set "
                    "input.encoding: utf-16 (and input.delimiter: tab for Unicode Text)")
        return "set input.encoding (e.g. cp1252) to the file's encoding"

    def _mark_careful(self, batch: RawBatch, start: int, end: int) -> None:
        suspect = self._suspect
        while suspect and suspect[0][1] < start:
            del suspect[0]
        if end != start or (suspect and suspect[0][0] <= end):
            batch.careful.append(len(batch.rows) - 1)

    def _forget_blocks(self, line: int) -> None:
        """Drop the blocks that end before ``line`` (no record of the batch to come is in them)."""
        blocks = self._blocks
        while len(blocks) > 1 and blocks[1][0] <= line:
            blocks.popleft()

    def record_text(self, start: int, end: int) -> tuple[str, list[int]] | None:
        """The raw text of physical lines ``start``..``end`` while their blocks are kept, and
        the offset where each line starts; None once they are gone."""
        blocks = self._blocks
        if not blocks or blocks[0][0] > start:
            return None
        if start == end:  # the common case: one line, in one of the last blocks
            for first, lines in reversed(blocks):
                if first <= start:
                    at = start - first
                    return (lines[at], [0]) if at < len(lines) else None
        parts: list[str] = []
        for first, lines in blocks:
            last = first + len(lines) - 1
            if last < start or first > end:
                continue
            parts += lines[max(start, first) - first: min(end, last) - first + 1]
        offsets = list(itertools.accumulate((len(p) for p in parts), initial=0))[:-1]
        return "".join(parts), offsets

    def raw_record(self, start: int) -> str | None:
        """The physical lines of the record starting on line ``start``, exactly as read
        (decoded, line ends kept), while their blocks are kept; else None."""
        taken: list[str] = []

        def lines() -> Iterator[str]:
            for first, block in self._blocks:
                if first + len(block) <= start:
                    continue
                if first > start and not taken:
                    return  # the record's first line is gone
                for line in block[max(0, start - first):]:
                    taken.append(line)
                    yield line

        reader = csv.reader(lines(), delimiter=self._settings.delimiter, quotechar='"',
                            doublequote=True, skipinitialspace=False, strict=True)
        try:
            next(reader)
        except (csv.Error, StopIteration):
            return None
        return "".join(taken)

    def check_quote_end(self, start: int, end: int) -> None:
        """A record on lines ``start``..``end`` has a cell ending with a quote (trailing
        whitespace aside): if that cell was not quoted, it is a ``stray-quote`` finding (its
        opening quote is likely missing, or a quoted field has whitespace around it)."""
        found = self.record_text(start, end)
        if found is None:
            return
        text, offsets = found
        at = _unquoted_quote_end(self._quote_end, text)
        if at is not None:
            line = start + bisect.bisect_right(offsets, at) - 1
            self._add_finding(Finding(
                "stray-quote", line,
                "an unquoted field ends with a quote, as if its opening quote were missing "
                "(quote the whole field if the quote belongs to the text)"))

    def _structure_error(self, start: int, end: int, message: str) -> None:
        if "field limit" in message:  # whether it closes is not known: stop reading here
            raise InputError(
                f"{self.path} line {start}: field-too-long: a field that starts on this line "
                f"is longer than {FIELD_LIMIT >> 20} MiB (a quote that never closes, or a "
                "value no note can be); nothing was sent")
        found = self.record_text(start, end)
        diagnosed = (_diagnose(found[0], found[1], start, self._settings.delimiter)
                     if found is not None and len(found[0]) <= 1 << 20 else None)
        if diagnosed is not None:
            self._add_finding(diagnosed)
        elif "expected after" in message:
            self._add_finding(Finding("stray-quote", start,
                                      "text follows the closing quote of a field"))
        else:
            self._add_finding(Finding("unclosed-quote", start, _UNCLOSED))

    def _add_finding(self, finding: Finding) -> None:
        """Keep the ``KEEP_FINDINGS`` findings with the lowest lines, in line order (they are
        found out of order: quote ends when a batch is validated, the rest while reading)."""
        self.finding_count += 1
        bisect.insort(self.findings, finding, key=operator.attrgetter("line"))
        del self.findings[KEEP_FINDINGS:]

    def _read_header(self) -> Header:
        batch = RawBatch(self.file_no, [], [], [])
        self._fill(batch, 1)
        if self.findings:
            raise InputError(self._findings_message())
        if not batch.rows:
            raise InputError(f"{self.path}: the file is empty (no header row)")
        self.records -= 1  # the header is not a record to account for
        header = make_header(self.path, batch.rows[0], batch.lines[0], self._settings)
        return dataclasses.replace(header, encoding=self.encoding, bom=self.bom)

    def _locate_bad_bytes(self) -> tuple[int, str]:
        """Physical line and bytes (hex) of the first undecodable sequence, in any encoding
        (UTF-16 too): the text before it is decoded and its line ends counted (errors only)."""
        decoder = codecs.getincrementaldecoder(self.encoding)("strict")
        ends, cr = 0, False
        with self.path.open("rb") as fh:
            fh.read(self._bom_len)
            while True:
                chunk = fh.read(READ_SIZE)
                try:
                    text = decoder.decode(chunk, not chunk)
                except UnicodeDecodeError as exc:
                    bad = exc.object[exc.start:exc.end]
                    text = bytes(exc.object[:exc.start]).decode(self.encoding, "replace")
                    return _count_ends(text, cr, ends) + 1, bytes(bad).hex(" ")
                ends = _count_ends(text, cr, ends)
                cr = text.endswith("\r") if text else cr
                if not chunk:
                    return self._line_num + 1, "(none found)"


_UNCLOSED = "a quoted field opens here and never closes"


def _count_ends(text: str, cr_before: bool, ends: int) -> int:
    """``ends`` plus the line ends (LF, CRLF, lone CR) in ``text``; ``cr_before``: the text
    before it ended with a CR (so a LF first is the end of that CRLF)."""
    ends += text.count("\n") + text.count("\r") - text.count("\r\n")
    return ends - 1 if cr_before and text.startswith("\n") else ends


def _utf16_guess(head: bytes) -> str:
    """utf-16-le or utf-16-be: which the zero bytes of ASCII text (e.g. a header) suggest."""
    return "utf-16-be" if head[:1] == b"\x00" else "utf-16-le"


def _split_lines(text: str, control: bool) -> list[str]:
    """``text`` cut after each LF, CRLF or lone CR (and nowhere else), ends kept."""
    if not control:
        lines = text.splitlines(True)
        # splitlines also cuts after VT, FF, FS, GS, RS (control bytes: control is True then),
        # U+0085, U+2028 and U+2029: a line ending in one of those needs the regex.
        ends = set(map(_LAST, lines[:-1]))
        if ends <= _LINE_ENDS and not (lines and lines[-1][-1] in _OTHER_BREAKS):
            return lines
    return _LINE.findall(text)


def _quote_end_pattern(delimiter: str) -> re.Pattern[str]:
    """Matches one field of a record at a position: a quoted field, or else an unquoted
    one (possibly empty). Possessive quantifiers: no field is ever tried two ways, so a
    long quoted note costs one pass."""
    d = re.escape(delimiter)
    return re.compile(rf'("[^"]*+(?:""[^"]*+)*+")(?=[{d}\r\n]|\Z)|[^{d}\r\n]*+')


def _unquoted_quote_end(field: re.Pattern[str], text: str) -> int | None:
    """Where the first unquoted field of the record ``text`` that ends with a quote, once
    trailing whitespace is trimmed (as notes are), starts; None if there is none. A quoted
    field with a space before it is unquoted text that ends with a quote."""
    pos, n = 0, len(text)
    while True:
        m = field.match(text, pos)
        assert m is not None  # the second alternative matches the empty string
        if m.lastindex is None and m.group().rstrip()[-1:] == '"':
            return pos
        pos = m.end()
        if pos >= n or text[pos] in "\r\n":
            return None
        pos += 1  # the delimiter


def _diagnose(text: str, offsets: list[int], start: int, delimiter: str) -> Finding | None:
    """Where and how a record the csv module refused goes wrong, char by char (errors only)."""
    def line_at(pos: int) -> int:
        return start + bisect.bisect_right(offsets, pos) - 1

    opened = -1
    i, n = 0, len(text)
    at_field_start = True
    while i < n:
        c = text[i]
        if opened < 0:
            if at_field_start and c == '"':
                opened = i
            elif c in "\r\n":
                return None  # the record ended cleanly: nothing found here
            at_field_start = c == delimiter
            i += 1
            continue
        if c != '"':
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == '"':
            i += 2
        elif nxt == delimiter:
            opened, at_field_start, i = -1, True, i + 2
        elif nxt in ("\r", "\n", ""):
            return None
        else:
            return Finding("stray-quote", line_at(opened),
                           f"text follows the closing quote (line {line_at(i)}) of a quoted "
                           "field that opens here; a quote inside a quoted field is written "
                           "twice (\"\")")
    if opened >= 0:
        return Finding("unclosed-quote", line_at(opened), _UNCLOSED)
    return None


def clean_name(name: str) -> str:
    """A header name as matched against the config: spaces and any BOM trimmed."""
    return name.replace("\ufeff", "").replace("ï»¿", "").strip()


def make_header(path: Path, names: list[str], line: int, settings: InputConfig) -> Header:
    """Find the configured columns in a header row; InputError naming what is missing.

    The first row may be data (a file without a header): the message names the
    expected columns and counts the fields found, and quotes a cell only when it
    closely matches an expected name (``_close_names``), so a note never reaches
    the console or a cron log.
    """
    clean = [clean_name(n) for n in names]
    wanted = {
        "input.columns.emr_task_id": settings.columns.emr_task_id,
        "input.columns.note": settings.columns.note,
        **({"input.columns.account": settings.columns.account}
           if settings.columns.account else {}),
        **{f"input.passthrough ({p})": p for p in settings.passthrough},
    }
    seen: dict[str, int] = {}
    for i, name in enumerate(clean):
        if name and name in seen:
            said = repr(name) if name in wanted.values() else "the same name"
            raise InputError(f"{path} line {line}: the header names column {said} twice "
                             f"(fields {seen[name] + 1} and {i + 1})")
        seen[name] = i
    missing = [f"{col!r} ({key})" for key, col in wanted.items() if col not in clean]
    if missing:
        count = sum(1 for n in clean if n)
        hint = _delimiter_hint(clean, settings.delimiter)
        raise InputError(
            f"{path} line {line}: column {' and '.join(missing)} not found; the first row has "
            f"{count} non-empty field{'s' if count != 1 else ''}"
            f"{_close_names(clean, [c for c in wanted.values() if c not in clean])}{hint}"
            " (a file without a header row? its first row must name the columns)"
        )
    return Header(
        names=tuple(names),
        line=line,
        task_col=clean.index(settings.columns.emr_task_id),
        note_col=clean.index(settings.columns.note),
        passthrough_cols=tuple(clean.index(p) for p in settings.passthrough),
        account_col=(clean.index(settings.columns.account) if settings.columns.account
                     else None),
    )


def _close_names(found: list[str], missing: list[str]) -> str:
    """"; field 1 'Task ID' looks like 'emr_task_id'" for each found cell that closely matches
    a missing column name (difflib ratio >= 0.75, compared case-folded with ``_`` and ``-`` as
    spaces: a cell can then be at most a third longer than the name), else ""."""
    def plain(text: str) -> str:
        return " ".join(text.casefold().replace("_", " ").replace("-", " ").split())

    close = []
    for want in missing:
        target = plain(want)
        for i, cell in enumerate(found):
            if cell and difflib.SequenceMatcher(None, plain(cell), target).ratio() >= 0.75:
                close.append(f"field {i + 1} {cell!r} looks like {want!r}")
                break
    return f"; {', '.join(close)}" if close else ""


def _delimiter_hint(names: list[str], delimiter: str) -> str:
    for char, key in (("\t", "tab"), (";", '";"'), (",", '","')):
        if char != delimiter and any(char in n for n in names):
            return f" (separated by {key}? set input.delimiter: {key})"
    return ""
