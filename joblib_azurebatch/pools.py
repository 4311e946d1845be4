"""Which pools this process uses, who may delete them, and the wait for their nodes.

Every run of this process that uses a pool holds a lease on it; concurrent and nested runs
share one lease per (account, pool). The pool is deleted when the last lease is released,
only if this process created it and no run asked to keep it: a pool that existed before is
never changed or deleted, only compared with the config and warned about.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .batch import PoolInfo, PoolSpec, pool_differences

if TYPE_CHECKING:
    from .service import BatchApi

__all__ = ["POOLS", "PoolDifferenceWarning", "PoolLease", "PoolRegistry", "capacity_progress"]

_log = logging.getLogger(__name__)


class PoolDifferenceWarning(UserWarning):
    """An existing pool differs from the config; it is used as it is."""


@dataclass
class PoolLease:
    """The right of one or more runs to use a pool, and whether releasing it deletes it."""

    key: tuple[str, str]
    service: BatchApi
    pool_id: str
    created: bool
    keep: bool
    holders: int = 0


class PoolRegistry:
    """The leases of one process, so that concurrent or nested runs share one pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], PoolLease] = {}

    def acquire(
        self, service: BatchApi, spec: PoolSpec, *, account_url: str, keep: bool
    ) -> PoolLease:
        """Take a lease on the pool, creating it if it does not exist yet.

        Warns (:class:`PoolDifferenceWarning`) when an existing pool differs from ``spec``.
        """
        key = (account_url, spec.pool_id)
        with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                info, created = service.ensure_pool(spec)
                lease = PoolLease(
                    key=key, service=service, pool_id=spec.pool_id, created=created, keep=keep
                )
                self._leases[key] = lease
                if created:
                    _log.info("created the pool %s", spec.pool_id)
                else:
                    _log.info("using the existing pool %s", spec.pool_id)
                    warn_differences(info, spec)
            lease.keep = lease.keep or keep
            lease.holders += 1
            return lease

    def release(self, lease: PoolLease) -> None:
        """Give a lease back; the last holder deletes a pool this process created."""
        with self._lock:
            lease.holders -= 1
            if lease.holders > 0:
                return
            self._leases.pop(lease.key, None)
            delete = lease.created and not lease.keep
        if delete:
            _log.info("deleting the pool %s", lease.pool_id)
            lease.service.delete_pool(lease.pool_id)


#: The process's leases: every backend instance shares them.
POOLS = PoolRegistry()


def warn_differences(info: PoolInfo, spec: PoolSpec) -> None:
    diffs = pool_differences(info, spec)
    if diffs:
        warnings.warn(
            f"The existing pool {spec.pool_id} is used as it is, though it differs from the "
            f"config: {'; '.join(diffs)}. Delete it or choose another pool_id to get the "
            "configured one.",
            PoolDifferenceWarning,
            stacklevel=6,
        )


@contextmanager
def capacity_progress(pool_id: str) -> Iterator[Callable[[PoolInfo], None]]:
    """A tqdm line on stderr while the pool gets its nodes (only if there is a wait)."""
    bar: Any = None
    shown: tuple[int, str] | None = None

    def show(info: PoolInfo) -> None:
        nonlocal bar, shown
        states = ", ".join(f"{n} {s}" for s, n in sorted(info.node_states.items()))
        postfix = f"{info.allocation_state}; nodes: {states or 'none yet'}"
        if (info.ready_slots, postfix) == shown:
            return  # redraw only what changed: off a terminal every redraw is a new line
        shown = (info.ready_slots, postfix)
        if bar is None:
            if info.ready_slots > 0:
                return
            from tqdm.auto import tqdm

            bar = tqdm(
                total=max(info.target_slots, 1),
                desc=f"Azure Batch pool {pool_id}: usable slots",
                unit="slot",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        bar.n = info.ready_slots
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()
