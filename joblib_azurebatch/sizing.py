"""How many joblib calls go into one Batch task.

Batch takes seconds to schedule and start a task, so one call per task would spend most of
the time in scheduling, while too many calls per task leave slots idle at the end. The
sizer learns both costs from the tasks that finished and aims between the two; the run asks
it for the size of every batch joblib dispatches.

Before any task finished, the sizer knows only the number of calls (when joblib knows it)
and the number of slots. The run keeps every slot busy with one running and one queued task
(:meth:`BatchSizer.in_flight_target`), so the first wave spreads the known calls over those
two tasks per slot (:meth:`BatchSizer.first_size`): each task starts as soon as a slot
frees, and each slot pays the per-task overhead about twice. Without a known number of
calls (a generator), the first wave is one call per task: a quick probe whose results
teach the sizer the time per call before larger batches go out.
"""

from __future__ import annotations

import math
import threading

__all__ = ["MEMORY_BUDGET", "BatchSizer"]

#: Bytes of pickled calls the batches in flight may hold in the client (see `BatchSizer`).
MEMORY_BUDGET = 32 * 1024 * 1024


class BatchSizer:
    """How many calls to pack into one Batch task, learned from finished tasks.

    Batch takes seconds to schedule and start a task, so one call per task would spend
    most of the time in scheduling. From each finished task the sizer learns the run time
    per call (from the result envelope) and the overhead per task (the task's time on the
    node beyond the calls, plus the service's scheduling latency), and aims at batches that
    run ``overhead_ratio`` times longer than their overhead, clamped to
    ``[min_duration, max_duration]`` seconds.

    It never takes calls away from idle slots: with the number of calls left known, a batch
    holds at most ``remaining / n_jobs`` of them, and the run keeps
    :meth:`in_flight_target` batches in flight. It grows at most ``max_growth`` times per
    decision and per task finished since the last one, so one fast first call cannot put
    the whole input into a handful of tasks while several that agree may, and never past
    ``max_size`` calls (joblib holds ``size x n_jobs`` calls in memory).
    Before any task finished, a known number of calls is spread over the slots
    (:meth:`first_size`), at most ``first_max`` calls per task: with no timing yet, that
    bounds how long a first task of slow calls can run before the sizer learns.

    Every size is also held to ``memory_budget``: the calls joblib holds for the batches in
    flight, and their pickles until stored, are the client's memory, so with each call
    pickling to ``b`` bytes (learned from the tasks dumped, :meth:`record_bytes`) a batch
    holds at most ``memory_budget / (in_flight_target x b)`` calls. 2,000 calls each with
    its own 100 kB array go as tasks of 40, not of 250 (which held 200 MB at once).
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
        first_max: int = 512,
        queued_per_slot: int = 1,
        smoothing: float = 0.3,
        memory_budget: int = MEMORY_BUDGET,
    ) -> None:
        self.n_jobs = max(1, n_jobs)
        self.max_size = max(1, max_size)
        self.first_max = max(1, min(first_max, self.max_size))
        self.queued_per_slot = max(0, queued_per_slot)
        self.min_duration = min_duration
        self.max_duration = max(max_duration, min_duration)
        self.overhead_ratio = overhead_ratio
        self.max_growth = max(2, max_growth)
        self.smoothing = smoothing
        self.size = 1
        self.per_call: float | None = None
        self.overhead: float | None = None
        self.samples = 0
        self.memory_budget = max(1, memory_budget)
        self._dumped_calls = 0
        self._dumped_bytes = 0
        #: Tasks learned from since the last decision: each lets the size grow once more.
        self._unused = 0
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
            self._unused += 1

    def record_bytes(self, *, calls: int, nbytes: int) -> None:
        """Learn from one dumped task: ``calls`` calls pickled to ``nbytes`` bytes (their
        own, not the shared objects already stored)."""
        if calls <= 0:
            return
        with self._lock:
            self._dumped_calls += calls
            self._dumped_bytes += max(nbytes, 0)

    @property
    def bytes_per_call(self) -> float | None:
        """Pickled bytes per call over the tasks dumped so far (a shared object counts once,
        so its share fades as calls go out); None: nothing dumped yet."""
        return self._dumped_bytes / self._dumped_calls if self._dumped_calls else None

    def _memory_cap(self) -> int:
        """The most calls per batch that keep the batches in flight within the budget."""
        per_call = self.bytes_per_call
        if not per_call:
            return self.max_size
        return max(1, int(self.memory_budget / (self.in_flight_target() * per_call)))

    def _smooth(self, old: float | None, new: float) -> float:
        """An exponential moving average, so one slow node does not swing the batch size."""
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def target_duration(self) -> float:
        overhead = self.overhead or 0.0
        return min(max(overhead * self.overhead_ratio, self.min_duration), self.max_duration)

    def in_flight_target(self) -> int:
        """Batches to keep sent and unfinished: one running per slot plus
        ``queued_per_slot`` waiting behind it, so a slot that frees starts its next task at
        once instead of idling while the client notices, sends and Batch schedules one."""
        return self.n_jobs * (1 + self.queued_per_slot)

    def first_size(self, *, remaining: int, in_flight: int) -> int:
        """The size of a batch before any task finished, with ``remaining`` calls not yet
        taken from joblib's input and ``in_flight`` batches already sent.

        The calls left are spread over the free places of :meth:`in_flight_target` (at
        least one per slot, since joblib cuts ``size x n_jobs`` calls into ``n_jobs``
        batches): 40 calls on 4 slots become 8 tasks of 5, two per slot. joblib's own
        ``pre_dispatch`` may cut the very first batches smaller; the ones sent after them
        take what is left. At most ``first_max`` calls, and the size is remembered as the
        base that learned sizes grow from.
        """
        free = max(self.in_flight_target() - max(in_flight, 0), self.n_jobs)
        size = max(1, min(math.ceil(max(remaining, 0) / free), self.first_max))
        with self._lock:
            size = min(size, self._memory_cap())
            self.size = max(self.size, size)
        return size

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
            growth = int(self.max_growth ** min(max(self._unused, 1), 4))
            self._unused = 0
            size = max(1, min(int(ideal), self.size * growth, self.max_size, self._memory_cap()))
            if remaining is not None and remaining > 0:
                size = min(size, max(1, math.ceil(remaining / self.n_jobs)))
            self.size = size
            return size
