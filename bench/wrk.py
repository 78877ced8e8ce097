"""Closed-loop runs with wrk (https://github.com/wg/wrk) and ``wrk_post.lua``.

wrk is a C epoll client that is far cheaper per request than any Python
client, so it is the default closed-loop generator when installed. The Lua
script sends the bench's pre-built raw requests and prints the latency
histogram; :func:`run_wrk` turns that into a :class:`~loadgen.LoadResult`.

wrk 4 "corrects" its histogram before the script sees it: for every
latency ``n >= 2e`` (``e`` = run time / requests per connection) it adds
synthetic samples at ``n - e``, ``n - 2e``, ... (``stats_correct``). That
guess suits a fixed-rate client, not a closed loop, and it would make the
proxy's and the mock's tails differ by an artefact. :func:`uncorrect`
removes the synthetic samples exactly: they only ever land *below* the
bucket that produced them, so walking the buckets from the top recovers
the measured counts. wrk only accepts whole seconds for ``-d``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import orjson
from hist import Histogram
from loadgen import LoadResult
from wire import Endpoint

__all__ = ["WRK_SCRIPT", "find_wrk", "run_wrk", "uncorrect"]

WRK_SCRIPT = Path(__file__).resolve().with_name("wrk_post.lua")
_MARK = "WRK_RESULT "


def find_wrk() -> str | None:
    """Path of the ``wrk`` binary, or None."""
    return shutil.which("wrk")


def uncorrect(pairs: Sequence[tuple[int, int]], complete: int, connections: int, runtime_us: int) -> dict[int, int]:
    """Undo wrk 4's ``stats_correct`` on a histogram of ``(value_us, count)`` pairs.

    ``complete``, ``connections`` and ``runtime_us`` are the run's figures,
    from which wrk derived ``expected`` with integer arithmetic. Returns the
    measured histogram; unchanged if wrk added nothing.
    """
    counts = {int(v): int(n) for v, n in pairs}
    per_conn = complete // connections if connections else 0
    if per_conn == 0 or sum(counts.values()) <= complete:
        return counts
    expected = runtime_us // per_conn
    if expected <= 0:
        return counts
    synthetic: dict[int, int] = {}
    measured: dict[int, int] = {}
    for value in sorted(counts, reverse=True):
        real = counts[value] - synthetic.pop(value, 0)
        if real > 0:
            measured[value] = real
            if value >= 2 * expected:
                m = value - expected
                while m > expected:
                    synthetic[m] = synthetic.get(m, 0) + real
                    m -= expected
    return measured


def run_wrk(
    endpoint: Endpoint,
    requests: Sequence[bytes],
    connections: int,
    duration: float,
    *,
    threads: int = 1,
    wrk: str = "wrk",
    timeout_s: int = 30,
) -> LoadResult:
    """One closed-loop wrk run (``duration`` rounded up to whole seconds)."""
    seconds = max(1, math.ceil(duration - 1e-9))
    threads = max(1, min(threads, connections))
    with tempfile.TemporaryDirectory(prefix="llmproxy-wrk-") as tmp:
        files = []
        for i, raw in enumerate(requests):
            path = Path(tmp) / f"request{i}.http"
            path.write_bytes(raw)
            files.append(str(path))
        env = {**os.environ, "WRK_REQUEST_FILES": ";".join(files)}
        cmd = [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            f"--timeout={timeout_s}s",
            "-s",
            str(WRK_SCRIPT),
            endpoint.url,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    data = orjson.loads(line[len(_MARK) :])
    errors = data["errors"]
    complete = int(data["requests"])
    counts = uncorrect([tuple(p) for p in data["hist"]], complete, connections, int(data["duration_us"]))
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    return LoadResult(
        hist=Histogram(counts),
        ok=complete - errors["status"],
        errors=errors["status"] + socket_errors,
        duration=data["duration_us"] / 1e6,
        generator="wrk",
    )
