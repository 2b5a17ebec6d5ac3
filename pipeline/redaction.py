"""Untrusted upstream text made safe to keep: no note, no secret, one short line.

What Cobalt says (an API error's message, a webhook's ``failure_reason``) may
quote the request: the note, or a credential. Before such text reaches the
ledger, a shared report or the console it goes through ``redact``, in two
passes:

1. **Cut precisely** where the quote is found as written: every occurrence of a
   private string (a note, a secret) not inside a longer word, and every run of
   ``REDACT_RUN`` (16) or more of its characters, also compared on letters and
   digits alone, case-folded. Each cut becomes ``[redacted]``.
2. **Withhold when in doubt.** What is left is compared again on a canonical
   form of both sides (``canonical``): JSON/Python string escapes, URL
   percent-encoding and HTML character references undone (repeatedly, so a
   quote escaped twice is found too), Unicode NFKD with combining marks
   dropped, case-folded, and everything but letters and digits dropped (so
   the ``n`` of an escaped ``\\n`` never joins the text). If a private string
   still shows (a run of 16 or more of its letters and digits, or a short one
   whole), the whole message is withheld and only the caller's own prefix
   (HTTP status and code) is kept: cutting precisely inside a re-encoded quote
   cannot be trusted. So is a message where the text next to a cut continues the
   private string (6 or more of its letters): the encoding broke pass 1's run.

The full upstream text is kept nowhere.
"""

from __future__ import annotations

import functools
import hashlib
import html
import itertools
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

REDACT_RUN: Final = 16  # this many consecutive characters of a note or secret are removed
REDACTED: Final = "[redacted]"
MESSAGE_WITHHELD: Final = "[message withheld: it quoted the request]"
MAX_MESSAGE: Final = 300
# An id from upstream (task_note_id, job_id, emr_note_id, an event's id) as kept: a letter
# or digit, then letters, digits and ``_ . : -``, at most 128 characters. Cobalt's ids fit
# (24 hex digits, integers, UUIDs, ``evt_...``); text with a space, other punctuation, a
# leading separator or beyond the cap does not. See ``looks_like_id`` for the whole rule.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_ID_PARTS: Final = re.compile(r"[_.:-]")
# A part of an id that reads as a word: letters only, at least one beyond hex digits (so
# "cafe" in a UUID is not one). An id has at most MAX_ID_WORDS of them: "evt_..." has one.
_WORD: Final = re.compile(r"[A-Za-z]*[G-Zg-z][A-Za-z]*")
MAX_ID_WORDS: Final = 2
ID_WITHHELD: Final = "withheld-"
SCAN_LIMIT: Final = 65_536  # characters of an upstream message looked at, at most
_NEIGHBOUR: Final = 6  # letters next to a cut that, found in the note, mean it was cut short
_SHORT_SKELETON: Final = 8  # a short private string is also looked for without its spacing
_ROUNDS: Final = 4  # decoding rounds: a quote escaped up to this many times is found
_ESCAPE: Final = re.compile(
    r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|x([0-9a-fA-F]{2})|(.))", re.DOTALL)
_CONTROL_ESCAPES: Final = frozenset("nrtbfva0")


def looks_like_id(text: str, private: Iterable[str] = ()) -> bool:
    """Whether upstream ``text`` may be kept and shown as an id.

    The rule: it matches ``ID_PATTERN`` (a letter or digit first; letters, digits and
    ``_ . : -``; 1 to 128 characters); at most ``MAX_ID_WORDS`` (2) of its parts between
    those separators are words (letters only, not all hex digits), so prose joined by
    separators ("Patient-has-HIV-diagnosis") is not an id while ``evt_5eQX92s``, UUIDs,
    24 hex digits and integers are; and it does not show any ``private`` string (the
    row's note, compared as ``quotes`` does: canonical letters and digits; nor, read as
    its letters alone, ``ID_NOTE_LETTERS`` (8) or more letters in a row of the note's,
    nor two or more of its runs of letters (3 or more each) words of the note: note words
    joined by digits or separators, "Patient1has2HIV3diagnosis", "x1Patient-x2has", are
    the note).
    """
    return _is_id(text, list(filter(None, private)))


