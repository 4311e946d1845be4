"""The worker image contract, end to end: the real backend against images that are venvs.

The emulator maps a container image name to a local interpreter, so each "image" here is a
virtualenv standing in for one the user might build:

* ``clean``: only what docker/ installs (the venv of test_worker_venv.py). Loops and a
  scikit-learn cross-validation run there and give what ``n_jobs=1`` gives;
* ``other-cloudpickle``: the same venv with another cloudpickle release in front of it, the
  image of a user who pinned cloudpickle differently: the caller gets a
  `VersionMismatchError` naming both versions and the fix, and nothing is left behind;
* ``bare``: a venv with no joblib-azurebatch at all: the task fails before any user code,
  Batch retries it, and the caller gets a `TaskFailedError` with the stderr tail.

Extra venvs are cached beside the clean one, under a hash of what goes into them, so a
session builds them at most once.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import secrets
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import cloudpickle
import joblib
import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from joblib import Parallel, delayed
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_score
from sklearn.utils import parallel as sklearn_parallel

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import BatchConfig, TaskFailedError, VersionMismatchError
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.payload import RemoteTraceback
from tests.helpers import venvs

#: The clean image: a fixture, built and cached by tests/helpers/venvs.py.
venv_python = venvs.venv_python

# The functions and the estimator below travel by value: the images do not have this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow

CLEAN = "contract.local/worker:clean"
OTHER_CLOUDPICKLE = "contract.local/worker:other-cloudpickle"
BARE = "contract.local/worker:bare"

CLIENT_CLOUDPICKLE = str(cloudpickle.__version__)
#: A cloudpickle release that is not the client's (both are in the package index).
WORKER_CLOUDPICKLE = "3.1.2" if CLIENT_CLOUDPICKLE != "3.1.2" else "3.1.1"


# ---------------------------------------------------------------------- what the tasks run


def where_am_i(x: int) -> dict[str, Any]:
    """A small computation plus the interpreter that ran it."""
    return {
        "value": x * x + 1,
        "executable": sys.executable,
        "prefix": sys.prefix,
        "has_pytest": importlib.util.find_spec("pytest") is not None,
    }


def where_am_i_and_my_warning_filters(x: int) -> dict[str, Any]:
    """`where_am_i`, plus each warning filter the call runs under, by category name: the
    action, the category's bases, and whether the category is the one its module holds."""

    def is_importable(category: type[Warning]) -> bool:
        try:
            found: Any = importlib.import_module(category.__module__)
            for part in category.__qualname__.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            return False
        return found is category

    return {
        **where_am_i(x),
        "filters": {
            f"{c.__module__}.{c.__qualname__}": (
                action,
                [base.__name__ for base in c.__mro__[1:]],
                is_importable(c),
            )
            for action, _, c, _, _ in cast(list[Any], warnings.filters)
        },
    }


def touch_marker(path: str) -> str:
    Path(path).touch()
    return path


class FitsOnlyIn(LogisticRegression):  # type: ignore[misc]
    """A LogisticRegression whose ``fit`` refuses to run outside ``expected_prefix``.

    With ``error_score="raise"``, a cross-validation of it passes only if every fold was
    fitted by that interpreter. The parameters are explicit (no ``**kwargs``) because
    scikit-learn's ``clone`` rebuilds the estimator from its ``__init__`` signature.
    """

    def __init__(self, *, expected_prefix: str | None = None, max_iter: int = 100) -> None:
        super().__init__(max_iter=max_iter)
        self.expected_prefix = expected_prefix

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> FitsOnlyIn:
        if self.expected_prefix is not None and not same_place(
            sys.prefix, Path(self.expected_prefix)
        ):
            raise RuntimeError(f"fitted by {sys.prefix}, not by {self.expected_prefix}")
        return super().fit(X, y, sample_weight=sample_weight)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- the images


def _venv_root(python: Path) -> Path:
    return python.parent.parent


