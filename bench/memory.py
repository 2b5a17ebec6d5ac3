"""Memory: peak RSS of `tasknotes validate` and `tasknotes run`, small input against large.

    python bench/memory.py [--quick]

Peak RSS is the kernel's (ru_maxrss from wait4 on each child). `validate` reads
200,000 and 1,000,000 generated rows; `run` sends 40,000 and 200,000 rows to the
bench's own server (0 ms, concurrency 64) and writes the full report. Goal
(issue #7): under 300 MB, and flat: the large input within 20% of the small one.
For validate the baseline is what the same file costs a bare `pandas.read_csv`,
run alternately before and after ours (small input: ours first; large: pandas
first). `run` has no baseline: nothing else does what it does, so it is judged
only against itself (small input against large) and the 300 MB goal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    Server,
    generated_input,
    machine,
    python,
    run_measured,
    table,
)

PANDAS = "import sys, pandas as pd; pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)"


def config(workdir: Path, data: Path, url: str = "http://127.0.0.1:9") -> Path:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": str(data)},
        "api": {"base_url": url, "account": "bench", "client_id": "c", "client_secret": "s",
                "access_token": "t"},
        "submit": {"concurrency": 64, "rate_per_second": None},
        "state": {"ledger": str(run_dir / "ledger.sqlite")},
        "webhooks": {"sink": str(run_dir / "webhooks.jsonl")},
        "report": {"dir": str(run_dir / "reports")},
    }))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2k and 10k rows")
    args = parser.parse_args()
    small_v, large_v, small_r, large_r = ((2_000, 10_000, 2_000, 10_000) if args.quick else
                                          (200_000, 1_000_000, 40_000, 200_000))
    print(f"bench/memory.py on {machine()}")
    rows = []
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for n in (small_v, large_v):
            data = generated_input(n)
            steps = {"ours": [python(), "-m", "pipeline", "-q", "validate",
                              str(config(workdir, data))],
                     "pandas": [python(), "-c", PANDAS, str(data)]}
            order = list(steps) if n == small_v else list(reversed(steps))
            measured = {name: run_measured(steps[name]) for name in order}
            ours, base = measured["ours"], measured["pandas"]
            results[f"validate {n}"] = ours.rss_mb
            rows.append([f"tasknotes validate, {n:,} rows", f"{ours.rss_mb:.0f}",
                         f"{ours.wall_s:.1f}", f"{base.rss_mb:.0f}"])
        with Server(0.0) as server:
            for n in (small_r, large_r):
                data = generated_input(n)
                ours = run_measured([python(), "-m", "pipeline", "-q", "run",
                                     str(config(workdir, data, server.url)), "--no-progress"])
                results[f"run {n}"] = ours.rss_mb
                rows.append([f"tasknotes run, {n:,} rows", f"{ours.rss_mb:.0f}",
                             f"{ours.wall_s:.1f}", "- (no baseline)"])
    print(table(["command", "peak RSS MB", "seconds", "pandas.read_csv MB"], rows))
    for kind, small, large in (("validate", small_v, large_v), ("run", small_r, large_r)):
        a, b = results[f"{kind} {small}"], results[f"{kind} {large}"]
        print(f"{kind}: {large:,} rows / {small:,} rows = {b / a:.2f} (flat: within 1.20: "
              f"{'met' if b / a <= 1.2 else 'not met'}); peak {max(a, b):.0f} MB (goal < 300: "
              f"{'met' if max(a, b) < 300 else 'not met'})")


if __name__ == "__main__":
    main()
