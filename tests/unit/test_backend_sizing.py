"""Batch sizing and n_jobs arithmetic of the backend, without any service."""

from __future__ import annotations

import pickle

import pytest
from joblib.parallel import FallbackToBackend, SequentialBackend, ThreadingBackend

from joblib_azurebatch import BatchConfig, ConfigError
from joblib_azurebatch.backend import AzureBatchBackend
from joblib_azurebatch.sizing import BatchSizer

KEY = "a2V5"  # base64 of "key": the config only checks the form


def config(**overrides: object) -> BatchConfig:
    fields: dict[str, object] = {
        "batch_url": "http://127.0.0.1:9",
        "batch_account": "acct",
        "batch_key": KEY,
        "storage_url": "http://127.0.0.1:9/devstoreaccount1",
        "storage_account": "devstoreaccount1",
        "storage_key": KEY,
    }
    fields.update(overrides)
    return BatchConfig(**fields)  # type: ignore[arg-type]


def sizer(**overrides: object) -> BatchSizer:
    fields: dict[str, object] = {"n_jobs": 4, "min_duration": 2.0, "max_duration": 60.0}
    fields.update(overrides)
    return BatchSizer(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- BatchSizer


def test_without_samples_the_size_stays_one() -> None:
    s = sizer()
    assert s.next_size(remaining=1000) == 1
    assert s.next_size() == 1


def test_pre_dispatch_all_spreads_known_calls_over_four_tasks_per_slot() -> None:
    s = sizer(n_jobs=4)
    assert s.initial_size(total=1600, all_at_once=True) == 100
    assert s.initial_size(total=3, all_at_once=True) == 1
    assert s.initial_size(total=1600, all_at_once=False) == 1
    assert s.initial_size(total=None, all_at_once=True) == 1


def test_fast_calls_grow_at_most_max_growth_per_decision() -> None:
    s = sizer(max_growth=8)
    s.record(batch_size=1, run_seconds=0.001, overhead_seconds=2.0)
    sizes = [s.next_size() for _ in range(3)]
    assert sizes == [8, 64, 512]


def test_known_remaining_calls_are_left_for_every_slot() -> None:
    s = sizer(n_jobs=4)
    s.record(batch_size=1, run_seconds=0.0001, overhead_seconds=2.0)
    for _ in range(5):
        s.next_size()
    # 90 calls left and 4 slots: no batch may take more than ceil(90 / 4).
    assert s.next_size(remaining=90) == 23
    assert s.next_size(remaining=3) == 1


def test_size_aims_at_overhead_ratio_times_the_overhead() -> None:
    s = sizer(min_duration=1.0, max_duration=100.0, overhead_ratio=5.0, max_growth=1000)
    # 0.5 s per call, 3 s overhead: batches of 15 s, so 30 calls.
    s.record(batch_size=2, run_seconds=1.0, overhead_seconds=3.0)
    assert s.target_duration() == pytest.approx(15.0)
    assert s.next_size() == 30


def test_target_duration_is_clamped() -> None:
    low = sizer(min_duration=2.0, max_duration=60.0)
    low.record(batch_size=1, run_seconds=0.1, overhead_seconds=0.01)
    assert low.target_duration() == 2.0
    high = sizer(min_duration=2.0, max_duration=60.0)
    high.record(batch_size=1, run_seconds=0.1, overhead_seconds=100.0)
    assert high.target_duration() == 60.0


def test_slow_calls_shrink_the_batch_and_never_below_one() -> None:
    s = sizer(max_growth=1000)
    s.record(batch_size=1, run_seconds=0.01, overhead_seconds=2.0)
    assert s.next_size() > 100
    for _ in range(30):
        s.record(batch_size=100, run_seconds=10_000.0, overhead_seconds=2.0)
    assert s.next_size() == 1


def test_size_never_exceeds_max_size() -> None:
    s = sizer(max_growth=1_000_000, max_size=4096)
    s.record(batch_size=1, run_seconds=1e-7, overhead_seconds=5.0)
    assert s.next_size() == 4096


# ---------------------------------------------------------------------- n_jobs


@pytest.mark.parametrize(
    ("nodes", "spot", "slots", "n_jobs", "expected"),
    [
        (2, 0, 2, -1, 4),
        (2, 0, 2, None, 4),
        (1, 3, 4, -1, 16),
        (2, 0, 4, -2, 7),
        (2, 0, 2, 3, 3),
        (2, 0, 2, 50, 50),
        (1, 0, 1, -1, 2),  # a one-slot pool still ships the work
        (2, 0, 2, -10, 2),
        (2, 0, 2, 1, 1),
    ],
)
def test_effective_n_jobs_is_the_target_capacity(nodes, spot, slots, n_jobs, expected) -> None:
    cfg = config(dedicated_nodes=nodes, spot_nodes=spot, task_slots_per_node=slots)
    assert AzureBatchBackend(config=cfg).effective_n_jobs(n_jobs) == expected


def test_effective_n_jobs_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="n_jobs == 0"):
        AzureBatchBackend(config=config()).effective_n_jobs(0)


def test_default_n_jobs_asks_for_the_whole_pool() -> None:
    assert AzureBatchBackend.default_n_jobs == -1
    assert AzureBatchBackend.supports_retrieve_callback is True
    backend = AzureBatchBackend(config=config())
    assert backend.supports_return_generator
    assert backend.supports_timeout


