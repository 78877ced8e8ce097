"""bench/throughput.py runs end to end (``--smoke``) and writes the JSON it promises.

Benchmarks are not tests: nothing here checks a speed, only that every phase
ran, that both the proxy and the mock direct served requests, that the
bench works with either closed-loop generator (wrk when installed, and the
Python one, which must work without wrk), and that the ``--baseline`` relays
(h11relay, and nginx where installed) are measured and stopped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "throughput.py"

NGINX_INSTALLED = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()

GENERATORS = [
    pytest.param("wrk", marks=pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"), id="wrk"),
    pytest.param("python", id="python"),
]


def _run_smoke(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Closed loop" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize("generator", GENERATORS)
def test_smoke_writes_every_section(tmp_path: Path, generator: str) -> None:
    res = _run_smoke(tmp_path, "--generator", generator)
    assert set(res) >= {"meta", "closed_loop", "paced_stream", "memory", "open_loop", "resources", "warnings"}
    meta = res["meta"]
    assert meta["mode"] == "smoke"
    assert meta["generator"].startswith(generator)
    assert meta["reply"]["sse_events"] == 50
    proxy = "llmproxy[empty]"
    assert [t["name"] for t in meta["targets"]] == ["direct", proxy]

    cells = {(c["mode"], c["concurrency"]) for c in res["closed_loop"]}
    assert cells == {("json", 1), ("json", 4), ("sse", 1), ("sse", 4)}
    for cell in res["closed_loop"]:
        direct, through = cell["results"]["direct"], cell["results"][proxy]
        assert direct["rps"] > 0 and through["rps"] > 0, cell
        assert direct["errors"] == 0 and through["errors"] == 0, cell
        assert {"p50", "p90", "p99"} <= set(through)
        assert set(through["added_ms"]) == {"p50", "p90", "p99"}
        assert through["cpu_us_per_request"] > 0

    paced = res["paced_stream"]["results"]
    assert paced[proxy]["streams"] == paced["direct"]["streams"] > 0
    assert "ttfb_p50" in paced[proxy]["added_ms"]

    memory = res["memory"][proxy]
    assert memory["requests"] >= 600 and len(memory["samples"]) >= 2
    assert "growth_mib_per_10k" in memory

    assert res["resources"][proxy]["peak_rss_mib"] > 0
    assert res["resources"][proxy]["alive"] is True

    open_loop = res["open_loop"][proxy]
    assert open_loop["steps"] and open_loop["steps"][0]["target"]["requests"] > 0
    assert {"max_rate_added_p99_under_5ms", "max_rate_added_p99_under_50ms"} <= set(open_loop)


def test_smoke_full_chain_with_python_generator_and_no_extra_phases(tmp_path: Path) -> None:
    res = _run_smoke(
        tmp_path, "-c", "full", "--generator", "python", "--skip", "memory", "--skip", "open", "--skip", "paced"
    )
    assert set(res) >= {"meta", "closed_loop", "resources"}
    assert "memory" not in res and "open_loop" not in res
    assert all(c["results"]["llmproxy[full]"]["rps"] > 0 for c in res["closed_loop"])


def test_smoke_baselines_are_measured_and_stopped(tmp_path: Path) -> None:
    """``--baseline``: reference relays on the proxy's CPU, measured like targets, stopped at the end."""
    names = ["h11relay"] + (["nginx"] if NGINX_INSTALLED else [])  # nginx only where it is installed
    res = _run_smoke(tmp_path, "--no-llmproxy", *(f"--baseline={name}" for name in names))
    labels = [f"baseline[{name}]" for name in names]
    targets = res["meta"]["targets"]
    assert [t["name"] for t in targets] == ["direct", *labels]
    assert all(t["kind"] == "baseline" for t in targets[1:])
    assert res["memory"] == {}  # memory is measured for llmproxy only
    for label in labels:
        assert res["meta"]["probe"][label]["sse_events"] == 50  # x-mock-tokens reached the mock
        for cell in res["closed_loop"]:
            row = cell["results"][label]
            assert row["rps"] > 0 and row["errors"] == 0, (label, cell)
            assert row["cpu_us_per_request"] > 0
        assert res["paced_stream"]["results"][label]["streams"] > 0
        assert res["open_loop"][label]["steps"][0]["target"]["errors"] == 0
        assert res["resources"][label]["alive"] is True
    # no errors, tracebacks or unclean exits (being preempted on a busy machine is only noise)
    assert not [w for w in res["warnings"] if "baseline" in w and "preempted" not in w], res["warnings"]
    for target in targets:  # every process was stopped: nothing listens any more
        host, port = target["url"].split("/")[2].split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()


def test_the_targets_table_judges_absolute_and_scaled_figures() -> None:
    """Pure rendering: a saved result with baselines gets ok/MISS per target, and scaled
    figures from the nginx latency and h11 relay throughput measured in the same run."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def result(rps: float, added_p50: float) -> dict[str, Any]:
        return {"rps": rps, "p50": 1.0, "p90": 1.0, "p99": 1.0, "errors": 0, "added_ms": {"p50": added_p50}}

    res: dict[str, Any] = {
        "meta": {
            "mode": "full",
            "cpus": 2,
            "pinning": None,
            "request": {"json_body_bytes": 322},
            "reply": {"json_body_bytes": 849, "sse_events": 50, "sse_body_bytes": 11657},
            "mock": {"url": "http://127.0.0.1:9", "tokens": 76},
            "targets": [{"name": n, "url": "u"} for n in ("direct", "llmproxy[empty]", "llmproxy[full]")],
            "plan": {"rounds": 1, "run_s": 1},
            "generator": "wrk",
        },
        "closed_loop": [
            {
                "mode": "json",
                "concurrency": 1,
                "results": {
                    "llmproxy[empty]": result(2000, 0.44),  # MISS as is; 0.44 / (0.22 / 0.11) = 0.22 ok
                    "llmproxy[full]": result(1800, 0.70),  # MISS either way: 0.35 scaled
                    "baseline[nginx]": result(4000, 0.22),
                },
            },
            {
                "mode": "json",
                "concurrency": 64,
                "results": {
                    "llmproxy[empty]": result(5000, 9.0),  # MISS as is; x 8500/4250 = 10,000 ok
                    "llmproxy[full]": result(4100, 9.0),  # the full chain's bound is 4,000: ok
                    "baseline[h11relay]": result(4250, 9.0),
                },
            },
        ],
        "resources": {"llmproxy[empty]": {"peak_rss_mib": 41.0}, "llmproxy[full]": {"peak_rss_mib": 61.0}},
        "memory": {"llmproxy[empty]": {"growth_mib_per_10k": 0.05}},
    }
    table = report._targets(res)
    assert "x2.00" in table[1] and "x2.00" in table[1][table[1].index(";") :]
    rows = {line.split("  ")[0]: line.split() for line in table[4:]}
    latency = rows["added p50, json c=1 < 0.3 ms"]
    assert latency[-8:] == ["0.44", "MISS", "0.22", "ok", "0.70", "MISS", "0.35", "MISS"]
    throughput = rows["req/s, json c=64 >= 6,000 (full chain 4,000)"]
    assert throughput[-8:] == ["5,000", "MISS", "10,000", "ok", "4,100", "ok", "8,200", "ok"]
    assert rows["peak RSS < 60 MiB"][-4:] == ["41.00", "ok", "61.00", "MISS"]
    assert rows["RSS growth < 2 MiB per 100k requests"][-3:] == ["0.50", "ok", "-"]
    del res["memory"], res["resources"]  # (their own sections need more fields)
    assert "\n".join(report._targets(res)) in report.render(res)