def _is_id(text: str, notes: list[str]) -> bool:
    """``looks_like_id(text, notes)``, ``notes`` given as a list of non-empty strings."""
    if not ID_PATTERN.fullmatch(text):
        return False
    # From here ``text`` is ASCII letters, digits and ``_ . : -`` only, so case-folding is
    # lower(), a letter is [a-z] and ``canonical`` decodes nothing: the checks below are
    # those spelled out above, on that alphabet (a million ids per reconcile of 1M rows).
    # More than 2 word parts need a letter beyond hex digits and 3 parts (2 separators).
    if (_NOT_HEX_LETTER.search(text) and _TWO_SEPARATORS.search(text)
            and len(_WORD_PART.findall(text)) > MAX_ID_WORDS):
        return False
    if not notes:
        return True
    # Each check works out only the note forms it needs (this runs on every accepted
    # request, with a new note each time, and on four ids of every event a reconcile
    # reads): the id's forms at bytes.translate speed (on this alphabet its canonical
    # letters and digits are ``text`` lower-cased without separators), the note's letters
    # for an id of 8+ letters, its runs of letters only when the id has 6+ letters (two
    # runs of 3) and two of them appear in the note at all, and the 16-letter windows
    # only for an id that has 16 letters and digits.
    lower = text.lower().encode("ascii")
    letters = lower.translate(None, _NOT_ASCII_LETTER).decode("ascii")
    if len(letters) >= ID_NOTE_LETTERS and any(letters in _note_letters(n) for n in notes):
        return False
    if len(letters) >= 2 * _MIN_RUN:
        runs = {r.casefold() for r in _LETTER_RUN.findall(text)}
        if len(runs) >= 2 and any(_shares_runs(runs, n) for n in notes):
            return False
    joined = lower.translate(None, _ID_SEPARATORS).decode("ascii")
    return not _id_quotes(joined, lower, notes)


def _shares_window(joined: str, theirs: str) -> bool:
    """Whether any ``REDACT_RUN`` (16) consecutive characters of ``joined`` appear in
    ``theirs``. The windows starting at ``a`` to ``a + 7`` all hold ``joined[a + 7:a + 16]``:
    where those 9 characters are not in ``theirs`` (nearly always, for an id against its
    note), none of the 8 windows is, and one search rules them all out."""
    last = len(joined) - REDACT_RUN
    for a in range(0, last + 1, _WINDOW_GROUP):
        b = a + _WINDOW_GROUP - 1 if a + _WINDOW_GROUP - 1 < last else last  # min(), inline
        if joined[b:a + REDACT_RUN] in theirs and any(
                joined[i:i + REDACT_RUN] in theirs for i in range(a, b + 1)):
            return True
    return False


_WINDOW_GROUP: Final = 8  # windows ruled out together by the characters they share


def _id_quotes(joined: str, lower: bytes, notes: list[str]) -> bool:
    """``quotes(text, notes)`` for an id ``text`` (``ID_PATTERN``'s alphabet: canonical
    decodes nothing and its words are its parts between separators), given the id's
    canonical letters and digits ``joined`` and its lower-cased ASCII ``lower``."""
    spaced: str | None = None
    for note in notes:
        forms = _forms(note)
        theirs = forms.joined
        if not theirs:
            continue
        if len(theirs) >= REDACT_RUN:
            if len(joined) < REDACT_RUN:
                continue  # no window of 16 to share
            if len(joined) <= len(theirs):
                if _shares_window(joined, theirs):
                    return True
                continue
            windows = {joined[i:i + REDACT_RUN] for i in range(len(joined) - REDACT_RUN + 1)}
            if not _windows(note).isdisjoint(windows):
                return True
            continue
        if len(theirs) >= _SHORT_SKELETON and theirs in joined:
            return True
        if spaced is None:
            spaced = f" {' '.join(lower.translate(_ASCII_ALNUM_OR_SPACE).decode('ascii').split())} "
        if forms.spaced in spaced:
            return True
    return False


