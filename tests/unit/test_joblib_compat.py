"""The one place that reads joblib's private attributes: probed once, safe when missing."""

from __future__ import annotations

import threading
import warnings

import joblib
import pytest
from joblib import Parallel, delayed
from joblib.parallel import ThreadingBackend

from joblib_azurebatch import _joblib_compat as compat


class Bare:
    """A Parallel-like object from a future joblib that renamed every private attribute."""


class Complete:
    """A Parallel-like object with everything the backend reads, set by hand."""

    def __init__(self) -> None:
        self._running = True
        self._aborting = False
        self._call_id = "c1"
        self._cached_effective_n_jobs = 6
        self.n_tasks = 40
        self.n_dispatched_tasks = 10
        self._pre_dispatch_amount = 0
        self._ready_batches = type("Q", (), {"queue": [1, 2]})()
        self._lock = threading.RLock()
        self.dispatched = 0

    def dispatch_next(self) -> None:
        self.dispatched += 1


def _probe_twice(parallel):
    """Probe as the backend does: at configure, then at the call's first batch."""
    return compat.probe(parallel, compat.probe(parallel), late=True)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # Each test sees the once-per-process warnings anew.
    monkeypatch.setattr(compat, "_warned", set())


class Probing(ThreadingBackend):
    """joblib's threading backend, probing at the two moments the azurebatch one does."""

    def configure(self, n_jobs=1, parallel=None, **kwargs):
        self.features = compat.probe(parallel)
        return super().configure(n_jobs=n_jobs, parallel=parallel, **kwargs)

    def compute_batch_size(self):
        compat.probe(self.parallel, self.features, late=True)
        return super().compute_batch_size()


def test_this_joblib_has_every_attribute_joblib_azurebatch_reads():
    backend = Probing()
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.JoblibCompatWarning)
        out = Parallel(n_jobs=2, backend=backend)(delayed(abs)(-x) for x in range(5))
    assert out == [0, 1, 2, 3, 4]
    assert backend.features.on == set(compat._NEEDS)


def test_a_managed_parallel_warns_about_nothing():
    """``with Parallel() as p`` configures the backend before ``__call__`` sets its flags
    (scikit-learn's GridSearchCV does this)."""
    backend = Probing()
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.JoblibCompatWarning)
        with Parallel(n_jobs=2, backend=backend) as parallel:
            first = parallel(delayed(abs)(-x) for x in range(3))
            second = parallel(delayed(abs)(-x) for x in range(2))
    assert (first, second) == ([0, 1, 2], [0, 1])
    assert backend.features.on == set(compat._NEEDS)


def test_missing_attributes_turn_features_off_with_one_warning_naming_the_version():
    parallel = Bare()
    with pytest.warns(compat.JoblibCompatWarning) as caught:
        features = _probe_twice(parallel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.JoblibCompatWarning)
        _probe_twice(Bare())  # a second Parallel: no second warning
    texts = [str(w.message) for w in caught]
    assert len(texts) == len(compat._NEEDS)
    assert all(f"joblib {joblib.__version__}" in t for t in texts)
    assert any("Parallel._running" in t for t in texts)
    assert features.on == set()


def test_safe_defaults_never_end_or_abort_a_run_of_a_live_parallel():
    parallel = Bare()
    with pytest.warns(compat.JoblibCompatWarning):
        features = _probe_twice(parallel)
    assert features.has_stopped() is False
    assert features.is_aborting() is False
    assert features.call_id() is None
    assert features.n_jobs() is None
    assert features.total_calls() is None
    assert features.dispatched_calls() == 0
    assert features.dispatches_all_at_once() is False
    assert features.can_pull_tail() is False


def test_a_collected_parallel_counts_as_stopped_and_aborting():
    parallel = Complete()
    features = compat.probe(parallel)
    compat.probe(parallel, features, late=True)
    assert not features.has_stopped()
    del parallel
    assert features.parallel is None
    assert features.has_stopped() is True
    assert features.is_aborting() is True


def test_readings_follow_the_parallel_object():
    parallel = Complete()
    features = compat.probe(parallel)
    compat.probe(parallel, features, late=True)
    assert features.on == set(compat._NEEDS)
    assert features.call_id() == "c1"
    assert features.n_jobs() == 6
    assert (features.total_calls(), features.dispatched_calls()) == (40, 10)
    assert features.dispatches_all_at_once() is True
    assert features.waiting_batches() == [1, 2]
    features.dispatcher()()
    assert parallel.dispatched == 1
    parallel._running = False
    parallel._aborting = True
    assert features.has_stopped() is True
    assert features.is_aborting() is True


def test_late_attributes_are_not_probed_at_configure():
    parallel = Complete()
    del parallel._call_id
    features = compat.probe(parallel)  # configure: _call_id is not set yet, no warning
    assert "call_identity" not in features.checked
    parallel._call_id = "later"
    compat.probe(parallel, features, late=True)
    assert features.call_id() == "later"


def test_callback_parallel_reads_joblibs_completion_callback():
    class Callback:
        parallel = "p"
        parallel_call_id = "id"

    assert compat.callback_parallel(Callback()) == ("p", "id")
    assert compat.callback_parallel(object()) == (None, None)
