"""The emulator command, from both entry points: what it prints gives `from_env()` a working
config with the pool shape, in each shell's syntax, and it stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import BatchConfig, default_image

EXE = Path(sys.executable).with_name("joblib-azurebatch")
ENTRY_POINTS = {
    "cli": [str(EXE), "emulator"],
    "module": [sys.executable, "-m", "joblib_azurebatch.emulator"],
}


def _read_variables(line: str, shell: str) -> tuple[str, str] | None:
    if shell == "bash" and line.startswith("export "):
        name, _, value = shlex.split(line)[1].partition("=")
        return name, value
    if shell == "powershell" and line.startswith("$env:"):
        match = re.fullmatch(r"\$env:(\w+) = '((?:[^']|'')*)'", line)
        assert match, line
        return match.group(1), match.group(2).replace("''", "'")
    if shell == "cmd" and line.startswith("set "):
        match = re.fullmatch(r'set "(\w+)=([^"%]*)"', line)
        assert match, line
        return match.group(1), match.group(2)
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("entry", "shell"), [("cli", "bash"), ("module", "powershell"), ("cli", "cmd")]
)
def test_printed_variables_give_a_working_config_with_the_pool_shape(
    entry: str, shell: str
) -> None:
    argv = ["--nodes", "3", "--spot-nodes", "1", "--slots-per-node", "2", "--shell", shell]
    proc = subprocess.Popen(
        [*ENTRY_POINTS[entry], *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        env: dict[str, str] = {}
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            read = _read_variables(line.rstrip("\n"), shell)
            if read is not None:
                env[read[0]] = read[1]
            if line.startswith("Press Ctrl-C"):
                break
        assert "Proposed pool:   3 + 1 spot nodes x 2 slots\n" in lines
        assert f"Set these in another shell ({shell}):\n" in lines
        cfg = BatchConfig.from_env(environ=env, pool_id="shape")
        assert (cfg.dedicated_nodes, cfg.spot_nodes, cfg.task_slots_per_node) == (3, 1, 2)
        assert cfg.image == default_image()  # the image this account maps to its interpreter
        svc = BatchService.from_config(cfg)
        try:
            assert svc.list_pools() == []
        finally:
            svc.close()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the watchdog and Azurite
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        _, still = psutil.wait_procs(children, timeout=10)
        assert still == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
