"""Memory probes shared by the benchmarks: RSS readings from /proc and a thread that keeps their peak.

    from memory import PeakSampler, anon_rss_bytes, tree_rss_bytes
    with PeakSampler(anon_rss_bytes, interval_s=0.005) as sampler:
        ...  # the work to measure
    sampler.peak  # bytes; also sampler.first, sampler.last, sampler.count

Used by bench_gaussian.py (RssAnon of its own worker process), compare_anomalib.py (RSS of a
child's process tree) and bench_serve_load.py (RSS of the server's process tree). The kernel keeps
a peak only of a process's own RSS (`ru_maxrss`), not of RssAnon or of a process tree, hence the
sampling. MB means MiB.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Callable

MB = 2**20


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def anon_rss_bytes() -> int | None:
    """Current private anonymous resident memory of this process (RssAnon), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tree_rss_bytes(pid: int) -> int:
    """Current RSS of `pid` and all its descendants, from /proc (0 once it has gone)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):  # absent for a zombie: it counts 0
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakSampler:
    """Calls `read()` on entry, every `interval_s` in a background thread, and on exit.

    Keeps the first, last and largest reading and their number (a reading of None is skipped), not
    the readings themselves, so that sampling often for long does not add to the memory it measures.
    """

    def __init__(self, read: Callable[[], int | None], interval_s: float):
        self.read, self.interval_s = read, interval_s
        self.first: int | None = None
        self.last: int | None = None
        self.peak: int | None = None
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        value = self.read()
        if value is None:
            return
        if self.first is None:
            self.first = value
        self.last, self.count = value, self.count + 1
        if self.peak is None or value > self.peak:
            self.peak = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
