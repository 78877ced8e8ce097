"""CPU time and memory of a process tree, read from ``/proc`` (Linux; no psutil).

``llmproxy serve --workers N`` forks N workers from a parent that only waits,
so a :class:`ProcessTree` is the root plus its direct children: CPU time is
summed over all of them, memory over the processes that serve (the workers,
or the root itself when it has no children).

CPU times come from ``/proc/PID/stat`` (``utime + stime``, in clock ticks,
usually 10 ms), RSS and its peak from ``VmRSS`` / ``VmHWM`` in
``/proc/PID/status``, the proportional set size (shared pages split between the
processes that share them) from ``/proc/PID/smaps_rollup``. Two noise gauges help judge a shared or virtual
machine: involuntary context switches of the server (something else ran on
its CPU) and the hypervisor's steal time per CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["ProcessTree", "children_of", "cpu_seconds", "status_int", "status_kib", "steal_seconds"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the ``(comm)`` field (so index 0 is ``state``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode("latin-1")
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM`` ...); 0 if absent."""
    prefix = key + ":"
    with open(f"/proc/{pid}/status", encoding="latin-1") as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[1])
    return 0


def status_int(pid: int, key: str) -> int:
    """A plain counter of ``/proc/PID/status`` (``nonvoluntary_ctxt_switches`` ...); 0 if absent."""
    return status_kib(pid, key)


def steal_seconds() -> dict[int, float]:
    """CPU time the hypervisor took from each CPU since boot (``steal`` in ``/proc/stat``)."""
    out: dict[int, float] = {}
    with open("/proc/stat", encoding="latin-1") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and len(fields) >= 8:
                out[int(name[3:])] = int(fields[7]) / _CLK_TCK
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (by scanning ``/proc/*/stat``)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(_stat_fields(int(name))[1]) == pid:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def _rollup_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/smaps_rollup`` (``Pss``, ``Private_Dirty`` ...); 0 if absent or gone."""
    prefix = key + ":"
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="latin-1") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class ProcessTree:
    """A server process and its workers; call :meth:`discover` once it is serving."""

    root: int
    workers: list[int] = field(default_factory=list)

    def discover(self) -> None:
        """Find the worker processes (none when the root serves by itself)."""
        self.workers = children_of(self.root)

    @property
    def serving(self) -> list[int]:
        return self.workers or [self.root]

    def alive(self) -> list[int]:
        """The serving processes that still exist (a crashed worker drops out)."""
        return [pid for pid in self.serving if os.path.exists(f"/proc/{pid}")]

    def cpu_seconds(self) -> float:
        """CPU time of the root and its workers (processes that exited count as 0)."""
        total = 0.0
        for pid in [self.root, *self.workers]:
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return total

    def rss_bytes(self) -> int:
        """Current resident memory summed over the serving processes."""
        return sum(self._kib(pid, "VmRSS") for pid in self.serving) * 1024

    def peak_rss_bytes(self) -> int:
        """Peak resident memory (``VmHWM``) summed over the serving processes."""
        return sum(self._kib(pid, "VmHWM") for pid in self.serving) * 1024

    def pss_bytes(self) -> int:
        """Proportional set size summed over the root and its workers: what the instance costs the
        machine, every page shared by several of them (forked copy-on-write, libraries) split
        between them, so counted once in the sum (``Pss`` of ``/proc/PID/smaps_rollup``)."""
        return sum(_rollup_kib(pid, "Pss") for pid in dict.fromkeys([self.root, *self.workers])) * 1024

    def involuntary_switches(self) -> int:
        """Times the serving processes were preempted: other work wanted their CPU."""
        return sum(self._kib(pid, "nonvoluntary_ctxt_switches") for pid in self.serving)

    @staticmethod
    def _kib(pid: int, key: str) -> int:
        try:
            return status_kib(pid, key)
        except OSError:
            return 0
