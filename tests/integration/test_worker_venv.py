"""The worker in a clean virtualenv holding only what the worker image installs.

The image cannot be built here (no Docker engine), so this stands in for it: a venv with
docker/requirements.txt and this package without extras, run against Azurite with the
environment a Batch task gets. It catches a worker that imports something the image lacks
(the emulator's extras, test tools) and a requirements file that misses a dependency.

The venv is built and cached by tests/helpers/venvs.py, so only the first run pays for
installing the scientific stack.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import payload
from joblib_azurebatch.errors import VersionMismatchError
from joblib_azurebatch.payload import PayloadWriter, PreparedTask, read_result
from joblib_azurebatch.storage import BlobStore
from tests.helpers import venvs

#: The clean image: a fixture, built and cached by tests/helpers/venvs.py.
venv_python = venvs.venv_python
KEY = os.urandom(32)
JOB = "venv-job"

pytestmark = pytest.mark.slow


def _writer(store: BlobStore) -> PayloadWriter:
    return PayloadWriter(store, job_id=JOB, signing_key=KEY, inline_threshold=65536)


def _batch(*calls: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> BatchedCalls:
    return BatchedCalls(list(calls), (SequentialBackend(), 1))


def _run_task(python: Path, task: PreparedTask, node: Path) -> subprocess.CompletedProcess[str]:
    """Run the worker as Batch would: a working directory, AZ_BATCH_* and the task's settings."""
    workdir = node / "tasks" / task.task_id / "wd"
    workdir.mkdir(parents=True)
    env = {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "AZ_BATCH_NODE_ROOT_DIR": str(node),
        "AZ_BATCH_NODE_SHARED_DIR": str(node / "shared"),
        "AZ_BATCH_NODE_ID": "tvm-1",
        "AZ_BATCH_NODE_IS_DEDICATED": "true",
        "AZ_BATCH_JOB_ID": JOB,
        "AZ_BATCH_TASK_ID": task.task_id,
        "AZ_BATCH_TASK_WORKING_DIR": str(workdir),
        **task.environment,
    }
    return subprocess.run(
        [str(python), "-m", "joblib_azurebatch.worker"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class _CreatesFile:
    """Unpickles into ``open(path, "w")``: the file's existence shows it was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_the_venv_holds_only_the_image_contents(venv_python: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, joblib_azurebatch.worker as w\n"
        "print(w.__file__)\n"
        "for name in ('numpy', 'scipy', 'sklearn', 'pandas', 'starlette', 'uvicorn', 'pytest'):\n"
        "    print(name, importlib.util.find_spec(name) is not None)\n"
    )
    done = subprocess.run(
        [str(venv_python), "-c", probe],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.split("\n")
    assert lines[0].startswith(str(venv_python.parent.parent))
    assert lines[1:8] == [
        "numpy True",
        "scipy True",
        "sklearn True",
        "pandas True",
        "starlette False",
        "uvicorn False",
        "pytest False",
    ]


def test_worker_runs_a_real_payload(venv_python: Path, store: BlobStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10000, 8))  # 640 kB and 80 kB: both go to the object store
    y = X @ np.arange(8.0) + 1.0

    def fit_coef(X: np.ndarray, y: np.ndarray, rows: slice) -> list[float]:
        from sklearn.linear_model import LinearRegression

        return [round(float(c), 6) for c in LinearRegression().fit(X[rows], y[rows]).coef_]

    task = _writer(store).prepare(
        "t-fit",
        _batch((fit_coef, (X, y, slice(0, 5000)), {}), (fit_coef, (X, y, slice(5000, None)), {})),
    )
    assert len(task.objects) == 2
    done = _run_task(venv_python, task, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "signature verified" in done.stdout
    result = read_result(store.download(task.result_blob), KEY, job_id=JOB, task_id=task.task_id)
    assert result.worker == payload.versions()
    expected = [fit_coef(X, y, slice(0, 5000)), fit_coef(X, y, slice(5000, None))]
    assert result.result() == expected
    assert expected[0] == pytest.approx(list(np.arange(8.0)), abs=1e-6)
    for sha in task.objects:
        assert (tmp_path / "shared" / "joblib-azurebatch" / "objects" / sha).is_file()


def test_version_mismatch_is_a_clear_result_and_exit_0(
    venv_python: Path, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    pretend = {**payload.versions(), "cloudpickle": "2.0.0"}
    with monkeypatch.context() as patch:
        patch.setattr(payload, "versions", lambda: pretend)
        task = _writer(store).prepare("t-old", _batch((len, (_CreatesFile(marker),), {})))
    done = _run_task(venv_python, task, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    with pytest.raises(VersionMismatchError) as info:
        read_result(
            store.download(task.result_blob), KEY, job_id=JOB, task_id=task.task_id
        ).result()
    message = str(info.value)
    assert "different: cloudpickle" in message
    assert "pip install cloudpickle==2.0.0" in message


def test_tampered_payload_exits_non_zero_and_unpickles_nothing(
    venv_python: Path, store: BlobStore, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    task = _writer(store).prepare("t-bad", _batch((len, (_CreatesFile(marker),), {})))
    data = bytearray(store.download(task.payload_blob))
    data[len(data) // 2] ^= 0x20
    store.upload(task.payload_blob, bytes(data))
    done = _run_task(venv_python, task, tmp_path / "node-a")
    assert done.returncode != 0
    assert "failed signature verification" in done.stderr
    assert not marker.exists()
    assert not store.exists(task.result_blob)
    # The same task, untampered, does unpickle the marker: the check above means something.
    good = _writer(store).prepare(
        "t-good", _batch((len, ([1, 2],), {}), (str, (_CreatesFile(marker),), {}))
    )
    done = _run_task(venv_python, good, tmp_path / "node-b")
    assert done.returncode == 0, done.stderr
    assert marker.exists()


def test_a_module_the_image_lacks_is_named_with_the_fix(
    venv_python: Path, store: BlobStore, tmp_path: Path
) -> None:
    # pytest is importable here, so cloudpickle sends its function by reference; the image
    # has no pytest.
    task = _writer(store).prepare("t-lacks", _batch((pytest.approx, (1.0,), {})))
    done = _run_task(venv_python, task, tmp_path)
    assert done.returncode == 0, done.stderr  # reported as the task's result: no retry
    with pytest.raises(ModuleNotFoundError, match="No module named '_pytest'") as info:
        read_result(
            store.download(task.result_blob), KEY, job_id=JOB, task_id=task.task_id
        ).result()
    assert "The node lacks a module" in "\n".join(getattr(info.value, "__notes__", []))
    assert isinstance(info.value.__cause__, payload.RemoteTraceback)
