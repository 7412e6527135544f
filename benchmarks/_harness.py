"""What every benchmark shares: timing rounds, a table, and saved JSON results.

Benchmarks compare atempstore with its peers *in the same run* and report
ratios; absolute times on shared machines are noise.  Results are saved under
``benchmarks/results/<name>-<UTC timestamp>.json`` with the machine facts that
matter (Python, cores, whether the scratch directory was fresh).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ("RESULTS", "best_of", "fresh_dir", "median", "percentile", "print_table", "save")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def fresh_dir(prefix: str) -> Iterator[Path]:
    """A new, empty scratch directory, removed afterwards.

    The disk here is ext4 without a journal: file creation slows down after many
    recent deletes, so every benchmark says it ran in a fresh directory.
    """
    path = Path(tempfile.mkdtemp(prefix=f"atempstore-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def best_of(rounds: int, measure: Callable[[], float]) -> float:
    """Run ``measure`` ``rounds`` times and keep the median (robust to noise)."""
    return median([measure() for _ in range(rounds)])


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def save(name: str, results: dict[str, Any]) -> Path:
    """Save ``results`` with the run's context; returns the file written.

    Only the latest run of each benchmark is kept: the older ``<name>-*.json``
    files are removed (git history keeps them).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    payload = {
        "benchmark": name,
        "utc": stamp,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "fresh_directory": True,
        **results,
    }
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    for older in RESULTS.glob(f"{name}-*.json"):
        if older != path:
            older.unlink()
    print(f"\nsaved {path.relative_to(RESULTS.parent.parent)}")
    return path
