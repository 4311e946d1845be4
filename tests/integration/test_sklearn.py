"""scikit-learn, unchanged, on the local Batch account: the same results as ``n_jobs=1``.

Each test runs a scikit-learn search or cross-validation twice, in-process and with
``n_jobs=-1`` under ``parallel_config(backend="azurebatch")``, and compares every number.
Equality alone would also hold if the backend quietly ran everything in-process, so each
test also checks, from the emulator's request counters, that Batch tasks were really
submitted and the results really came back through the pool.

The estimators are trees: their results do not depend on the BLAS kernel, which can differ
between the caller and a node (a task sees none of the caller's environment, such as
``OPENBLAS_CORETYPE``), so exact equality is the right check.
"""

from __future__ import annotations

import sys

import cloudpickle
import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    RandomizedSearchCV,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)

pytestmark = pytest.mark.timeout(120)

# The nodes cannot import this test module, so its functions travel by value, as a user's
# own module not installed in the worker image would (docs/troubleshooting.md).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SUBMIT_OPERATIONS = ("Tasks_CreateTaskCollection", "Tasks_CreateTask")


@pytest.fixture(scope="module")
def data():
    X, y = load_iris(return_X_y=True)
    return X, y


@pytest.fixture(scope="module")
def cfg(local):
    """One kept pool for the module: pool start-up is not what these tests are about."""
    return local.config(pool_id="sklearn", keep_pool=True)


class OnBatch:
    """Runs a block under the azurebatch backend and counts the tasks it submitted."""

    def __init__(self, local, cfg) -> None:
        self.local = local
        self.cfg = cfg
        self.submissions = 0

    def __enter__(self):
        self._before = self._count()
        self._ctx = joblib.parallel_config(backend="azurebatch", config=self.cfg)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.submissions = self._count() - self._before
        return False

    def _count(self) -> int:
        counters = self.local.emulator.counters
        return sum(counters.get(op, 0) for op in SUBMIT_OPERATIONS)


def test_cross_val_score_matches_sequential(local, cfg, data):
    X, y = data
    model = make_pipeline(StandardScaler(), DecisionTreeClassifier(random_state=0))
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)

    expected = cross_val_score(model, X, y, cv=cv, n_jobs=1)
    with OnBatch(local, cfg) as run:
        got = cross_val_score(model, X, y, cv=cv, n_jobs=-1)

    assert run.submissions > 0, "no Batch task was submitted: the backend ran in-process"
    np.testing.assert_array_equal(got, expected)


def test_grid_search_matches_sequential(local, cfg, data):
    X, y = data
    grid = {"max_depth": [2, None], "min_samples_leaf": [1, 5]}
    cv = KFold(n_splits=2, shuffle=True, random_state=1)

    def search(n_jobs: int) -> GridSearchCV:
        est = DecisionTreeClassifier(random_state=0)
        return GridSearchCV(est, grid, cv=cv, n_jobs=n_jobs).fit(X, y)

    expected = search(1)
    with OnBatch(local, cfg) as run:
        got = search(-1)

    assert run.submissions > 0
    assert got.best_params_ == expected.best_params_
    assert got.best_score_ == expected.best_score_
    for key in ("mean_test_score", "std_test_score", "rank_test_score"):
        np.testing.assert_array_equal(got.cv_results_[key], expected.cv_results_[key])
    for i in range(2):
        key = f"split{i}_test_score"
        np.testing.assert_array_equal(got.cv_results_[key], expected.cv_results_[key])
    # The refit happens in the caller's process on the whole data, as with n_jobs=1.
    np.testing.assert_array_equal(got.predict(X), expected.predict(X))


def test_randomized_search_matches_sequential(local, cfg, data):
    X, y = data
    distributions = {
        "n_estimators": [3, 5, 8],
        "max_depth": [1, 2, 3, None],
        "max_features": [1, 2, None],
        "criterion": ["gini", "entropy"],
    }
    cv = KFold(n_splits=2, shuffle=True, random_state=2)

    def search(n_jobs: int) -> RandomizedSearchCV:
        est = RandomForestClassifier(random_state=0)
        return RandomizedSearchCV(
            est, distributions, n_iter=3, cv=cv, random_state=0, n_jobs=n_jobs
        ).fit(X, y)

    expected = search(1)
    with OnBatch(local, cfg) as run:
        got = search(-1)

    assert run.submissions > 0
    assert got.cv_results_["params"] == expected.cv_results_["params"]
    np.testing.assert_array_equal(
        got.cv_results_["mean_test_score"], expected.cv_results_["mean_test_score"]
    )
    assert got.best_params_ == expected.best_params_
    np.testing.assert_array_equal(got.predict_proba(X), expected.predict_proba(X))


def _fold(model, X, y, train, test):
    """A hand-written fold: fit on the training rows, return the fitted model's output."""
    fitted = clone(model).fit(X[train], y[train])
    return fitted.predict_proba(X[test]), fitted.score(X[test], y[test])


def test_hand_written_kfold_loop_matches_sequential(local, cfg, data):
    X, y = data
    model = DecisionTreeClassifier(max_depth=3, random_state=0)
    splits = list(KFold(n_splits=5, shuffle=True, random_state=3).split(X))

    def loop(n_jobs: int):
        return joblib.Parallel(n_jobs=n_jobs)(
            joblib.delayed(_fold)(model, X, y, train, test) for train, test in splits
        )

    expected = loop(1)
    with OnBatch(local, cfg) as run:
        got = loop(-1)

    assert run.submissions > 0
    assert len(got) == len(expected) == len(splits)
    for (proba, score), (proba_ref, score_ref) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(proba, proba_ref)
        assert score == score_ref
