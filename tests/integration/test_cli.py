"""The ``joblib-azurebatch`` command: help, the demo, the local account, housekeeping."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import pytest

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import cli
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.leftovers import is_library_job
from joblib_azurebatch.storage import BlobStore

EXE = Path(sys.executable).with_name("joblib-azurebatch")
FOLD_ROW = re.compile(r"^\s*(\d+)\s+([01]\.\d{4})\s+([01]\.\d{4})\s*$")
ENV_NAMES = sorted({v for names in BatchConfig.ENV_VARS.values() for v in names})


def _run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_lists_every_command():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("demo", "emulator", "pools", "jobs", "cleanup"):
        assert command in done.stdout
    demo = _run("demo", "--help")
    assert demo.returncode == 0
    assert "--azure" in demo.stdout
    assert "--folds" in demo.stdout


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: joblib-azurebatch" in capsys.readouterr().err


@pytest.mark.timeout(150)
def test_demo_prints_both_runs_scores_and_wall_times():
    done = _run("demo", "--folds", "3", "--trees", "5", "--nodes", "1", timeout=140)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    rows = [FOLD_ROW.match(line) for line in out.splitlines()]
    folds = [m for m in rows if m]
    assert [int(m.group(1)) for m in folds] == [1, 2, 3], out
    for m in folds:
        assert m.group(2) == m.group(3)
        assert 0.5 < float(m.group(2)) <= 1.0
    wall = re.search(r"^\s*wall\s+(\d+\.\d) s\s+(\d+\.\d) s$", out, re.MULTILINE)
    assert wall, out
    assert float(wall.group(1)) > 0
    assert "identical scores: yes" in out
    assert "local emulated Batch account" in out


def test_format_comparison_reports_a_difference():
    a = cli.DemoRun(label="azurebatch", scores=(0.5, 0.75), seconds=2.0)
    b = cli.DemoRun(label="n_jobs=1", scores=(0.5, 0.7), seconds=1.0)
    text = cli.format_comparison(a, b)
    assert "identical scores: NO" in text
    assert "0.7500" in text
    assert "0.7000" in text


def test_our_job_ids_are_recognised():
    cfg = BatchConfig(job_id="nightly")
    assert is_library_job(cfg.new_job_id())
    assert is_library_job(BatchConfig().new_job_id())
    assert not is_library_job("nightly")
    assert not is_library_job("someone-elses-job-20260101")


@pytest.fixture
def local_env(local, monkeypatch):
    """The environment ``joblib-azurebatch emulator`` prints, with a container of its own."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in local.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JOBLIB_AZUREBATCH_CONTAINER", "cli-housekeeping")
    cfg = BatchConfig.from_env()
    assert cfg.container == "cli-housekeeping"
    return cfg


def _ids(jobs):
    return {j.job_id for j in jobs if j.state != "deleting"}


def test_housekeeping_lists_and_cleans_what_a_kept_run_left(local, local_env, capsys):
    cfg = local.config(
        pool_id="cli-pool",
        container="cli-housekeeping",
        job_id="cli-housekeeping",
        keep_pool=True,
        keep_job=True,
        keep_blobs=True,
    )
    svc = BatchService.from_config(local_env)
    store = BlobStore.from_config(local_env)
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(6))
        assert out == [0, 1, 2, 3, 4, 5]
        left = {j for j in _ids(svc.list_jobs()) if j.startswith("cli-housekeeping-")}
        assert len(left) == 1, left
        (job_id,) = left
        kept = store.list_names("jobs/")
        assert any(name.startswith(f"jobs/{job_id}/") for name in kept), (job_id, kept)

        assert cli.main(["jobs", "list"]) == 0
        listing = capsys.readouterr().out
        assert job_id in listing
        assert "cli-pool" in listing

        assert cli.main(["pools", "list"]) == 0
        assert re.search(r"^cli-pool\s", capsys.readouterr().out, re.MULTILINE)

        assert cli.main(["cleanup", "--dry-run", "--container", "joblib-azurebatch"]) == 0
        assert f"would delete job {job_id}" in capsys.readouterr().out
        assert any(name.startswith(f"jobs/{job_id}/") for name in store.list_names("jobs/"))

        assert cli.main(["cleanup", "--dry-run"]) == 0
        dry = capsys.readouterr().out
        assert f"would delete job {job_id}" in dry
        assert job_id in _ids(svc.list_jobs())
        assert store.list_names(f"jobs/{job_id}/")

        assert cli.main(["cleanup"]) == 0
        wet = capsys.readouterr().out
        assert f"deleted job {job_id}" in wet
        assert job_id not in _ids(svc.list_jobs())
        assert store.list_names("jobs/") == []

        assert cli.main(["pools", "delete", "cli-pool"]) == 0
        assert "deleting pool cli-pool" in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while (pool := svc.get_pool("cli-pool")) is not None and time.monotonic() < deadline:
            assert pool.state == "deleting"
            time.sleep(0.2)
        assert svc.get_pool("cli-pool") is None
    finally:
        svc.close()
        store.close()


def test_housekeeping_without_an_account_says_what_to_set(monkeypatch, capsys):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["jobs", "list"]) == 2
    err = capsys.readouterr().err
    assert "CredentialError" in err
    assert "BATCH_ACCOUNT_URL" in err


@pytest.mark.timeout(90)
def test_emulator_command_prints_a_working_environment():
    proc = subprocess.Popen(
        [str(EXE), "emulator", "--nodes", "1", "--slots", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        env: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = shlex.split(line)[1].partition("=")
                env[name] = value
            if "Ctrl-C" in line:
                break
        assert {"BATCH_ACCOUNT_URL", "BATCH_ACCOUNT_KEY", "STORAGE_ACCOUNT_KEY"} <= set(env)
        cfg = BatchConfig.from_env(environ=env)
        svc = BatchService.from_config(cfg)
        try:
            assert svc.list_pools() == []
        finally:
            svc.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
