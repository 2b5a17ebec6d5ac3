"""What ``tasknotes prune`` removes besides event text: the sink file's side files (set-aside
lines, a torn tail: both may hold notes) once old, and a pruned run's input copies, which
no later ``reconcile`` writes again; and what its summary says of the ledger's bytes."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from test_shared_files import FakeCobalt

from helpers import ThreadedServer, read_results, write_config, write_csv
from pipeline.cli import main
from pipeline.events import compact_json as compact

SECRET = "Zoë's PHI: called patient about the biopsy"
OLD = "2026-01-05T10:00:00Z"
NOTE = "PHIMARK called patient about the biopsy"  # HTML escapes nothing in it


def test_prune_removes_old_side_files_and_keeps_one_written_since(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    sink = tmp_path / "state" / "webhooks.jsonl"
    sink.parent.mkdir(mode=0o700)
    sink.write_bytes(b"")
    set_aside = sink.with_name(sink.name + ".set-aside")
    torn = sink.with_name(sink.name + ".torn")
    set_aside.write_text(f'{{"line_base64": "{SECRET}"}}\n', encoding="utf-8")
    torn.write_text(f'{{"id": "evt_1", "data": {{"note": "{SECRET}\n', encoding="utf-8")
    long_ago = time.time() - 90 * 86400
    os.utime(set_aside, (long_ago, long_ago))

    assert main(["prune", str(config), "--older-than", "30", "--dry-run"]) == 0
    assert str(set_aside) in capsys.readouterr().out
    assert set_aside.exists()  # a dry run removes nothing

    assert main(["prune", str(config), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert str(set_aside) in out
    assert "left: 1 side file of the sink file written to within the limit" in out
    assert not set_aside.exists()
    assert torn.exists()  # written within the limit: its fragment may be recent

    os.utime(torn, (long_ago, long_ago))
    assert main(["prune", str(config), "--older-than", "30"]) == 0
    assert str(torn) in capsys.readouterr().out
    assert not torn.exists()


def test_a_pruned_runs_redrive_and_rejects_are_not_written_again_by_reconcile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run A leaves X unsent (503: offered in redrive.csv) and rejects a bad row; prune
    removes both copies; a webhook for A's sent row then makes reconcile rewrite A's
    report, which offers X in results.csv but writes neither copy again; the summary
    gives the ledger's bytes before and after."""
    source = write_csv(tmp_path / "in.csv", [["X", "note x"], ["Y", SECRET],
                                             ["bad id with space", "n"]])
    fake = FakeCobalt(answers={"X": (503, {"message": "busy"})})
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, input={"path": str(source)},
                              api={"base_url": api.url})
        assert main(["-q", "run", str(config), "--no-progress"]) == 1
    (report,) = (tmp_path / "reports").iterdir()
    assert (report / "redrive.csv").exists()
    assert (report / "rejects.csv").exists()
    ledger = tmp_path / "state" / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:
        db.execute("UPDATE runs SET started_at = '2026-01-05T09:00:00.000Z'")
    capsys.readouterr()

    assert main(["prune", str(config), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert str(report / "redrive.csv") in out
    assert str(report / "rejects.csv") in out
    assert f"ledger {ledger}: " in out
    before, after = out.split(f"ledger {ledger}: ")[1].split(" bytes")[0].split(" -> ")
    assert int(before.replace(",", "")) >= int(after.replace(",", "")) > 0
    assert not (report / "redrive.csv").exists()
    assert not (report / "rejects.csv").exists()

    sink = tmp_path / "state" / "webhooks.jsonl"
    with sink.open("ab") as fh:
        fh.write(compact({"id": "evt_y", "access_token_reference_id": "u", "object": "event",
                          "created": OLD, "type": "task_note.created",
                          "job_id": fake.jobs["Y"], "data": {"task_note_id": "tn", "emr_task_id":
                                                             "Y", "note": SECRET}}) + b"\n")
    assert main(["-q", "reconcile", str(config)]) == 1  # X is still unsent
    rows = {r["emr_task_id"]: r["final_status"] for r in read_results(report)}
    assert rows == {"X": "send_failed", "Y": "confirmed", "": "rejected_invalid"}  # rewritten
    assert not (report / "redrive.csv").exists()
    assert not (report / "rejects.csv").exists()
    assert SECRET not in "".join(p.read_text(encoding="utf-8") for p in report.iterdir())


def test_prune_rewrites_a_pruned_runs_report_without_note_previews_and_reconcile_keeps_it_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With report.show_note_preview the report.html of a run holds the first characters
    of each flagged row's note. Pruning the run rewrites that page at once (no later
    change is needed): no preview is left, and it no longer points to the rejects.csv
    prune removed; reconcile and a second prune leave it so."""
    source = write_csv(tmp_path / "in.csv", [["X", NOTE], ["bad id with space", NOTE]])
    fake = FakeCobalt(answers={"X": (503, {"message": "busy"})})
    with ThreadedServer(fake.app()) as api:
        config = write_config(tmp_path, input={"path": str(source)}, api={"base_url": api.url},
                              report={"dir": str(tmp_path / "reports"),
                                      "show_note_preview": True, "preview_chars": 12})
        assert main(["-q", "run", str(config), "--no-progress"]) == 1
    (report,) = (tmp_path / "reports").iterdir()
    page = report / "report.html"
    assert "PHIMARK" in page.read_text(encoding="utf-8")  # the preview is there
    assert "The rows are in rejects.csv" in page.read_text(encoding="utf-8")
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        db.execute("UPDATE runs SET started_at = '2026-01-05T09:00:00.000Z'")
    capsys.readouterr()

    assert main(["prune", str(config), "--older-than", "30", "--dry-run"]) == 0
    assert "would rewrite 1 report (report.html)" in capsys.readouterr().out
    assert "PHIMARK" in page.read_text(encoding="utf-8")  # a dry run changes nothing

    assert main(["prune", str(config), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "rewrote 1 report (report.html) without note previews" in out
    assert str(page) in out
    for _ in range(2):
        text = page.read_text(encoding="utf-8")
        assert "PHIMARK" not in text
        assert "rejects.csv (not shared" not in text
        assert "removed by tasknotes prune" in text
        assert main(["-q", "reconcile", str(config)]) == 1  # X is still unsent
    assert "PHIMARK" not in "".join(p.read_text(encoding="utf-8") for p in report.iterdir())
    assert main(["prune", str(config), "--older-than", "30"]) == 0
    assert "rewrote" not in capsys.readouterr().out  # rewritten once, then left alone


def test_a_symlinked_input_copy_is_not_followed_and_the_summary_says_only_the_link_went(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """rejects.csv replaced by a symbolic link to a file elsewhere: prune removes the
    link, never the file it points to, and does not list it as a removed copy: it says
    that only the link went and that the file it points to may hold note text."""
    source = write_csv(tmp_path / "in.csv", [["bad id with space", NOTE]])
    config = write_config(tmp_path, input={"path": str(source)})
    assert main(["-q", "run", str(config), "--no-progress"]) == 1
    (report,) = (tmp_path / "reports").iterdir()
    outside = tmp_path / "outside.csv"
    (report / "rejects.csv").rename(outside)
    (report / "rejects.csv").symlink_to(outside)
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        db.execute("UPDATE runs SET started_at = '2026-01-05T09:00:00.000Z'")
    capsys.readouterr()

    assert main(["prune", str(config), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert f"  {report / 'rejects.csv'}\n" not in out  # not among the files removed
    assert f"{report / 'rejects.csv'}: a symbolic link; removed the link only" in out
    assert "removed 0 files" in out
    assert not (report / "rejects.csv").is_symlink()
    assert "PHIMARK" in outside.read_text(encoding="utf-8")  # never followed


def test_a_rotated_copy_of_the_sink_file_is_named_by_prune_and_reconcile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The sink file moved away by hand (as logrotate does) and a new one started: the
    moved copy holds events reconcile never reads and note text prune never prunes.
    Neither is silent about it: prune lists it as left, reconcile warns; tasknotes' own side
    files are not taken for one."""
    config = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    event = {"id": "evt_r1", "access_token_reference_id": "u", "object": "event",
             "created": OLD, "type": "task_note.created", "job_id": "1",
             "data": {"task_note_id": "tn", "emr_task_id": "T", "note": NOTE}}
    (state / "webhooks.jsonl.1").write_bytes(compact(event) + b"\n")
    (state / "webhooks.jsonl").write_bytes(compact({**event, "id": "evt_r2"}) + b"\n")
    for own in ("webhooks.jsonl.received", "webhooks.jsonl.set-aside", "webhooks.jsonl.torn"):
        (state / own).write_bytes(b"")
    capsys.readouterr()

    assert main(["prune", str(config), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert f"left: {state / 'webhooks.jsonl.1'}: looks like a rotated copy" in out
    assert "webhooks.jsonl.received:" not in out
    assert "PHIMARK" in (state / "webhooks.jsonl.1").read_text(encoding="utf-8")

    from pipeline.reconciliation import ingest  # noqa: PLC0415 - this test alone
    from pipeline.state import Ledger  # noqa: PLC0415 - this test alone

    (state / "webhooks.jsonl").rename(state / "webhooks.jsonl-20261130")
    (state / "webhooks.jsonl").write_bytes(compact({**event, "id": "evt_r3"}) + b"\n")
    ledger = Ledger(tmp_path / "other-ledger.sqlite")
    try:
        with caplog.at_level("WARNING"):
            ingest(ledger, state / "webhooks.jsonl", "test_clinic")
    finally:
        ledger.close()
    warned = [r.getMessage() for r in caplog.records if "rotated copies" in r.getMessage()]
    assert len(warned) == 1
    assert "2 file(s) beside it look like rotated copies of it (first: webhooks.jsonl-2026" \
        in warned[0]


def test_rotated_copies_are_recognised_as_logrotate_names_them(tmp_path: Path) -> None:
    """logrotate's dateext with `extension .jsonl` puts the date before the suffix
    (webhooks-20261130.jsonl, .gz too), numbered ones webhooks.1.jsonl: copies, as are
    <sink>.1 and <sink>-DATE; tasknotes' own side files and another config's sink file
    (webhooks-north.jsonl) are not."""
    from pipeline.events import rotated_copies  # noqa: PLC0415 - this test alone

    sink = tmp_path / "webhooks.jsonl"
    copies = ["webhooks-20261130.jsonl", "webhooks-20261130.jsonl.gz", "webhooks.1.jsonl",
              "webhooks.jsonl.1", "webhooks.jsonl-20261130", "webhooks_2026-11-30.jsonl"]
    others = ["webhooks.jsonl", "webhooks-north.jsonl", "webhooks.jsonl.received",
              "webhooks.jsonl.set-aside", "webhooks.jsonl.torn", "ledger.sqlite",
              "webhooks2.jsonl", ".webhooks.jsonl.prune.tmp", "webhooks-1.csv"]
    for name in copies + others:
        (tmp_path / name).write_bytes(b"")
    assert rotated_copies(sink) == sorted(tmp_path / name for name in copies)


def test_an_odd_run_directory_is_named_left_and_the_other_runs_are_pruned(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three old runs, each with a rejects.csv: one run's report.html replaced by a
    directory, one run's directory replaced by a plain file. Prune names each as left
    (one line, exit 1: something old was not pruned), still prunes the third run whole,
    and leaves no temporary copy of a report (it would hold note previews)."""
    source = write_csv(tmp_path / "in.csv", [["bad id with space", SECRET]])
    config = write_config(tmp_path, input={"path": str(source)},
                          report={"show_note_preview": True})
    for _ in range(3):
        assert main(["-q", "run", str(config), "--no-progress"]) == 1
    first, second, third = sorted((tmp_path / "reports").iterdir())
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite") as db:
        db.execute("UPDATE runs SET started_at = '2026-01-05T09:00:00.000Z'")
    (first / "report.html").unlink()
    (first / "report.html").mkdir()
    for path in second.iterdir():
        path.unlink()
    second.rmdir()
    second.write_text("odd", encoding="utf-8")
    capsys.readouterr()

    assert main(["prune", str(config), "--older-than", "30"]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert f"left: {first / 'report.html'}" in out
    assert f"left: {second}" in out or f"left: {second / 'pruned.json'}" in out
    assert not (third / "rejects.csv").exists()  # the sane run is pruned all the same
    assert SECRET not in (third / "report.html").read_text(encoding="utf-8")
    assert not list(tmp_path.glob("reports/*/*.tmp"))
    assert not (first / "rejects.csv").exists()
