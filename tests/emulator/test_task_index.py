"""The job's task index agrees with the tasks themselves, whatever happens to them.

Counts, listings and the scheduler's queue read the index instead of every task of the job;
each test here drives tasks through the moves the executor and the handlers make (dispatch,
requeue, retry, completion with and without failure, reactivation, deletion) and compares
what the index says with what a walk over every task says.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import pytest

from joblib_azurebatch.emulator.models import Job, Task
from joblib_azurebatch.emulator.odata import compile_filter
from joblib_azurebatch.emulator.wire import format_time

BASE = "http://127.0.0.1:1"


def _job(n: int, *, slots: list[int] | None = None) -> Job:
    job = Job(id="j", state="active", spec={"poolInfo": {"poolId": "p"}})
    for i in range(n):
        spec = {"id": f"t{i}", "commandLine": "true"}
        if slots is not None:
            spec["requiredSlots"] = slots[i % len(slots)]
        job.add_task(Task(id=f"t{i}", state="active", job_id=job.id, spec=spec))
    return job


def _step(job: Job, rng: random.Random) -> None:
    """One move a real account makes, on a random task."""
    if not job.tasks:
        return
    task = rng.choice(list(job.tasks.values()))
    roll = rng.random()
    if task.state == "active":
        if roll < 0.1:
            task.failure = {"code": "TaskEnded"}  # terminated before it ran
            task.move("completed")
        else:
            task.failure = None
            task.move("running")
    elif task.state == "running":
        if roll < 0.15:
            task.move("active")  # requeued (preempted node) or retried
        else:
            task.failure = {"code": "FailureExitCode"} if roll < 0.35 else None
            task.move("completed")
    elif task.state == "completed":
        if roll < 0.1 and task.failure is not None:
            task.failure = None
            task.move("active")  # ReactivateTask
        elif roll < 0.15:
            job.remove_task(task)  # DeleteTask


def _brute_counts(job: Job) -> dict[str, int]:
    tasks = list(job.tasks.values())
    return {
        "active": sum(t.state == "active" for t in tasks),
        "running": sum(t.state in ("running", "preparing") for t in tasks),
        "completed": sum(t.state == "completed" for t in tasks),
        "failed": sum(t.state == "completed" and t.failure is not None for t in tasks),
        "completed_slots": sum(t.required_slots for t in tasks if t.state == "completed"),
        "failed_slots": sum(
            t.required_slots for t in tasks if t.state == "completed" and t.failure is not None
        ),
    }


def _index_counts(job: Job) -> dict[str, int]:
    index = job.index
    return {
        "active": index.count("active"),
        "running": index.count("running", "preparing"),
        "completed": index.count("completed"),
        "failed": index.failed,
        "completed_slots": index.slots("completed"),
        "failed_slots": index.failed_slots,
    }


def _listed(job: Job, text: str, *, use_index: bool) -> list[str]:
    found = compile_filter(text)
    if use_index:
        tasks = job.index.candidates(states=found.states, since=found.since, after=0)
    else:
        tasks = iter(job.tasks.values())
    return [t.id for t in tasks if found.predicate(t.to_wire(BASE))]


def test_counts_and_listings_follow_every_move() -> None:
    rng = random.Random(7)
    job = _job(300, slots=[1, 1, 2])
    moments: list[dt.datetime] = []
    for step in range(3000):
        _step(job, rng)
        if step % 250 == 0:
            moments.append(max(t.state_transition_time for t in job.tasks.values()))
            assert _index_counts(job) == _brute_counts(job)
    assert _index_counts(job) == _brute_counts(job)
    filters = [
        "",
        "state eq 'completed'",
        "state eq 'active'",
        "state eq 'running' or state eq 'completed'",
        "state eq 'completed' and executionInfo/result eq 'failure'",
        "not (state eq 'completed')",
    ]
    for when in moments[-4:]:
        stamp = format_time(when)
        filters += [
            f"state eq 'completed' and stateTransitionTime ge datetime'{stamp}'",
            f"stateTransitionTime gt datetime'{stamp}' and state eq 'active'",
            f"(state eq 'completed' or state eq 'running') and stateTransitionTime ge "
            f"datetime'{stamp}'",
            f"datetime'{stamp}' le stateTransitionTime",
        ]
    for text in filters:
        assert _listed(job, text, use_index=True) == _listed(job, text, use_index=False), text


def test_filters_say_what_they_imply() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    t1 = t0 + dt.timedelta(seconds=5)
    cases = {
        "state eq 'Completed'": ({"completed"}, None),
        f"state eq 'completed' and stateTransitionTime ge datetime'{format_time(t0)}'": (
            {"completed"},
            t0,
        ),
        f"stateTransitionTime gt datetime'{format_time(t0)}' and stateTransitionTime ge "
        f"datetime'{format_time(t1)}'": (None, t1),
        "state eq 'active' or state eq 'running'": ({"active", "running"}, None),
        "state eq 'active' or id eq 'x'": (None, None),
        "not (state eq 'active')": (None, None),
        f"stateTransitionTime lt datetime'{format_time(t0)}'": (None, None),
        "state ne 'active'": (None, None),
    }
    for text, (states, since) in cases.items():
        found = compile_filter(text)
        assert (set(found.states) if found.states is not None else None, found.since) == (
            states,
            since,
        ), text


def test_a_time_filtered_listing_reads_only_what_moved_since() -> None:
    job = _job(5000)
    for task in list(job.tasks.values()):
        task.move("running")
        task.move("completed")
    time.sleep(0.01)  # the index widens a time bound by 1 ms; leave a gap wider than that
    since = dt.datetime.now(dt.timezone.utc)
    later = [job.tasks[f"t{i}"] for i in (17, 4000, 2)]
    for task in later:
        task.failure = {"code": "FailureExitCode"}
        task.move("active")
        task.move("running")
        task.move("completed")
    found = compile_filter(
        f"state eq 'completed' and stateTransitionTime gt datetime'{format_time(since)}'"
    )
    picked = list(job.index.candidates(states=found.states, since=found.since, after=0))
    # The three that completed again, in submission order: not the 5,000 of the job.
    assert [t.id for t in picked] == ["t2", "t17", "t4000"]
    assert [t.id for t in job.tasks.values() if found.predicate(t.to_wire(BASE))] == [
        "t2",
        "t17",
        "t4000",
    ]


def test_the_queue_gives_the_oldest_active_tasks_first_and_only_them() -> None:
    job = _job(10)
    first = list(job.index.pop_active())
    assert [t.id for t in first] == [f"t{i}" for i in range(10)]
    job.index.put_back(first)
    for task in [job.tasks["t3"], job.tasks["t1"]]:
        task.move("running")
    job.tasks["t1"].move("active")  # requeued: back in submission order, not at the end
    order = []
    for task in job.index.pop_active():
        order.append(task.id)
        if len(order) == 4:
            break
    assert order == ["t0", "t1", "t2", "t4"]
    popped = job.index.popped
    rest = list(job.index.pop_active())
    assert [t.id for t in rest] == ["t5", "t6", "t7", "t8", "t9"]
    assert job.index.popped == popped + 5


def test_ids_are_checked_case_insensitively_and_freed_by_deletion() -> None:
    job = _job(3)
    assert job.has_task_id("T1")
    job.remove_task(job.tasks["t1"])
    assert not job.has_task_id("t1")
    assert job.index.count("active") == 2
    assert [t.id for t in job.index.candidates(states=None, since=None, after=0)] == ["t0", "t2"]


@pytest.mark.parametrize("fill", ["spread", "pack"])
def test_free_slots_pick_nodes_as_the_fill_type_says(fill: str, tmp_path: Path) -> None:
    from joblib_azurebatch.emulator.execution import _FreeSlots
    from joblib_azurebatch.emulator.models import Account, Pool

    account = Account(name="a", root=tmp_path)
    pool = Pool(
        id="p",
        state="active",
        spec={"taskSlotsPerNode": 3, "taskSchedulingPolicy": {"nodeFillType": fill}},
    )
    nodes = [account.new_node(pool, dedicated=True, state="idle") for _ in range(3)]
    nodes[1].running[("j", "x")] = 1  # one slot taken on the second node
    free = _FreeSlots(pool)
    assert free.free == 8
    picks = [free.take(1) for _ in range(8)]
    assert free.empty
    assert free.take(1) is None
    per_node = {n.id: sum(p is n for p in picks) for n in nodes}
    assert per_node == {nodes[0].id: 3, nodes[1].id: 2, nodes[2].id: 3}
    if fill == "spread":
        # The emptiest node first, lowest id among equals: never two on one node while
        # another has fewer.
        assert picks[0] is not nodes[1]
        assert picks[0].id == min(n.id for n in nodes if n is not nodes[1])
    else:
        # The fullest node that fits: the one with a slot taken is filled first.
        assert picks[:2] == [nodes[1], nodes[1]]
        assert picks[2].id == max(n.id for n in nodes if n is not nodes[1])
