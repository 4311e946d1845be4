"""The idle formula: its text, and what the emulator's evaluator makes of it.

The evaluator is the emulator's (the same code that sizes pools there), run directly
against a made-up sample history, so that every branch of the formula is tried in
milliseconds: woken, busy, idle, and a history too thin to call the pool idle.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from joblib_azurebatch.emulator.autoscale import (
    SAMPLE_DELAY,
    SAMPLE_PERIOD,
    Outcome,
    Scope,
    compile_formula,
)
from joblib_azurebatch.idle import idle_formula, parse_wake

WAKE = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
T0 = WAKE.timestamp()
MINUTE = 60.0


def history(
    until: float, pending: Callable[[float], float] = lambda t: 0.0, *, since: float = T0 - 3600
) -> list[tuple[float, dict[str, float]]]:
    """A sample every 30 s from ``since`` to ``until``, with ``pending(t)`` pending tasks."""
    out = []
    t = since
    while t <= until:
        out.append((t, {"PendingTasks": pending(t), "ActiveTasks": 0.0, "RunningTasks": 0.0}))
        t += SAMPLE_PERIOD
    return out


def evaluate(formula: str, now: float, samples: list[tuple[float, dict[str, float]]]) -> Outcome:
    outcome = compile_formula(formula).evaluate(
        Scope(now=now, history=samples, target_dedicated=2, target_low_priority=1)
    )
    assert outcome.error is None, outcome.error
    return outcome


@pytest.fixture
def formula() -> str:
    return idle_formula(dedicated=2, spot=1, idle_minutes=15, wake=WAKE)


def test_formula_text(formula: str) -> None:
    assert formula == "\n".join(
        [
            "// joblib-azurebatch: keep the nodes while woken or busy, else drain to zero.",
            '$wake = time("2025-06-01T12:00:00Z");',
            "$idle = 15 * TimeInterval_Minute;",
            "$woken = (time() - $wake) < $idle;",
            "$sampled = $PendingTasks.GetSamplePercent($idle) >= 70;",
            "$pending = max(0, $PendingTasks.GetSample($idle));",
            "$keep = $woken || !$sampled || $pending > 0;",
            "$TargetDedicatedNodes = $keep ? 2 : 0;",
            "$TargetLowPriorityNodes = $keep ? 1 : 0;",
            "$NodeDeallocationOption = taskcompletion;",
        ]
    )
    assert len(formula.encode()) < 8192


def test_wake_is_written_in_utc_whatever_the_zone() -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    text = idle_formula(
        dedicated=1, spot=0, idle_minutes=5, wake=dt.datetime(2025, 6, 1, 14, 0, 30, 999, paris)
    )
    assert '$wake = time("2025-06-01T12:00:30Z");' in text
    assert parse_wake(text) == dt.datetime(2025, 6, 1, 12, 0, 30, tzinfo=dt.timezone.utc)


def test_parse_wake_of_other_formulas_is_none() -> None:
    assert parse_wake("$TargetDedicatedNodes = 1;") is None
    assert parse_wake('$wake = time("not a date");') is None
    assert parse_wake("") is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dedicated": -1, "spot": 0, "idle_minutes": 5}, "negative"),
        ({"dedicated": 1, "spot": -2, "idle_minutes": 5}, "negative"),
        ({"dedicated": 1, "spot": 0, "idle_minutes": 0}, "idle_minutes"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, int], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        idle_formula(**kwargs, wake=WAKE)


def test_a_naive_wake_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        idle_formula(dedicated=1, spot=0, idle_minutes=5, wake=dt.datetime(2025, 6, 1, 12))


def test_full_targets_while_recently_woken(formula: str) -> None:
    # Idle for an hour before the wake, and not a task since: the wake alone keeps the nodes.
    now = T0 + 14 * MINUTE
    outcome = evaluate(formula, now, history(now))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (2, 1)
    assert outcome.deallocation == "taskcompletion"
    assert "$woken=1" in outcome.results


def test_full_targets_on_a_new_pool_without_any_sample(formula: str) -> None:
    outcome = evaluate(formula, T0 + 5, [])
    assert (outcome.target_dedicated, outcome.target_low_priority) == (2, 1)


def test_full_targets_while_tasks_are_pending(formula: str) -> None:
    # Woken long ago, but a task was pending ten minutes ago (and is visible by now).
    now = T0 + 60 * MINUTE
    busy_until = now - 10 * MINUTE
    outcome = evaluate(formula, now, history(now, lambda t: 4.0 if t <= busy_until else 0.0))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (2, 1)
    assert "$pending=4" in outcome.results
    assert "$woken=0" in outcome.results


def test_full_targets_while_a_task_runs_right_now(formula: str) -> None:
    now = T0 + 60 * MINUTE
    outcome = evaluate(formula, now, history(now, lambda t: 1.0))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (2, 1)


def test_zero_when_idle_past_the_window(formula: str) -> None:
    now = T0 + 60 * MINUTE
    busy_until = now - 16 * MINUTE  # the last pending task is just outside the window
    outcome = evaluate(formula, now, history(now, lambda t: 3.0 if t <= busy_until else 0.0))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (0, 0)
    assert "$keep=0" in outcome.results
    assert outcome.deallocation == "taskcompletion"


def test_zero_right_after_the_wake_window_of_a_new_pool(formula: str) -> None:
    # A pool created at the wake, idle ever since: its history starts at the wake.
    now = T0 + 15 * MINUTE + SAMPLE_PERIOD
    outcome = evaluate(formula, now, history(now, since=T0))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (0, 0)


def test_a_thin_history_is_not_taken_for_idleness(formula: str) -> None:
    # Woken long ago, and samples only for the last five of the fifteen minutes: too few
    # (33 %) to call the pool idle, so it keeps its nodes rather than drain on no evidence.
    now = T0 + 60 * MINUTE
    outcome = evaluate(formula, now, history(now, since=now - 5 * MINUTE))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (2, 1)
    assert "$sampled=0" in outcome.results


def test_samples_reach_the_formula_a_minute_late(formula: str) -> None:
    # A task pending only in the last minute is not seen yet: the formula drains, and the
    # run's own wake (not the samples) is what keeps a pool up when a run starts.
    now = T0 + 60 * MINUTE
    outcome = evaluate(formula, now, history(now, lambda t: 5.0 if t > now - SAMPLE_DELAY else 0.0))
    assert (outcome.target_dedicated, outcome.target_low_priority) == (0, 0)


def test_spot_only_and_dedicated_only_pools() -> None:
    now = T0 + MINUTE
    spot = evaluate(idle_formula(dedicated=0, spot=3, idle_minutes=5, wake=WAKE), now, history(now))
    assert (spot.target_dedicated, spot.target_low_priority) == (0, 3)
    dedicated = evaluate(
        idle_formula(dedicated=4, spot=0, idle_minutes=5, wake=WAKE), now, history(now)
    )
    assert (dedicated.target_dedicated, dedicated.target_low_priority) == (4, 0)
