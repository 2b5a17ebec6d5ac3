"""The id check against a row's note, as run on every accepted request.

``client._accepted`` checks the task_note_id and job_id of each answer against the
row's note (``redaction.looks_like_id``), a new note each time, so the check works out
only the note forms it needs, with per-character tables instead of per-character
Python loops. These tests pin that the faster forms are the same as their definitions
(every code point), that each check still withholds an id showing the note, and that
the id check does not build the note's set of 16-letter windows.
"""

from __future__ import annotations

import re
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import redaction
from pipeline.redaction import canonical, looks_like_id, quotes

_DECODED = "%&+\\"  # characters canonical decodes: left out so only the per-char step runs


def _code_points(size: int = 4096) -> list[str]:
    """Every code point but surrogates and ``_DECODED``, in strings of ``size``."""
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if not 0xD800 <= c <= 0xDFFF and chr(c) not in _DECODED]
    return ["".join(chars[i:i + size]) for i in range(0, len(chars), size)]


def _words_by_definition(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return "".join(c if c.isalnum() else " " for c in text).split()


def test_canonical_reads_every_code_point_as_its_definition_says() -> None:
    """NFKD, combining marks dropped, case-folded, split on all but letters and digits."""
    for text in [*_code_points(), "Ab-9 x_Y", "Caf\u00e9 \u0130stanbul \ufb01ne \u017fo"]:
        assert canonical(text) == _words_by_definition(text)


def test_an_ids_letters_are_every_code_point_isalpha_keeps() -> None:
    for text in [*_code_points(), "Ab-9 x_Y", "\u212a\u017f\u00df\u00bd\u2167"]:
        assert redaction._letters(text) == "".join(
            c for c in text.casefold() if c.isalpha())


def test_an_id_holding_16_of_the_notes_letters_and_digits_is_the_note() -> None:
    """Few letters (no letters or runs check applies): the 16 characters shared with the
    note's canonical letters and digits are what withholds it."""
    note = "Dose 1200 mg at 08:00, 14:00, 20:00 daily"
    assert looks_like_id("1200mgat08001400")
    assert not looks_like_id("1200mgat08001400", [note])
    assert quotes("1200mgat08001400", [note])
    assert looks_like_id("1200mgat08001401", [note])  # one character off: not the note


@pytest.mark.parametrize("value", ["hiv7has", "has-9-hiv", "x1hiv.x2has"])
def test_two_note_words_in_any_order_are_the_note(value: str) -> None:
    """Fewer than 8 letters in a row of the note's: the runs check withholds it."""
    note = "Patient has HIV diagnosis confirmed"
    assert looks_like_id(value)
    assert not looks_like_id(value, [note])
    assert looks_like_id(value, ["Patient hasty, HIVE diagnosis"])  # pieces of words only


def test_the_id_check_does_not_build_the_notes_windows() -> None:
    """An id against a long note: its own windows are looked for in the note's letters;
    the note's set of windows (hundreds of strings, per note) is never made."""
    note = "Patient reports intermittent chest pain since Monday; " * 20
    before = redaction._windows.cache_info()
    assert looks_like_id("5f0c3b2a9d1e4f6a7b8c9d0e", [note])
    assert not looks_like_id("intermittentchestpain", [note])
    assert redaction._windows.cache_info() == before
    assert quotes("x " * 20 + note, [note])  # a message longer than the note: the sets
    assert redaction._windows.cache_info().misses == before.misses + 1


def _looks_like_id_by_definition(text: str, private: list[str]) -> bool:
    """``looks_like_id`` as its docstring spells it out, through the general ``quotes``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", text):
        return False
    words = [p for p in re.split(r"[_.:-]", text) if re.fullmatch(r"[A-Za-z]*[G-Zg-z][A-Za-z]*", p)]
    if len(words) > 2:
        return False
    notes = [p for p in private if p]
    letters = "".join(c for c in text.casefold() if c.isalpha())
    runs = {r.casefold() for r in re.findall(r"[^\W\d_]{3,}", text)}
    for note in notes:
        note_letters = "".join(c for c in note.casefold() if c.isalpha())
        if len(letters) >= 8 and letters in note_letters:
            return False
        if len(runs & set(re.findall(r"[^\W\d_]{3,}", note.casefold()))) >= 2:
            return False
    return not quotes(text, notes)


_ID_ALPHABET = "abcdefhivnpstxyzABFHIPX0123456789_.:-"
_NOTES = ["Patient has HIV diagnosis confirmed", "HIV", "has hiv", "abc def",
          "Dose 1200 mg at 08:00, 14:00, 20:00 daily", "evt 0000 0000 0000 0000 123",
          "Patient reports intermittent chest pain since Monday; " * 3, "café ﬁne ß",
          "a1b2c3d4", "abcdefgh", "ab12 cd34", "x", ""]


@settings(max_examples=4000, deadline=None)
@given(st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=40),
       st.lists(st.sampled_from(_NOTES) | st.text(alphabet=_ID_ALPHABET + " ,;é",
                                                   max_size=40), max_size=3))
def test_the_id_checks_shortcuts_give_the_definitions_verdict(text: str,
                                                              notes: list[str]) -> None:
    """Every shortcut of ``looks_like_id`` (bytes forms, checks skipped by length) gives
    the verdict its rule spelled out gives, on ids made of its own alphabet and notes
    that share their letters, digits and words."""
    assert looks_like_id(text, notes) == _looks_like_id_by_definition(text, notes)


@settings(max_examples=4000, deadline=None)
@given(st.lists(st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=40)
                | st.sampled_from(["x" * 129, "1" * 129, "1" * 127 + "a", "evt_" + "0" * 124,
                                   "a-b", "1.2", "12:34-5", "-1", "0" * 16, "A1b2C3d4E5f",
                                   "evt_00000000000000000123", "1200mgat08001400",
                                   "h.i.v", "t-x-y", "x-y-z1", "\u0661\u0662\u0663",
                                   "\u00b23", "123\n", ""]),
                min_size=1, max_size=4),
       st.sampled_from(_NOTES) | st.text(alphabet=_ID_ALPHABET + " ,;é", max_size=60)
       | st.none())
def test_safe_ids_shortcuts_give_the_definitions_verdict(ids: list[str],
                                                        note: str | None) -> None:
    """``safe_ids`` (an event's ids against its note, with its own shortcut for ids of
    few letters) keeps exactly the ids the rule spelled out keeps, withholds the rest
    as ``safe_id`` does, and passes None through."""
    kept = redaction.safe_ids([*ids, None], note)
    assert kept[-1] is None
    for text, got in zip(ids, kept, strict=False):
        if _looks_like_id_by_definition(text, [note] if note else []):
            assert got == text
        else:
            assert got == redaction.safe_id(text, [note] if note else [])
            assert got is not None
            assert got.startswith(redaction.ID_WITHHELD)


@pytest.mark.parametrize(("value", "note"), [
    ("evt_00000000000000000123", "evt 0000 0000 0000 0000 123"),  # 16+ shared: the note
    ("1200mgat08001400", "Dose 1200 mg at 08:00, 14:00, 20:00 daily"),
    ("1-ab-cd-2", "ab cd"),  # a short note's words, whole and in order
    ("0ab12cd349", "ab12 cd34"),  # a short note of 8+ letters and digits run together
    ("hiv7has", "Patient has HIV diagnosis confirmed"),
])
def test_ids_showing_the_note_are_withheld(value: str, note: str) -> None:
    assert looks_like_id(value)
    assert not looks_like_id(value, [note])
