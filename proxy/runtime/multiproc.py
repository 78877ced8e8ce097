"""Metrics across worker processes: one scrape of any worker shows the sum over all of them.

With ``server.workers > 1`` every worker is a forked process with its own
metric values; a scrape lands on whichever worker the kernel hands the
connection to. prometheus_client's *multiprocess mode* solves that: each
process writes its values into its own memory-mapped file in one folder,
and a scrape reads and merges every file there (counters and histograms
summed, gauges by their ``multiprocess_mode``). Writing a value is a
``struct.pack_into`` into the mmap: cheap enough for the hot path, and the
scrape is exact (no flush interval, no snapshot lag).

The supervisor calls, in this order (:mod:`llmproxy.runtime.app`)::

    prepare(workers)        # parent, before forking: a fresh folder, PROMETHEUS_MULTIPROC_DIR set
    worker_started()        # in each forked worker, before it builds anything
    worker_exited(pid)      # parent, when a worker exits (its live gauges are dropped)
    cleanup()               # parent, after the last worker exited

Metrics of a dead worker stay in the folder: a restarted worker's counters
add to what its predecessor counted, so totals never go down. Gauges use
``livesum`` (connections, exchanges and streams in flight: the sum over live
workers) or ``mostrecent`` (a value every worker sees alike).

Custom collectors (metric families built at scrape time, such as key health)
cannot be written to the files: the scraping worker adds its own to the
merged families (see :class:`WorkerRegistry`). They must therefore show
state every worker shares (read from the shared store), or merge what the
other workers publish themselves, as the core's exchange metrics do
(:mod:`llmproxy.runtime.metrics`: per-worker snapshots in the same folder);
a filter's per-worker counts must be real ``Counter`` objects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, values
from prometheus_client.core import Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

__all__ = ["ENV", "WorkerRegistry", "active", "cleanup", "folder", "prepare", "worker_exited", "worker_started"]

#: The variable prometheus_client reads to find the folder of the value files.
ENV = "PROMETHEUS_MULTIPROC_DIR"

_owned: str | None = None


def prepare(workers: int) -> str | None:
    """Parent, before forking ``workers`` workers: create (or wipe) the folder and export it.

    Returns the folder, or None for one worker (values stay in process).
    A folder given in the environment is used (and wiped: stale files from
    an earlier run would be summed in); otherwise a temporary one is made and
    removed by :func:`cleanup`.
    """
    global _owned
    if workers <= 1:
        return None
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db") or name.startswith("llmproxy-exchanges-"):  # (metrics.py's snapshots)
                os.remove(os.path.join(path, name))
    else:
        path = _owned = tempfile.mkdtemp(prefix="llmproxy-metrics-")
        os.environ[ENV] = path
    return path


def worker_started() -> None:
    """In a forked worker, before any metric is created: write values to the shared folder.

    prometheus_client picks its value class when it is imported, which
    happened in the parent before the folder existed; switching it here
    makes every metric the worker creates afterwards file-backed.
    """
    if os.environ.get(ENV):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def worker_exited(pid: int) -> None:
    """Parent: a worker exited; drop its ``live*`` gauges (its counters stay summed)."""
    path = os.environ.get(ENV)
    if path:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def cleanup() -> None:
    """Parent, after every worker exited: remove the folder :func:`prepare` created."""
    global _owned
    if _owned is not None:
        shutil.rmtree(_owned, ignore_errors=True)
        os.environ.pop(ENV, None)
        _owned = None


def folder() -> str | None:
    """The shared metrics folder in a worker in multiprocess mode, else None."""
    return os.environ.get(ENV) if active() else None


def active() -> bool:
    """True in a worker whose metric values are file-backed (multiprocess mode)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class WorkerRegistry(CollectorRegistry):
    """A worker's registry: what filters and the core register metrics in.

    In one process it is an ordinary registry. In multiprocess mode
    :meth:`scrape_registry` is what ``/metrics`` renders: the merged files of
    every worker, plus the custom collectors registered here (metrics objects
    are not collected from this registry then: the files already hold them).
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.custom: list[Collector] = []
        self._scrape: CollectorRegistry | None = None

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.custom.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        if collector in self.custom:
            self.custom.remove(collector)

    def scrape_registry(self) -> CollectorRegistry:
        """The registry to render for a scrape (this one unless in multiprocess mode)."""
        if not active():
            return self
        if self._scrape is None:
            scrape = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
            scrape.register(_Custom(self))
            self._scrape = scrape
        return self._scrape


class _Custom:
    """The scraping worker's custom collectors, next to the merged files."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for collector in self.registry.custom:
            yield from collector.collect()
