"""bench/cache_bench.py runs end to end (``--smoke``): every measured proxy request was a cache hit.

A benchmark, not a test of speed: nothing here compares the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cache_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cache_bench.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["requests"] == 50
    for mode in ("json", "stream"):
        for phase in ("direct", "hit"):
            assert result[mode][phase]["p50_us"] > 0
