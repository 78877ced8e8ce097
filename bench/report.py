"""Rendering bench results: the printed tables and the optional PNG plot.

Everything here reads the results dict that ``throughput.py --json`` writes,
so a saved run can be rendered again (``throughput.py --render FILE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["plot", "render"]


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
            f"{r['workers']} worker(s){'' if r['alive'] else ' -- A WORKER DIED'}, "
            f"preempted {r.get('involuntary_context_switches', 0):,} times; CPU per request: {cpu or '-'}"
        )
    return out


def _open(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, ol in res.get("open_loop", {}).items():
        rows = [
            [
                _num(s["rate"]),
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
        out.append("")
    return out


# The speed targets (bench issue), for one worker: (label, mode, concurrency, figure, bound, bound for the
# full builtin chain (configs/full.yaml), higher is better). The figure is "added_p50" (ms over direct) or "rps".
_SPEED_TARGETS: tuple[tuple[str, str, int, str, float, float, bool], ...] = (
    ("added p50, json c=1 < 0.3 ms", "json", 1, "added_p50", 0.3, 0.3, False),
    ("req/s, json c=64 >= 6,000 (full chain 4,000)", "json", 64, "rps", 6000.0, 4000.0, True),
    ("added p50, 50-event sse c=1 < 1 ms", "sse", 1, "added_p50", 1.0, 1.0, False),
    ("streams/s, sse c=16 >= 1,000", "sse", 16, "rps", 1000.0, 1000.0, True),
)
#: The reference machine of the targets, as the issue gives it: nginx adds 0.11 ms at c=1,
#: a bare uvloop + h11 relay does ~8,500 req/s at c=64.
_REFERENCE_NGINX_ADDED_MS = 0.11
_REFERENCE_H11RELAY_RPS = 8500.0


def _cell(res: dict[str, Any], mode: str, concurrency: int, name: str, figure: str) -> float | None:
    for cell in res.get("closed_loop", []):
        if cell["mode"] == mode and cell["concurrency"] == concurrency and name in cell["results"]:
            r = cell["results"][name]
            value = r.get("added_ms", {}).get("p50") if figure == "added_p50" else r.get("rps")
            return float(value) if value is not None else None
    return None


def _targets(res: dict[str, Any]) -> list[str]:
    """Each llmproxy target against the speed and memory targets, absolute and scaled.

    Scaled figures put this machine's speed next to the reference machine's,
    from the baselines measured in the same run: latency divided by how much
    more nginx adds here, throughput multiplied by how much slower the bare
    h11 relay is here. They are a reading aid; the absolute figures are the
    measurement.
    """
    names = [t["name"] for t in res["meta"]["targets"] if t["name"].startswith("llmproxy")]
    if not names or not res.get("closed_loop"):
        return []
    nginx = _cell(res, "json", 1, "baseline[nginx]", "added_p50")
    relay = _cell(res, "json", 64, "baseline[h11relay]", "rps")
    slow_latency = nginx / _REFERENCE_NGINX_ADDED_MS if nginx and nginx > 0 else None
    slow_throughput = _REFERENCE_H11RELAY_RPS / relay if relay else None
    several = [t["name"] for t in res["meta"]["targets"] if (t.get("workers") or 1) > 1]
    out = [
        "Targets (stated for one worker"
        + (f"; {', '.join(several)} ran several, with RSS summed over them" if several else "")
        + (", and the default short heads, not --sdk-headers" if res["meta"]["mock"].get("provider_headers") else "")
        + "): the figure, then ok or MISS; scaled = as on the issue's reference machine"
    ]
    factors = []
    if slow_latency is not None:
        factors.append(
            f"nginx adds {nginx:.2f} ms at json c=1 here vs {_REFERENCE_NGINX_ADDED_MS} there (x{slow_latency:.2f})"
        )
    if slow_throughput is not None:
        factors.append(
            f"the bare h11 relay does {relay:,.0f} req/s at json c=64 here vs ~{_REFERENCE_H11RELAY_RPS:,.0f} "
            f"there (x{slow_throughput:.2f})"
        )
    out.append(
        "machine: " + ("; ".join(factors) if factors else "no scaling (run with --baseline nginx --baseline h11relay)")
    )

    def verdict(value: float | None, bound: float, higher: bool) -> str:
        if value is None:
            return "-"
        ok = value >= bound if higher else value < bound
        return f"{_num(value)} {'ok' if ok else 'MISS'}"

    rows = []
    for label, mode, concurrency, figure, bound, full_chain_bound, higher in _SPEED_TARGETS:
        row = [label]
        for name in names:
            this_bound = full_chain_bound if name.startswith("llmproxy[full") else bound
            value = _cell(res, mode, concurrency, name, figure)
            factor = slow_throughput if higher else slow_latency
            scaled = None if value is None or factor is None else (value * factor if higher else value / factor)
            row.append(verdict(value, this_bound, higher))
            row.append(verdict(scaled, this_bound, higher))  # "-" without the baseline that scales it
        rows.append(row)
    resources = res.get("resources", {})
    memory = res.get("memory", {})
    rss_row = ["peak RSS < 60 MiB"]
    growth_row = ["RSS growth < 2 MiB per 100k requests"]
    for name in names:
        peak = resources.get(name, {}).get("peak_rss_mib")
        rss_row += [verdict(peak, 60.0, False), ""]
        growth = memory.get(name, {}).get("growth_mib_per_10k")
        growth_row += [verdict(None if growth is None else max(growth, 0.0) * 10, 2.0, False), ""]
    rows += [rss_row, growth_row]
    header = ["target"]
    for name in names:
        header += [name, "scaled"]
    return out + _table(header, rows)


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
    for section in (_closed(res), _paced(res), _memory(res), _open(res), _targets(res)):
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
