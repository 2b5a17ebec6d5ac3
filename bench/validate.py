"""Validation speed: `tasknotes validate` on 1M rows against a bare pandas.read_csv.

    python bench/validate.py [--rows 1000000] [--reps 2] [--quick]

Both read the same generated file (bench/make_input.py: 20-2,000 character
notes with commas, quotes, line breaks, non-ASCII). Baselines, each in its own
process, alternating with ours:
- pandas       pandas.read_csv(dtype=str, keep_default_na=False): the whole file
- pandas-50k   the same in chunks of 50,000 rows (what a careful script would do)
`tasknotes validate` does more: physical line numbers, every check, duplicates
across the run, a checksum, rejects.csv. Goal (issue #7): <= 1.5x pandas.read_csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    generated_input,
    machine,
    median,
    python,
    run_measured,
    table,
)

PANDAS = ("import sys, pandas as pd; "
          "pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)")
PANDAS_CHUNKED = ("import sys, pandas as pd\n"
                  "for chunk in pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False, "
                  "chunksize=50_000): pass")


def commands(data: Path, workdir: Path) -> dict[str, list[str]]:
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(data)},
        # validate checks the credentials resolve, as run would (nothing is sent).
        "api": {"client_id": "c", "client_secret": "s", "access_token": "t"},
        "state": {"ledger": str(workdir / "ledger.sqlite")},
        "report": {"dir": str(workdir / "reports")},
    }))
    return {
        "tasknotes validate": [python(), "-m", "pipeline", "-q", "validate",
                               str(config)],
        "pandas.read_csv": [python(), "-c", PANDAS, str(data)],
        "pandas.read_csv, 50k chunks": [python(), "-c", PANDAS_CHUNKED, str(data)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.reps = 20_000, 1
    data = generated_input(args.rows)
    print(f"bench/validate.py on {machine()}; {args.rows:,} rows, "
          f"{data.stat().st_size / 2**20:,.0f} MiB, {args.reps} reps")
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = commands(data, Path(tmp))
        for rep in range(args.reps):
            names = list(jobs)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                measured = run_measured(jobs[name])
                seconds.setdefault(name, []).append(measured.wall_s)
                cpu.setdefault(name, []).append(measured.cpu_s)
                memory.setdefault(name, []).append(measured.rss_mb)
    base, base_cpu = median(seconds["pandas.read_csv"]), median(cpu["pandas.read_csv"])
    rows = [[name, f"{median(s):.2f}", f"{median(s) / base:.2f}", f"{median(cpu[name]):.2f}",
             f"{median(cpu[name]) / base_cpu:.2f}", f"{median(memory[name]):.0f}"]
            for name, s in seconds.items()]
    print(table(["command", "seconds", "x read_csv", "CPU s", "CPU x read_csv",
                 "peak RSS MB"], rows))
    ours = median(seconds["tasknotes validate"])
    chunked = median(seconds["pandas.read_csv, 50k chunks"])
    print(f"tasknotes validate / pandas.read_csv = {ours / base:.2f} (goal <= 1.5: "
          f"{'met' if ours / base <= 1.5 else 'not met'}); by CPU time "
          f"{median(cpu['tasknotes validate']) / base_cpu:.2f}; / chunked read_csv = "
          f"{ours / chunked:.2f}")


if __name__ == "__main__":
    main()