_NOT_HEX_LETTER: Final = re.compile(r"[G-Zg-z]")  # an id without one has no _WORD part
_TWO_SEPARATORS: Final = re.compile(r"[_.:-].*[_.:-]")
# A part between separators (``_ID_PARTS``) that is a ``_WORD``, found in one pass.
_WORD_PART: Final = re.compile(r"(?<![^_.:-])[A-Za-z]*[G-Zg-z][A-Za-z]*(?![^_.:-])")
ID_NOTE_LETTERS: Final = 8
_MIN_RUN: Final = 3  # letters in a run of letters that the runs check compares
_LETTER_RUN: Final = re.compile(r"[^\W\d_]{3,}")
_ID_SEPARATORS: Final = b"_.:-"


@dataclass(frozen=True, slots=True)
class _Forms:
    """A private string as the checks compare it, worked out once per string: its
    ``canonical`` words joined (``joined``) and spaced (``spaced``). Its letters
    (``_note_letters``), windows (``_windows``) and runs of letters (``_runs``) are
    cached apart, worked out only when a check needs them."""

    joined: str
    spaced: str


@functools.lru_cache(maxsize=64)
def _forms(secret: str) -> _Forms:
    """``_Forms`` of ``secret``, cached (a few: reconcile checks each of an event's ids
    against that event's note, one after the other; in memory only)."""
    words = canonical(secret)
    return _Forms("".join(words), f" {' '.join(words)} ")


@functools.lru_cache(maxsize=64)
def _note_letters(secret: str) -> str:
    """``_letters`` of ``secret``, cached."""
    return _letters(secret)


@functools.lru_cache(maxsize=64)
def _windows(secret: str) -> frozenset[str]:
    """Every run of ``REDACT_RUN`` of ``secret``'s canonical letters and digits, cached."""
    joined = _forms(secret).joined
    return frozenset(joined[i:i + REDACT_RUN] for i in range(len(joined) - REDACT_RUN + 1))


@functools.lru_cache(maxsize=64)
def _runs(secret: str) -> frozenset[str]:
    """``secret``'s runs of 3 or more letters, case-folded, cached."""
    return frozenset(_LETTER_RUN.findall(secret.casefold()))


def _shares_runs(runs: set[str], note: str) -> bool:
    """Whether two or more of ``runs`` (case-folded) are runs of letters of ``note``.

    A run of the note is a piece of its case-folded text, so fewer than two of ``runs``
    found in that text answers no without working out the note's runs."""
    folded = note.casefold()
    if sum(1 for run in runs if run in folded) < 2:
        return False
    return len(runs & _runs(note)) >= 2


class _CharTable(dict[int, str | None]):
    """A ``str.translate`` table worked out per character the first time it is seen, by
    ``rule`` (the character's replacement, None to drop it): the same result as
    applying ``rule`` to each character in Python, at C speed once the text's characters
    are known. At most ``_TABLE_LIMIT`` characters are kept (bounded memory whatever
    upstream sends); a character beyond that is worked out again each time."""

    def __init__(self, rule: Callable[[str], str | None]) -> None:
        super().__init__()
        self._rule = rule

    def __missing__(self, code: int) -> str | None:
        value = self._rule(chr(code))
        if len(self) < _TABLE_LIMIT:
            self[code] = value
        return value


_TABLE_LIMIT: Final = 16_384
_NO_MARKS: Final = _CharTable(lambda c: None if unicodedata.combining(c) else c)
_ALNUM_OR_SPACE: Final = _CharTable(lambda c: c if c.isalnum() else " ")
_LETTER_ONLY: Final = _CharTable(lambda c: c if c.isalpha() else None)
# bytes.translate tables for ASCII text: every byte but a letter (to delete), and each
# byte mapped to itself when a letter or digit, else to a space.
_NOT_ASCII_LETTER: Final = bytes(b for b in range(256) if not chr(b).isascii()
                                 or not chr(b).isalpha())
