"""Issue 12's edges: a receipt is durable before its line is visible (so a reader never
finds an event without its receive time), ids that are prose are withheld, and a row an
attempt of which may have stored the note is never "provably not sent"."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from helpers import (
    WEBHOOK_SECRET,
    EmulatorThread,
    ThreadedServer,
    read_results,
    read_summary,
    run_pipeline,
    wait_until,
    write_config,
    write_csv,
)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.emulator import Faults
from pipeline.events import SinkFile, compact_json, read_receipts, receipts_path
from pipeline.redaction import (
    ID_NOTE_LETTERS,
    ID_PATTERN,
    MAX_ID_WORDS,
    looks_like_id,
    quotes,
    safe_id,
)
from pipeline.sink import WebhookReceiver


def test_a_receipt_is_durable_before_its_line_is_visible(tmp_path: Path) -> None:
    """At the moment the receipts are fsync'ed, the sink file does not yet hold their lines:
    a reader that sees a line (reconcile reads without the sink's lock) finds its receipt."""
    path = tmp_path / "webhooks.jsonl"
    seen: list[tuple[int, int]] = []  # (sink size, receipts on disk) at each receipts fsync

    def fsync(fd: int) -> None:
        os.fsync(fd)
        if os.fstat(fd).st_ino == receipts_path(path).stat().st_ino:
            receipts = read_receipts(path) or {}
            seen.append((path.stat().st_size, len(receipts)))

    sink = SinkFile(path, fsync=fsync)
    sink.open()

    async def main_() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            for i in range(3):
                event = {"id": f"evt_{i}", "type": "task_note.created", "job_id": str(i),
                         "created": "2026-11-30T10:00:00Z", "data": {}}
                assert await sink.append(compact_json(event), f"evt_{i}",
                                         received_at="2026-11-30T10:00:00.123Z") == "stored"
            sink.stop()

    anyio.run(main_)
    sink.close()
    assert [receipts for _, receipts in seen] == [1, 2, 3]
    sizes = [size for size, _ in seen]
    assert sizes[0] == 0  # the first receipt was on disk before any line was
    assert sizes[1] < sizes[2] < path.stat().st_size  # each batch's line came after


@pytest.mark.parametrize("value", [
    "-Patient-has-HIV-diagnosis-confirmed", "-Patient_has_HIV_diagnosis_confirmed",
    "evt-Patient-has-HIV-diagnosis-confirmed1001", "Patient.has.HIV", "Call:me:back",
    "_leading", ".leading", "x" * 129,
])
def test_prose_joined_by_separators_is_not_an_id(value: str) -> None:
    assert not looks_like_id(value)
    assert str(safe_id(value)).startswith("withheld-")


@pytest.mark.parametrize("value", [
    "evt_5eQX92sNOmSVqNLaKvfsoGYT", "1796047431404554", "5f0c3b2a9d1e4f6a7b8c9d0e",
    "123e4567-e89b-12d3-a456-426614174000", "deadbeef-cafe-babe-face-feedfacecafe",
    "tn_abc123", "evt_x", "1",
])
def test_real_ids_stay_as_given(value: str) -> None:
    assert safe_id(value) == value


def test_an_id_showing_the_rows_note_is_withheld() -> None:
    """Two words pass the shape rule; compared with the note they carry, they are withheld."""
    assert looks_like_id("call-back")
    assert not looks_like_id("call-back", ["Call back"])
    assert str(safe_id("evt_call_back", ["call back"])).startswith("withheld-")


@pytest.mark.parametrize("value", [
    "Patient1has2HIV3diagnosis", "x1Patient-x2has-x3HIV-x4diagnosis", "HIV-diagnosis",
    "Patient:has", "Patienthas9",
])
def test_note_words_joined_by_digits_are_the_note(value: str) -> None:
    """The letters of an id, read alone, may not be 8 or more letters in a row of the row's
    note (a re-test found note words joined by digits passing the shape rule)."""
    note = "Patient has HIV diagnosis confirmed"
    assert looks_like_id(value) or value.startswith("x1")  # the shape alone may pass
    assert not looks_like_id(value, [note])
    assert looks_like_id("5f0c3b2a9d1e4f6a7b8c9d0e", [note])  # a real id still passes


def _id_rule(text: str, private: list[str]) -> bool:
    """``looks_like_id``'s rule as its docstring spells it, on any text (Unicode case
    folding, ``str.isalpha``, ``quotes``): what its ASCII fast path must agree with."""
    if not ID_PATTERN.fullmatch(text):
        return False
    parts = re.split(r"[_.:-]", text)
    if sum(1 for p in parts if re.fullmatch(r"[A-Za-z]*[G-Zg-z][A-Za-z]*", p)) > MAX_ID_WORDS:
        return False
    notes = [p for p in private if p]
    letters = "".join(c for c in text.casefold() if c.isalpha())
    runs = {r.casefold() for r in re.findall(r"[^\W\d_]{3,}", text)}
    for note in notes:
        if len(letters) >= ID_NOTE_LETTERS and letters in "".join(
                c for c in note.casefold() if c.isalpha()):
            return False
        if len(runs & set(re.findall(r"[^\W\d_]{3,}", note.casefold()))) >= 2:
            return False
    return not (notes and quotes(text, notes))


NOTES = ["Patient has HIV diagnosis confirmed, follow up 2026-01-05 ref 0a1b2c3d4e5f",
         "Patient called back, scheduled for next week; café, “quoted”. " * 3,
         "HIV+", "call 555 0100", "deadbeefcafebabe", "Ünïcödé ﬁle ＦＵＬＬ 12345678", "a b"]


def _an_id(rng: random.Random, note: str) -> str:
    """Id-shaped text: Cobalt's kinds of ids, random id characters, or pieces of ``note``
    (words cut short, joined by digits or separators; runs of its letters and digits)."""
    kind = rng.randrange(4)
    if kind == 0:
        digits = rng.randrange(1, 25)
        return rng.choice(["evt_", "", "emr-"]) + f"{rng.randrange(16 ** 24):0{digits}x}"
    if kind == 1:
        chars = "abcdefxyzHIV0123456789_.:-"
        return "".join(rng.choice(chars) for _ in range(rng.randrange(1, 30)))
    if kind == 2:
        words = re.findall(r"[^\W\d_]+", note) or ["ab"]
        parts = [rng.choice(words)[:rng.randrange(1, 12)] for _ in range(rng.randrange(1, 5))]
        return rng.choice(["", "x", "1"]) + rng.choice("12_-9.").join(parts)
    alnum = "".join(c for c in note.lower() if c.isalnum()) or "a"
    start = rng.randrange(len(alnum))
    return rng.choice(["", "n", "7"]) + alnum[start:start + rng.randrange(1, 30)]


def test_the_id_check_is_its_rule_spelled_out() -> None:
    """The id check reads a million ids per reconcile of 1M rows, so it takes shortcuts
    on the id alphabet (ASCII); on 4,000 id-shaped texts, many made of the note's own words
    and letters, it gives what the rule spelled out gives, withheld and kept alike."""
    rng = random.Random(16)
    cases = [("has1hiv", [NOTES[0]]), ("Patienthas9", [NOTES[0]]), ("hiv", ["HIV+"]),
             ("call-555-0100", ["call 555 0100"]), ("x1deadbeefcafebabe", [NOTES[4]])]
    cases += [(_an_id(rng, note), rng.choice([[note], [note, rng.choice(NOTES)], []]))
              for note in (rng.choice(NOTES) for _ in range(4000))]
    verdicts = [(text, looks_like_id(text, notes), _id_rule(text, notes)) for text, notes in cases]
    assert [(t, got) for t, got, want in verdicts if got != want] == []
    withheld = sum(1 for _, got, _ in verdicts if not got)
    assert 400 < withheld < 3600  # both answers are exercised, not one of them


def test_a_row_once_ambiguous_is_never_send_failed(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """on_ambiguous: resend, every answer a 500 after Cobalt stored the note: the rows end
    ambiguous (the note may be in the chart), not send_failed; nothing goes to redrive.csv and
    --write-off has nothing to write off."""
    write_csv(tmp_path / "input.csv", [[f"T{i}", f"note {i}"] for i in range(3)])
    with EmulatorThread(faults=Faults(rate_500_after_store=1, drop_webhooks=1.0)) as api:
        path = write_config(tmp_path, api={"base_url": api.url},
                            submit={"max_attempts": 2, "on_ambiguous": "resend"})
        outcome = run_pipeline(load_config(path, needs=("api",)))
        assert api.stored("T0", "note 0") == 2
    report = outcome.report.directory
    assert [r["final_status"] for r in read_results(report)] == ["ambiguous"] * 3
    assert read_summary(report)["final_status"]["send_failed"] == 0
    assert not (report / "redrive.csv").exists()
    capsys.readouterr()
    assert main(["status", str(path), "--write-off", outcome.run_id]) == 1  # ambiguous: open
    assert "0 unsent rows written off" in capsys.readouterr().out


def _store(path: Path, events: list[tuple[str, str]]) -> None:
    """Store (event id, receive time) events in the sink file at ``path``, as the sink does."""
    sink = SinkFile(path)
    sink.open()

    async def main_() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            for event_id, at in events:
                event = {"id": event_id, "type": "patient.updated", "created": at, "data": {}}
                await sink.append(compact_json(event), event_id, received_at=at)
            sink.stop()

    anyio.run(main_)
    sink.close()


def test_receipts_hold_no_upstream_text_and_bad_times_are_no_times(tmp_path: Path) -> None:
    """A receipt names its event by safe_id (prose in an id is withheld there too); a receipt
    whose time is not one the sink writes (garbled, 1970, another zone) gives no time."""
    path = tmp_path / "webhooks.jsonl"
    prose = "Patient John Smith has HIV; call 555-1234"
    _store(path, [(prose, "2026-11-30T10:00:00.123Z"), ("evt_1", "2026-11-30T10:00:01.000Z")])
    text = receipts_path(path).read_text()
    assert "Patient" not in text
    assert set(read_receipts(path) or {}) == {str(safe_id(prose)), "evt_1"}
    bad = ["not-a-time", "1970-01-01T00:00:00.000Z", "2026-11-30T13:52:27.000+05:00",
           "2099-01-01T00:00:00.000Z", "2026-02-30T10:00:00.000Z", 17]
    lines = [compact_json({"id": f"evt_bad{i}", "offset": 10_000 + i, "received_at": value})
             for i, value in enumerate(bad)]
    with receipts_path(path).open("ab") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    receipts = read_receipts(path) or {}
    assert not any(f"evt_bad{i}" in receipts for i in range(len(bad)))
    assert receipts["evt_1"].received_at == "2026-11-30T10:00:01.000Z"


_FSIZE_SCRIPT = """
import resource, sys
from pathlib import Path
import anyio
from pipeline.events import SinkFile, SinkWriteError, compact_json

path = Path(sys.argv[1])
sink = SinkFile(path)
sink.open()

def event(i):
    return compact_json({"id": f"evt_{i}", "type": "patient.updated",
                         "created": "2026-11-30T10:00:00Z", "data": {"pad": "x" * 900}})

async def main():
    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run)
        for i in range(20):
            await sink.append(event(i), f"evt_{i}", received_at="2026-11-30T10:00:00.000Z")
        size = path.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))
        try:
            await sink.append(event(99), "evt_99", received_at="2026-11-30T10:00:00.000Z")
        except SinkWriteError:
            print("append refused")
        print("probe:", sink.probe())
        sink.stop()

anyio.run(main)
"""


def test_health_says_the_sink_cannot_store_under_a_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stops appends to the sink file (EFBIG): /healthz's probe must fail too,
    not pass by writing a small scratch file from offset 0."""
    done = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path / "w.jsonl")],
                          capture_output=True, text=True, timeout=60, check=False)
    lines = done.stdout.splitlines()
    assert lines[0] == "append refused", done.stderr
    assert lines[1].startswith("probe: sink file"), lines
    assert "cannot be written" in lines[1]


def test_a_run_measures_only_its_own_sends_and_the_notification_follows_the_verdict(
        tmp_path: Path) -> None:
    """Run 1 sends 3 rows whose webhooks reach a real sink; run 2 (same input) skips them as
    already sent: its latency_s counts none of run 1's sends. A run whose rows await their
    outcomes notifies "waiting" with summary.json's verdict in the command's JSON."""
    notified = tmp_path / "notified.json"
    write_csv(tmp_path / "input.csv", [[f"T{i}", f"note {i}"] for i in range(3)])
    sink = SinkFile(tmp_path / "state" / "webhooks.jsonl")
    sink.open()
    receiver = WebhookReceiver(sink, [WEBHOOK_SECRET.encode()])
    command = [sys.executable, "-c",
               f"import sys; open({str(notified)!r}, 'wb').write(sys.stdin.buffer.read())"]
    with ThreadedServer(receiver.app()) as hooks, EmulatorThread(
            webhook_url=f"{hooks.url}/webhooks/cobalt") as api:
        path = write_config(tmp_path, api={"base_url": api.url}, notify={"command": command})
        config = load_config(path, needs=("api",))
        first = run_pipeline(config)
        wait_until(lambda: api.emulator.deliveries.get("success") == 3, what="the webhooks")
        second = run_pipeline(config)
    sink.close()
    main(["-q", "reconcile", str(path)])  # every report, rewritten with every outcome in
    own = read_summary(second.report.directory)
    assert own["final_status"]["skipped_already_sent"] == 3
    assert (own["latency_s"]["count"], own["latency_s"]["outcome_clocks"]) == (0, {})
    assert read_summary(first.report.directory)["latency_s"]["count"] == 3

    with EmulatorThread(faults=Faults(drop_webhooks=1.0)) as api:
        write_csv(tmp_path / "more.csv", [["U1", "another note"]])
        path = write_config(tmp_path, api={"base_url": api.url}, notify={"command": command})
        assert main(["run", str(path), "--input", str(tmp_path / "more.csv"),
                     "--no-progress"]) == 0
    sent = json.loads(notified.read_text())
    assert read_summary(Path(sent["report_dir"]))["verdict"] == "waiting"
    assert sent["verdict"] == "waiting"
    assert sent["text"].splitlines()[0] == (
        f"tasknotes run {sent['run_id']}: waiting for outcomes (exit 0)")