def test_n_jobs_one_falls_back_to_sequential_before_reading_any_config(monkeypatch) -> None:
    for name in ("BATCH_ACCOUNT_URL", "BATCH_ACCOUNT_KEY", "STORAGE_ACCOUNT_NAME"):
        monkeypatch.delenv(name, raising=False)
    backend = AzureBatchBackend()
    with pytest.raises(FallbackToBackend) as info:
        backend.configure(n_jobs=1)
    assert isinstance(info.value.backend, SequentialBackend)


def test_configure_takes_the_config_and_checks_it() -> None:
    backend = AzureBatchBackend()
    cfg = config(dedicated_nodes=3, task_slots_per_node=2)
    assert backend.configure(n_jobs=-1, config=cfg) == 6
    incomplete = BatchConfig(batch_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="storage account"):
        AzureBatchBackend().configure(n_jobs=-1, config=incomplete)


def test_config_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match="BatchConfig"):
        AzureBatchBackend(config={"pool_id": "x"})  # type: ignore[arg-type]


# ---------------------------------------------------------------------- nesting and pickling


def test_nested_backend_is_local_and_carries_no_secret() -> None:
    backend = AzureBatchBackend(config=config(), nesting_level=0)
    nested, n_jobs = backend.get_nested_backend()
    assert nested is not backend
    assert isinstance(nested, ThreadingBackend)
    assert n_jobs is None
    blob = pickle.dumps(nested)
    assert KEY.encode() not in blob
    assert b"BatchConfig" not in blob
    deeper = AzureBatchBackend(config=config(), nesting_level=1).get_nested_backend()[0]
    assert isinstance(deeper, SequentialBackend)


def test_backend_refuses_to_be_pickled() -> None:
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(AzureBatchBackend(config=config()))


# ---------------------------------------------------------------------- bundles


class _Unpicklable(Exception):
    def __init__(self, *, reason: str) -> None:  # keyword-only: does not unpickle
        super().__init__(reason)


def _ok() -> list[int]:
    return [1, 2]


def _bad() -> list[int]:
    raise KeyError("missing column")


def _worse() -> list[int]:
    raise _Unpicklable(reason="locked")


def test_bundle_runs_every_part_and_keeps_each_outcome() -> None:
    from joblib_azurebatch.bundle import Bundle
    from joblib_azurebatch.errors import RemoteError

    bundle = Bundle([_ok, _bad, _worse, _ok])
    outcomes = pickle.loads(pickle.dumps(bundle()))
    assert [ok for ok, _, _ in outcomes] == [True, False, False, True]
    assert outcomes[0][1] == [1, 2]
    assert outcomes[3][1] == [1, 2]
    assert isinstance(outcomes[1][1], KeyError)
    assert "missing column" in outcomes[1][2]
    assert "_bad" in outcomes[1][2]
    substitute = outcomes[2][1]
    assert isinstance(substitute, RemoteError)
    assert substitute.type_name.endswith("_Unpicklable")
    assert "locked" in substitute.message
    assert "_worse" in substitute.remote_traceback


def test_each_task_finished_since_the_last_decision_lets_the_size_grow_once_more() -> None:
    one = sizer(max_growth=8)
    one.record(batch_size=1, run_seconds=0.0001, overhead_seconds=2.0)
    assert one.next_size() == 8
    three = sizer(max_growth=8)
    for _ in range(3):
        three.record(batch_size=1, run_seconds=0.0001, overhead_seconds=2.0)
    assert three.next_size() == 512  # three tasks that agree: 8 x 8 x 8
    assert three.next_size() == 4096  # no new task: one more step only


def test_a_known_number_of_calls_is_spread_over_a_running_and_a_queued_task_per_slot() -> None:
    s = sizer(n_jobs=4)
    assert s.in_flight_target() == 8
    assert s.first_size(remaining=2000, in_flight=0) == 250
    # joblib's pre_dispatch cut the first four batches to 2 calls: the four queued ones
    # take the rest, so each slot still runs two tasks in all.
    assert s.first_size(remaining=1992, in_flight=4) == 498
    assert sizer(n_jobs=4, first_max=64).first_size(remaining=1992, in_flight=4) == 64


def test_batches_are_held_to_the_memory_budget_by_the_bytes_a_call_pickles_to() -> None:
    s = sizer(memory_budget=32 * 1024 * 1024)
    assert s.first_size(remaining=2_000, in_flight=0) == 250  # nothing dumped yet
    s.record_bytes(calls=250, nbytes=250 * 100_000)  # each call with its own 100 kB array
    cap = 32 * 1024 * 1024 // (s.in_flight_target() * 100_000)
    assert s.first_size(remaining=2_000, in_flight=0) == cap
    s.record(batch_size=cap, run_seconds=0.001 * cap, overhead_seconds=1.0)
    assert s.next_size(remaining=10_000) == cap
    small = sizer(memory_budget=32 * 1024 * 1024)
    small.record_bytes(calls=250, nbytes=250 * 100)  # tiny calls: the budget does not bind
    assert small.first_size(remaining=2_000, in_flight=0) == 250
