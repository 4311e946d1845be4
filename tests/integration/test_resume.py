"""resume=True on the local account: stored results are taken, nothing runs twice.

Every call leaves a marker file when it starts (the emulated nodes share this machine's
disk), so the tests count executions, not results.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

from joblib_azurebatch import cli
from joblib_azurebatch.memo import RESULTS_PREFIX
from tests.helpers.clients import client_env
from tests.helpers.waiting import unique

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def marked(x: int, folder: str, seconds: float = 0.0) -> int:
    """x * x, leaving a marker ``{x}-{random}`` in ``folder`` as it starts."""
    Path(folder, f"{x}-{uuid.uuid4().hex}").touch()
    time.sleep(seconds)
    return x * x


def executions(folder: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for marker in folder.iterdir():
        x = int(marker.name.split("-")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


@pytest.fixture
def cfg(local, request):
    name = unique(request.node.name.replace("_", "-")[5:25].strip("-"))
    return local.config(pool_id=name, job_id=name, resume=True)


def run(cfg, folder: Path, xs, seconds: float = 0.0) -> list[int]:
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        return Parallel(n_jobs=-1)(delayed(marked)(x, str(folder), seconds) for x in xs)


def test_a_rerun_takes_every_stored_result_and_creates_nothing(local, cfg, tmp_path, batch_client):
    assert run(cfg, tmp_path, range(12)) == [x * x for x in range(12)]
    assert executions(tmp_path) == {x: 1 for x in range(12)}
    jobs_before = {j.id for j in batch_client.list_jobs()}
    seen = len(local.emulator.requests())
    assert run(cfg, tmp_path, range(12)) == [x * x for x in range(12)]
    assert executions(tmp_path) == {x: 1 for x in range(12)}
    during = local.emulator.requests()[seen:]
    assert [r for r in during if r.method in ("POST", "PUT", "PATCH")] == []
    assert {j.id for j in batch_client.list_jobs()} - jobs_before == set()


def test_a_changed_argument_runs_only_that_call_again(cfg, tmp_path):
    run(cfg, tmp_path, range(8))
    changed = [0, 1, 2, 30, 4, 5, 6, 7]
    assert run(cfg, tmp_path, changed) == [x * x for x in changed]
    assert executions(tmp_path) == {**{x: 1 for x in range(8)}, 30: 1}


def test_a_tampered_result_is_refused_and_computed_again(cfg, tmp_path, blob_service):
    run(cfg, tmp_path, [101, 102])
    container = blob_service.get_container_client(cfg.container)
    names = [b.name for b in container.list_blobs(name_starts_with=RESULTS_PREFIX)]
    assert names
    # Forge every stored record of this test's calls: flip a byte of the pickled value.
    for name in names:
        blob = container.get_blob_client(name)
        data = bytearray(blob.download_blob().readall())
        data[-3] ^= 0xFF
        blob.upload_blob(bytes(data), overwrite=True)
    assert run(cfg, tmp_path, [101, 102]) == [101 * 101, 102 * 102]
    assert executions(tmp_path) == {101: 2, 102: 2}


CLIENT = """
import sys, time, uuid
from pathlib import Path
import joblib
from joblib import Parallel, delayed
from joblib_azurebatch import BatchConfig

def marked(x, folder, seconds):
    Path(folder, f"{x}-{uuid.uuid4().hex}").touch()
    time.sleep(seconds)
    return x * x

n, folder, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
started = time.monotonic()
with joblib.parallel_config(backend="azurebatch", config=BatchConfig.from_env()):
    out = Parallel(n_jobs=-1)(delayed(marked)(x, folder, seconds) for x in range(n))
