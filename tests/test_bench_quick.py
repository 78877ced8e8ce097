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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--smoke`` run for every check below: the python generator, an empty and the full
    production chain, and the baselines (h11relay; nginx where installed), every phase."""
    names = ["h11relay"] + (["nginx"] if NGINX_INSTALLED else [])  # nginx only where it is installed
    return _run_smoke(
        tmp_path_factory.mktemp("smoke"),
        "--generator",
        "python",
        "-c",
        "empty",
        "-c",
        "full",
        *(f"--baseline={name}" for name in names),
    )


def test_smoke_writes_every_section(smoke: dict[str, Any]) -> None:
    res = smoke
    assert set(res) >= {"meta", "closed_loop", "paced_stream", "memory", "open_loop", "resources", "warnings"}
    meta = res["meta"]
    assert meta["mode"] == "smoke"
    assert meta["generator"].startswith("python")
    assert meta["reply"]["sse_events"] == 50
    proxies = ["llmproxy[empty]", "llmproxy[full]"]
    baselines = [t["name"] for t in meta["targets"] if t["kind"] == "baseline"]
    assert [t["name"] for t in meta["targets"]] == ["direct", *proxies, *baselines]

    cells = {(c["mode"], c["concurrency"]) for c in res["closed_loop"]}
    assert cells == {(m, c) for m in ("json", "sse", "sse-whole") for c in (1, 4)}  # both stream framings
    for cell in res["closed_loop"]:
        direct = cell["results"]["direct"]
        assert direct["rps"] > 0 and direct["errors"] == 0, cell
        for name in [*proxies, *baselines]:
            through = cell["results"][name]
            assert through["rps"] > 0 and through["errors"] == 0, (name, cell)
            assert {"p50", "p90", "p99"} <= set(through)
            assert set(through["added_ms"]) == {"p50", "p90", "p99"}
            assert through["cpu_us_per_request"] > 0
        for name in proxies:  # the ratios to the relay measured in the same run
            assert cell["results"][name]["ratio_rps_vs_h11relay"] > 0
            assert "ratio_added_p50_vs_h11relay" in cell["results"][name]

    paced = res["paced_stream"]["results"]
    for name in proxies:
        assert paced[name]["streams"] == paced["direct"]["streams"] > 0
        assert "ttfb_p50" in paced[name]["added_ms"]

        memory = res["memory"][name]
        assert memory["requests"] >= 200 and len(memory["samples"]) >= 2
        assert "growth_mib_per_10k" in memory

        assert res["resources"][name]["peak_rss_mib"] > 0
        assert res["resources"][name]["alive"] is True

        open_loop = res["open_loop"][name]
        assert open_loop["steps"] and open_loop["steps"][0]["target"]["requests"] > 0
        assert {"max_rate_added_p99_under_5ms", "max_rate_added_p99_under_50ms"} <= set(open_loop)
        assert "generator_saturates_at_rps" in open_loop
        assert {"scheduled_rps", "achieved_rps"} <= set(open_loop["steps"][0]["generator"])

    assert res["otlp_sink"]["exports"] > 0 and res["otlp_sink"]["bytes"] > 0  # full's tracing reached it


def test_smoke_baselines_are_measured_and_stopped(smoke: dict[str, Any]) -> None:
    """``--baseline``: reference relays on the proxy's CPU, measured like targets, stopped at the end."""
    res = smoke
    targets = res["meta"]["targets"]
    labels = [t["name"] for t in targets if t["kind"] == "baseline"]
    assert labels == ["baseline[h11relay]"] + (["baseline[nginx]"] if NGINX_INSTALLED else [])
    assert not set(labels) & set(res["memory"])  # memory is measured for llmproxy only
    for label in labels:
        assert res["meta"]["probe"][label]["sse_events"] == 50  # x-mock-tokens reached the mock
        assert res["meta"]["probe"][label]["sse_whole_events"] == 50  # and x-mock-sse-framing
        assert res["paced_stream"]["results"][label]["streams"] > 0
        assert res["open_loop"][label]["steps"][0]["target"]["errors"] == 0
        assert res["resources"][label]["alive"] is True
    # no errors, tracebacks or unclean exits (being preempted on a busy machine is only noise)
    assert not [w for w in res["warnings"] if "baseline" in w and "preempted" not in w], res["warnings"]
    assert not [w for w in res["warnings"] if "died" in w or "Traceback" in w], res["warnings"]
    for target in targets:  # every process was stopped: nothing listens any more
        host, port = target["url"].split("/")[2].split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_smoke_with_wrk_as_closed_loop_generator(tmp_path: Path) -> None:
    """Where wrk is installed, the closed loop runs on it (the smoke run above uses the python one)."""
    res = _run_smoke(
        tmp_path,
        "--generator",
        "wrk",
        "--sse-framing",
        "events",
        "--skip",
        "memory",
        "--skip",
        "open",
        "--skip",
        "paced",
    )
    assert res["meta"]["generator"].startswith("wrk")
    assert all(c["results"]["llmproxy[empty]"]["rps"] > 0 for c in res["closed_loop"])


