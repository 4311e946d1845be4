"""``LocalBatch(bare_nodes=True)``: every node is a fresh ``python:X.Y-slim``.

Python and pip, no third-party package, nothing of the emulator's own environment: what a
task can import is what a start task installed into the node's shared directory, as on a
pool that runs the public image. Each run starts from the pristine image, so what one run
installs into the image itself is gone for the next.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential

from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.execution import host_settings
from joblib_azurebatch.emulator.images import slim_image
from tests.helpers.waiting import FAST, sh, unique, vm, wait_for

SLIM = slim_image()


def py(code: str) -> str:
    return f"python -c {shlex.quote(code)}"


@pytest.fixture(scope="module")
def bare() -> Iterator[LocalBatch]:
    with LocalBatch(nodes=1, slots_per_node=2, bare_nodes=True) as running:
        yield running


@pytest.fixture(scope="module")
def client(bare: LocalBatch) -> BatchClient:
    return BatchClient(bare.batch_url, AzureNamedKeyCredential(bare.batch_account, bare.batch_key))


def _pool(client: BatchClient, pool_id: str, start: m.BatchStartTask | None = None) -> None:
    client.create_pool(
        m.BatchPoolCreateOptions(
            id=pool_id,
            vm_size="standard_d2s_v3",
            target_dedicated_nodes=1,
            task_slots_per_node=2,
            virtual_machine_configuration=vm([SLIM]),
            start_task=start,
        )
    )


@pytest.fixture(scope="module")
def job(client: BatchClient) -> Iterator[str]:
    pool_id = unique("bare-pool")
    _pool(client, pool_id)
    job_id = unique("bare-job")
    client.create_job(
        m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
    )
    yield job_id
    client.begin_delete_job(job_id, polling_interval=FAST)
    client.begin_delete_pool(pool_id, polling_interval=FAST)


def run(client: BatchClient, job_id: str, command: str, image: str | None = SLIM) -> m.BatchTask:
    """Run one task (in ``image``; None: outside any container) and wait for its end."""
    task_id = unique("t")
    settings = m.BatchTaskContainerSettings(image_name=image) if image else None
    client.create_task(
        job_id,
        m.BatchTaskCreateOptions(id=task_id, command_line=command, container_settings=settings),
    )
    wait_for(
        f"task {task_id}",
        lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.COMPLETED,
        timeout=60.0,
    )
    return client.get_task(job_id, task_id)


def output(client: BatchClient, job_id: str, task: m.BatchTask, name: str = "stdout.txt") -> str:
    return b"".join(client.download_task_file(job_id, task.id, name)).decode()


def make_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding module ``name``, so pip installs it offline."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": b"VALUE = 'installed'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def site_packages(bare: LocalBatch) -> list[str]:
    assert bare.bare_python is not None
    root = Path(bare.bare_python).parents[1] / "lib"
    return sorted(p.name for p in root.glob("python*/site-packages/*"))


# --- what the image has -------------------------------------------------------------------------


def test_the_slim_image_is_the_bare_interpreter(bare: LocalBatch) -> None:
    assert bare.bare_python is not None
    assert bare.images[SLIM] == bare.bare_python
    assert bare.bare_python != sys.executable
    # Any other image is still pulled from the table: the worker image keeps this interpreter.
    assert sys.executable in bare.images.values()


@pytest.mark.parametrize("image", [SLIM, f"docker.io/library/{SLIM}", None])
def test_python_and_pip_but_no_third_party_package(
    client: BatchClient, job: str, image: str | None
) -> None:
    stdlib = run(client, job, py("import json, sqlite3, ssl; print('stdlib')"), image)
    assert stdlib.execution_info.exit_code == 0
    assert output(client, job, stdlib).strip() == "stdlib"

    for module in ("numpy", "joblib", "azure.batch"):
        __import__(module)  # the emulator's own interpreter has it ...
        task = run(client, job, py(f"import {module}"), image)  # ... the node does not
        assert task.execution_info.exit_code == 1
        assert "ModuleNotFoundError" in output(client, job, task, "stderr.txt")

    pip = run(client, job, "python -m pip --version", image)
    assert pip.execution_info.exit_code == 0
    assert output(client, job, pip).startswith("pip ")
    listed = run(client, job, "python -m pip list --format=json", image)
    names = {p["name"].lower() for p in json.loads(output(client, job, listed))}
    assert "pip" in names
    assert names <= {"pip", "setuptools", "wheel"}


def test_nothing_of_the_emulators_environment_leaks(client: BatchClient, job: str) -> None:
    code = "import json, os, sys; print(json.dumps({'path': sys.path, 'env': dict(os.environ)}))"
    task = run(client, job, py(code))
    seen = json.loads(output(client, job, task))
    emulator_site = sysconfig.get_paths()["purelib"]
    assert [p for p in seen["path"] if p.startswith(emulator_site)] == []
    assert [p for p in seen["path"] if p.startswith(sys.prefix + os.sep)] == []
    env = seen["env"]
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"):
        assert name not in env
    assert os.path.dirname(sys.executable) not in env["PATH"].split(os.pathsep)
    # pip's settings come along, so pip in a task reaches the index as pip here does.
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            assert env[name] == value
    assert env["PIP_CACHE_DIR"]
    assert env["HOME"] == env["AZ_BATCH_TASK_WORKING_DIR"]


def test_pip_settings_follow_the_user_not_the_runs_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = home / ".config" / "pip" / "pip.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[global]\nextra-index-url = https://example.invalid/simple\n")
    environ = {
        "HOME": str(home),
        "PIP_INDEX_URL": "https://mirror.example.invalid/simple",
        "https_proxy": "http://proxy.example.invalid:3128",
        "PYTHONPATH": "/somewhere/site-packages",
        "VIRTUAL_ENV": "/somewhere",
    }
    got = host_settings(environ)
    assert got == {
        "PIP_INDEX_URL": "https://mirror.example.invalid/simple",
        "https_proxy": "http://proxy.example.invalid:3128",
        "PIP_CONFIG_FILE": str(config),
        "PIP_CACHE_DIR": str(home / ".cache" / "pip"),
    }
    mine = {**environ, "PIP_CACHE_DIR": "/cache", "XDG_CONFIG_HOME": str(tmp_path / "none")}
    assert host_settings(mine)["PIP_CACHE_DIR"] == "/cache"
    assert "PIP_CONFIG_FILE" not in host_settings(mine)


# --- what a run installs ------------------------------------------------------------------------


def test_what_a_task_installs_into_the_image_is_gone_for_the_next(
    bare: LocalBatch, client: BatchClient, job: str, tmp_path: Path
) -> None:
    wheel = make_wheel(tmp_path, "bare_probe_image")
    before = site_packages(bare)
    install = run(client, job, sh(f"python -m pip install --no-index {shlex.quote(str(wheel))}"))
    assert install.execution_info.exit_code == 0, output(client, job, install, "stderr.txt")
    later = run(client, job, py("import bare_probe_image"))
    assert later.execution_info.exit_code == 1
    assert "ModuleNotFoundError" in output(client, job, later, "stderr.txt")
    assert site_packages(bare) == before


def test_a_start_task_installs_into_the_shared_directory_for_every_task(
    client: BatchClient, tmp_path: Path
) -> None:
    wheel = make_wheel(tmp_path, "bare_probe_shared")
    target = "$AZ_BATCH_NODE_SHARED_DIR/site"
    start = m.BatchStartTask(
        command_line=sh(
            f"python -m pip install --no-index --target {target} {shlex.quote(str(wheel))}"
        ),
        container_settings=m.BatchTaskContainerSettings(image_name=SLIM),
        wait_for_success=True,
    )
    pool_id = unique("bare-start")
    _pool(client, pool_id, start)
    job_id = unique("bare-start-job")
    try:
        client.create_job(
            m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id))
        )
        with_path = sh(
            f"PYTHONPATH={target} python -c 'import bare_probe_shared as b; print(b.VALUE)'"
        )
        seen = run(client, job_id, with_path)
        assert seen.execution_info.exit_code == 0, output(client, job_id, seen, "stderr.txt")
        assert output(client, job_id, seen).strip() == "installed"
        (node,) = client.list_nodes(pool_id)
        assert node.start_task_info.exit_code == 0
        assert seen.execution_info.start_time >= node.start_task_info.end_time
        without = run(client, job_id, py("import bare_probe_shared"))
        assert without.execution_info.exit_code == 1
    finally:
        client.begin_delete_job(job_id, polling_interval=FAST)
        client.begin_delete_pool(pool_id, polling_interval=FAST)


def test_pip_in_a_task_reaches_the_index_the_host_reaches(
    client: BatchClient, job: str, tmp_path: Path
) -> None:
    probe = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path)]
    try:
        host = subprocess.run(
            [*probe, "cloudpickle"], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("this machine's pip does not reach a package index in time")
    if host.returncode != 0:
        pytest.skip(f"this machine's pip reaches no package index: {host.stderr[-300:]}")
    task = run(client, job, "python -m pip download --no-deps --dest . cloudpickle")
    assert task.execution_info.exit_code == 0, output(client, job, task, "stderr.txt")
    files = {f.name for f in client.list_task_files(job, task.id, recursive=True)}
    assert any(name.startswith("wd/cloudpickle-") for name in files), files