assert out == [x * x for x in range(n)], out
print(f"OK {time.monotonic() - started:.2f}", flush=True)
"""


def test_a_killed_client_rerun_computes_every_call_once(
    local, tmp_path, batch_client, monkeypatch, capsys
):
    """SIGKILL a client in the middle of 200 calls; the same script run again waits for the
    calls the dead client's job still runs, takes every stored result and runs the rest."""
    calls, seconds = 200, 0.05
    name = unique("resume-kill")
    env = client_env(local, pool_id=name, job_id=name, resume=True, pool_linger=0.0)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    markers = tmp_path / "markers"
    markers.mkdir()
    argv = [sys.executable, str(script), str(calls), str(markers), str(seconds)]
    first = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        deadline = started + 120
        while len(list(markers.iterdir())) < 60 and time.monotonic() < deadline:
            assert first.poll() is None, "the client ended before it could be killed"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_after = time.monotonic() - started
        at_kill = len(list(markers.iterdir()))
        assert 60 <= at_kill < calls
        # What the user sees meanwhile: the run is listed as resumable, and cleanup keeps it.
        for variable, value in env.items():
            if variable not in os.environ or os.environ[variable] != value:
                monkeypatch.setenv(variable, value)
        capsys.readouterr()
        assert cli.main(["jobs", "list"]) == 0
        assert cli.main(["cleanup", "--dry-run"]) == 0
        shown = capsys.readouterr().out
        (line,) = [x for x in shown.splitlines() if x.startswith(name) and "yes" in x]
        assert "client gone" in line
        assert re.search(r"kept job \S+: .*resumable", shown)
        assert f"would delete job {name}" not in shown
        # Its stored results, fetched without the script: in call order, each one right.
        job_id = line.split()[0]
        fetched = tmp_path / "fetched.pkl"
        assert cli.main(["jobs", "results", job_id, "-o", str(fetched)]) == 0
        values = pickle.loads(fetched.read_bytes())
        assert sum(v is not None for v in values) >= 30
        assert all(v in (None, x * x) for x, v in enumerate(values))
        assert "calls its tasks were given have a stored result" in capsys.readouterr().out
        rerun_started = time.monotonic()
        second = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        rerun = time.monotonic() - rerun_started
        assert second.returncode == 0, second.stderr[-3000:]
        assert second.stdout.startswith("OK")
        counts = executions(markers)
        twice = {x: n for x, n in counts.items() if n != 1}
        assert counts == {x: 1 for x in range(calls)}, f"{twice}\n{second.stderr[-4000:]}"
        print(
            f"\nSIGKILL and re-run, {calls} calls of {seconds} s: killed after "
            f"{killed_after:.1f} s with {at_kill} calls started; the re-run took {rerun:.1f} s; "
            f"executions per call: {sum(counts.values()) / calls:.2f} (max {max(counts.values())})"
        )
    finally:
        if first.poll() is None:
            first.kill()
        for job in batch_client.list_jobs():
            if job.id.startswith(name):
                with contextlib.suppress(Exception):
                    batch_client.delete_job(job.id)
        with contextlib.suppress(Exception):
            batch_client.delete_pool(name)


def _executions_under_preemption(local, tmp_path: Path, *, resume: bool) -> float:
    """200 calls, 20 per task, on 2 spot nodes of which one is preempted (or made unusable)
    every second, 8 times; returns the executions per call."""
    name = unique(f"preempt-{int(resume)}")
    cfg = local.config(pool_id=name, job_id=name, resume=resume, dedicated_nodes=0, spot_nodes=2)
    folder = tmp_path / f"resume-{resume}"
    folder.mkdir()
    done = threading.Event()
    hits = []

    def chaos() -> None:
        turn = 0
        while not done.wait(1.0) and len(hits) < 8:
            turn += 1
            take = local.emulator.kill_node if turn % 3 == 0 else local.emulator.preempt_node
            with contextlib.suppress(Exception):  # no node to take at that moment
                hits.append(take(name, recover_after=0.2))

    watcher = threading.Thread(target=chaos, daemon=True)
    watcher.start()
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = Parallel(n_jobs=-1, batch_size=20)(
                delayed(marked)(x, str(folder), 0.03) for x in range(200)
            )
    finally:
        done.set()
        watcher.join(5)
    assert out == [x * x for x in range(200)]
    assert len(hits) >= 3
    counts = executions(folder)
    assert set(counts) == set(range(200))
    return sum(counts.values()) / 200


def test_preemption_costs_the_running_call_not_the_task(local, tmp_path):
    """Preempted nodes requeue their tasks; a resumable task run again skips the calls its
    earlier attempt finished. (Without resume the same chaos cost 1.5 to 1.7 executions
    per call when this test also measured it: each preemption repeats a task's finished
    calls.)"""
    resumed = _executions_under_preemption(local, tmp_path, resume=True)
    print(f"\nexecutions per call under preemption with resume: {resumed:.2f}")
    assert resumed <= 1.2


def test_resume_takes_only_its_own_runs_results_and_cache_takes_any(cfg, tmp_path):
    """Two runs that share calls but not their first call: with resume the second computes
    its calls again (it is another run); with cache it takes the first run's results."""
    run(cfg, tmp_path, [201, 202, 203])
    assert run(cfg, tmp_path, [200, 202, 203]) == [200 * 200, 202 * 202, 203 * 203]
    assert executions(tmp_path) == {200: 1, 201: 1, 202: 2, 203: 2}
    cached = cfg.replace(resume=False, cache=True)
    assert run(cached, tmp_path, [199, 202, 203]) == [199 * 199, 202 * 202, 203 * 203]
    assert executions(tmp_path) == {199: 1, 200: 1, 201: 1, 202: 2, 203: 2}
