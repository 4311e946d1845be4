"""How many joblib calls go into one Batch task.

Batch takes seconds to schedule and start a task, so one call per task would spend most of
the time in scheduling, while too many calls per task leave slots idle at the end. The
sizer learns both costs from the tasks that finished and aims between the two; the run asks
it for the size of every batch joblib dispatches.
"""

from __future__ import annotations

import math
import threading

__all__ = ["BatchSizer"]


class BatchSizer:
    """How many calls to pack into one Batch task, learned from finished tasks.

    Batch takes seconds to schedule and start a task, so one call per task would spend
    most of the time in scheduling. From each finished task the sizer learns the run time
    per call (from the result envelope) and the overhead per task (the task's time on the
    node beyond the calls, plus the service's scheduling latency), and aims at batches that
    run ``overhead_ratio`` times longer than their overhead, clamped to
    ``[min_duration, max_duration]`` seconds.

    It never takes calls away from idle slots: with the number of calls left known, a batch
    holds at most ``remaining / n_jobs`` of them, and joblib keeps ``pre_dispatch`` (two
    per slot by default) batches in flight. It grows at most ``max_growth`` times per
    decision, so one fast first call cannot put the whole input into a handful of tasks,
    and never past ``max_size`` calls (joblib holds ``size x n_jobs`` calls in memory).
    """

    def __init__(
        self,
        *,
        n_jobs: int,
        min_duration: float,
        max_duration: float,
        overhead_ratio: float = 5.0,
        max_growth: int = 8,
        max_size: int = 4096,
        smoothing: float = 0.3,
    ) -> None:
        self.n_jobs = max(1, n_jobs)
        self.max_size = max(1, max_size)
        self.min_duration = min_duration
        self.max_duration = max(max_duration, min_duration)
        self.overhead_ratio = overhead_ratio
        self.max_growth = max(2, max_growth)
        self.smoothing = smoothing
        self.size = 1
        self.per_call: float | None = None
        self.overhead: float | None = None
        self.samples = 0
        self._lock = threading.Lock()

    def record(self, *, batch_size: int, run_seconds: float, overhead_seconds: float) -> None:
        """Learn from one finished task that ran ``batch_size`` calls."""
        if batch_size <= 0:
            return
        per_call = max(run_seconds, 0.0) / batch_size
        overhead = max(overhead_seconds, 0.0)
        with self._lock:
            self.per_call = self._smooth(self.per_call, per_call)
            self.overhead = self._smooth(self.overhead, overhead)
            self.samples += 1

    def _smooth(self, old: float | None, new: float) -> float:
        """An exponential moving average, so one slow node does not swing the batch size."""
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def target_duration(self) -> float:
        overhead = self.overhead or 0.0
        return min(max(overhead * self.overhead_ratio, self.min_duration), self.max_duration)

    def initial_size(self, *, total: int | None, all_at_once: bool) -> int:
        """The size before any task finished: 1, unless joblib dispatches everything now.

        With ``pre_dispatch="all"`` no completion will ever come back to resize batches, so
        the known number of calls is spread over about four tasks per slot.
        """
        if all_at_once and total:
            return max(1, math.ceil(total / (4 * self.n_jobs)))
        return 1

    def next_size(self, *, remaining: int | None = None) -> int:
        """The size of the next batch; ``remaining`` is the number of calls not yet sent."""
        with self._lock:
            if self.samples == 0 or self.per_call is None:
                return self.size
            ideal = self.target_duration() / max(self.per_call, 1e-6)
            size = max(1, min(int(ideal), self.size * self.max_growth, self.max_size))
            if remaining is not None and remaining > 0:
                size = min(size, max(1, math.ceil(remaining / self.n_jobs)))
            self.size = size
            return size
