"""The event codec: one parse for the sink and every reader; bad lines set aside, never fatal."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reconcile import Book

from helpers import make_config, read_sink, write_config
from pipeline.client import CobaltClient
from pipeline.events import (
    MAX_DEPTH,
    SetAside,
    SinkFile,
    UnreadableEvent,
    check_event_id,
    decode_event,
    decode_event_stdlib,
    read_sink_from,
    receipt_time,
    receive_time,
    set_aside_path,
)
from pipeline.polling import Poller, PollStats
from pipeline.reconciliation import Reconciler
from pipeline.state import Ledger

GOOD = {"id": "evt_1", "type": "task_note.failed", "job_id": "1",
        "data": {"task_note_id": "a", "failure_reason": "locked 🙂"}}
SURROGATE = b'{"id":"evt_s","type":"task_note.failed","job_id":"2",' \
            b'"data":{"failure_reason":"locked \\ud83d"}}'


def nested(depth: int) -> bytes:
    return b'{"id":"evt_deep","data":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(SURROGATE, "lone-surrogate", id="lone-high-surrogate"),
        pytest.param(b'{"id":"e","x":"\\udc00 trailing"}', "lone-surrogate", id="lone-low"),
        pytest.param(b'{"\\ud800":1,"id":"e"}', "lone-surrogate", id="surrogate-key"),
        pytest.param(json.dumps(GOOD).encode("utf-16"), "not-utf8", id="utf-16-with-bom"),
        pytest.param(json.dumps(GOOD).encode("utf-16-le"), "not-json", id="utf-16-le"),
        pytest.param(json.dumps(GOOD).encode("utf-32"), "not-utf8", id="utf-32"),
        pytest.param(b'{"id":"e","x":"\xed\xa0\xbd"}', "not-utf8", id="utf-8-encoded-surrogate"),
        pytest.param(b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), "not-json", id="utf-8-bom"),
        pytest.param(nested(50_000), "too-deep", id="50000-deep"),
        pytest.param(nested(MAX_DEPTH), "too-deep", id="one-past-the-limit"),
        pytest.param(b'{"id":"e","n":NaN}', "not-finite", id="nan"),
        pytest.param(b'{"id":"e","n":-Infinity}', "not-finite", id="infinity"),
        pytest.param(b'{"id":"e","n":1e400}', "not-finite", id="overflowing-float"),
        pytest.param(b'{"id":"e","n":' + b"9" * 5000 + b"}", "not-json", id="5000-digit-int"),
        pytest.param(b'["an","array"]', "not-an-object", id="array"),
        pytest.param(b"{not json", "not-json", id="broken"),
    ],
)
def test_the_codec_refuses_what_no_reader_could_use(raw: bytes, code: str) -> None:
    """Each kind of unreadable body is an UnreadableEvent with its code, never another error."""
    with pytest.raises(UnreadableEvent) as caught:
        decode_event(raw)
    assert caught.value.code == code


def test_the_codec_accepts_what_cobalt_sends() -> None:
    """Non-ASCII as is, escaped pairs, and nesting right at the limit are accepted."""
    assert decode_event(json.dumps(GOOD, ensure_ascii=False).encode()) == GOOD
    assert decode_event(b'{"id":"e","x":"\\ud83d\\ude42"}')["x"] == "🙂"
    assert decode_event(nested(MAX_DEPTH - 1))["id"] == "evt_deep"
    assert decode_event(b'{"id":"e","x":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')["id"] == "e"


@pytest.mark.parametrize("bad", ["evt\x00", "evt\x1f", "evt\x7f", "\x80evt", "evt\x85x",
                                 "evt\x9f", "evt\n", "evt\t"])
def test_an_event_id_with_a_control_character_is_refused(bad: str) -> None:
    """Every character of Unicode category Cc (C0, DEL, C1) makes an id ``bad-id``."""
    with pytest.raises(UnreadableEvent) as caught:
        check_event_id(bad)
    assert caught.value.code == "bad-id"


@pytest.mark.parametrize("good", ["evt_1", "evt\xa0x", "évt\u2028x", "evt \U0001f642", "x" * 255])
def test_an_event_id_without_a_control_character_is_kept(good: str) -> None:
    """Next to Cc: NBSP (Zs), a line separator (Zl), non-ASCII, an emoji are not Cc."""
    assert check_event_id(good) == good


def test_a_receive_time_is_utc_with_milliseconds_as_receipts_keep_it() -> None:
    """``receive_time`` is the text readers accept as a receive time (``receipt_time``)."""
    now = receive_time()
    assert receipt_time(now) == now
    assert len(now) == len("2026-06-15T12:02:40.123Z")
    assert now.endswith("Z")


def test_a_body_over_the_size_limit_is_refused() -> None:
    """The size limit is checked before parsing."""
    with pytest.raises(UnreadableEvent) as caught:
        decode_event(json.dumps(GOOD).encode(), max_bytes=10)
    assert caught.value.code == "too-large"


# Text as a JavaScript string can hold it: any code point, and lone surrogates too.
texts = st.text(max_size=12) | st.text(
    st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | texts,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(texts, children, max_size=4),
    max_leaves=40,
)


def store_and_read_back(bodies: list[bytes]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Each body the receiver's parse accepts, appended by a real SinkFile, then read back."""
    accepted = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = SinkFile(Path(tmp) / "state" / "webhooks.jsonl", fsync=lambda fd: None)
        sink.open()

        async def append_all() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sink.run)
                for n, body in enumerate(bodies):
                    try:
                        event = decode_event(body)  # the receiver's parse (minus its id check)
                    except UnreadableEvent:
                        continue
                    accepted.append(event)
                    await sink.append(body, f"evt_{n}")
                sink.stop()

        anyio.run(append_all)
        sink.close()
        read = [item for _, _, item in read_sink_from(sink.path, 0)]
    return accepted, read


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.dictionaries(texts, json_values, max_size=6),
                         min_size=1, max_size=4),
       pretty=st.booleans(), ascii_only=st.booleans())
