"""Mutation score of the delivery modules: how much of their behaviour the tests pin down.

    python bench/mutation.py [--sample 8] [--report-only]

mutmut (configured under [tool.mutmut] in pyproject.toml) mutates the state
store (pipeline/state/), submit.py, client.py, events.py and reconciliation.py and runs,
for each mutant, the in-process tests that cover the mutated function. A full run is ~2,200 mutants
(hours on two shared cores), so this script runs a fixed sample: the mutants
whose name hashes (SHA-256) to 0 modulo --sample, the same set every time for
the same code. It runs mutmut under `nice -n 19` with one worker, then prints
per module how many mutants were killed (a test failed), survived (the tests
passed), timed out or were "suspicious" (the tests passed, much slower than
without the mutant), had no covering test, were not checked, or got any other
verdict; every sampled mutant is in exactly one column. The score is
killed / (killed + survived + timeout + suspicious): a timeout is not counted as
caught, since on a loaded machine it may be the machine and not a test
noticing, and a suspicious mutant passed the tests. The timed-out and
suspicious mutants are listed by name, to be looked at (or rerun on a quiet
machine). --report-only skips the run and prints
the table from the results already in mutants/ (`mutmut show NAME` shows a
mutant's diff). There is no baseline: the score is judged against itself over
time, and every surviving mutant is worth a look.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, table

COLUMNS = ("killed", "survived", "timeout", "suspicious", "no tests", "not checked")
UNDECIDED = ("timeout", "suspicious")  # in the score's denominator, not its numerator


def mutmut() -> str:
    found = shutil.which("mutmut", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("mutmut is not installed: pip install -e '.[dev]'")
    return found


def statuses() -> dict[str, str]:
    """Every generated mutant's name and mutmut's verdict on it."""
    done = subprocess.run([mutmut(), "results", "--all", "true"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    found = {}
    for line in done.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("pipeline."):
            found[name] = status
    return found


def sampled(names: list[str], every: int) -> list[str]:
    return [n for n in names if int(hashlib.sha256(n.encode()).hexdigest(), 16) % every == 0]


def generate() -> None:
    """Make the mutants and the test-coverage stats without testing any mutant: mutmut run
    with a filter that matches nothing stops once both exist."""
    subprocess.run(["nice", "-n", "19", mutmut(), "run", "--max-children", "1",
                    "pipeline.no-such-mutant"], cwd=ROOT, capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sample", type=int, default=8, help="test 1 mutant in N")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table from the results already in mutants/")
    args = parser.parse_args()
    if not args.report_only:
        generate()
    names = sampled(sorted(statuses()), args.sample)
    if not names:
        raise SystemExit("no mutants found: run without --report-only first")
    if not args.report_only:
        subprocess.run(["nice", "-n", "19", mutmut(), "run", "--max-children", "1", *names],
                       cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    verdicts = statuses()
    per_module: dict[str, Counter[str]] = {}
    undecided: list[str] = []
    for name in names:
        module = name.split(".")[1]
        status = verdicts.get(name, "not checked")
        if status in UNDECIDED:
            undecided.append(f"{status}: {name}")
        per_module.setdefault(module, Counter())[status if status in COLUMNS else "other"] += 1
    rows = []
    total: Counter[str] = Counter()
    for module in sorted(per_module):
        counts = per_module[module]
        total.update(counts)
        rows.append(row(module, counts))
    rows.append(row("all five", total))
    print(f"bench/mutation.py: 1 mutant in {args.sample} ({len(names)} of {len(verdicts)})")
    print(table(["module", "sampled", *COLUMNS, "other", "score"], rows))
    tested = _tested(total)
    print(f"mutation score = killed / (killed + survived + timeout + suspicious) = "
          f"{total['killed']} / {tested} = {total['killed'] / tested:.2f}"
          if tested else "no mutant tested yet")
    for line in undecided:
        print(line)


def _tested(counts: Counter[str]) -> int:
    return counts["killed"] + counts["survived"] + sum(counts[s] for s in UNDECIDED)


def row(name: str, counts: Counter[str]) -> list[object]:
    tested = _tested(counts)
    score = f"{counts['killed'] / tested:.2f}" if tested else "-"
    return [name, sum(counts.values()), *(counts[c] for c in COLUMNS), counts["other"], score]


if __name__ == "__main__":
    main()
