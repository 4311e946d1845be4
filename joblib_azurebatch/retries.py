"""How requests to Azure are retried: for a time budget, waiting as the service asks.

A throttled or briefly unavailable service should cost a run time, not the run. So every
request to Batch and to Blob Storage is retried until a *time budget* is spent
(``BatchConfig.retry_budget``, ten minutes by default), not for a number of attempts: eight
quick attempts give up during a five-minute outage, while a service that asks for
``Retry-After: 30`` every time is given exactly as many attempts as the budget holds.

Between two attempts the wait is the one the service asked for (``Retry-After`` in seconds
or as an HTTP date, else ``retry-after-ms``), up to :data:`RETRY_AFTER_MAX`: a longer one is
waited out in steps of that, each followed by an attempt. Without it, the wait doubles from
:data:`BACKOFF_FIRST` up to :data:`BACKOFF_MAX`, with the lower half random, so that
clients throttled at the same moment do not all come back at the same moment. A wait that
would end past the budget is not started: the last answer is the one the caller gets, with
its status and error code.

This module only decides; it imports no Azure SDK. ``batch.py`` and ``storage.py`` put
these decisions into their SDK's own retry policy (azure-core's ``RetryPolicy``,
azure-storage-blob's ``ExponentialRetry``), whose loops send the attempts, and
``BatchService`` uses them where it retries by itself (adding tasks, a reached quota).

A worker on a node has no config: its blob requests get :data:`WORKER_RETRY_BUDGET`, or
the seconds in ``JOBLIB_AZUREBATCH_RETRY_BUDGET`` when the node's environment sets it
(a task that gives up exits non-zero, and Batch retries the task).
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "DEFAULT_RETRY_BUDGET",
    "RETRY_AFTER_MAX",
    "RETRY_BUDGET_ENV",
    "RETRY_STATUSES",
    "WARN_AFTER",
    "WORKER_RETRY_BUDGET",
    "Attempts",
    "RetryBudget",
    "backoff",
    "retry_after",
    "worker_retry_budget",
]

_log = logging.getLogger(__name__)

#: Answers worth another attempt: timeout, throttled, and the transient server errors.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: The longest wait a ``Retry-After`` is honoured for in one go.
RETRY_AFTER_MAX = 60.0
#: Without ``Retry-After``, the wait before the first resend; it doubles each time.
BACKOFF_FIRST = 0.25
#: The longest wait between two attempts without ``Retry-After``.
BACKOFF_MAX = 30.0
#: Seconds of retries a client request gets by default (``BatchConfig.retry_budget``).
DEFAULT_RETRY_BUDGET = 600.0
#: Seconds of retries a worker's blob request gets on a node.
WORKER_RETRY_BUDGET = 300.0
#: A request still being retried after this many seconds says so once, as a warning: a
#: mistyped endpoint or a long outage should not look like a hang for the whole budget.
WARN_AFTER = 30.0
#: The variable a node's environment may set to change :data:`WORKER_RETRY_BUDGET`
#: (the same name ``BatchConfig.from_env`` reads ``retry_budget`` from).
RETRY_BUDGET_ENV = "JOBLIB_AZUREBATCH_RETRY_BUDGET"


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds an answer asks to wait, or None if it does not say.

    ``Retry-After`` as seconds or as an HTTP date; else ``retry-after-ms`` or
    ``x-ms-retry-after-ms`` (which azure-core reads too), for waits under a second.
    """
    if not headers:
        return None
    found = {str(k).lower(): str(v).strip() for k, v in headers.items()}
    text = found.get("retry-after", "")
    if not text:
        millis = found.get("retry-after-ms") or found.get("x-ms-retry-after-ms")
        try:
            return max(float(millis), 0.0) / 1000 if millis else None
        except ValueError:
            return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.timezone.utc)
        seconds = (moment - _dt.datetime.now(_dt.timezone.utc)).total_seconds()
    return max(seconds, 0.0)


def backoff(
    retry: int,
    *,
    first: float = BACKOFF_FIRST,
    ceiling: float = BACKOFF_MAX,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """The wait before the ``retry``-th resend (from 1) when the answer gave no
    ``Retry-After``: doubling from ``first`` up to ``ceiling``, of which the lower half is
    random (``uniform(low, high)``)."""
    top = min(first * 2 ** (max(retry, 1) - 1), ceiling)
    return uniform(top / 2, top)


def worker_retry_budget(environ: Mapping[str, str] | None = None) -> float:
    """The retry budget of a worker's blob requests: ``JOBLIB_AZUREBATCH_RETRY_BUDGET``
    when it holds a positive number of seconds, else :data:`WORKER_RETRY_BUDGET`."""
    env = os.environ if environ is None else environ
    try:
        seconds = float(env.get(RETRY_BUDGET_ENV, ""))
    except ValueError:
        return WORKER_RETRY_BUDGET
    return seconds if seconds > 0 else WORKER_RETRY_BUDGET


@dataclass(frozen=True, kw_only=True)
class RetryBudget:
    """How the attempts of one request are spaced, and for how long they go on."""

    #: Seconds from the first attempt after which no further wait is started.
    seconds: float = DEFAULT_RETRY_BUDGET
    retry_after_max: float = RETRY_AFTER_MAX
    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    #: Seconds of retries after which one warning says that the request is still failing
    #: (None: never, for a caller that logs its own waits).
    warn_after: float | None = WARN_AFTER
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"a retry budget must be positive, not {self.seconds!r}")

    def start(self) -> Attempts:
        """The attempts of one request, starting now."""
        return Attempts(self)


class Attempts:
    """The attempts of one request: how long to wait before the next, and when to stop."""

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self.started = budget.clock()
        #: Resends asked for so far (the first attempt is not one).
        self.retries = 0
        self._warned = False

    @property
    def spent(self) -> float:
        """Seconds since the first attempt."""
        return self.budget.clock() - self.started

    def next_wait(self, asked: float | None, *, reason: str = "") -> float | None:
        """The wait before the next attempt, or None when it would end past the budget.

        ``asked`` is the answer's ``Retry-After`` in seconds (None without one; a zero asks
        for nothing and gets the back-off). ``reason`` (what the last attempt met) goes into
        the log lines.
        """
        self.retries += 1
        if asked:
            wait = min(asked, self.budget.retry_after_max)
        else:
            wait = backoff(
                self.retries, first=self.budget.backoff_first, ceiling=self.budget.backoff_max
            )
        spent = self.spent
        if spent + wait > self.budget.seconds:
            _log.warning(
                "giving up after %d attempts in %.0f s (the retry budget is %g s): %s",
                self.retries,
                spent,
                self.budget.seconds,
                reason or "no answer",
            )
            return None
        warn_after = self.budget.warn_after
        if warn_after is not None and spent >= warn_after and not self._warned:
            self._warned = True
            _log.warning(
                "still retrying after %d attempts in %.0f s (the retry budget is %g s): %s",
                self.retries,
                spent,
                self.budget.seconds,
                reason or "no answer",
            )
        _log.debug(
            "attempt %d: %s; retrying in %.2f s%s",
            self.retries,
            reason or "no answer",
            wait,
            " as asked" if asked else "",
        )
        return wait
