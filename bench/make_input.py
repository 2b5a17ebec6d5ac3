"""Generate a realistic large task-note CSV for the benchmarks.

UUID task ids; notes of 20-2,000 characters (log-uniform, so most are short)
in a mix typical of clinical exports: about 10% with commas, 5% with quotes,
3% spanning lines, a fifth with non-ASCII text (é, —, ’) and a few with
emoji or CJK; written by ``csv.writer`` as a spreadsheet export would be.

    python bench/make_input.py OUT.csv --rows 1000000 [--seed 7]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import uuid
from pathlib import Path

WORDS = (
    "patient", "called", "back", "scheduled", "follow-up", "lab", "results", "reviewed",
    "refill", "approved", "insurance", "pending", "prior", "auth", "faxed", "voicemail", "left",
    "BP", "128/82", "A1c", "7.1%", "dose", "mg", "daily", "twice", "clinic", "visit",
    "discussed", "plan", "referral", "cardiology", "imaging", "ordered", "message", "nurse",
    "provider",
)
ACCENTED = ("café", "São Paulo", "naïve", "Zoë", "—", "it’s", "“urgent”", "résumé")
RARE = ("🙂", "患者", "✓")


def _corpus(rng: random.Random, size: int = 400_000) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(size // 6))


def make_note(rng: random.Random, corpus: str) -> str:
    """One note: 20-2,000 chars, log-uniform, with the usual CSV hazards mixed in."""
    length = int(math.exp(rng.uniform(math.log(20), math.log(2000))))
    start = rng.randrange(len(corpus) - length)
    note = corpus[start : start + length].strip() or "note"
    extras = []
    if rng.random() < 0.10:
        extras.append("dose 5mg, twice daily")
    if rng.random() < 0.05:
        extras.append('patient said "ok"')
    if rng.random() < 0.03:
        extras.append("\nfollow-up:\n- call Monday")
    if rng.random() < 0.20:
        extras.append(rng.choice(ACCENTED))
    if rng.random() < 0.02:
        extras.append(rng.choice(RARE))
    return (note + " " + " ".join(extras)).strip() if extras else note


def write_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Write ``rows`` data rows (plus a header) to ``path``."""
    rng = random.Random(seed)
    corpus = _corpus(rng)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["emr_task_id", "note"])
        for _ in range(rows):
            writer.writerow([str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                             make_note(rng, corpus)])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write_csv(args.out, args.rows, args.seed)


if __name__ == "__main__":
    main()
