"""Raw records -> checked batches: each row valid (to send), a skipped duplicate, or rejected.

A bad row is data, not an exception: a ``Problem`` has a stable kebab-case
code and one message template per code. Every check runs on every row, so a
user fixes a file in one pass.

Normalisation, applied before the checks (and documented in the README):
task ids are trimmed; in notes CRLF and a lone CR become ``\\n`` (Cobalt shows
``\\n`` as a line break), optionally so do the two characters ``\\n``
(``input.unescape_newlines``), and outer whitespace is trimmed; inner
whitespace is kept as written. Task ids and notes are then put in Unicode
NFC (UAX #15): ``é`` typed as one code point or as ``e`` + U+0301 is the same
visible note, so it must be the same ledger key and duplicate-index entry and
be sent once, in one form.

A row equal to the file's header (names trimmed) is ``repeated-header``: two
exports concatenated. A cell ending with a quote is passed to the source to
check its raw text (``CsvFile.check_quote_end``): unquoted, it is a structural
finding that stops the run.

Batches are columnar (parallel lists), not an object per row: at a million
rows an object per row costs more than parsing the CSV.

Over 400 lines because each problem code's check and its message template sit together,
one table a reader scans to learn every rule.
"""

from __future__ import annotations

import functools
import operator
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from pipeline.config import InputConfig, ValidationConfig
from pipeline.source import CsvFile, Header, RawBatch, clean_name

