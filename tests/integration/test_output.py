"""What the calls print and warn reaches the caller, and a failure shows its source line."""

from __future__ import annotations

import secrets
import subprocess
import sys
import warnings

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DriftWarning(UserWarning):
    """A warning class of the caller's own, to be raised again as itself."""


def chatty(x):
    print(f"call {x} says hello")
    print(f"call {x} complains", file=sys.stderr)
    if x == 2:
        warnings.warn(f"call {x} drifted", DriftWarning, stacklevel=1)
    return x


def broken(x):
    values = {"a": 1}
    return values[f"missing-{x}"]  # the line the remote traceback must show


def test_prints_and_warnings_of_the_calls_reach_the_caller(local, capfd):
    name = f"output-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, progress=False)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.warns(DriftWarning, match="call 2 drifted"),
    ):
        assert Parallel(n_jobs=-1, batch_size=1)(delayed(chatty)(x) for x in range(4)) == [
            0,
            1,
            2,
            3,
        ]
    out, err = capfd.readouterr()
    for x in range(4):
        assert f"call {x} says hello" in out
        assert f"call {x} complains" in err


def test_forward_output_false_keeps_the_output_on_the_node(local, capfd):
    name = f"quiet-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, progress=False, forward_output=False)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", DriftWarning)
        Parallel(n_jobs=-1, batch_size=1)(delayed(chatty)(x) for x in range(2))
    out, _ = capfd.readouterr()
    assert "says hello" not in out


def test_a_remote_traceback_shows_the_source_line(local):
    name = f"tb-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, progress=False)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(KeyError) as info,
    ):
        Parallel(n_jobs=-1)(delayed(broken)(x) for x in range(2))
    remote = str(info.value.__cause__)
    assert "the line the remote traceback must show" in remote


def test_logs_prints_a_tasks_output_while_the_job_exists(local):
    name = f"logs-{secrets.token_hex(3)}"
    # Task files live on the node: keep the pool (its nodes) as well as the job.
    cfg = local.config(pool_id=name, job_id=name, progress=False, keep_job=True, keep_pool=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        Parallel(n_jobs=-1, batch_size=1)(delayed(chatty)(x) for x in range(2))
    from joblib_azurebatch.batch import BatchService

    svc = BatchService.from_config(cfg)
    try:
        (job,) = [j for j in svc.list_jobs() if j.job_id.startswith(name)]
        env = {**local.environment(), "PATH": ""}
        exe = [sys.executable, "-m", "joblib_azurebatch.cli", "logs"]
        listing = subprocess.run(
            [*exe, job.job_id], env=env, capture_output=True, text=True, timeout=120
        )
        assert listing.returncode == 0, listing.stderr
        task_id = listing.stdout.splitlines()[1].split()[0]
        shown = subprocess.run(
            [*exe, job.job_id, task_id], env=env, capture_output=True, text=True, timeout=120
        )
        assert shown.returncode == 0, shown.stderr
        assert f"===== {task_id}/stdout.txt =====" in shown.stdout
        assert "says hello" in shown.stdout, shown.stderr[-3000:]
        assert "complains" in shown.stdout
        print(shown.stdout)
    finally:
        svc.delete_job(job.job_id)
        svc.delete_pool(name)
        svc.close()