def test_fuzz_nothing_the_sink_accepts_is_refused_by_a_reader(
        payloads: list[dict[str, Any]], pretty: bool, ascii_only: bool) -> None:
    """Whatever body the sink accepts and stores, the reader reads back, equal, none set aside."""
    bodies = []
    for n, payload in enumerate(payloads):
        try:
            bodies.append(json.dumps({**payload, "n": n}, ensure_ascii=ascii_only,
                                     indent=2 if pretty else None).encode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError):
            continue
    accepted, read = store_and_read_back(bodies)
    assert read == accepted
    for event in read:  # what the ledger and the reports then do with it: UTF-8 text
        json.dumps(event, ensure_ascii=False).encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_give_an_event_or_an_unreadable_event(raw: bytes) -> None:
    """No byte string makes the codec raise anything but UnreadableEvent."""
    with contextlib.suppress(UnreadableEvent):
        decode_event(raw)


def _verdict(decode: Any, raw: bytes) -> tuple[str, Any]:
    """What a codec makes of ``raw``: the event (with each value's type, so 1 and 1.0 and
    True differ), or the refusal's code."""
    try:
        return "event", _typed(decode(raw))
    except UnreadableEvent as exc:
        return "refused", exc.code


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return [(k, _typed(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, value)


_NUMBERS = st.integers() | st.integers(min_value=2**62, max_value=2**70) | st.integers(
    min_value=-(2**70), max_value=-(2**62)) | st.floats()
_NASTY = st.sampled_from([b"\\ud83d", b"\\ud83d\\ude00", b"\\udc00", b"\\u0000", b"\xed\xa0\xbd",
                          b"\xef\xbb\xbf", b"NaN", b"-Infinity", b"1e400", b"-0", b"1E2",
                          b"01", b"1.", b" ", b"\t", b"\\n", b"\x00", b"\xff", b"9" * 25,
                          b"-" + b"9" * 19, b"18446744073709551616", b"9223372036854775808",
                          b"-9223372036854775809", b'"', b",", b":", b"}", b"]", b"caf\xc3\xa9"])


@settings(max_examples=2000, deadline=None)
@given(value=st.dictionaries(texts, json_values | _NUMBERS, max_size=5),
       cuts=st.lists(st.tuples(st.integers(min_value=0, max_value=400), _NASTY), max_size=3),
       ascii_only=st.booleans())
def test_fuzz_the_fast_parse_gives_what_the_standard_library_gives(
        value: dict[str, Any], cuts: list[tuple[int, bytes]], ascii_only: bool) -> None:
    """decode_event (orjson where it agrees) and decode_event_stdlib (json alone): the same
    event, every value of the same type, or the same refusal, for JSON objects of every
    kind of value (integers past 64 bits, floats, surrogates, non-ASCII) with nasty bytes
    spliced in (lone surrogate escapes, BOMs, NaN, numbers past a double, broken syntax)."""
    try:
        raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    for where, nasty in cuts:
        at = min(where, len(raw))
        raw = raw[:at] + nasty + raw[at:]
    assert _verdict(decode_event, raw) == _verdict(decode_event_stdlib, raw)


@pytest.mark.parametrize("raw", [
    b'{"id":"e","n":18446744073709551616}', b'{"id":"e","n":-9223372036854775809}',
    b'{"id":"e","n":[123456789012345678901234567890]}', b'{"id":"e", "n":\t99999999999999999999}',
])
def test_an_integer_past_64_bits_is_read_as_the_integer_it_is(raw: bytes) -> None:
    """orjson would read it as a float (a job id altered); the codec keeps the integer."""
    assert _verdict(decode_event, raw) == _verdict(decode_event_stdlib, raw)
    event = decode_event(raw)
    number = event["n"][0] if isinstance(event["n"], list) else event["n"]
    assert isinstance(number, int)
    assert str(number) in raw.decode()


# -- readers set bad lines aside -----------------------------------------------------------


def test_read_sink_skips_a_bad_line_in_the_middle_and_goes_on(tmp_path: Path) -> None:
    """An old file with a lone-surrogate line and a UTF-16 line: the good events still read."""
    path = tmp_path / "w.jsonl"
    first, last = json.dumps({**GOOD, "id": "a"}), json.dumps({**GOOD, "id": "b"})
    path.write_bytes(first.encode() + b"\n" + SURROGATE + b"\n"
                     + json.dumps(GOOD).encode("utf-16") + b"\n" + last.encode() + b"\n")
    assert [e["id"] for _, e in read_sink(path)] == ["a", "b"]
    lines = [item for _, _, item in read_sink_from(path, 0)]
    aside = [item for item in lines if isinstance(item, SetAside)]
    assert [(a.offset, a.code) for a in aside] == [(len(first) + 1, "lone-surrogate"),
                                                  (len(first) + 2 + len(SURROGATE), "not-utf8")]
    assert aside[0].raw == SURROGATE


def test_reconcile_sets_a_lone_surrogate_aside_and_settles_the_rest(book: Book,
                                                                    tmp_path: Path) -> None:
    """Finding 1: the event that bricked every reconcile is set aside, counted, kept 0600."""
    old = os.umask(0o022)
    try:
        book.row("accepted", job_id="1")
        book.row("accepted", job_id="2", task="T2")
        book.event("task_note.created", "1", n=1)
        offset = book.sink.stat().st_size
        with book.sink.open("ab") as fh:
            fh.write(SURROGATE + b"\n")
        book.event("task_note.failed", "2", n=2)
        assert book.finals() == [("confirmed", "created"), ("failed_in_emr", "failed")]
    finally:
        os.umask(old)
    result = book.result()
    assert result.tally.get("(set aside)") == 1
    side = set_aside_path(book.sink)
    assert oct(side.stat().st_mode & 0o777) == "0o600"
    (record,) = [json.loads(line) for line in side.read_text().splitlines()]
    assert record["offset"] == offset
    assert record["code"] == "lone-surrogate"
    assert base64.b64decode(record["line_base64"]) == SURROGATE


def test_a_set_aside_line_is_kept_once_when_the_file_is_read_again(book: Book) -> None:
    """Reading the same sink again (a fresh ledger) does not copy its bad line twice."""
    book.event("task_note.created", "1", n=1)
    with book.sink.open("ab") as fh:
        fh.write(nested(50_000) + b"\n")
    book.event("task_note.created", "2", n=2)
    book.result()
    other = Ledger(book.sink.parent / "other.sqlite")
    other.start_run("run-2", "test_clinic", "fp", {})
    Reconciler(other, book.sink).run("run-2")
    other.close()
    lines = set_aside_path(book.sink).read_text().splitlines()
    assert [json.loads(line)["code"] for line in lines] == ["too-deep"]


@pytest.fixture
def book(tmp_path: Path) -> Book:
    return Book(tmp_path)


def test_tasknotes_reconcile_survives_bad_lines_and_reports_them(tmp_path: Path) -> None:
    """Findings 1 and 2 end to end: exit 0 (not 2, not a traceback), set_aside in summary.json."""
    (tmp_path / "state").mkdir()
    shelf = Book(tmp_path / "state")
    shelf.row("accepted", job_id="1")
    shelf.event("task_note.created", "1", n=1)
    with shelf.sink.open("ab") as fh:
        fh.write(SURROGATE + b"\n" + json.dumps({**GOOD, "id": "u16"}).encode("utf-16") + b"\n")
    shelf.ledger.close()
    config = write_config(tmp_path, state={"ledger": str(shelf.ledger.path)},
                          webhooks={"sink": str(shelf.sink)})
    done = subprocess.run([sys.executable, "-m", "pipeline", "reconcile", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "2 unreadable line(s) set aside" in done.stderr
    (summary,) = tmp_path.glob("reports/*/summary.json")
    assert json.loads(summary.read_text())["events"]["set_aside"] == 2


def test_poll_does_not_store_a_polled_event_a_reader_would_refuse(tmp_path: Path) -> None:
    """The list API's copy of a lone-surrogate event is skipped (job still missing), no crash."""
    config = make_config(tmp_path)
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    item = {"event_id": "evt_p", "event_type": "task_note.failed", "job_id": 7,
            "created_at": "2026-06-15T12:02:40Z",
            "data": {"task_note_id": "a", "failure_reason": "locked \ud83d"}}
    good = {**item, "event_id": "evt_q", "job_id": 8, "data": {"failure_reason": "ok"}}

    def answer(request: httpx.Request) -> httpx.Response:  # the list API, by job id
        job = request.url.params.get("job_id")
        page = {"webhook_events": [e for e in (item, good) if str(e["job_id"]) == job],
                "pagination": {"current_page": 1, "total_pages": 1}}
        return httpx.Response(200, content=json.dumps(page).encode(),  # \ud83d kept escaped
                              headers={"content-type": "application/json"})

    async def poll() -> PollStats:
        async with CobaltClient(config.api, transport=httpx.MockTransport(answer)) as client:
            return await Poller(config, client, sink).run({"7", "8"}, None)

    stats = anyio.run(poll)
    sink.close()
    assert (stats.wanted, stats.still_missing) == (2, 1)
    assert [e["id"] for _, e in read_sink(sink.path)] == ["evt_q"]
