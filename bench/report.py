"""Rendering bench results: the printed tables and the optional PNG plot.

Everything here reads the results dict that ``throughput.py --json`` writes,
so a saved run can be rendered again (``throughput.py --render FILE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["add_ratios", "plot", "render"]


def _num(value: Any, digits: int = 2) -> str:
    """A figure for a table cell: thousands separators for big ones, '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _signed(value: Any) -> str:
    text = _num(value)
    return text if text == "-" or text.startswith("-") else "+" + text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _closed(res: dict[str, Any]) -> list[str]:
    rows = []
    for cell in res.get("closed_loop", []):
        for name, r in cell["results"].items():
            added = r.get("added_ms", {})
            rows.append(
                [
                    cell["mode"],
                    str(cell["concurrency"]),
                    name,
                    _num(r["rps"]),
                    _num(r["p50"]),
                    _num(r["p90"]),
                    _num(r["p99"]),
                    _signed(added.get("p50")) if added else "",
                    _signed(added.get("p90")) if added else "",
                    _signed(added.get("p99")) if added else "",
                    _num(r.get("cpu_us_per_request"), 0) if "cpu_us_per_request" in r else "",
                    str(r["errors"]) if r["errors"] else "",
                ]
            )
    if not rows:
        return []
    plan = res["meta"]["plan"]
    head = [
        f"Closed loop: {plan['rounds']} round(s) x {plan['run_s']:g} s per target and cell, targets interleaved, "
        f"generator {res['meta']['generator']}; latency in ms, + = added over direct",
    ]
    header = ["mode", "conc", "target", "req/s", "p50", "p90", "p99", "+p50", "+p90", "+p99", "CPU us/req", "errors"]
    return head + _table(header, rows, left=3)


def _paced(res: dict[str, Any]) -> list[str]:
    paced = res.get("paced_stream")
    if not paced:
        return []
    rows = []
    for name, r in paced["results"].items():
        added = r.get("added_ms", {})
        rows.append(
            [
                name,
                _num(r["ttfb_p50"]),
                _num(r["first_token_p50"]),
                _num(r["event_lag_p50"]),
                _num(r["event_lag_p99"]),
                _num(r["gap_mean"], 3),
                _signed(added.get("ttfb_p50")) if added else "",
                _signed(added.get("first_token_p50")) if added else "",
                _signed(added.get("event_lag_p50")) if added else "",
                _signed(added.get("event_lag_p99")) if added else "",
                _signed(added.get("gap_mean")) if added else "",
            ]
        )
    head = [
        f"Paced streams: ttft {paced['ttft_ms']:g} ms, itl {paced['itl_ms']:g} ms, {paced['events']} events, "
        f"concurrency 1, {paced['streams']} streams per target, interleaved; ms; lag = arrival - (ttft + i*itl)",
    ]
    header = ["target", "TTFB", "1st token", "lag p50", "lag p99", "gap mean", "+TTFB", "+1st", "+lag p50", "+lag p99"]
    header.append("+gap")
    return head + _table(header, rows)