def test_ladder_configs_and_marginal_costs(tmp_path: Path) -> None:
    """Pure: --ladder's configs are full.yaml's filters added one at a time; marginals are step differences."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ladder
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import yaml

    full = ROOT / "bench" / "configs" / "full.yaml"
    names = [f["name"] for f in yaml.safe_load(full.read_text())["filters"]]
    paths = ladder.write_configs(full, tmp_path)
    assert [p.stem for p in paths] == ["ladder-0-none", *(f"ladder-{i + 1}-{n}" for i, n in enumerate(names))]
    assert [f["name"] for f in yaml.safe_load(paths[2].read_text())["filters"]] == names[:2]
    labels = [f"llmproxy[{p.stem}]" for p in paths[:3]]

    def cpu(us: float) -> dict[str, Any]:
        return {"rps": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0, "errors": 0, "cpu_us_per_request": us}

    res: dict[str, Any] = {
        "meta": {"targets": [{"name": n} for n in ["direct", *labels]], "reply": {"sse_events": 50}},
        "closed_loop": [
            {"mode": "json", "concurrency": 16, "results": dict(zip(labels, map(cpu, (100, 110, 160)), strict=True))},
            {"mode": "sse", "concurrency": 16, "results": dict(zip(labels, map(cpu, (500, 550, 800)), strict=True))},
            {"mode": "json", "concurrency": 64, "results": dict(zip(labels, map(cpu, (1, 1, 1)), strict=True))},
        ],
    }
    lad = ladder.ladder(res)
    assert lad is not None and lad["concurrency"] == 16
    steps = lad["steps"]
    assert [s["filter"] for s in steps] == ["none", *names[:2]]
    assert steps[1]["marginal_json_cpu_us"] == 10 and steps[2]["marginal_json_cpu_us"] == 50
    assert steps[1]["marginal_sse_cpu_us_per_event"] == 1.0 and steps[2]["marginal_sse_cpu_us_per_event"] == 5.0
    res["ladder"] = lad
    table = report._ladder(res)
    assert table[3].split()[:4] == [labels[1], names[0], "+10.00", "+1.00"]


def test_the_targets_table_judges_ratios_to_the_relay() -> None:
    """Pure rendering: a saved result with the h11 relay gets ratio_* fields per cell and
    ok/MISS per target from the ratios, with each config's own bound."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def result(rps: float, added_p50: float) -> dict[str, Any]:
        return {"rps": rps, "p50": 1.0, "p90": 1.0, "p99": 1.0, "errors": 0, "added_ms": {"p50": added_p50}}

    names = ("direct", "llmproxy[empty]", "llmproxy[routing]", "llmproxy[full]")
    res: dict[str, Any] = {
        "meta": {
            "mode": "full",
            "cpus": 2,
            "pinning": None,
            "request": {"json_body_bytes": 322},
            "reply": {"json_body_bytes": 849, "sse_events": 50, "sse_body_bytes": 11657},
            "mock": {"url": "http://127.0.0.1:9", "tokens": 76},
            "targets": [{"name": n, "url": "u"} for n in names],
            "plan": {"rounds": 1, "run_s": 1},
            "generator": "wrk",
        },
        "closed_loop": [
            {
                "mode": "json",
                "concurrency": 1,
                "results": {
                    "llmproxy[empty]": result(2000, 0.44),  # 1.1x the relay's: MISS (<= 1.0)
                    "llmproxy[routing]": result(2000, 0.44),  # no bound: the bare ratio
                    "llmproxy[full]": result(1800, 0.48),  # 1.2x: ok (<= 1.25)
                    "baseline[h11relay]": result(4000, 0.40),
                    "target[127.0.0.1:4000]": result(100, 12.0),
                },
            },
            {
                "mode": "json",
                "concurrency": 64,
                "results": {
                    "llmproxy[empty]": result(5000, 9.0),  # 1.25x: ok (>= 1.2)
                    "llmproxy[routing]": result(4800, 9.0),
                    "llmproxy[full]": result(3000, 9.0),  # 0.75x: MISS (>= 0.9)
                    "baseline[h11relay]": result(4000, 9.0),
                    "target[127.0.0.1:4000]": result(100, 90.0),
                },
            },
            {
                "mode": "sse",
                "concurrency": 16,
                "results": {
                    "llmproxy[routing]": result(1000, 9.0),  # 1.0x: ok (>= 1.0)
                    "llmproxy[full]": result(850, 9.0),  # 0.85x: ok (>= 0.8)
                    "baseline[h11relay]": result(1000, 9.0),
                },
            },
        ],
        "resources": {"llmproxy[empty]": {"peak_rss_mib": 41.0}, "llmproxy[full]": {"peak_rss_mib": 61.0}},
        "memory": {"llmproxy[empty]": {"growth_mib_per_10k": 0.05}},
    }
    table = report._targets(res)
    json64 = res["closed_loop"][1]["results"]
    assert json64["llmproxy[empty]"]["ratio_rps_vs_h11relay"] == 1.25
    assert json64["llmproxy[full]"]["ratio_rps_vs_target"] == 30.0
    assert res["closed_loop"][0]["results"]["llmproxy[full]"]["ratio_added_p50_vs_h11relay"] == 1.2
    assert "ratio_rps_vs_h11relay" not in res["closed_loop"][0]["results"]["baseline[h11relay]"]
    rows = {line.split("  ")[0]: line.split() for line in table[3:]}
    latency = rows["added p50 json c=1 / relay's (empty <= 1.0, full <= 1.25)"]
    assert latency[-5:] == ["1.10x", "MISS", "1.10x", "1.20x", "ok"]
    throughput = rows["req/s json c=64 / relay's (empty >= 1.2, full >= 0.9)"]
    assert throughput[-5:] == ["1.25x", "ok", "1.20x", "0.75x", "MISS"]
    streams = rows["streams/s sse c=16 / relay's (routing >= 1.0, full >= 0.8)"]
    assert streams[-5:] == ["-", "1.00x", "ok", "0.85x", "ok"]
    assert rows["req/s json c=64 / target's >= 40"][-3:] == ["40.00x", "ok", "30.00x", "MISS"][-3:]
    assert rows["added p50 json c=1 / target's <= 0.05"][-2:] == ["0.04x", "ok"]
    assert rows["peak RSS <= 60 MiB (full)"][-3:] == ["41.00", "-", "61.00", "MISS"][-3:]
    assert rows["RSS growth < 2 MiB per 100k requests"][-3:] == ["0.50", "ok", "-", "-"][-3:]
    del res["memory"], res["resources"]  # (their own sections need more fields)
    assert "\n".join(report._targets(res)) in report.render(res)
