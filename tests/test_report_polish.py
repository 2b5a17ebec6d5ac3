"""Report polish: even ticks, no clipped chart label, latencies only from millisecond times,
no column repeating another."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import anyio
import numpy as np
import pytest
from cdp import CHROMIUM, render

from helpers import (
    EmulatorThread,
    make_config,
    notes,
    read_results,
    run_pipeline,
    write_csv,
)
from pipeline.config import ReportConfig
from pipeline.reconciliation import Reconciler
from pipeline.report import Tally, nice_step, render_html, summarise, write_results
from pipeline.state import Ledger

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _tally(latencies: list[float]) -> Tally:
    tally = Tally(ReportConfig(), NOW)
    tally.latencies = [np.array(latencies, dtype=np.float32)]
    return tally


@pytest.mark.parametrize("top", [0.0, 0.04, 0.3, 1.0, 2.7, 7.3, 10.0, 95.0, 599.0, 3000.0])
def test_latency_ticks_are_even_and_round(top: float) -> None:
    """Tick labels are equally spaced multiples of a round step (1, 2, 2.5 or 5 x 10^k), at
    most 10 bins, the first tick 0 and the last at or beyond the slowest outcome."""
    histogram = _tally([0.0, top / 2, top]).histogram()
    ticks = [float(t["label"]) for t in histogram["ticks"]]
    step = histogram["step"]
    scale = 60.0 if histogram["unit"] == "min" else 1.0
    assert ticks[0] == 0
    assert ticks[-1] >= top / scale - 1e-6
    assert 1 <= len(ticks) - 1 <= 10
    assert np.allclose(np.diff(ticks), step)
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert round(float(mantissa), 6) in {1.0, 2.0, 2.5, 5.0}
    assert sum(b["count"] for b in histogram["bins"]) == 3
    assert [b["label"] for b in histogram["bins"]] == [t["label"] for t in histogram["ticks"]][:-1]


def test_nice_step_picks_the_smallest_round_step_not_below() -> None:
    assert [nice_step(x) for x in (0.0, 0.03, 0.1, 0.27, 0.73, 1.0, 1.2, 2.1, 4.9, 60.0)] == [
        0.1, 0.05, 0.1, 0.5, 1.0, 1.0, 2.0, 2.5, 5.0, 100.0]


@pytest.mark.slow
def test_no_chart_label_is_clipped_in_chromium(tmp_path: Path) -> None:
    """In a real browser, every text of both charts lies inside its SVG, whatever the counts
    (up to millions) and the latency range (a tenth of a second to an hour)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    write_csv(tmp_path / "input.csv", notes(3))
    with EmulatorThread() as api:
        config = make_config(tmp_path, api={"base_url": api.url})
        outcome = run_pipeline(config)
    ledger = Ledger(config.state.ledger)
    try:
        result = Reconciler(ledger, config.webhooks.sink).run(outcome.run_id)
        rng = np.random.default_rng(5)
        cases = {
            "tenths": list(rng.uniform(0.05, 0.3, 50)),
            "one-tall-bin": [7.3] * 1_234_567 + [0.1, 3.0],
            "minutes": list(rng.uniform(30, 3_600, 2_000)),
            "all-zero": [0.0] * 40,
        }
        pages = {}
        for name, latencies in cases.items():
            tally = write_results(result, tmp_path / f"{name}.csv", config.report, NOW)
            tally.latencies = [np.array(latencies, dtype=np.float32)]
            tally.counts["confirmed"] = 9_876_543  # the widest status count label
            tally.rows = sum(tally.counts.values())
            summary = summarise(result, tally, config.report, NOW)
            page = tmp_path / f"{name}.html"
            page.write_text(render_html(result, tally, summary, NOW), encoding="utf-8")
            pages[name] = page
    finally:
        ledger.close()
    outside = """[...document.querySelectorAll('svg')].flatMap(svg => {
        const r = svg.getBoundingClientRect();
        return [...svg.querySelectorAll('text')].filter(t => {
            const b = t.getBoundingClientRect();
            return b.left < r.left - 0.5 || b.right > r.right + 0.5
                || b.top < r.top - 0.5 || b.bottom > r.bottom + 0.5;
        }).map(t => svg.id + ': ' + t.textContent);
    })"""
    for name, page in pages.items():
        seen = anyio.run(render, page.as_uri(), tmp_path / f"profile-{name}",
                         tmp_path / f"{name}.png",
                         {"outside": outside,
                          "texts": "document.querySelectorAll('#latency-chart text').length"})
        assert seen.errors == []
        assert seen.values["texts"] > 2, name
        assert seen.values["outside"] == [], name


def test_results_csv_does_not_repeat_the_error_in_detail(tmp_path: Path) -> None:
    """A rejected row's error (code and message) is in `error` only; `detail` keeps what
    error does not say (why a row was skipped)."""
    write_csv(tmp_path / "input.csv", [["T1", "a"], ["", "no id"], ["T1", "a"]])
    with EmulatorThread() as api:
        outcome = run_pipeline(make_config(tmp_path, api={"base_url": api.url}))
    assert outcome.report is not None
    rejected, duplicate = (r for r in read_results(outcome.report.directory)
                           if r["final_status"] != "confirmed" and r["line"] in ("3", "4"))
    assert rejected["error"] == "missing-task-id: the emr_task_id is empty"
    assert rejected["detail"] == ""
    assert duplicate["error"] == ""
    assert duplicate["detail"] == "duplicate of line 2"