_ASCII_ALNUM_OR_SPACE: Final = bytes(b if chr(b).isascii() and chr(b).isalnum() else 0x20
                                     for b in range(256))
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]+")


def _by_stretch(text: str, ascii_part: Callable[[str], str], other: Callable[[str], str]
                ) -> str:
    """``text`` with ``ascii_part`` applied to each stretch of ASCII characters and
    ``other`` to each stretch of the rest, joined. For rules that map each character on
    its own, the same as ``other`` on the whole text; a note is mostly ASCII, done at
    ``bytes.translate`` speed."""
    parts: list[str] = []
    start = 0
    for match in _NON_ASCII.finditer(text):
        parts += (ascii_part(text[start:match.start()]), other(match.group()))
        start = match.end()
    parts.append(ascii_part(text[start:]))
    return "".join(parts)


def _ascii_letters(folded: str) -> str:
    return folded.encode("ascii").translate(None, _NOT_ASCII_LETTER).decode("ascii")


def _other_letters(folded: str) -> str:
    return folded.translate(_LETTER_ONLY)


def _letters(text: str) -> str:
    """``text``'s letters alone, case-folded (digits, separators and spaces dropped)."""
    folded = text.casefold()
    if folded.isascii():  # an ASCII letter is A-Z or a-z, case-folded a-z
        return _ascii_letters(folded)
    return _by_stretch(folded, _ascii_letters, _other_letters)


def safe_id(value: object, private: Iterable[str] = ()) -> str | None:
    """An id that came from upstream, as tasknotes keeps and reports it.

    As given when it looks like an id (``looks_like_id``, against the ``private``
    strings given: the note of the row it belongs to, when known); else withheld:
    ``withheld-`` and 16 hex digits of its SHA-256, so the same value always gives the
    same text (events still de-duplicate) and nothing of it is shown, since a buggy or
    hostile upstream could put note text there (OWASP: treat upstream data as
    untrusted). None stays None.
    """
    if value is None:
        return None
    text = str(value)
    return text if _is_id(text, list(filter(None, private))) else _withheld_id(text)