TEMPLATES: Final[dict[str, str]] = {
    "wrong-field-count": "expected {expected} fields, found {found}",
    "repeated-header": "the row repeats the header (two files joined into one?)",
    "bad-encoding": "bytes that are not valid {encoding}",
    "missing-task-id": "the emr_task_id is empty",
    "bad-task-id": ("the emr_task_id ({length} characters) does not match "
                    "validation.emr_task_id_pattern"),
    "suspicious-line-in-quoted-field": (
        "line {line}, inside a quoted field, starts like a row of its own (a task id and "
        "the delimiter): a quote lost or added earlier may have folded rows together"),
    "blank-note": "the note is empty",
    "note-too-long": "the note has {length} characters; the limit is {limit}",
    "control-characters": "the note contains control character {char} at position {pos}",
    "duplicate-row": "same emr_task_id and note as line {line}{where}",
    # Never the cell itself: a shifted row can put note text in the account column.
    "unknown-account": ("the {column} column {state}; it must name one of api.accounts "
                        "({known} configured)"),
}
_nfc = unicodedata.normalize
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (less tab, LF), DEL and C1
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one row."""

    code: str
    message: str

    @classmethod
    def of(cls, code: str, **values: object) -> Problem:
        return cls(code, TEMPLATES[code].format(**values))


@dataclass(slots=True)
class CheckedBatch:
    """Rows of one file after validation, as parallel lists in input order.

    ``notes[i]`` is the normalised note of a valid row ('' for a rejected one).
    ``cells[i]`` are the fields as read; ``problems[i]`` exists for rejected rows.
    ``duplicate_of[i]`` is (file_no, line) of the first identical row, for a
    valid row skipped as a duplicate.
    """

    file_no: int
    lines: list[int] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passthrough: list[tuple[str, ...]] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    problems: dict[int, tuple[Problem, ...]] = field(default_factory=dict)
    duplicate_of: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Valid rows that NFC changed: (task id, note) as written, which is how versions before
    # NFC keyed them in the ledger, so a note they sent is still found (runner.py).
    as_written: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Rejected rows: the record's physical lines exactly as read (decoded, line ends kept),
    # for rejects.csv; missing when the source could not give them.
    raw: dict[int, str] = field(default_factory=dict)
    # With api.accounts: each row's account (input.columns.account), '' for a rejected row
    # whose value is not a configured account. Empty without api.accounts.
    accounts: list[str] = field(default_factory=list)

    def account(self, i: int, default: str) -> str:
        """Row ``i``'s account: its own (api.accounts), else ``default`` (the run's)."""
        return self.accounts[i] if self.accounts else default

    def __len__(self) -> int:
        return len(self.lines)

    def sendable(self) -> list[int]:
        """Indices of the rows to send: valid and not a skipped duplicate."""
        return [i for i in range(len(self.lines))
                if i not in self.problems and i not in self.duplicate_of]

    def reasons(self, i: int) -> str:
        """The problem codes of row ``i``, ``;``-separated (rejects.csv's ``reasons``)."""
        return ";".join(p.code for p in self.problems.get(i, ()))


@dataclass(slots=True)
class ProblemTally:
    """Counts per problem code, with the first few places each was seen."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    keep: int = 5

    def add(self, batch: CheckedBatch) -> None:
        for i, problems in batch.problems.items():
            for p in problems:
                self.counts[p.code] += 1
                seen = self.examples.setdefault(p.code, [])
                if len(seen) < self.keep:
                    seen.append((batch.file_no, batch.lines[i]))


class Validator:
    """Checks the batches of one run; remembers every valid row to find duplicates across files."""

    def __init__(self, settings: InputConfig, rules: ValidationConfig, *,
                 accounts: Collection[str] = ()) -> None:
        """``accounts``: the names of api.accounts, when rows name their account."""
        self._settings = settings
        self._rules = rules
        self._accounts = frozenset(accounts)
        self._fullmatch = re.compile(rules.emr_task_id_pattern).fullmatch
        self._duplicates = DuplicateIndex()
        self._file_names: dict[int, str] = {}
        self.blank_rows = 0

    def name_file(self, file_no: int, name: str) -> None:
        """The name duplicate messages use for a file."""
        self._file_names[file_no] = name

    def check(self, batch: RawBatch, header: Header) -> CheckedBatch:
        """Every record of the batch, in order; records with nothing in them are dropped."""
        out = CheckedBatch(batch.file_no)
        # The plain path is inlined: at a million rows a method call per row is measurable.
        careful = set(batch.careful)
        width, task_col, note_col = header.width, header.task_col, header.note_col
        pick = _picker(header.passthrough_cols)
        fullmatch, limit = self._fullmatch, self._rules.max_note_chars
        unescape = self._settings.unescape_newlines
        source = batch.source
        # A cell ending with a quote may be a field whose opening quote was lost: the note is
        # tested below, the task id by the pattern (unless it allows quotes), others here.
        every_cell = width > 2 or '"' in self._rules.emr_task_id_pattern
        add_line, add_task, add_note = out.lines.append, out.task_ids.append, out.notes.append
        add_pass, add_cells = out.passthrough.append, out.cells.append
        for i, (line, cells) in enumerate(zip(batch.lines, batch.rows, strict=True)):
            if i not in careful and len(cells) == width:
                task_id = cells[task_col].strip()
                note = cells[note_col].strip()
                if (task_id and note and len(note) <= limit and fullmatch(task_id)
                        and not (unescape and "\\n" in note)
                        and not (every_cell and _quote_ended(cells))):
                    if note[-1] == '"' and source is not None:
                        source.check_quote_end(line, line)  # a plain record: one line
                    if not (note.isascii() and task_id.isascii()):
                        written = (task_id, note)
                        task_id, note = _nfc("NFC", task_id), _nfc("NFC", note)
                        if len(note) > limit:
                            self._careful_row(out, batch, i, header)
                            continue
                        if written != (task_id, note):
                            out.as_written[len(out.lines)] = written
                    add_line(line)
                    add_task(task_id)
                    add_note(note)
                    add_pass(pick(cells))
                    add_cells(cells)
                    continue
            self._careful_row(out, batch, i, header)
        self._finish(out, header, source)
        return out

    def _finish(self, out: CheckedBatch, header: Header, source: CsvFile | None) -> None:
        """Repeated headers, duplicates, and the raw text of the rejected records."""
        # Rare: one regex scan of the batch instead of a test per row. (A header repeated from
        # a second export may differ in case or column order, or carry a byte-order mark.)
        # (A rejected row's task id may be blanked: those rows are always looked at.)
        # (Valid rows' task ids are trimmed and match the pattern: casefold is enough.)
        if not _folded_names(header).isdisjoint(map(str.casefold, out.task_ids)):
            self._repeated_headers(out, header, range(len(out)))
        elif out.problems:
            self._repeated_headers(out, header, list(out.problems))
        if header.account_col is not None:
            self._check_accounts(out, header.account_col)
        if self._rules.duplicates != "allow":
            self._mark_duplicates(out)
        if out.problems and source is not None:
            for i in out.problems:
                raw = source.raw_record(out.lines[i])
                if raw is not None:
                    out.raw[i] = raw

    def _check_accounts(self, out: CheckedBatch, column: int) -> None:
        """Each row's account, and ``unknown-account`` for a value not in api.accounts. The
        error names the column, never the value: a shifted row (an unquoted comma in the
        note) can put note text in that cell, and the error reaches the shared reports."""
        known = self._accounts
        name = self._settings.columns.account or "account"
        for i, cells in enumerate(out.cells):
            value = cells[column].strip() if column < len(cells) else ""
            problems = out.problems.get(i, ())
            if value in known:
                out.accounts.append(value)
                continue
            out.accounts.append("")
            if any(p.code == "repeated-header" for p in problems):
                continue
            state = "is empty" if not value else "names no configured account"
            out.problems[i] = (*problems, Problem.of(
                "unknown-account", column=repr(name), state=state, known=len(known)))
            if not problems:
                out.notes[i] = ""
                out.passthrough[i] = ()

    def _careful_row(self, out: CheckedBatch, batch: RawBatch, i: int, header: Header) -> None:
        line, cells = batch.lines[i], batch.rows[i]
        if not any(c.strip() for c in cells):
            self.blank_rows += 1
            return
        if batch.source is not None and _quote_ended(cells):
            end = batch.lines[i + 1] - 1 if i + 1 < len(batch.lines) else batch.source.lines_read
            batch.source.check_quote_end(line, end)
        readable = cells[header.task_col].strip() if len(cells) > header.task_col else ""
        folded = self._folded_line(line, cells)
        if len(cells) != header.width:
            problem = Problem.of("wrong-field-count", expected=header.width, found=len(cells))
            self._append_reject(out, line, cells, self._shown(_nfc("NFC", readable), header),
                                problems=(problem, *folded),
                                passthrough=())
            return
        task_id = _nfc("NFC", readable)
        written = self._normalise(cells[header.note_col])
        note = _nfc("NFC", written)
        passthrough = tuple(cells[c] for c in header.passthrough_cols)
        problems = self._problems(task_id, note, cells) + folded
        if problems:
            self._append_reject(out, line, cells, self._shown(task_id, header), problems=problems,
                                passthrough=passthrough)
            return
        if (readable, written) != (task_id, note):
            out.as_written[len(out.lines)] = (readable, written.strip())
        out.lines.append(line)
        out.task_ids.append(task_id)
        out.notes.append(note.strip())
        out.passthrough.append(passthrough)
        out.cells.append(cells)

    def _folded_line(self, line: int, cells: list[str]) -> tuple[Problem, ...]:
        """``suspicious-line-in-quoted-field`` if a line inside a quoted field starts with a
        task id (matching the pattern, with a letter and a digit in it) then the delimiter:
        the shape of rows folded into one field by a lost or extra quote. Real notes rarely
        start a line that way; the letter-and-digit rule spares dates and times
        (``2024-05-01,``, ``12:30,``) and words (``Plan,``)."""
        after_break = _after_break(self._settings.delimiter)
        at = line
        for cell in cells:
            for m in after_break.finditer(cell):
                token = m.group(1).strip()  # as a row's task id is read: trimmed
                if _LETTER.search(token) and _DIGIT.search(token) and self._fullmatch(token):
                    at += len(_BREAK.findall(cell, 0, m.start() + 1))
                    return (Problem.of("suspicious-line-in-quoted-field", line=at),)
            if "\n" in cell or "\r" in cell:
                at += len(_BREAK.findall(cell))
        return ()

    def _repeated_headers(self, out: CheckedBatch, header: Header, rows: Iterable[int]) -> None:
        """Those of ``rows`` equal to the header (names trimmed, in any case and order)
        become ``repeated-header`` rejects."""
        names = sorted(n.casefold() for n in header.clean_names)
        for i in rows:
            if sorted(clean_name(c).casefold() for c in out.cells[i]) == names:
                out.notes[i] = ""
                out.passthrough[i] = ()
                out.problems[i] = (Problem.of("repeated-header"),)
                if not self._fullmatch(out.task_ids[i]):
                    out.task_ids[i] = ""

    def _normalise(self, note: str) -> str:
        """Line breaks as LF (and ``\\n`` if asked); NFC is applied by the caller."""
        if "\r" in note:
            note = note.replace("\r\n", "\n").replace("\r", "\n")
        if self._settings.unescape_newlines:
            note = note.replace("\\n", "\n")
        return note

    def _shown(self, task_id: str, header: Header) -> str:
        """A rejected row's task id as the ledger and results.csv keep it: only if it matches
        validation.emr_task_id_pattern (or is the header's own name, repeated). Anything
        else in that cell may be a note (a line of a broken multi-line note, columns
        swapped): rejects.csv keeps the row as it was."""
        if task_id and (self._fullmatch(task_id)
                        or clean_name(task_id) == clean_name(header.names[header.task_col])):
            return task_id
        return ""

    @staticmethod
    def _append_reject(
        out: CheckedBatch, line: int, cells: list[str], task_id: str, *,
        problems: tuple[Problem, ...], passthrough: tuple[str, ...],
    ) -> None:
        i = len(out.lines)
        out.lines.append(line)
        out.task_ids.append(task_id)
        out.notes.append("")
        out.passthrough.append(passthrough)
        out.cells.append(cells)
        out.problems[i] = problems

    def _problems(self, task_id: str, raw_note: str, cells: list[str]) -> tuple[Problem, ...]:
        found: list[Problem] = []
        if self._settings.on_bad_encoding == "reject" and any(map(_SURROGATE.search, cells)):
            found.append(Problem.of("bad-encoding", encoding=self._settings.encoding))
        if not task_id:
            found.append(Problem.of("missing-task-id"))
        elif not self._fullmatch(task_id):
            found.append(Problem.of("bad-task-id", length=len(task_id)))
        note = raw_note.strip()
        if not note:
            found.append(Problem.of("blank-note"))
        elif len(note) > self._rules.max_note_chars:
            found.append(Problem.of("note-too-long", length=len(note),
                                    limit=self._rules.max_note_chars))
        control = _CONTROL.search(raw_note)
        if control is not None:
            found.append(Problem.of("control-characters", char=f"U+{ord(control.group()):04X}",
                                    pos=control.start() + 1))
        return tuple(found)

    def _mark_duplicates(self, out: CheckedBatch) -> None:
        if out.accounts:  # the same note for two accounts is two notes
            valid = [i for i in range(len(out)) if i not in out.problems]
            pairs: Iterable[tuple[str, ...]] = (
                (out.accounts[i], out.task_ids[i], out.notes[i]) for i in valid)
        elif out.problems:
            valid = [i for i in range(len(out)) if i not in out.problems]
            pairs = ((out.task_ids[i], out.notes[i]) for i in valid)
        else:
            valid = list(range(len(out)))
            pairs = zip(out.task_ids, out.notes, strict=True)
        if not valid:
            return
        hashes = np.fromiter(map(hash, pairs), dtype=np.int64, count=len(valid))
        refs = np.asarray(out.lines, dtype=np.int64)[valid] | (out.file_no << 40)
        earlier = self._duplicates.check_and_add(hashes, refs)
        for pos in np.flatnonzero(earlier >= 0).tolist():
            ref = int(earlier[pos])
            self._as_duplicate(out, valid[pos], (ref >> 40, ref & ((1 << 40) - 1)))

    def _as_duplicate(self, out: CheckedBatch, i: int, first: tuple[int, int]) -> None:
        if self._rules.duplicates == "skip":
            out.duplicate_of[i] = first
            return
        where = "" if first[0] == out.file_no else f" of {self._file_names.get(first[0], '?')}"
        out.problems[i] = (Problem.of("duplicate-row", line=first[1], where=where),)
        out.duplicate_of[i] = first


def _quote_ended(cells: list[str]) -> bool:
    """Some cell ends with a quote once trailing whitespace is trimmed (as notes are)."""
    return any(c.rstrip()[-1:] == '"' for c in cells)


_BREAK = re.compile("\r\n|\r|\n")
_LETTER = re.compile("[^\\W\\d_]")
_DIGIT = re.compile("[0-9]")


@functools.lru_cache(maxsize=64)
def _folded_names(header: Header) -> frozenset[str]:
    """The header's names, trimmed and casefolded: a task id among them may start a row
    that repeats the header."""
    return frozenset(n.casefold() for n in header.clean_names)


@functools.lru_cache(maxsize=8)
def _after_break(delimiter: str) -> re.Pattern[str]:
    """A line break inside a cell, then text up to the delimiter (group 1)."""
    d = re.escape(delimiter)
    return re.compile(rf"[\r\n]([^\r\n{d}]*){d}")


def _picker(columns: tuple[int, ...]) -> Callable[[list[str]], tuple[str, ...]]:
    """A fast function taking the passthrough cells out of a row."""
    if not columns:
        return lambda cells: ()
    getter = operator.itemgetter(*columns)
    if len(columns) == 1:
        return lambda cells: (getter(cells),)
    return getter


class DuplicateIndex:
    """The first occurrence of every row hash seen in a run, in 14 bytes per row.

    A dict of a million rows costs ~150 MB. Here new hashes go into sorted numpy
    runs (hash, line, file), merged like a binary counter up to ``RUN_CAP``
    entries and then left alone, so no merge of the whole index ever doubles
    it, and a batch's lookup is a few ``searchsorted`` calls. The hash is
    Python's 64-bit SipHash of (task id, note): two different rows collide with
    odds of about 1 in 10^7 per billion row pairs, and a row so skipped still
    shows in the results as a duplicate of a named line.

    A ref is ``file_no << 40 | line``, as ``Validator`` builds it.
    """

    RUN_CAP = 1 << 16  # ~1 MB per run: merges stay small, lookups stay a few searchsorted

    def __init__(self) -> None:
        self._runs: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32],
                               npt.NDArray[np.uint16]]] = []

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self._runs)

    def check_and_add(
        self, hashes: npt.NDArray[np.int64], refs: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """For each hash, the ref of its first occurrence (earlier batch or row), else -1."""
        earlier = np.full(len(hashes), -1, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        sorted_h = hashes[order]
        repeat = np.zeros(len(sorted_h), dtype=bool)
        repeat[1:] = sorted_h[1:] == sorted_h[:-1]
        first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(sorted_h))))
        earlier[order[repeat]] = refs[order[first[repeat]]]
        for run_h, run_lines, run_files in self._runs:
            # Sorted queries: searchsorted narrows each search from the last (3.6x faster).
            idx = np.searchsorted(run_h, sorted_h).clip(max=len(run_h) - 1)
            hit = run_h[idx] == sorted_h
            found = idx[hit]
            earlier[order[hit]] = (run_files[found].astype(np.int64) << 40) | run_lines[found]
        new = order[~repeat]
        new = new[earlier[new] < 0]
        if len(new):
            self._push(hashes[new], refs[new])
        return earlier

    def _push(self, hashes: npt.NDArray[np.int64], refs: npt.NDArray[np.int64]) -> None:
        order = np.argsort(hashes)
        refs = refs[order]
        self._runs.append((hashes[order], (refs & ((1 << 40) - 1)).astype(np.uint32),
                           (refs >> 40).astype(np.uint16)))
        runs = self._runs
        while (len(runs) > 1 and len(runs[-2][0]) < self.RUN_CAP
               and len(runs[-2][0]) <= 2 * len(runs[-1][0])):
            (h2, l2, f2), (h1, l1, f1) = runs.pop(), runs.pop()
            h, lines, files = (np.concatenate((h1, h2)), np.concatenate((l1, l2)),
                               np.concatenate((f1, f2)))
            order = np.argsort(h, kind="stable")
            runs.append((h[order], lines[order], files[order]))
