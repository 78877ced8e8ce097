"""Side-by-side throughput and latency benchmark: llmproxy (or any gateway) vs the mock direct.

Not a test: it prints figures and never judges them. Run from the repo root::

    python bench/throughput.py                      # full run, empty chain, ~5 min
    python bench/throughput.py -c full --json out.json --plot out.png
    python bench/throughput.py -c empty -c full     # both chains side by side
    python bench/throughput.py -c empty -c routing -c full -c full-redis --baseline h11relay  # ratio targets
    python bench/throughput.py --ladder --baseline h11relay   # each full-chain filter's marginal CPU
    python bench/throughput.py --workers 2 --proxy-cpus 0,1
    python bench/throughput.py --quick              # under 30 s, fewer requests
    python bench/throughput.py --sdk-headers         # heads as long as real SDK and provider ones
    python bench/throughput.py --smoke              # CI: a few seconds, checks it runs
    python bench/throughput.py --baseline h11relay --baseline nginx   # + reference relays
    python bench/throughput.py --mock-port 9009 --target http://127.0.0.1:4000   # + another gateway

Theory of operation
-------------------
One mock provider runs in its fastest mode (no pacing, replies written in one
``write``); every target forwards to it, and "direct" talks to it without a
proxy, so direct-to-mock is the ceiling and the baseline of every figure.
On a machine with two or more CPUs the proxy is pinned to one CPU and the
mock, the load generator and this script to the others (``taskset``), so
what the proxy adds is its own cost, not contention with the generator.

Baselines (``--baseline``) are reference relays started on the proxy's CPU
in front of the same mock, to show on the reader's machine what a minimal
relay costs: ``h11relay`` (``h11relay.py``: bare uvloop + h11, no features,
the floor of "h11 in Python") and ``nginx`` (one worker, upstream
keep-alive). They are measured like external targets (every phase but
memory) and, having a process the bench started, get CPU per request too.

Phases, in this order (``--skip`` drops any):

1. **probe**: one JSON and one SSE request per target; the reply sizes and
   the SSE event count are recorded and a non-200 stops the bench.
2. **memory** (llmproxy targets): N requests (100k; 8k with ``--quick``),
   JSON and SSE alternating, on the freshly started proxy; RSS is sampled
   every N/10 requests. Memory must plateau: the report gives the growth per
   10k requests over the second half of the run.
3. **closed** loop: for each mode (JSON, SSE) and concurrency (1, 16, 64),
   R rounds in which every target runs for T seconds in turn (the order
   reversed every other round), histograms merged exactly. Added latency =
   target minus direct at the same percentile. The proxy's CPU time per
   request is read from ``/proc`` around each of its runs.
4. **paced** streams: concurrency 1, the mock paced like a model (ttft
   50 ms, itl 5 ms, 50 events); added time to first byte and per event.
5. **open** loop (JSON): fixed arrival rates as fractions of the target's
   closed-loop peak, direct and target interleaved, then bisection, for the
   highest rate that keeps the added p99 (target p99 minus the median direct
   p99 of all steps) under 5 ms and under 50 ms.

The closed loop uses wrk with ``wrk_post.lua`` when it is installed (C, far
cheaper per request than Python), else the multi-process raw-socket
generator of ``loadgen.py``, which also drives the memory and open-loop
phases. Results go to stdout as tables and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import report
from ladder import ladder, write_configs
from loadgen import LoadResult, closed_loop, open_loop
from paced import PacedClient, StreamTiming, summarize
from procstat import steal_seconds
from services import (
    OTLP_ENV,
    REDIS_ENV,
    Service,
    find_nginx,
    nginx_version,
    start_h11relay,
    start_mock,
    start_nginx,
    start_otlp_sink,
    start_proxy,
    start_redis,
)
from wire import SDK_HEADERS, Endpoint, ResponseParser, build_request, chat_body, parse_url
from wrk import find_wrk, run_wrk

BENCH = Path(__file__).resolve().parent
# No C open-loop generator (wrk2, vegeta, oha) installs from the package registries here, so the open
# loop is the python one; a step is generator-bound when, against the mock direct, it achieved less than
# this share of its scheduled rate or sent this late on average.
GENERATOR_KEEPS_UP = 0.95
GENERATOR_LATE_MS = 1.0
# "sse": the mock sends one chunk per event (as providers flush); "sse-whole": the whole SSE
# body in one chunk (x-mock-sse-framing: whole). --sse-framing picks which are measured.
MODES = ("json", "sse", "sse-whole")
PHASES = ("memory", "closed", "paced", "open")
# Mock tokens: 76 content words make its chat.completion JSON ~850 bytes;
# 47 make a stream of 50 SSE events (role chunk, 47 deltas, finish, [DONE]).
JSON_TOKENS = 76
SSE_TOKENS = 47
# Memory "plateaus" when it grows less than this per 10k requests (~10 B/request).
PLATEAU_MIB_PER_10K = 0.1
OPEN_LOOP_LIMITS_MS = (5.0, 50.0)
BASELINES = ("h11relay", "nginx")


@dataclass(frozen=True)
class Plan:
    """How long and how much each phase runs."""

    name: str
    concurrency: tuple[int, ...]
    rounds: int
    run_s: float
    warmup_s: float
    memory_requests: int
    memory_samples: int
    memory_concurrency: int
    paced_streams: int
    paced_ttft_ms: float
    paced_itl_ms: float
    open_step_s: float
    open_fractions: tuple[float, ...]
    open_refine: int
    open_retry: bool  # run a failing open-loop step once more and keep the better run
    note: str = ""


PLANS = {
    "full": Plan(
        name="full",
        concurrency=(1, 16, 64),
        rounds=3,
        run_s=2.0,
        warmup_s=1.0,
        memory_requests=100_000,
        memory_samples=10,
        memory_concurrency=16,
        paced_streams=30,
        paced_ttft_ms=50,
        paced_itl_ms=5,
        open_step_s=3.0,
        open_fractions=(0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.15),
        open_refine=2,
        open_retry=True,
    ),
    "quick": Plan(
        name="quick",
        concurrency=(1, 16, 64),
        rounds=1,
        run_s=1.0,
        warmup_s=0.0,
        memory_requests=8_000,
        memory_samples=4,
        memory_concurrency=32,
        paced_streams=5,
        paced_ttft_ms=50,
        paced_itl_ms=5,
        open_step_s=0.5,
        open_fractions=(0.25, 0.6, 0.9),
        open_refine=0,
        open_retry=False,
        note="quick: memory over 8k requests, not 100k",
    ),
    "smoke": Plan(
        name="smoke",
        concurrency=(1, 4),
        rounds=1,
        run_s=0.1,
        warmup_s=0.0,
        memory_requests=200,
        memory_samples=2,
        memory_concurrency=4,
        paced_streams=2,
        paced_ttft_ms=5,
        paced_itl_ms=1,
        open_step_s=0.15,
        open_fractions=(0.3,),
        open_refine=0,
        open_retry=False,
        note="smoke: tiny runs that check the bench works; the figures mean nothing",
    ),
}


@dataclass
class Target:
    """Something to measure: the mock direct, an llmproxy or a baseline relay we started, or an external gateway."""

    name: str
    kind: str  # direct | llmproxy | baseline | external
    endpoint: Endpoint
    requests: dict[str, bytes]  # mode (json, sse, paced) -> raw request
    service: Service | None = None
    config: str | None = None
    workers: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # mode -> CPU seconds in closed-loop runs
    cpu_requests: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.endpoint.url,
            "config": self.config,
            "workers": self.workers,
        }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mib(n: int) -> float:
    return round(n / (1024 * 1024), 2)


def _cpus(text: str) -> list[int]:
    """``0``, ``0,1`` or ``2-3`` -> CPU numbers."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _config_spec(spec: str, workers: int) -> tuple[Path, int]:
    """``-c NAME`` or ``-c NAME@N`` (N workers for this config; else ``--workers``): its path and workers."""
    name, at, count = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if at:
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"-c {spec}: the worker count after @ must be a whole number >= 1")
        workers = int(count)
    return _config_path(name), workers


