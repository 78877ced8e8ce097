"""bench/guardrails_bench.py runs (small text, few repeats): nothing checks a speed, only that every
figure is printed and the rule set redacted what it should (the bench asserts it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_guardrails_bench_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "guardrails_bench.py"), "--kb", "1", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(target <= 30 µs/KB") == 4, proc.stdout
    assert proc.stdout.count("stream events") == 2 and "worst whole-text/request figure" in proc.stdout
