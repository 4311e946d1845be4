"""The default path a first user takes: no image, bare nodes, the client's environment.

The local account stands every node up as a fresh ``python:X.Y-slim`` would be (Python and
pip, nothing else), so the pool's start task really installs what the calls import. The
script is run as a user runs it: its own process, ``BatchConfig.from_env()`` with only the
account's variables, a local package beside it that is not installed anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential

from joblib_azurebatch.emulator import LocalBatch

pytestmark = pytest.mark.slow

SCRIPT = """
    import json, sys
    import joblib
    from joblib import Parallel, delayed
    from sklearn.datasets import load_iris
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    from joblib_azurebatch import BatchConfig
    from mylab.features import featurize


    def score(seed):
        X, y = load_iris(return_X_y=True)
        model = DecisionTreeClassifier(random_state=seed, max_depth=2 + seed % 3)
        cv = KFold(3, shuffle=True, random_state=seed)
        return float(cross_val_score(model, featurize(X), y, cv=cv).mean())


    if __name__ == "__main__":
        with joblib.parallel_config(backend="azurebatch", config=BatchConfig.from_env()):
            remote = Parallel(n_jobs=-1)(delayed(score)(s) for s in range(8))
        print(json.dumps({"remote": remote, "local": [score(s) for s in range(8)]}))
"""

FEATURES = """
    import numpy as np


    def featurize(X):
        return np.hstack([X, np.log1p(X)])
"""


@pytest.fixture(scope="module")
def bare() -> LocalBatch:
    with LocalBatch(nodes=2, slots_per_node=2, bare_nodes=True) as local:
        yield local


@pytest.fixture(scope="module")
def client(bare) -> BatchClient:
    return BatchClient(bare.batch_url, AzureNamedKeyCredential(bare.batch_account, bare.batch_key))


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "features.py").write_text(textwrap.dedent(FEATURES))
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    return tmp_path


def run_script(bare: LocalBatch, folder: Path, **variables: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_AZUREBATCH_")},
        **bare.environment(),
        "JOBLIB_AZUREBATCH_DEDICATED_NODES": "2",
        "JOBLIB_AZUREBATCH_TASK_SLOTS_PER_NODE": "2",
        "JOBLIB_AZUREBATCH_POLL_INTERVAL": "0.2",
        **variables,
    }
    env.pop("PYTHONPATH", None)  # mylab is importable from the script's folder only
    return subprocess.run(
        [sys.executable, "script.py"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def node_file(client: BatchClient, pool_id: str, node_id: str, path: str) -> str:
    return b"".join(client.download_node_file(pool_id, node_id, path)).decode()


def test_a_script_with_scikit_learn_and_a_local_package_runs_on_bare_nodes(bare, client, project):
    pool_id = "no-docker"
    out = run_script(
        bare,
        project,
        JOBLIB_AZUREBATCH_POOL_ID=pool_id,
        JOBLIB_AZUREBATCH_KEEP_POOL="1",
        JOBLIB_AZUREBATCH_KEEP_JOB="1",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert scores["remote"] == scores["local"]
    assert len(set(scores["local"])) > 1  # the calls differ: equality means something

    # The environment was installed by each node's start task, once per node, ...
    nodes = list(client.list_nodes(pool_id))
    assert len(nodes) == 2
    for node in nodes:
        log = node_file(client, pool_id, node.id, "startup/stdout.txt")
        assert log.count("installing environment") == 1, log[-2000:]
    # ... and no task installed it again.
    jobs = [j for j in client.list_jobs() if j.pool_info.pool_id == pool_id]
    assert len(jobs) == 1
    tasks = list(client.list_tasks(jobs[0].id))
    assert tasks
    for task in tasks:
        stdout = b"".join(client.download_task_file(jobs[0].id, task.id, "stdout.txt")).decode()
        assert "installing environment" not in stdout
    client.begin_delete_job(jobs[0].id, polling_interval=1).result()
    client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_a_package_that_does_not_exist_fails_fast_explained_and_leaves_nothing(
    bare, client, project
):
    pool_id = "no-docker-bad-package"
    started = time.monotonic()
    out = run_script(
        bare,
        project,
        JOBLIB_AZUREBATCH_POOL_ID=pool_id,
        JOBLIB_AZUREBATCH_PACKAGES="no-such-package-joblib-azurebatch==1.0",
    )
    seconds = time.monotonic() - started
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    error = next(line for line in reversed(last) if "ServiceError" in line)
    assert pool_id in error
    assert "No matching distribution found for no-such-package-joblib-azurebatch==1.0" in error
    assert "on the node" in error
    assert seconds < 120
    # Nothing is left running or billing: the pool this run created is going, no job stays.
    deadline = time.monotonic() + 30
    while True:
        pools = {p.id: str(p.state).lower() for p in client.list_pools()}
        if pool_id not in pools or pools[pool_id].endswith("deleting"):
            break
        assert time.monotonic() < deadline, pools
        time.sleep(0.2)
    assert not [j for j in client.list_jobs() if j.pool_info.pool_id == pool_id]


def test_an_image_nobody_publishes_fails_fast_with_the_pull_error(bare, client, project):
    pool_id = "no-docker-bad-image"
    started = time.monotonic()
    out = run_script(
        bare,
        project,
        JOBLIB_AZUREBATCH_POOL_ID=pool_id,
        JOBLIB_AZUREBATCH_BASE_IMAGE="myregistry.azurecr.io/never-pushed:3.11",
    )
    assert out.returncode != 0
    error = next(line for line in reversed(out.stderr.splitlines()) if "ServiceError" in line)
    assert pool_id in error
    assert "ContainerInvalidImage" in error
    assert time.monotonic() - started < 120
    assert not [j for j in client.list_jobs() if j.pool_info.pool_id == pool_id]
