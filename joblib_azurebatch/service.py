"""What a run, its submitter and its tracker need from Azure Batch, as a ``Protocol``.

:class:`~joblib_azurebatch.batch.BatchService` is the real implementation (the only module
that imports ``azure.batch``). Keeping the needs as a protocol lets the unit tests drive
the tracker, the submitter and the run against an in-memory fake with a clock of their own,
in milliseconds, while the end-to-end tests run the real SDK against the emulator.

The types in the signatures are the project's own frozen dataclasses, never SDK types.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .batch import JobInfo, PoolInfo, PoolSpec, TaskCounts, TaskOutcome, TaskSpec

__all__ = ["BatchApi", "Clock"]


class BatchApi(Protocol):
    """The Batch operations the client side of a run uses."""

    def get_pool(self, pool_id: str) -> PoolInfo | None: ...

    def ensure_pool(self, spec: PoolSpec, *, timeout: float = ...) -> tuple[PoolInfo, bool]: ...

    def wait_for_capacity(
        self,
        pool_id: str,
        *,
        min_slots: int,
        timeout: float,
        progress: Callable[[PoolInfo], None],
    ) -> PoolInfo: ...

    def delete_pool(self, pool_id: str) -> None: ...

    def enable_autoscale(self, pool_id: str, formula: str) -> None: ...

    def pool_status(self, pool_id: str) -> PoolInfo | None: ...

    def list_pools(self) -> list[PoolInfo]: ...

    def list_jobs(self, *, pool_id: str | None = None) -> list[JobInfo]: ...

    def get_job(self, job_id: str) -> JobInfo | None: ...

    def set_job_metadata(self, job_id: str, metadata: Mapping[str, str]) -> None: ...

    def create_job(
        self, job_id: str, pool_id: str, *, metadata: Mapping[str, str] | None = None
    ) -> None: ...

    def terminate_job(self, job_id: str, reason: str, *, wait: float = ...) -> None: ...

    def delete_job(self, job_id: str) -> None: ...

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> None: ...

    def task_counts(self, job_id: str) -> TaskCounts: ...

    def completed_tasks(
        self, job_id: str, *, since: _dt.datetime | None = None
    ) -> list[TaskOutcome]: ...

    def read_task_file(
        self, job_id: str, task_id: str, path: str, *, tail_bytes: int = ...
    ) -> str: ...


class Clock(Protocol):
    """Monotonic time and sleeping, injectable so that tests fast-forward instead of wait."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...
