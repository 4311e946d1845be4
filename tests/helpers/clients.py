"""Client processes for tests that need more than one client, or one that is killed.

Each client is a separate Python process running an ordinary script against the local
account, configured only through environment variables (the way a user's script would be).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from joblib_azurebatch.config import default_image

#: What every client runs: ``n`` calls of ``square`` that each sleep ``seconds``; it prints
#: OK (and its wall time) when the results are right.
SCRIPT = """
import sys, time
import joblib
from joblib import Parallel, delayed
from joblib_azurebatch import BatchConfig

def square(x, seconds):
    time.sleep(seconds)
    return x * x

n, seconds = int(sys.argv[1]), float(sys.argv[2])
cfg = BatchConfig.from_env()
started = time.monotonic()
with joblib.parallel_config(backend="azurebatch", config=cfg):
    out = Parallel(n_jobs=-1, batch_size=1)(delayed(square)(x, seconds) for x in range(n))
assert out == [x * x for x in range(n)], out
print(f"OK {time.monotonic() - started:.2f}", flush=True)
"""


def client_env(local: Any, *, pool_id: str, job_id: str, **fields: Any) -> dict[str, str]:
    """The environment of a client process pointed at ``local`` (a LocalBatch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_AZUREBATCH_")}
    env.update(local.environment())
    values: dict[str, Any] = {
        "pool_id": pool_id,
        "job_id": job_id,
        "image": default_image(),
        "dedicated_nodes": local.nodes,
        "spot_nodes": local.spot_nodes,
        "task_slots_per_node": local.slots_per_node,
        "poll_interval": 0.2,
        "watch_interval": 1.0,
        "progress": False,
        **fields,
    }
    env.update({f"JOBLIB_AZUREBATCH_{k.upper()}": str(v) for k, v in values.items()})
    return env


def start_client(
    folder: Path, env: dict[str, str], *, calls: int, seconds: float
) -> subprocess.Popen[str]:
    script = folder / "client.py"
    if not script.exists():
        script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(calls), str(seconds)],
        env=env,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
