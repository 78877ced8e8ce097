"""bench/usage_bench.py runs (a few events, a few repeats): nothing checks a speed, only that each
protocol's stream was watched and its usage found (the bench asserts it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_usage_bench_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "usage_bench.py"), "--events", "6", "--repeat", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("µs/event   (target <= 1 µs)") == 4, proc.stdout
    assert "worst: +" in proc.stdout
