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

__all__ = ["FaultControls", "FaultPlan", "RequestLog", "RequestRecord"]


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


class FaultControls:
    """The fault and observation calls a test makes on a local service (the Batch
    emulator, the blob proxy in front of Azurite), over its ``faults`` and ``log``.

    ``THROTTLE_STATUS`` is how the service throttles: 429 for Batch, 503 ``ServerBusy``
    for Azure Storage.
    """

    THROTTLE_STATUS = 429
    faults: FaultPlan
    log: RequestLog

    def throttle(
        self,
        operation_id: str = "*",
        *,
        times: int = 1,
        status: int | None = None,
        retry_after: float | None = 1.0,
    ) -> None:
        """Answer the next ``times`` requests of ``operation_id`` with ``status`` (by
        default the service's throttling status) and ``Retry-After``."""
        self.faults.add(
            operation_id,
            times=times,
            status=status or self.THROTTLE_STATUS,
            retry_after=retry_after,
            after_commit=False,
        )

    def throttle_share(
        self,
        share: float,
        operation_id: str = "*",
        *,
        times: int = 1000,
        status: int | None = None,
        retry_after: float | None = 1.0,
        seed: int | None = 0,
    ) -> None:
        """Answer a random ``share`` of the requests of ``operation_id`` with ``status``.

        A busy account throttles some requests of every kind, not the next few of one: this
        is how a client's retries are tried across a whole run. ``times`` bounds the faulty
        answers so that a test that forgets ``faults.clear()`` cannot throttle the rest of
        the session forever; ``seed`` makes the draw repeatable.
        """
        self.faults.add(
            operation_id,
            times=times,
            status=status or self.THROTTLE_STATUS,
            retry_after=retry_after,
            after_commit=False,
            share=share,
            seed=seed,
        )

    def fail(
        self,
        operation_id: str,
        *,
        status: int,
        code: str,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Refuse the next ``times`` requests of ``operation_id`` with ``status`` and the
        service's error ``code``, changing nothing: a reached quota (409
        ``ActiveJobAndScheduleQuotaReached`` on ``Jobs_CreateJob``), an outage (500
        ``InternalError``), any refusal the service can give."""
        self.faults.add(
            operation_id,
            times=times,
            status=status,
            retry_after=retry_after,
            after_commit=False,
            code=code,
        )

    @property
    def counters(self) -> Counter[str]:
        """Requests per operation (``counters["Tasks_CreateTaskCollection"]``), refused
        ones included."""
        return self.log.counters

    def requests(self, operation_id: str | None = None) -> list[RequestRecord]:
        """The request log, optionally for one operation."""
        return self.log.records(operation_id)