def _config_path(name: str) -> Path:
    """A config given as a name in bench/configs (``empty``, ``full``) or as a path."""
    candidate = BENCH / "configs" / f"{name}.yaml"
    if "/" not in name and not name.endswith((".yaml", ".yml")) and candidate.exists():
        return candidate
    path = Path(name)
    if not path.exists():
        raise SystemExit(
            f"config {name!r} not found (names: {', '.join(p.stem for p in BENCH.glob('configs/*.yaml'))})"
        )
    return path.resolve()


def _headers(raw: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--header {item!r}: expected 'name: value'")
        out.append((name.strip(), value.strip()))
    return out


class Bench:
    """One benchmark run: starts the processes, runs the phases, collects the results."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.otlp_sink: Service | None = None
        framing = getattr(args, "sse_framing", "both")
        self.modes = ("json", *{"both": ("sse", "sse-whole"), "events": ("sse",), "whole": ("sse-whole",)}[framing])
        self.warnings: list[str] = []
        self.results: dict[str, Any] = {}
        self.services: list[Service] = []
        self.targets: list[Target] = []
        self.direct: Target | None = None
        self.extra_headers = _headers(args.header)
        if args.sdk_headers:  # the SDK's fields first; a --header authorization replaces the SDK's key
            given = {name.lower() for name, _ in self.extra_headers}
            self.extra_headers = [*(f for f in SDK_HEADERS if f[0] not in given), *self.extra_headers]
        self.wrk = None if args.generator == "python" else find_wrk()
        if args.generator == "wrk" and self.wrk is None:
            raise SystemExit("--generator wrk: wrk is not installed")
        self.pin = self._pinning()
        self.loadavg = os.getloadavg()[0]
        self.switches_at_start: dict[str, int] = {}
        if self.loadavg > 0.5:
            self.warnings.append(
                f"load average {self.loadavg:.2f} before the bench: other processes compete for the CPUs"
            )
        self.procs = args.procs or max(1, len(self.pin["aux"]) if self.pin else 1)

    # -- setup ------------------------------------------------------------------

    def _pinning(self) -> dict[str, list[int]] | None:
        if self.args.no_pin:
            return None
        available = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None or len(available) < 2:
            self.warnings.append(
                f"not pinned ({len(available)} CPU(s) usable, taskset "
                f"{'found' if shutil.which('taskset') else 'missing'}): "
                "the proxy shares CPUs with the mock and the generator"
            )
            return None
        proxy = _cpus(self.args.proxy_cpus) if self.args.proxy_cpus else available[:1]
        aux = _cpus(self.args.aux_cpus) if self.args.aux_cpus else [c for c in available if c not in proxy]
        if not aux:
            aux = available
            self.warnings.append("no CPU left for the mock and generator; they share the proxy's CPUs")
        return {"proxy": proxy, "aux": aux}

    def _requests(self, endpoint: Endpoint) -> dict[str, bytes]:
        model = self.args.model
        base = self.extra_headers
        paced = [
            ("x-mock-tokens", str(SSE_TOKENS)),
            ("x-mock-ttft-ms", f"{self.plan.paced_ttft_ms:g}"),
            ("x-mock-itl-ms", f"{self.plan.paced_itl_ms:g}"),
        ]
        return {
            "json": build_request(endpoint, chat_body(model, False), base),
            "sse": build_request(endpoint, chat_body(model, True), [*base, ("x-mock-tokens", str(SSE_TOKENS))]),
            "sse-whole": build_request(
                endpoint,
                chat_body(model, True),
                [*base, ("x-mock-tokens", str(SSE_TOKENS)), ("x-mock-sse-framing", "whole")],
            ),
            "paced": build_request(endpoint, chat_body(model, True), [*base, *paced]),
        }

    def _config_services(self, paths: Sequence[Path], aux: list[int] | None, logdir: Path) -> dict[str, str]:
        """Start what the configs refer to (the OTLP sink, redis-server); their URLs as env variables."""
        texts = [p.read_text() for p in paths]
        env: dict[str, str] = {}
        if any(OTLP_ENV in t for t in texts):
            _log("starting the OTLP/HTTP trace sink ...")
            self.otlp_sink = start_otlp_sink(cpus=aux, logdir=logdir)
            self.services.append(self.otlp_sink)
            env[OTLP_ENV] = f"{self.otlp_sink.url}/v1/traces"
        if any(REDIS_ENV in t for t in texts):
            redis = start_redis(cpus=aux, logdir=logdir)
            if redis is not None:
                _log(f"started redis-server on port {redis.port}")
                self.services.append(redis)
                env[REDIS_ENV] = f"redis://{redis.host}:{redis.port}/0"
        return env

    def otlp_stats(self) -> dict[str, Any] | None:
        """What the OTLP sink received (exports, bytes), None without one."""
        if self.otlp_sink is None:
            return None
        status, body = _fetch(parse_url(self.otlp_sink.url), b"GET /stats HTTP/1.1\r\nhost: sink\r\n\r\n")
        return dict(orjson.loads(body)) if status == 200 else None

    def start(self, logdir: Path) -> None:
        """Start the mock and the proxies, pinned; build the targets."""
        args = self.args
        aux = self.pin["aux"] if self.pin else None
        if aux:
            os.sched_setaffinity(0, aux)
        mock_port = args.mock_port if args.mock_port is not None else (9009 if args.target else 0)
        _log(f"starting mock provider (tokens {JSON_TOKENS}) ...")
        mock = start_mock(
            host="127.0.0.1",
            port=mock_port,
            tokens=JSON_TOKENS,
            cpus=aux,
            logdir=logdir,
            provider_headers=args.sdk_headers,
        )
        self.services.append(mock)
        mock_ep = parse_url(mock.url)
        self.direct = Target("direct", "direct", mock_ep, self._requests(mock_ep))
        self.targets.append(self.direct)
        configs = [] if args.no_llmproxy else [_config_spec(spec, args.workers) for spec in args.config or ["empty"]]
        env_extra = self._config_services([path for path, _ in configs], aux, logdir)
        for path, workers in configs:
            if REDIS_ENV in path.read_text() and REDIS_ENV not in env_extra:
                self.warnings.append(f"{path.stem}: skipped, redis-server is not installed (it needs ${REDIS_ENV})")
                continue
            label = f"llmproxy[{path.stem}{f',w{workers}' if workers > 1 else ''}]"
            _log(f"starting {label} ({path}) ...")
            svc = start_proxy(
                label,
                path,
                upstream=mock.url,
                workers=workers,
                cpus=self.pin["proxy"] if self.pin else None,
                logdir=logdir,
                env_extra=env_extra,
            )
            self.services.append(svc)
            ep = parse_url(svc.url)
            self.targets.append(Target(label, "llmproxy", ep, self._requests(ep), svc, str(path), workers))
        for name in dict.fromkeys(args.baseline):  # in order, once each
            self._start_baseline(name, mock.url, logdir)
        for url in args.target:
            ep = parse_url(url)
            self.targets.append(Target(f"target[{ep.host}:{ep.port}]", "external", ep, self._requests(ep)))
        if len(self.targets) < 2:
            raise SystemExit("nothing to measure besides direct: give -c CONFIG, --baseline NAME or --target URL")
        most = max((workers for _, workers in configs), default=1)
        if most > 1 and self.pin and len(self.pin["proxy"]) < most:
            self.warnings.append(
                f"{most} workers pinned to CPU(s) {self.pin['proxy']}: they share them (see --proxy-cpus)"
            )

    def _start_baseline(self, name: str, upstream: str, logdir: Path) -> None:
        """Start one reference relay on the proxy's CPU(s) and add it as a target (a warning if it cannot run)."""
        label = f"baseline[{name}]"
        cpus = self.pin["proxy"] if self.pin else None
        if name == "h11relay":
            what = "bench/h11relay.py (uvloop + h11, no features)"
            _log(f"starting {label} ...")
            svc = start_h11relay(label, upstream=upstream, cpus=cpus, logdir=logdir)
        else:
            nginx = find_nginx()
            if nginx is None:
                self.warnings.append(f"{label}: nginx is not installed (not on $PATH nor /usr/sbin/nginx); skipped")
                return
            what = f"{nginx_version(nginx)}: 1 worker, upstream keepalive 128, proxy_buffering off"
            _log(f"starting {label} ({nginx}) ...")
            svc = start_nginx(label, nginx, upstream=upstream, cpus=cpus, logdir=logdir)
        self.services.append(svc)
        ep = parse_url(svc.url)
        self.targets.append(Target(label, "baseline", ep, self._requests(ep), svc, what, 1))

    def stop(self) -> None:
        """Stop every process started, llmproxy first; note any that did not exit cleanly."""
        for svc in reversed(self.services):
            alive = svc.proc.poll() is None
            code = svc.stop()
            if not alive:
                self.warnings.append(f"{svc.name} had exited before the end (code {code}): {svc.log_tail(5)}")
            elif code not in (0, -15):
                self.warnings.append(f"{svc.name} exited with {code} on SIGTERM")

    @property
    def others(self) -> list[Target]:
        return [t for t in self.targets if t.kind != "direct"]

    # -- phases -----------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        """One JSON and one SSE request per target; sizes and event counts, or SystemExit."""
        found: dict[str, Any] = {}
        for target in self.targets:
            row: dict[str, Any] = {}
            for mode in MODES:  # every framing is probed, measured or not
                status, body = _fetch(target.endpoint, target.requests[mode])
                if status != 200:
                    raise SystemExit(f"{target.name}: {mode} probe answered {status}: {body[:300]!r}")
                row[f"{mode}_body_bytes"] = len(body)
                if mode != "json":
                    row[f"{mode.replace('-', '_')}_events"] = body.count(b"data:")
                if b"fp_mock" not in body:
                    self.warnings.append(f"{target.name}: {mode} reply does not come from the bench mock")
            found[target.name] = row
        direct = found["direct"]
        for name, row in found.items():
            if row["sse_events"] != direct["sse_events"] or row["sse_whole_events"] != direct["sse_events"]:
                self.warnings.append(
                    f"{name}: {row['sse_events']} SSE events vs {direct['sse_events']} direct "
                    "(does it forward the x-mock-tokens header?)"
                )
        return found

    def memory(self) -> dict[str, Any]:
        """RSS of each llmproxy over N requests (JSON and SSE alternating)."""
        plan = self.plan
        out: dict[str, Any] = {}
        step = max(1, plan.memory_requests // plan.memory_samples)
        for target in self.others:
            if target.kind != "llmproxy" or target.service is None:
                continue
            tree = target.service.tree
            reqs = [target.requests["json"], target.requests["sse"]]
            samples = [{"requests": 0, "rss_mib": _mib(tree.rss_bytes())}]
            done = errors = 0
            _log(f"[memory] {target.name}: {plan.memory_requests:,} requests ...")
            while done < plan.memory_requests:
                budget = min(step, plan.memory_requests - done)
                r = closed_loop(
                    target.endpoint, reqs, plan.memory_concurrency, 3600.0, procs=self.procs, max_requests=budget
                )
                done += r.ok + r.errors
                errors += r.errors
                samples.append({"requests": done, "rss_mib": _mib(tree.rss_bytes())})
            growth = _growth_per_10k(samples)
            out[target.name] = {
                "requests": done,
                "errors": errors,
                "concurrency": plan.memory_concurrency,
                "mix": "JSON and SSE alternating",
                "samples": samples,
                "growth_mib_per_10k": round(growth, 3),
                "plateau": growth < PLATEAU_MIB_PER_10K,
                "note": plan.note if plan.name != "full" else "",
            }
            if growth >= PLATEAU_MIB_PER_10K:
                self.warnings.append(f"{target.name}: RSS still growing, {growth:+.2f} MiB per 10k requests")
        return out

    def _closed_run(self, target: Target, mode: str, concurrency: int, seconds: float) -> LoadResult:
        if self.wrk is not None:
            return run_wrk(target.endpoint, [target.requests[mode]], concurrency, seconds, wrk=self.wrk)
        return closed_loop(target.endpoint, [target.requests[mode]], concurrency, seconds, procs=self.procs)

    def closed(self) -> list[dict[str, Any]]:
        """The closed-loop grid: modes x concurrencies x interleaved rounds over all targets."""
        plan = self.plan
        if plan.warmup_s > 0:
            for target in self.targets:
                for mode in self.modes:
                    closed_loop(target.endpoint, [target.requests[mode]], 16, plan.warmup_s, procs=self.procs)
        cells = []
        for mode in self.modes:
            for conc in plan.concurrency:
                runs: dict[str, list[LoadResult]] = {t.name: [] for t in self.targets}
                cpu: dict[str, float] = {t.name: 0.0 for t in self.targets}
                for rnd in range(plan.rounds):
                    order = self.targets if rnd % 2 == 0 else list(reversed(self.targets))
                    for target in order:
                        tree = target.service.tree if target.service else None
                        before = tree.cpu_seconds() if tree else 0.0
                        runs[target.name].append(self._closed_run(target, mode, conc, plan.run_s))
                        if tree:
                            cpu[target.name] += tree.cpu_seconds() - before
                merged = {name: LoadResult.combine(parts, parallel=False) for name, parts in runs.items()}
                base = merged["direct"]
                results: dict[str, Any] = {}
                for target in self.targets:
                    r = merged[target.name]
                    row = r.summary()
                    if target.kind != "direct":
                        row["added_ms"] = {
                            f"p{p}": round((r.hist.percentile_us(p) - base.hist.percentile_us(p)) / 1000, 3)
                            for p in (50, 90, 99)
                        }
                    if target.service is not None and r.ok + r.errors:
                        row["cpu_us_per_request"] = round(cpu[target.name] / (r.ok + r.errors) * 1e6, 1)
                        target.cpu_s[f"{mode} c={conc}"] = cpu[target.name]
                        target.cpu_requests[f"{mode} c={conc}"] = r.ok + r.errors
                    if r.errors:
                        self.warnings.append(f"{target.name}: {r.errors} errors in closed loop {mode} c={conc}")
                    results[target.name] = row
                cells.append({"mode": mode, "concurrency": conc, "results": results})
                _log(
                    f"[closed {mode} c={conc}] "
                    + " | ".join(f"{n} {v['rps']:,.0f} req/s p99 {v['p99']:.2f} ms" for n, v in results.items())
                )
        return cells

    def paced(self) -> dict[str, Any]:
        """Paced streams at concurrency 1, targets interleaved; added TTFB and per-event delay."""
        plan = self.plan
        clients = {t.name: PacedClient(t.endpoint) for t in self.targets}
        timings: dict[str, list[StreamTiming]] = {t.name: [] for t in self.targets}
        _log(f"[paced] {plan.paced_streams} streams per target ...")
        try:
            for i in range(plan.paced_streams):
                order = self.targets if i % 2 == 0 else list(reversed(self.targets))
                for target in order:
                    t = clients[target.name].measure(target.requests["paced"])
                    if t.status != 200:
                        raise SystemExit(f"{target.name}: paced stream answered {t.status}")
                    timings[target.name].append(t)
        finally:
            for client in clients.values():
                client.close()
        ttft, itl = plan.paced_ttft_ms / 1000, plan.paced_itl_ms / 1000
        results = {name: summarize(ts, ttft, itl) for name, ts in timings.items()}
        base = results["direct"]
        keys = ("ttfb_p50", "first_token_p50", "event_lag_p50", "event_lag_p99", "gap_mean")
        for target in self.others:
            row = results[target.name]
            row["added_ms"] = {
                k: round(row[k] - base[k], 3) if row[k] is not None and base[k] is not None else None for k in keys
            }
        return {
            "ttft_ms": plan.paced_ttft_ms,
            "itl_ms": plan.paced_itl_ms,
            "events": base["events_per_stream"],
            "streams": plan.paced_streams,
            "results": results,
        }

    def _capacity(self, target: Target, closed: list[dict[str, Any]]) -> float:
        """The target's peak closed-loop JSON rate (measured now if the closed phase was skipped)."""
        rates = [c["results"][target.name]["rps"] for c in closed if c["mode"] == "json"]
        if rates:
            return max(rates)
        return closed_loop(target.endpoint, [target.requests["json"]], 16, 1.0, procs=self.procs).rps

    def fixed_rate(self, closed: list[dict[str, Any]]) -> dict[str, Any]:
        """Fixed-rate runs per target (direct interleaved) for the 5 ms / 50 ms added-p99 limits."""
        plan = self.plan
        assert self.direct is not None
        direct = self.direct
        out: dict[str, Any] = {}
        for target in self.others:
            capacity = self._capacity(target, closed)
            steps: list[dict[str, Any]] = []

            def step(rate: float, target: Target = target, steps: list[dict[str, Any]] = steps) -> dict[str, Any]:
                rate = max(1.0, round(rate))
                s: dict[str, Any] = {}
                for attempt in (1, 2) if plan.open_retry else (1,):  # a stall of the machine is not the proxy
                    d = open_loop(direct.endpoint, [direct.requests["json"]], rate, plan.open_step_s, procs=self.procs)
                    t = open_loop(target.endpoint, [target.requests["json"]], rate, plan.open_step_s, procs=self.procs)
                    clean = t.errors == 0 and t.incomplete == 0 and t.ok > 0
                    if not s or (clean, -t.hist.percentile_us(99)) > (s["clean"], -s["target"]["p99"] * 1000):
                        s.update(rate=rate, direct=d.summary(), target=t.summary(), clean=clean, attempts=attempt)
                    else:
                        s["attempts"] = attempt
                    # the generator against the mock direct (the fastest server here): when it cannot keep
                    # its own schedule, the step measures the generator, not the target
                    achieved = s["direct"]["rps"]
                    late_ms = s["direct"].get("late_us_mean", 0.0) / 1000
                    s["generator"] = {"scheduled_rps": rate, "achieved_rps": achieved, "late_ms_mean": late_ms}
                    s["generator_bound"] = achieved < GENERATOR_KEEPS_UP * rate or late_ms > GENERATOR_LATE_MS
                    if attempt == 1:
                        steps.append(s)
                    _judge(steps)
                    if all(s["ok"].values()):
                        break
                _log(
                    f"[open {target.name}] {rate:,.0f}/s: p99 {s['target']['p99']:.2f} ms (direct "
                    f"{s['direct']['p99']:.2f}), added {s['added_p99_ms']:+.2f} ms, {s['attempts']} run(s)"
                )
                return s

            for fraction in plan.open_fractions:
                if not step(capacity * fraction)["ok"][str(OPEN_LOOP_LIMITS_MS[-1])]:
                    break
            best: dict[str, float] = {}
            for lim in OPEN_LOOP_LIMITS_MS:
                key = str(lim)
                for _ in range(plan.open_refine):
                    lo, hi = _bracket(steps, key)
                    if hi is None or hi - lo < max(10.0, 0.03 * hi):
                        break
                    step((lo + hi) / 2)
            _judge(steps)
            for lim in OPEN_LOOP_LIMITS_MS:
                best[str(lim)] = _bracket(steps, str(lim))[0]
            out[target.name] = {
                "mode": "json",
                "step_s": plan.open_step_s,
                "capacity_rps": round(capacity, 1),
                "max_rate_added_p99_under_5ms": best[str(OPEN_LOOP_LIMITS_MS[0])],
                "max_rate_added_p99_under_50ms": best[str(OPEN_LOOP_LIMITS_MS[1])],
                # the lowest rate at which the python generator fell behind its schedule against direct;
                # figures at or above it are generator-bound (None: it kept up at every step)
                "generator_saturates_at_rps": min((x["rate"] for x in steps if x["generator_bound"]), default=None),
                "steps": steps,
            }
        return out

    def resources(self) -> dict[str, Any]:
        """Peak and final RSS and CPU per request of each process the bench started (llmproxy, baselines)."""
        out: dict[str, Any] = {}
        for target in self.others:
            if target.service is None:
                continue
            tree = target.service.tree
            alive = target.service.proc.poll() is None and len(tree.alive()) == len(tree.serving)
            if not alive:
                self.warnings.append(f"{target.name}: a process died during the bench: {target.service.log_tail(5)}")
            switches = tree.involuntary_switches() - self.switches_at_start.get(target.name, 0)
            if switches > 1000:
                self.warnings.append(
                    f"{target.name} was preempted {switches:,} times: other processes ran on its CPU, "
                    "so its tail latencies are noisy"
                )
            out[target.name] = {
                "involuntary_context_switches": switches,
                "peak_rss_mib": _mib(tree.peak_rss_bytes()),
                "rss_end_mib": _mib(tree.rss_bytes()),
                # the instance's proportional set size (supervisor included) over its workers:
                # what one more worker costs, its shared copy-on-write pages counted once
                "pss_end_mib": _mib(tree.pss_bytes()),
                "pss_per_worker_mib": _mib(tree.pss_bytes() // len(tree.serving)),
                "workers": len(tree.serving),
                "alive": alive,
                "cpu_us_per_request": {
                    k: round(target.cpu_s[k] / n * 1e6, 1) for k, n in target.cpu_requests.items() if n
                },
            }
        return out

    def scan_logs(self) -> None:
        """Report tracebacks and errors that the processes logged (nginx: level error and worse)."""
        marks = ("Traceback", " ERROR ", "CRITICAL", "[error]", "[crit]", "[alert]", "[emerg]")
        for svc in self.services:
            text = svc.log_tail(2000)
            bad = [ln for ln in text.splitlines() if any(m in ln for m in marks)]
            if bad:
                self.warnings.append(
                    f"{svc.name} logged {len(bad)} error line(s), first: {bad[0][:200]} (log {svc.log})"
                )

    # -- driver -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        skip = set(self.args.skip)
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
            logdir = Path(self.args.log_dir) if self.args.log_dir else Path(tmp)
            logdir.mkdir(parents=True, exist_ok=True)
            try:
                self.start(logdir)
                steal_before = steal_seconds()
                self.switches_at_start = {
                    t.name: t.service.tree.involuntary_switches() for t in self.targets if t.service is not None
                }
                probe = self.probe()
                res: dict[str, Any] = {"meta": self._meta(started, probe)}
                phases: list[tuple[str, Callable[[], Any]]] = [
                    ("memory", self.memory),
                    ("closed", self.closed),
                    ("paced", self.paced),
                ]
                for name, fn in phases:
                    if name not in skip:
                        res[{"closed": "closed_loop", "paced": "paced_stream"}.get(name, name)] = fn()
                if "open" not in skip:
                    res["open_loop"] = self.fixed_rate(res.get("closed_loop", []))
                res["resources"] = self.resources()
                otlp = self.otlp_stats()
                if otlp is not None:
                    res["otlp_sink"] = otlp
                    if not otlp.get("exports"):
                        self.warnings.append("tracing exported nothing to the OTLP sink")
                steal = {cpu: round(v - steal_before.get(cpu, 0.0), 2) for cpu, v in steal_seconds().items()}
                res["meta"]["noise"] = {"loadavg_at_start": self.loadavg, "steal_s_per_cpu": steal}
                if self.pin and any(steal.get(cpu, 0.0) > 1.0 for cpu in self.pin["proxy"]):
                    self.warnings.append(f"the hypervisor stole CPU time from the proxy's CPU: {steal} s")
                self.scan_logs()
            finally:
                self.stop()
        res["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
        res["warnings"] = self.warnings
        return res

    def _meta(self, started: str, probe: dict[str, Any]) -> dict[str, Any]:
        assert self.direct is not None
        direct = probe["direct"]
        return {
            "version": 1,
            "mode": self.plan.name,
            "command": shlex.join([sys.executable, *sys.argv]),
            "started": started,
            "cpus": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()} {platform.python_implementation()} "
            f"{platform.python_version()}",
            "pinning": self.pin,
            "generator": (
                f"wrk ({self.wrk}, 1 thread)" if self.wrk else f"python raw sockets ({self.procs} process(es))"
            ),
            "mock": {
                "url": f"http://{self.direct.endpoint.host}:{self.direct.endpoint.port}",
                "tokens": JSON_TOKENS,
                "provider_headers": self.args.sdk_headers,
            },
            "request": {
                "json_body_bytes": len(chat_body(self.args.model, False)),
                "json_request_bytes": len(self.direct.requests["json"]),
            },
            "reply": {
                "json_body_bytes": direct["json_body_bytes"],
                "sse_events": direct["sse_events"],
                "sse_body_bytes": direct["sse_body_bytes"],
            },
            "probe": probe,
            "targets": [t.describe() for t in self.targets],
            "plan": asdict(self.plan),
        }


def _fetch(endpoint: Endpoint, request: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    import socket

    with socket.create_connection((endpoint.host, endpoint.port), timeout=30) as sock:
        sock.sendall(request)
        parser = ResponseParser(keep_body=True)
        while True:
            data = sock.recv(65536)
            if parser.feed(data) if data else parser.eof():
                return parser.status, bytes(parser.body)
            if not data:
                return 0, bytes(parser.body)


def _growth_per_10k(samples: list[dict[str, Any]]) -> float:
    """Least-squares slope of RSS (MiB) per 10k requests over the second half of the samples."""
    total = samples[-1]["requests"]
    tail = [s for s in samples if s["requests"] >= total / 2]
    if len(tail) < 2:
        return 0.0
    xs = [s["requests"] / 10_000 for s in tail]
    ys = [s["rss_mib"] for s in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _judge(steps: list[dict[str, Any]]) -> None:
    """Set every open-loop step's added p99 and its pass/fail per limit.

    The baseline is the median direct p99 over all the steps so far: the mock
    runs far below its capacity at these rates, so its p99 does not depend on
    the rate, and the median ignores a direct run that a stall of the machine
    happened to hit (which would otherwise make the added figure negative).
    """
    base = statistics.median(s["direct"]["p99"] for s in steps)
    for s in steps:
        added = s["target"]["p99"] - base
        s["baseline_p99_ms"] = base
        s["added_p99_ms"] = round(added, 3)
        s["ok"] = {str(lim): s["clean"] and added < lim for lim in OPEN_LOOP_LIMITS_MS}


def _bracket(steps: list[dict[str, Any]], key: str) -> tuple[float, float | None]:
    """(highest passing rate below the first failure, lowest failing rate) for one limit."""
    failing = [s["rate"] for s in steps if not s["ok"][key]]
    hi = min(failing) if failing else None
    passing = [s["rate"] for s in steps if s["ok"][key] and (hi is None or s["rate"] < hi)]
    return (max(passing) if passing else 0.0), hi


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Throughput and latency of llmproxy (and other gateways) vs the mock provider direct.",
        epilog="See bench/README.md for the method and how to read the figures.",
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="finish in under 30 s (memory over 8k requests)")
    size.add_argument("--smoke", action="store_true", help="a few seconds, c=1 and 4: checks the bench runs (CI)")
    ap.add_argument(
        "-c",
        "--config",
        action="append",
        help="llmproxy config: a name in bench/configs (empty, full) or a path, NAME@N for N workers "
        "(else --workers); repeat to compare several, e.g. -c full -c full@2 (default: empty)",
    )
    ap.add_argument("--workers", type=int, default=1, help="llmproxy worker processes (default 1)")
    ap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="URL",
        help="another OpenAI-compatible gateway, already pointed at the mock (see --mock-port)",
    )
    ap.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=BASELINES,
        help="also measure a reference relay on the proxy's CPU: h11relay (bench/h11relay.py, bare uvloop + h11) "
        "or nginx (if installed); repeatable",
    )
    ap.add_argument("--no-llmproxy", action="store_true", help="measure only the --baseline and --target ones")
    ap.add_argument(
        "--mock-port",
        type=int,
        default=None,
        help="port of the mock provider (default: 9009 with --target, else a free one)",
    )
    ap.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header for every target, e.g. an API key for --target",
    )
    ap.add_argument(
        "--sdk-headers",
        action="store_true",
        help="traffic with production-sized heads: requests carry the openai SDK's header fields "
        "and the mock answers with a hosted provider's (~20 fields each way)",
    )
    ap.add_argument("--model", default="gpt-4o-mini", help="model name in the requests")
    ap.add_argument(
        "--sse-framing",
        choices=("both", "events", "whole"),
        default="both",
        help="the mock's stream framing measured: one chunk per event (sse), the whole body in one (sse-whole), "
        "or both (default)",
    )
    ap.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="closed-loop generator: wrk if installed (auto), or the python one",
    )
    ap.add_argument("--procs", type=int, default=0, help="python generator processes (default: one per aux CPU)")
    ap.add_argument("--proxy-cpus", default=None, help="CPUs for llmproxy, e.g. 0 or 0,1 (default: the first)")
    ap.add_argument("--aux-cpus", default=None, help="CPUs for the mock and the generator (default: the rest)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--skip", action="append", default=[], choices=PHASES, help="skip a phase (repeatable)")
    ap.add_argument(
        "--ladder",
        action="store_true",
        help="add configs/full.yaml's filters one at a time (-c ladder-0 .. ladder-N) and report each "
        "filter's marginal CPU per JSON request and per SSE event",
    )
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--plot", metavar="PNG", help="latency vs concurrency plot (needs matplotlib)")
    ap.add_argument("--log-dir", help="keep the mock's and proxies' logs here")
    ap.add_argument("--render", metavar="JSON", help="print the report of a saved --json file and exit")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render:
        res = orjson.loads(Path(args.render).read_bytes())
    else:
        if args.workers < 1:
            raise SystemExit("--workers must be >= 1")
        plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
        with tempfile.TemporaryDirectory(prefix="llmproxy-ladder-") as tmp:
            if args.ladder:
                args.config = [
                    *(args.config or []),
                    *map(str, write_configs(BENCH / "configs" / "full.yaml", Path(tmp))),
                ]
            res = Bench(args, plan).run()
        report.add_ratios(res)
        steps = ladder(res)
        if steps is not None:
            res["ladder"] = steps
        if args.json:
            Path(args.json).write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    sys.stdout.write(report.render(res))
    if args.plot:
        problem = report.plot(res, args.plot)
        print(problem or f"plot written to {args.plot}")
    if args.json and not args.render:
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
