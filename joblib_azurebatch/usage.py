"""What one run used, said in one line when it ends.

Batch bills for the nodes' VM time, dedicated and spot at different prices, whether or not
they run a task. A user who sees only results cannot tell what a run cost, or that spot
preemptions and retries made it run longer. So each run counts its tasks, the retries Batch
made (``retryCount``: the task failed outside the user's code and ran again) and the
requeues (``requeueCount``: its node was preempted or lost, and it went back to the queue),
and notes the pool's nodes when its capacity arrived. At the end it logs one INFO record
and, where a person watches the progress line, prints the same line:

    joblib-azurebatch: job J on pool P: 40 tasks (2 retried, 1 requeued), 2 dedicated + 0
    spot nodes for 1m23s = 0.05 dedicated + 0.00 spot node-hours while it ran

The node-hours are the nodes the pool had times the run's wall time: what the run kept
busy or waiting, not a bill (a pool shared with other runs, or kept between runs, bills
for its nodes whoever uses them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["Usage"]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Usage:
    """The counts of one run (thread-safe: tasks finish on the tracker's threads)."""

    started: float = field(default_factory=time.monotonic)
    tasks: int = 0
    retried: int = 0
    requeued: int = 0
    dedicated_nodes: int = 0
    spot_nodes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def nodes(self, *, dedicated: int, spot: int) -> None:
        """The pool's nodes once it had capacity."""
        with self._lock:
            self.dedicated_nodes, self.spot_nodes = dedicated, spot

    def task(self, *, retries: int, requeues: int) -> None:
        with self._lock:
            self.tasks += 1
            self.retried += int(retries > 0)
            self.requeued += int(requeues > 0)

    def line(self, *, job_id: str, pool_id: str, ended: float | None = None) -> str:
        wall = max(0.0, (ended if ended is not None else time.monotonic()) - self.started)
        hours = wall / 3600
        return (
            f"joblib-azurebatch: job {job_id} on pool {pool_id}: {self.tasks} "
            f"task{'' if self.tasks == 1 else 's'} "
            f"({self.retried} retried, {self.requeued} requeued), {self.dedicated_nodes} "
            f"dedicated + {self.spot_nodes} spot nodes for {_duration(wall)} = "
            f"{self.dedicated_nodes * hours:.2f} dedicated + {self.spot_nodes * hours:.2f} "
            "spot node-hours while it ran"
        )