def safe_ids(values: Iterable[object], note: object) -> list[str | None]:
    """``safe_id`` of each of ``values`` against one ``note`` (ignored unless a non-empty
    string): the ids of one event against its own note, in one call (reconcile reads
    four ids of every event, a million events per reconcile of 1M rows).

    The usual id (``_FEW_LETTERS``: at most 5 letters and one separator, so neither the
    word-part rule nor a letters check of ``looks_like_id`` can apply), against a note
    of 16 or more canonical letters and digits, can only show the note by sharing 16 of
    them: under 16 characters it cannot, and a longer one is looked for in the note's
    letters and digits at once (``_shares_window``), as ``_id_quotes`` does."""
    notes = [note] if isinstance(note, str) and note else []
    theirs = _forms(notes[0]).joined if notes else ""
    quick = not notes or len(theirs) >= REDACT_RUN
    few = _FEW_LETTERS.fullmatch
    out: list[str | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        text = str(value)
        if quick:
            if len(text) < REDACT_RUN and text.isdigit() and text.isascii():
                out.append(text)  # a job id: digits only, no letter, no separator
                continue
            if few(text) is not None:
                if len(text) < REDACT_RUN or not notes:
                    out.append(text)
                    continue
                joined = (text.lower().encode("ascii").translate(None, _ID_SEPARATORS)
                          .decode("ascii"))
                if len(joined) <= len(theirs):
                    out.append(_withheld_id(text) if _shares_window(joined, theirs) else text)
                    continue
        out.append(text if _is_id(text, notes) else _withheld_id(text))
    return out


# An id ID_PATTERN takes (1 to 128 characters) with at most 5 letters and one separator.
_FEW_LETTERS: Final = re.compile(
    r"(?=[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z)(?!(?:.*[_.:-]){2})"
    r"(?:[0-9_.:-]*[A-Za-z]){0,5}[0-9_.:-]*")


def _withheld_id(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return ID_WITHHELD + digest


def redact(text: str, private: Iterable[str], *, limit: int = MAX_MESSAGE,
           withheld: str = MESSAGE_WITHHELD) -> str:
    """Untrusted upstream ``text`` made safe to store and show: one line, at most ``limit``
    characters, with every ``private`` string (a note, a secret) removed.

    Pass 1 replaces each quote found as written by ``[redacted]``: every
    occurrence of a private string (not inside a longer word); every run of
    ``REDACT_RUN`` (16) or more consecutive characters of one (a quote cut
    short, or embedded in other text); and the same runs compared on letters
    and digits alone, case-folded (a quote whose spacing, punctuation or case
    was changed). Pass 2: if ``quotes`` still finds a private string in what
    is left (re-encoded: escaped, URL- or HTML-encoded, NFD, re-cased), the
    result is ``withheld`` instead. Control characters and line breaks become
    spaces. Only the first 65,536 characters are read.
    """
    text = text[:SCAN_LIMIT]
    secrets = [s for s in private if s]
    hide = bytearray(len(text))
    everywhere = list(range(len(text)))
    skeleton, where = _skeleton(text)
    for secret in secrets:
        _hide_runs(text, everywhere, secret, hide, whole=True)
        _hide_runs(skeleton, where, _skeleton(secret)[0], hide, whole=False)
    parts: list[str] = []
    for i, char in enumerate(text):
        if hide[i]:
            if not (i and hide[i - 1]):
                parts.append(REDACTED)
        else:
            parts.append(char if char.isprintable() else " ")
    safe = " ".join("".join(parts).split())
    if secrets and (quotes(safe, secrets) or _cut_short(safe, secrets)):
        return withheld
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"


def quotes(text: str, private: Iterable[str]) -> bool:
    """Whether ``text`` still shows any ``private`` string once both are ``canonical``.

    A private string whose canonical letters and digits number ``REDACT_RUN`` (16) or more
    shows when any 16 consecutive of them appear in ``text``'s; a shorter one when its
    words appear whole and in order, or (8 or more letters and digits) when they
    appear run together.
    """
    words = canonical(text)
    joined = "".join(words)
    spaced = f" {' '.join(words)} "
    windows: set[str] | None = None
    for secret in private:
        forms = _forms(secret)
        letters = forms.joined
        if not letters:
            continue
        if len(letters) >= REDACT_RUN:
            # A shared window: each of the shorter side's windows looked for in the
            # other's letters (an id against its note), or the two sets of windows.
            if len(joined) <= len(letters):
                if any(joined[i:i + REDACT_RUN] in letters
                       for i in range(len(joined) - REDACT_RUN + 1)):
                    return True
                continue
            if windows is None:
                windows = {joined[i:i + REDACT_RUN]
                           for i in range(len(joined) - REDACT_RUN + 1)}
            if not _windows(secret).isdisjoint(windows):
                return True
        elif forms.spaced in spaced or (
                len(letters) >= _SHORT_SKELETON and letters in joined):
            return True
    return False


def _cut_short(safe: str, private: list[str]) -> bool:
    """Whether text next to a ``[redacted]`` still continues a private string (its first or
    last ``_NEIGHBOUR`` canonical letters appear in it): a quote whose encoding (``%22``,
    an NFD accent) broke pass 1's run, so the cut missed part of it."""
    segments = ["".join(canonical(part)) for part in safe.split(REDACTED)]
    if len(segments) < 2:
        return False
    letters = [_forms(secret).joined for secret in private]
    for left, right in itertools.pairwise(segments):
        ends = [end for end in (left[-_NEIGHBOUR:], right[:_NEIGHBOUR])
                if len(end) == _NEIGHBOUR]
        if any(end in theirs for end in ends for theirs in letters):
            return True
    return False


# ASCII text holding none of these has nothing _decode_once undoes (an id always).
_ENCODED: Final = re.compile(r"[%&+\\]")


def canonical(text: str) -> list[str]:
    """``text``'s words as compared by ``quotes``: decoded, NFKD without combining marks,
    case-folded, split on everything that is not a letter or a digit.

    Decoding undoes, up to four times over, JSON/Python string escapes (``\\n``,
    ``\\u00e9``, ``\\"``; an escaped control character becomes a space), URL
    percent-encoding (RFC 3986, ``+`` as a space) and HTML character references.
    """
    text = text[:SCAN_LIMIT]
    if text.isascii() and not _ENCODED.search(text):  # nothing to decode, no marks
        return _ascii_words(text)
    for _ in range(_ROUNDS):
        decoded = _decode_once(text)
        if decoded == text:
            break
        text = decoded
    text = unicodedata.normalize("NFKD", text)
    if text.isascii():  # decoded to ASCII: no marks, and the fast path's words
        return _ascii_words(text)
    return _by_stretch(text, _ascii_spaced, _other_spaced).split()


def _ascii_words(text: str) -> list[str]:
    """ASCII ``text``'s words as ``canonical`` gives them: lower case (ASCII's case
    folding), split on everything but letters and digits."""
    return _ascii_spaced(text).split()


def _ascii_spaced(text: str) -> str:
    """ASCII ``text`` in lower case, every character but a letter or digit a space."""
    return text.lower().encode("ascii").translate(_ASCII_ALNUM_OR_SPACE).decode("ascii")


def _other_spaced(text: str) -> str:
    """``text`` without combining marks, case-folded, every character but a letter or
    digit a space (what ``canonical`` does to each character after NFKD)."""
    return text.translate(_NO_MARKS).casefold().translate(_ALNUM_OR_SPACE)


def _decode_once(text: str) -> str:
    if "&" in text:
        text = html.unescape(text)
    if "%" in text or "+" in text:
        text = urllib.parse.unquote_plus(text)
    if "\\" in text:
        text = _ESCAPE.sub(_unescape, text)
    return text


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1) or match.group(2) or match.group(3)
    if code:
        char = chr(min(int(code, 16), 0x10FFFF))
        return char if char.isprintable() else " "
    char = match.group(4)
    return " " if char in _CONTROL_ESCAPES else char


def _skeleton(text: str) -> tuple[str, list[int]]:
    """``text``'s letters and digits, case-folded, and where each came from in ``text``."""
    chars: list[str] = []
    where: list[int] = []
    for i, char in enumerate(text):
        if char.isalnum():
            for folded in char.casefold():
                chars.append(folded)
                where.append(i)
    return "".join(chars), where


def _joined(text: str, left: int, right: int) -> bool:
    """Whether ``text[left]`` and ``text[right]`` both exist and are both letters or digits."""
    return (left >= 0 and right < len(text) and text[left].isalnum()
            and text[right].isalnum())


def _hide_runs(hay: str, where: list[int], needle: str, hide: bytearray, *,
               whole: bool) -> None:
    """Mark in ``hide`` (indexed like the original text; ``where[i]`` is the original
    position of ``hay[i]``) every run of ``REDACT_RUN`` or more characters of ``needle``
    found in ``hay``, and (``whole``) every occurrence of ``needle`` itself."""
    if not needle or not hay:
        return
    spans: list[tuple[int, int]] = []
    if whole:  # a whole occurrence, unless it is part of a longer word ("n" in "note")
        start = hay.find(needle)
        while start >= 0:
            end = start + len(needle)
            if not (_joined(hay, start - 1, start) or _joined(hay, end - 1, end)):
                spans.append((start, end))
            start = hay.find(needle, start + 1)
    if len(needle) >= REDACT_RUN:
        windows = {needle[i:i + REDACT_RUN] for i in range(len(needle) - REDACT_RUN + 1)}
        spans += [(i, i + REDACT_RUN) for i in range(len(hay) - REDACT_RUN + 1)
                  if hay[i:i + REDACT_RUN] in windows]
    for start, end in spans:
        first, last = where[start], where[end - 1]
        hide[first:last + 1] = b"\x01" * (last + 1 - first)