def _memory(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, mem in res.get("memory", {}).items():
        samples = mem["samples"]
        rows = [[f"{s['requests']:,}", f"{s['rss_mib']:.1f}"] for s in samples]
        verdict = "plateau" if mem["plateau"] else "GROWING"
        out.append(
            f"Memory, {name}: {mem['requests']:,} requests ({mem['mix']}, concurrency {mem['concurrency']})"
            + (f" [{mem['note']}]" if mem.get("note") else "")
        )
        out += _table(["after requests", "RSS MiB"], rows)
        out.append(f"growth over the second half: {mem['growth_mib_per_10k']:+.2f} MiB per 10k requests -> {verdict}")
        out.append("")
    for name, r in res.get("resources", {}).items():
        cpu = ", ".join(f"{k} {v:,.0f} us" for k, v in r.get("cpu_us_per_request", {}).items())
        out.append(
            f"{name}: peak RSS {r['peak_rss_mib']:.1f} MiB, RSS at end {r['rss_end_mib']:.1f} MiB, "
            + (f"PSS per worker at end {r['pss_per_worker_mib']:.1f} MiB, " if "pss_per_worker_mib" in r else "")
            + f"{r['workers']} worker(s){'' if r['alive'] else ' -- A WORKER DIED'}, "
            f"preempted {r.get('involuntary_context_switches', 0):,} times; CPU per request: {cpu or '-'}"
        )
    return out


def _open(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, ol in res.get("open_loop", {}).items():
        rows = [
            [
                _num(s["rate"]) + (" *" if s.get("generator_bound") else ""),
                _num(s["direct"]["p99"]),
                _num(s["target"]["p99"]),
                _signed(s["added_p99_ms"]),
                _num(s["target"]["rps"]),
                str(s["target"]["errors"] + s["target"].get("incomplete", 0)),
            ]
            for s in sorted(ol["steps"], key=lambda s: s["rate"])
        ]
        out.append(
            f"Open loop, {name}: fixed arrival rate, {ol['mode']}, {ol['step_s']:g} s per step and target, "
            f"python generator, latency from the scheduled send time (ms)"
        )
        out += _table(["rate/s", "direct p99", "target p99", "+p99", "done/s", "errors"], rows, left=0)
        if ol["steps"]:
            out.append(f"+p99 = target p99 - {ol['steps'][0].get('baseline_p99_ms', 0):.2f} ms (median direct p99)")
        lowest = min((s["rate"] for s in ol["steps"]), default=0)
        best = [
            f"{_num(rate)} req/s" if rate else f"none (not even {_num(lowest)} req/s)"
            for rate in (ol["max_rate_added_p99_under_5ms"], ol["max_rate_added_p99_under_50ms"])
        ]
        out.append(f"highest rate with added p99 < 5 ms: {best[0]}; < 50 ms: {best[1]}")
        if "generator_saturates_at_rps" in ol:
            sat = ol["generator_saturates_at_rps"]
            out.append(
                f"* generator-bound: the python generator fell behind its schedule against direct from "
                f"{_num(sat)} req/s; figures at or above it measure the generator"
                if sat is not None
                else "the python generator kept its schedule against direct at every step"
            )
        out.append("")
    return out


RELAY = "baseline[h11relay]"


def _stem(name: str) -> str:
    """The config of an llmproxy target: ``llmproxy[full-redis,w2]`` -> ``full-redis``."""
    return name[len("llmproxy[") : -1].split(",")[0] if name.startswith("llmproxy[") else name


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(float(a) / float(b), 3)


def add_ratios(res: dict[str, Any]) -> None:
    """Put each target's ratios to the others measured in the same run into the results (in place).

    Per closed-loop cell (JSON and every SSE framing), each result other than the
    relay's gets ``ratio_rps_vs_h11relay`` (its req/s or streams/s over the bare
    h11 relay's; higher is better) and ``ratio_added_p50_vs_h11relay`` (its added
    p50 over direct, over the relay's; lower is better) when ``--baseline h11relay``
    ran. With exactly one ``--target`` gateway, each llmproxy result also gets
    ``ratio_rps_vs_target`` and ``ratio_added_p50_vs_target``; a ``...,wN`` result
    whose one-worker twin ran gets ``ratio_rps_vs_one_worker``. Idempotent.
    """
    for cell in res.get("closed_loop", []):
        results = cell["results"]
        relay = results.get(RELAY)
        gateways = [n for n in results if n.startswith("target[")]
        gateway = results[gateways[0]] if len(gateways) == 1 else None
        for name, r in results.items():
            added = (r.get("added_ms") or {}).get("p50")
            if relay is not None and name != RELAY:
                r["ratio_rps_vs_h11relay"] = _ratio(r.get("rps"), relay.get("rps"))
                r["ratio_added_p50_vs_h11relay"] = _ratio(added, (relay.get("added_ms") or {}).get("p50"))
            if not name.startswith("llmproxy["):
                continue
            if gateway is not None:
                r["ratio_rps_vs_target"] = _ratio(r.get("rps"), gateway.get("rps"))
                r["ratio_added_p50_vs_target"] = _ratio(added, (gateway.get("added_ms") or {}).get("p50"))
            if ",w" in name:
                one = results.get(f"llmproxy[{_stem(name)}]")
                if one is not None:
                    r["ratio_rps_vs_one_worker"] = _ratio(r.get("rps"), one.get("rps"))


def _cell(res: dict[str, Any], mode: str, concurrency: int, name: str, figure: str) -> float | None:
    for cell in res.get("closed_loop", []):
        if cell["mode"] == mode and cell["concurrency"] == concurrency and name in cell["results"]:
            value = cell["results"][name].get(figure)
            return float(value) if value is not None else None
    return None


# The targets, as ratios to the bare h11 relay in the same run, one worker:
# (label, mode prefix, concurrency, ratio field, {config stem: bound}, higher is better).
# A config without a bound shows its ratio without a verdict; "full" covers full-redis.
_RATIO_TARGETS: tuple[tuple[str, str, int, str, dict[str, float], bool], ...] = (
    (
        "added p50 json c=1 / relay's (empty <= 1.0, full <= 1.25)",
        "json",
        1,
        "ratio_added_p50_vs_h11relay",
        {"empty": 1.0, "full": 1.25},
        False,
    ),
    (
        "req/s json c=64 / relay's (empty >= 1.2, full >= 0.9)",
        "json",
        64,
        "ratio_rps_vs_h11relay",
        {"empty": 1.2, "full": 0.9},
        True,
    ),
    (
        "streams/s {mode} c=16 / relay's (routing >= 1.0, full >= 0.8)",
        "sse",
        16,
        "ratio_rps_vs_h11relay",
        {"routing": 1.0, "full": 0.8},
        True,
    ),
)
#: Against another gateway on the same mock (--target): throughput ratio above, added-latency ratio below.
_GATEWAY_TARGETS: tuple[tuple[str, str, int, str, float, bool], ...] = (
    ("req/s json c=64 / target's >= 40", "json", 64, "ratio_rps_vs_target", 40.0, True),
    ("added p50 json c=1 / target's <= 0.05", "json", 1, "ratio_added_p50_vs_target", 0.05, False),
)


def _bound(bounds: dict[str, float], name: str) -> float | None:
    stem = _stem(name)
    if stem in bounds:
        return bounds[stem]
    return bounds.get("full") if stem.startswith("full") else None


def _verdict(value: float | None, bound: float | None, higher: bool, suffix: str = "x") -> str:
    if value is None:
        return "-"
    text = f"{_num(value)}{suffix}"
    if bound is None:
        return text
    ok = value >= bound if higher else value <= bound
    return f"{text} {'ok' if ok else 'MISS'}"


def _targets(res: dict[str, Any]) -> list[str]:
    """Each llmproxy target against the issue's targets, as ratios to the h11 relay in the same run.

    The relay (``--baseline h11relay``) is the floor of the design measured on
    this machine in this run, so the verdicts do not depend on the machine's
    speed. A cell shows the ratio, then ok or MISS where the issue bounds that
    config (empty, routing, full*), or the bare ratio where it does not.
    """
    names = [t["name"] for t in res["meta"]["targets"] if t["name"].startswith("llmproxy")]
    if not names or not res.get("closed_loop"):
        return []
    add_ratios(res)
    several = [t["name"] for t in res["meta"]["targets"] if (t.get("workers") or 1) > 1]
    out = [
        "Targets (ratios to the bare h11 relay in this run; stated for one worker"
        + (f"; {', '.join(several)} ran several, with RSS summed over them" if several else "")
        + (", and the default short heads, not --sdk-headers" if res["meta"]["mock"].get("provider_headers") else "")
        + "): the ratio, then ok or MISS"
    ]
    has_relay = any(RELAY in c["results"] for c in res["closed_loop"])
    if not has_relay:
        out.append("no ratios to the relay: run with --baseline h11relay")
    modes = sorted({c["mode"] for c in res["closed_loop"]})
    rows = []
    for label, prefix, concurrency, field, bounds, higher in _RATIO_TARGETS:
        for mode in [m for m in modes if m.startswith(prefix)] or [prefix]:
            row = [label.format(mode=mode)]
            for name in names:
                row.append(_verdict(_cell(res, mode, concurrency, name, field), _bound(bounds, name), higher))
            rows.append(row)
    if any(n.startswith("target[") for c in res["closed_loop"] for n in c["results"]):
        for label, mode, concurrency, field, bound, higher in _GATEWAY_TARGETS:
            rows.append([label, *(_verdict(_cell(res, mode, concurrency, n, field), bound, higher) for n in names)])
    if several:
        rows.append(
            [
                "req/s json c=64 / one worker's",
                *(_verdict(_cell(res, "json", 64, n, "ratio_rps_vs_one_worker"), None, True) for n in names),
            ]
        )
    resources = res.get("resources", {})
    memory = res.get("memory", {})
    rss_row = ["peak RSS <= 60 MiB (full)"]
    pss_row = ["PSS per worker at end <= 60 MiB (full)"]
    growth_row = ["RSS growth < 2 MiB per 100k requests"]
    for name in names:
        full = _stem(name).startswith("full")
        peak = resources.get(name, {}).get("peak_rss_mib")
        rss_row.append(_verdict(peak, 60.0 if full else None, False, ""))
        pss_row.append(_verdict(resources.get(name, {}).get("pss_per_worker_mib"), 60.0 if full else None, False, ""))
        growth = memory.get(name, {}).get("growth_mib_per_10k")
        per_100k = None if growth is None else max(growth, 0.0) * 10
        growth_row.append("-" if per_100k is None else f"{_num(per_100k)} {'ok' if per_100k < 2.0 else 'MISS'}")
    rows += [rss_row, pss_row, growth_row]
    return out + _table(["target", *names], rows)


def _ladder(res: dict[str, Any]) -> list[str]:
    """The marginal cost of each full-chain filter (``--ladder``), from ``res["ladder"]``."""
    lad = res.get("ladder")
    if not lad:
        return []
    steps = lad["steps"]
    fields = [k for k in steps[-1] if k.startswith("marginal_")]
    header = [
        "step",
        "filter added",
        *(f.removeprefix("marginal_").replace("_cpu_us", " +us").replace("_per_event", "/event") for f in fields),
    ]
    rows = [[s["target"], s["filter"], *(_signed(s.get(f)) for f in fields)] for s in steps[1:]]
    base = steps[0]
    out = [
        f"Marginal CPU per filter (--ladder; proxy CPU at c={lad['concurrency']}, {lad['sse_events']} events a stream; "
        f"no filter: json {_num(base.get('json_cpu_us'), 0)} us/request)"
    ]
    return out + _table(header, rows, left=2)


def render(res: dict[str, Any]) -> str:
    """The human-readable report of a results dict."""
    meta = res["meta"]
    pin = meta.get("pinning")
    lines = [
        f"llmproxy bench ({meta['mode']}): {meta['cpus']} CPUs; "
        + (f"proxy on CPU {pin['proxy']}, mock + generator on CPU {pin['aux']}" if pin else "no CPU pinning"),
        f"request {meta['request']['json_body_bytes']} B JSON body; reply {meta['reply']['json_body_bytes']} B JSON "
        f"or {meta['reply']['sse_events']} SSE events ({meta['reply']['sse_body_bytes']:,} B); "
        f"mock at {meta['mock']['url']} (tokens {meta['mock']['tokens']})"
        + ("; SDK request and provider reply header fields" if meta["mock"].get("provider_headers") else ""),
        "targets: " + ", ".join(f"{t['name']} = {t['url']}" for t in meta["targets"]),
        "",
    ]
    for section in (_closed(res), _paced(res), _memory(res), _open(res), _targets(res), _ladder(res)):
        if section:
            lines += [*section, ""]
    for warning in res.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines).rstrip() + "\n"


def plot(res: dict[str, Any], path: str) -> str | None:
    """Latency vs concurrency (p50 and p99, per target, JSON and SSE) as a PNG.

    Returns None on success, else why no plot was made (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot"
    cells = res.get("closed_loop", [])
    modes = sorted({c["mode"] for c in cells}, key=lambda m: (m != "json", m))
    if not modes:
        return "no closed-loop results to plot"
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for cell in cells:
            if cell["mode"] != mode:
                continue
            for name, r in cell["results"].items():
                series.setdefault(name, []).append((cell["concurrency"], r["p50"], r["p99"]))
        for i, (name, points) in enumerate(series.items()):
            points.sort()
            xs = [p[0] for p in points]
            color = f"C{i}"
            ax.plot(xs, [p[1] for p in points], "o-", color=color, label=f"{name} p50")
            ax.plot(xs, [p[2] for p in points], "s--", color=color, label=f"{name} p99")
        ax.set_xscale("log", base=2)
        ticks = sorted({c["concurrency"] for c in cells})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (connections)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{mode}: latency vs concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