@pytest.fixture(scope="module")
def other_cloudpickle_python(venv_python: Path) -> Path:
    """The clean image with another cloudpickle release installed in front of it.

    The venv's own site-packages holds only that cloudpickle; a ``.pth`` file appends the
    clean venv's site-packages after it, so everything else (joblib-azurebatch included,
    reinstalled there whenever its source changes) is the clean image's.
    """
    clean_site = venvs.site_packages(venv_python)
    name = hashlib.sha256(f"{clean_site}|{WORKER_CLOUDPICKLE}".encode()).hexdigest()[:16]

    def build(venv: Path) -> None:
        site = venvs.site_packages(venv / "bin" / "python")
        done = subprocess.run(
            [
                str(venv_python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(site),
                f"cloudpickle=={WORKER_CLOUDPICKLE}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"installing cloudpickle {WORKER_CLOUDPICKLE} failed:\n{done.stderr}")
        (site / "clean-image.pth").write_text(f"{clean_site}\n")

    python = venvs.cached_venv(f"cp-{name}", build)
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import cloudpickle as c, joblib_azurebatch as j; print(c.__version__, j.__file__)",
        ],
        cwd=python.parent,  # not this checkout, whose package would shadow the image's
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version, package = probe.stdout.split()
    assert version == WORKER_CLOUDPICKLE
    assert Path(package).is_relative_to(clean_site)
    return python


@pytest.fixture(scope="module")
def bare_python() -> Path:
    """A venv of the same Python with nothing installed: an image that lacks the worker."""
    name = hashlib.sha256(f"{sys.version}|{sys.base_prefix}".encode()).hexdigest()[:16]
    python = venvs.cached_venv(f"bare-{name}", lambda venv: None)
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('joblib_azurebatch'))"],
        cwd=python.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "None"
    return python


# ---------------------------------------------------------------------- the local account


@pytest.fixture(scope="module")
def account(
    venv_python: Path,
    other_cloudpickle_python: Path,
    bare_python: Path,
) -> Iterator[LocalBatch]:
    images = {
        CLEAN: str(venv_python),
        OTHER_CLOUDPICKLE: str(other_cloudpickle_python),
        BARE: str(bare_python),
    }
    with LocalBatch(nodes=1, slots_per_node=2, images=images) as local:
        yield local


@pytest.fixture(scope="module")
def batch_client(account: LocalBatch) -> BatchClient:
    return BatchClient(
        account.batch_url, AzureNamedKeyCredential(account.batch_account, account.batch_key)
    )


@pytest.fixture(scope="module")
def blob_service(account: LocalBatch) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(account.storage_connection_string)


def config_for(account: LocalBatch, image: str, name: str, **changes: Any) -> BatchConfig:
    ident = f"{name}-{secrets.token_hex(3)}"
    return account.config(image=image, pool_id=ident, job_id=ident, **changes)


def assert_nothing_left(
    batch_client: BatchClient, blob_service: BlobServiceClient, cfg: BatchConfig
) -> None:
    """No job of this config, no pool, no blob: the run cleaned up after itself."""
    assert cfg.job_id is not None

    def pool_exists() -> bool:
        try:
            batch_client.get_pool(cfg.pool_id)
        except ResourceNotFoundError:
            return False
        return True

    def leftovers() -> list[str]:
        jobs = [j.id for j in batch_client.list_jobs() if j.id.startswith(f"{cfg.job_id}-")]
        container = blob_service.get_container_client(cfg.container)
        blobs = [b.name for b in container.list_blobs(name_starts_with=f"jobs/{cfg.job_id}-")]
        return jobs + blobs + ([f"pool {cfg.pool_id}"] if pool_exists() else [])

    deadline = time.monotonic() + 15
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers() == []


def same_place(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------- the tests


def test_parallel_runs_in_the_clean_image_and_matches_n_jobs_1(
    account: LocalBatch,
    venv_python: Path,
    batch_client: BatchClient,
    blob_service: BlobServiceClient,
) -> None:
    cfg = config_for(account, CLEAN, "contract-parallel")
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        remote = Parallel(n_jobs=-1)(delayed(where_am_i)(x) for x in range(4))
    local = Parallel(n_jobs=1)(delayed(where_am_i)(x) for x in range(4))

    assert [r["value"] for r in remote] == [r["value"] for r in local]
    clean = _venv_root(venv_python)
    for r in remote:
        assert same_place(r["prefix"], clean), r
        assert same_place(os.path.dirname(r["executable"]), venv_python.parent), r
        assert not r["has_pytest"]
    # The check above can fail: in-process, the calls see this interpreter, which has pytest.
    assert not same_place(local[0]["prefix"], clean)
    assert local[0]["has_pytest"]
    assert_nothing_left(batch_client, blob_service, cfg)


def test_cross_val_score_fits_in_the_clean_image_and_matches_n_jobs_1(
    account: LocalBatch,
    venv_python: Path,
    batch_client: BatchClient,
    blob_service: BlobServiceClient,
) -> None:
    X, y = load_iris(return_X_y=True)
    cv = KFold(3, shuffle=True, random_state=0)
    expected = cross_val_score(FitsOnlyIn(max_iter=500), X, y, cv=cv, n_jobs=1)
    in_clean_image = FitsOnlyIn(expected_prefix=str(_venv_root(venv_python)), max_iter=500)
    # The check can fail: this interpreter is not the clean image.
    with pytest.raises(RuntimeError, match="not by"):
        cross_val_score(in_clean_image, X, y, cv=cv, n_jobs=1, error_score="raise")

    # This suite's pytest configuration filters a pytest warning class, which scikit-learn
    # ships with every fold to an image without pytest (the test below looks closer).
    assert any(f[2] is pytest.PytestUnraisableExceptionWarning for f in warnings.filters)
    cfg = config_for(account, CLEAN, "contract-cv")
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        scores = cross_val_score(in_clean_image, X, y, cv=cv, n_jobs=-1, error_score="raise")

    assert list(scores) == list(expected)
    assert 0.85 < expected.mean() <= 1.0
    assert_nothing_left(batch_client, blob_service, cfg)


def test_a_warning_filter_on_a_class_the_image_lacks_does_not_stop_the_calls(
    account: LocalBatch,
    batch_client: BatchClient,
    blob_service: BlobServiceClient,
) -> None:
    """scikit-learn's Parallel (cross_val_score, GridSearchCV, ...) ships the caller's
    warning filters with each call. A filter on a class from a module the image lacks (here
    pytest's, as a test suite's configuration sets) arrives as a stand-in subclass of the
    class's builtin base, one the image has as itself, and the calls run."""
    cfg = config_for(account, CLEAN, "contract-filters")
    with warnings.catch_warnings(), joblib.parallel_config(backend="azurebatch", config=cfg):
        warnings.filterwarnings("error", category=pytest.PytestCollectionWarning)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        out = sklearn_parallel.Parallel(n_jobs=2)(
            sklearn_parallel.delayed(where_am_i_and_my_warning_filters)(x) for x in range(2)
        )

    assert [r["value"] for r in out] == [1, 2]
    for r in out:
        assert not r["has_pytest"]
        filters = r["filters"]
        # pytest's class, as a stand-in: same names, builtin base, not importable there.
        assert filters["pytest.PytestCollectionWarning"] == (
            "error",
            ["UserWarning", "Warning", "Exception", "BaseException", "object"],
            False,
        )
        # The one of this suite's pytest configuration too.
        assert filters["pytest.PytestUnraisableExceptionWarning"][2] is False
        # scikit-learn's class is in the image: the filter holds the image's own class.
        assert filters["sklearn.exceptions.ConvergenceWarning"] == (
            "ignore",
            ["UserWarning", "Warning", "Exception", "BaseException", "object"],
            True,
        )
    # The check can fail: here, pytest's class is itself, with its pytest base.
    here = where_am_i_and_my_warning_filters(0)["filters"]
    assert here["pytest.PytestUnraisableExceptionWarning"][2] is True
    assert here["pytest.PytestUnraisableExceptionWarning"][1][0] == "PytestWarning"
    assert_nothing_left(batch_client, blob_service, cfg)


def test_other_cloudpickle_in_the_image_is_a_clear_version_mismatch(
    account: LocalBatch,
    batch_client: BatchClient,
    blob_service: BlobServiceClient,
    tmp_path: Path,
) -> None:
    cfg = config_for(account, OTHER_CLOUDPICKLE, "contract-mismatch")
    markers = [str(tmp_path / f"ran-{i}") for i in range(6)]
    start = time.monotonic()
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(VersionMismatchError) as info,
    ):
        Parallel(n_jobs=-1)(delayed(touch_marker)(m) for m in markers)
    elapsed = time.monotonic() - start

    message = str(info.value)
    assert f"cloudpickle {WORKER_CLOUDPICKLE}" in message  # what the image has
    assert f"cloudpickle {CLIENT_CLOUDPICKLE}" in message  # what the client has
    assert "different: cloudpickle" in message
    assert f"pip install cloudpickle=={CLIENT_CLOUDPICKLE}" in message  # the fix
    assert "BatchConfig(image=...)" in message
    assert isinstance(info.value.__cause__, RemoteTraceback)
    # The versions are compared before the calls are unpickled: no user code ran.
    assert [m for m in markers if os.path.exists(m)] == []
    assert elapsed < 60
    assert_nothing_left(batch_client, blob_service, cfg)


def test_image_without_the_worker_fails_the_task_after_retries(
    account: LocalBatch,
    batch_client: BatchClient,
    blob_service: BlobServiceClient,
) -> None:
    cfg = config_for(account, BARE, "contract-bare", max_task_retries=1)
    start = time.monotonic()
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(TaskFailedError) as info,
    ):
        Parallel(n_jobs=2)(delayed(where_am_i)(x) for x in range(2))
    elapsed = time.monotonic() - start

    error = info.value
    assert cfg.job_id is not None
    assert error.job_id.startswith(f"{cfg.job_id}-")
    assert error.task_id.startswith("task-")
    assert error.job_id in str(error)
    assert error.task_id in str(error)
    assert "outside your code" in str(error)
    assert "exit code 1" in str(error)
    assert "after 2 attempts" in str(error)  # the first try and the one retry allowed
    assert "ModuleNotFoundError: No module named 'joblib_azurebatch'" in error.stderr_tail
    assert error.stderr_tail in str(error)
    assert elapsed < 60
    assert_nothing_left(batch_client, blob_service, cfg)
