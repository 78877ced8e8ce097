"""The marginal-cost ladder: the full chain's filters added one at a time.

``throughput.py --ladder`` measures ``ladder-0`` (no filter), then the first
filter of ``configs/full.yaml``, then the first two, and so on, all in one
interleaved run. Each filter's marginal cost is the proxy's CPU time per
request (``/proc``, measured per closed-loop cell) of its step minus the step
before: per JSON request, and per SSE event (a stream's CPU over its events).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["LADDER_PREFIX", "ladder", "write_configs"]

LADDER_PREFIX = "ladder-"


def write_configs(full: Path, outdir: Path) -> list[Path]:
    """One config per step into ``outdir``: ``full``'s settings with its first i filters, i = 0..n.

    Files are named ``ladder-{i}-{last filter}.yaml`` (``ladder-0-none.yaml``
    first), so the bench's targets are ``llmproxy[ladder-...]``.
    """
    config = yaml.safe_load(full.read_text())
    filters = list(config.get("filters") or [])
    paths = []
    for i in range(len(filters) + 1):
        step = {**config, "filters": filters[:i]}
        last = filters[i - 1]["name"] if i else "none"
        path = outdir / f"{LADDER_PREFIX}{i}-{last}.yaml"
        path.write_text(yaml.safe_dump(step, sort_keys=False))
        paths.append(path)
    return paths


def _cpu(res: dict[str, Any], mode: str, concurrency: int, name: str) -> float | None:
    for cell in res.get("closed_loop", []):
        if cell["mode"] == mode and cell["concurrency"] == concurrency:
            value = cell["results"].get(name, {}).get("cpu_us_per_request")
            return float(value) if value is not None else None
    return None


def ladder(res: dict[str, Any]) -> dict[str, Any] | None:
    """Each step's CPU µs per JSON request and per SSE event, and its filter's marginal cost; None without one.

    Read at the highest concurrency measured up to 16 (the proxy busiest, the
    figures steadiest). ``events`` is the direct stream's event count.
    """
    names = [t["name"] for t in res["meta"]["targets"] if t["name"].startswith(f"llmproxy[{LADDER_PREFIX}")]
    cells = res.get("closed_loop", [])
    if not names or not cells:
        return None
    concurrencies = sorted({c["concurrency"] for c in cells})
    concurrency = max([c for c in concurrencies if c <= 16] or concurrencies[:1])
    events = res["meta"]["reply"]["sse_events"] or 1
    modes = sorted({c["mode"] for c in cells if c["mode"] != "json"})
    steps: list[dict[str, Any]] = []
    for name in names:
        step: dict[str, Any] = {"target": name, "filter": name[:-1].split("-", 2)[-1]}
        step["json_cpu_us"] = _cpu(res, "json", concurrency, name)
        for mode in modes:
            cpu = _cpu(res, mode, concurrency, name)
            step[f"{mode}_cpu_us_per_event"] = None if cpu is None else round(cpu / events, 2)
        if steps:
            before = steps[-1]
            for field in [k for k in step if k.endswith(("_cpu_us", "_per_event"))]:
                a, b = step[field], before[field]
                step[f"marginal_{field}"] = None if a is None or b is None else round(a - b, 2)
        steps.append(step)
    return {"concurrency": concurrency, "sse_events": events, "steps": steps}
