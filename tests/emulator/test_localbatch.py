"""LocalBatch starts a whole local account and leaves nothing behind, also when the body raises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch.emulator import LocalBatch


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(check, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


class Boom(Exception):
    pass


def test_no_process_left_when_the_body_raises(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    pids: list[int] = []
    with pytest.raises(Boom), LocalBatch(nodes=1, slots_per_node=2) as local:
        client = BatchClient(
            local.batch_url, AzureNamedKeyCredential(local.batch_account, local.batch_key)
        )
        client.create_pool(
            m.BatchPoolCreateOptions(
                id="p", vm_size="standard_d2s_v3", target_dedicated_nodes=1, task_slots_per_node=2
            )
        )
        client.create_job(m.BatchJobCreateOptions(id="j", pool_info=m.BatchPoolInfo(pool_id="p")))
        # A task whose shell leaves a background child: the whole process group must go.
        client.create_task(
            "j",
            m.BatchTaskCreateOptions(id="t", command_line=f"sleep 60 & echo $! > {pidfile}; wait"),
        )
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        wait_for(lambda: len(local.emulator.process_ids()) == 1)
        pids = [*local.emulator.process_ids(), int(pidfile.read_text()), local.azurite.pid or 0]
        assert all(alive(pid) for pid in pids)
        raise Boom
    assert len(pids) == 3
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)


def test_config_describes_the_local_account(local: LocalBatch) -> None:
    cfg = local.config(pool_id="custom-pool")
    assert cfg.batch_url == local.batch_url
    assert cfg.batch_account == local.batch_account
    assert cfg.batch_key == local.batch_key
    assert cfg.storage_url == local.blob_url
    assert cfg.storage_account == local.storage_account
    assert cfg.storage_key == local.storage_key
    assert (cfg.dedicated_nodes, cfg.spot_nodes, cfg.task_slots_per_node) == (2, 0, 2)
    assert cfg.pool_id == "custom-pool"
    assert cfg.poll_interval == pytest.approx(0.2)
    # The endpoints work with the real SDKs.
    blobs = BlobServiceClient.from_connection_string(local.storage_connection_string)
    blobs.create_container("config-check")
    assert "config-check" in {c.name for c in blobs.list_containers()}


def test_module_entry_point_prints_working_endpoints_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "joblib_azurebatch.emulator", "--nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        exports: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                exports[name] = value.strip("'")
            if line.startswith("Press Ctrl-C"):
                break
        assert set(exports) >= {
            "BATCH_ACCOUNT_NAME",
            "BATCH_ACCOUNT_KEY",
            "BATCH_ACCOUNT_URL",
            "STORAGE_ACCOUNT_NAME",
            "STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_CONNECTION_STRING",
        }
        client = BatchClient(
            exports["BATCH_ACCOUNT_URL"],
            AzureNamedKeyCredential(exports["BATCH_ACCOUNT_NAME"], exports["BATCH_ACCOUNT_KEY"]),
        )
        assert list(client.list_pools()) == []
        blobs = BlobServiceClient.from_connection_string(exports["AZURE_STORAGE_CONNECTION_STRING"])
        assert list(blobs.list_containers()) == []
        children = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        assert children  # Azurite
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
