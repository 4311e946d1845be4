"""Fault plans and observation: what tests inject, and what they count afterwards.

A test says what should go wrong (``throttle("Tasks_CreateTaskCollection", times=2)``,
``throttle_share(0.2)`` for a random fifth of every request, or ``fail("Jobs_CreateJob",
status=409, code="ActiveJobAndScheduleQuotaReached")`` for any refusal) and later reads what
the client did (``counters["Tasks_CreateTaskCollection"]``, ``log``). Both are keyed by the
specification's operationId, the one name every test, benchmark and log line shares (the
blob proxy, :mod:`.blobproxy`, names blob requests after the Blob service's operations).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["FaultPlan", "RequestLog", "RequestRecord"]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the emulator saw it and answered it."""

    time: float
    method: str
    path: str
    operation_id: str
    status: int
    client_request_id: str | None
    fault: str | None = None
    #: The scheme of the Authorization header (``SharedKey``, ``Bearer``), None without one.
    auth: str | None = None


@dataclass
class _Rule:
    operation_id: str
    remaining: int
    status: int
    retry_after: float | None
    after_commit: bool
    #: The chance that a matching request is answered by this rule; 1.0 takes every one.
    share: float = 1.0
    #: Draws the requests a share rule answers, seeded so that a test can replay a run.
    rng: random.Random | None = None
    #: The service's error code to answer with; None: the usual one for ``status``.
    code: str | None = None


@dataclass
class FaultPlan:
    """Pending faults, consumed one request at a time."""

    _rules: list[_Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        operation_id: str,
        *,
        times: int,
        status: int,
        retry_after: float | None,
        after_commit: bool,
        share: float = 1.0,
        seed: int | None = None,
        code: str | None = None,
    ) -> None:
        """Queue ``times`` faulty answers for ``operation_id``.

        With ``share`` below 1 each matching request is answered by the fault with that
        chance (drawn from ``seed``), until ``times`` such answers have been given. ``code``
        is the error code the answer carries (None: the usual one for ``status``).
        """
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], not {share}")
        rng = random.Random(seed) if share < 1.0 else None
        with self._lock:
            self._rules.append(
                _Rule(operation_id, times, status, retry_after, after_commit, share, rng, code)
            )

    def take(self, operation_id: str, *, after_commit: bool) -> _Rule | None:
        """The rule that applies to this request now, if any (and count it used)."""
        with self._lock:
            for rule in self._rules:
                if (
                    rule.remaining > 0
                    and rule.after_commit == after_commit
                    and rule.operation_id in (operation_id, "*")
                    and (rule.rng is None or rule.rng.random() < rule.share)
                ):
                    rule.remaining -= 1
                    return rule
            self._rules = [r for r in self._rules if r.remaining > 0]
            return None

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._rules.clear()


class RequestLog:
    """Every request with its answer, and per-operation counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self.counters: Counter[str] = Counter()

    def record(
        self,
        *,
        method: str,
        path: str,
        operation_id: str,
        status: int,
        client_request_id: str | None,
        fault: str | None,
        auth: str | None = None,
    ) -> None:
        """Append one request."""
        rec = RequestRecord(
            time.time(), method, path, operation_id, status, client_request_id, fault, auth
        )
        with self._lock:
            self._records.append(rec)
            self.counters[operation_id] += 1

    def records(self, operation_id: str | None = None) -> list[RequestRecord]:
        """A copy of the log, optionally for one operation."""
        with self._lock:
            return [r for r in self._records if operation_id in (None, r.operation_id)]

    def clear(self) -> None:
        """Forget the log and the counters (between test phases)."""
        with self._lock:
            self._records.clear()
            self.counters.clear()
