"""Run every benchmark, one after another: ``python benchmarks/run_all.py``.

Each prints its table and saves JSON under ``benchmarks/results/``.  They run
in sequence, never in parallel: a benchmark compares implementations measured
in the same run, and a second benchmark would only add noise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("locks", "tempfiles", "session", "filestore", "copysession", "serve")


def main() -> int:
    failed = []
    for name in ORDER:
        print(f"\n=== bench_{name}.py", flush=True)
        status = subprocess.call([sys.executable, str(HERE / f"bench_{name}.py")])
        if status:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
