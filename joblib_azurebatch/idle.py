"""The autoscale formula that makes a pool the library created stop billing when left idle.

A pool that nobody deletes keeps its nodes, and its bill, forever: a client that dies, or a
notebook left open overnight, must not cost a night of VMs. So a pool the library creates
(unless ``keep_pool=True``) sizes itself with the formula :func:`idle_formula` writes, which
Azure Batch evaluates every few minutes on its own:

* while the pool was **woken** less than ``idle_minutes`` ago, it keeps the configured
  dedicated and spot nodes. A run wakes a pool by enabling autoscale again with a fresh wake
  time (the service evaluates the formula at once when it is enabled), so a drained pool grows
  back without waiting for the next evaluation;
* while any task of the pool's jobs was **pending** (waiting or running) in the last
  ``idle_minutes``, it keeps them too, so a long run is never drained under its tasks;
* otherwise both targets drop to 0. ``$NodeDeallocationOption = taskcompletion`` lets a task
  that still runs finish before its node goes.

The formula uses only what Microsoft's page on autoscale formulas documents
(https://learn.microsoft.com/azure/batch/batch-automatic-scaling): ``time()`` and
``time("<W3C-DTF>")``, timestamp minus timestamp giving a time interval compared with
another, ``TimeInterval_Minute``, ``$PendingTasks`` (active plus running tasks) read through
``GetSample`` and ``GetSamplePercent``, ``max`` over a list of doubles and vectors, ``!``,
``||``, ``?:``. Samples are taken every 30 seconds and reach the formula about a minute late,
and some may be missing: following the page's advice, ``GetSamplePercent`` checks how much of
the window is covered first, and a window with less than 70 % of its samples does not count
as idle (the pool keeps its nodes until the history says otherwise) instead of failing the
evaluation, which would leave the pool as it is with an error. ``GetSample`` over the window,
without a required percentage, never fails, and ``max(0, ...)`` of it is never empty.
"""

from __future__ import annotations

import datetime as _dt
import re

__all__ = ["SAMPLE_PERCENT", "idle_formula", "parse_wake"]

#: Share of the window's samples (in percent) under which the history is too thin to call
#: the pool idle; the value of Microsoft's own examples.
SAMPLE_PERCENT = 70

_WAKE = re.compile(r'\$wake\s*=\s*time\(\s*"([^"]+)"\s*\)')


def idle_formula(*, dedicated: int, spot: int, idle_minutes: int, wake: _dt.datetime) -> str:
    """The autoscale formula of a pool that drains to zero nodes after ``idle_minutes`` idle.

    ``dedicated`` and ``spot`` are the node counts the pool keeps while it is in use;
    ``wake`` (timezone-aware) is when a run last needed it, written into the formula in
    UTC. Raises ``ValueError`` for negative counts, an ``idle_minutes`` under 1 or a naive
    ``wake`` (a local time would shift the window by the machine's UTC offset).
    """
    if dedicated < 0 or spot < 0:
        raise ValueError(f"node counts cannot be negative (dedicated={dedicated}, spot={spot})")
    if idle_minutes < 1:
        raise ValueError(f"idle_minutes must be at least 1, not {idle_minutes}")
    if wake.tzinfo is None or wake.utcoffset() is None:
        raise ValueError("wake must be timezone-aware, e.g. datetime.now(timezone.utc)")
    stamp = wake.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "\n".join(
        [
            "// joblib-azurebatch: keep the nodes while woken or busy, else drain to zero.",
            f'$wake = time("{stamp}");',
            f"$idle = {int(idle_minutes)} * TimeInterval_Minute;",
            "$woken = (time() - $wake) < $idle;",
            f"$sampled = $PendingTasks.GetSamplePercent($idle) >= {SAMPLE_PERCENT};",
            "$pending = max(0, $PendingTasks.GetSample($idle));",
            "$keep = $woken || !$sampled || $pending > 0;",
            f"$TargetDedicatedNodes = $keep ? {int(dedicated)} : 0;",
            f"$TargetLowPriorityNodes = $keep ? {int(spot)} : 0;",
            "$NodeDeallocationOption = taskcompletion;",
        ]
    )


def parse_wake(formula: str) -> _dt.datetime | None:
    """The wake time an :func:`idle_formula` holds (UTC), or None for any other formula.

    For whoever reads a pool back (cleanup, the pools listing, tests): when was it last
    needed, and so roughly when it will drain.
    """
    found = _WAKE.search(formula or "")
    if found is None:
        return None
    text = found.group(1).strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc)
