"""The client's memory over many calls that each bring their own array, in a fresh process.

``bench.run`` starts ``python -m bench.rss`` once per backend and writes a JSON spec to its
stdin: ``{"peer": "azurebatch" | "dask" | "loky", "calls": 2000, "kilobytes": 100}``, plus
for azurebatch the account and pool to run on (``AzureBatchPeer.child_spec``). A fresh
process, so that the figure is this workload's alone: the parent's earlier rows (a 52 MB
array, a forest, a DataFrame) have grown its heap in ways no later call gives back.

The child warms its backend with a few tiny calls, notes its RSS, runs ``calls`` calls of
``checksum(own_array(i))`` (each array made only when joblib dispatches its call), sampling
its RSS every 20 ms, and prints one JSON line: the baseline, the peak and the end RSS in MB
and the wall time. The RSS is this process's only; with dask it includes the scheduler,
which ``LocalCluster`` runs in the client's process.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from typing import Any

import cloudpickle
import joblib
import psutil

from bench import peers, work


class PeakRss:
    """Samples this process's RSS in a thread until stopped; keeps the highest."""

    def __init__(self, interval: float = 0.02) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure(peer: peers.Peer, *, calls: int, kilobytes: int) -> dict[str, float]:
    """Run the workload on a warm ``peer``; the RSS figures in MB and the wall time."""
    peers.warm_up(peer)
    gc.collect()
    process = psutil.Process()
    baseline = process.memory_info().rss
    started = time.perf_counter()
    with PeakRss() as rss:
        out = peer.run(
            joblib.delayed(work.checksum)(work.own_array(i, kilobytes)) for i in range(calls)
        )
    wall = time.perf_counter() - started
    expected = [float(work.own_array(i, kilobytes)[0]) for i in range(calls)]
    if out != expected:
        raise SystemExit(f"{peer.name}: wrong results")
    gc.collect()
    return {
        "baseline_mb": baseline / 1e6,
        "peak_mb": rss.peak / 1e6,
        "end_mb": process.memory_info().rss / 1e6,
        "wall_s": wall,
    }


def _peer(spec: dict[str, Any]) -> peers.Peer:
    if spec["peer"] == "azurebatch":
        return peers.AzureBatchPeer.from_child_spec(spec["azurebatch"])
    return peers.start(spec["peer"])


def main() -> int:
    spec = json.loads(sys.stdin.read())
    cloudpickle.register_pickle_by_value(work)
    with _peer(spec) as peer:
        figures = measure(peer, calls=int(spec["calls"]), kilobytes=int(spec["kilobytes"]))
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
