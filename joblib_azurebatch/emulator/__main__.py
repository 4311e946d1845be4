"""``python -m joblib_azurebatch.emulator``: run a local account until Ctrl-C."""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from collections.abc import Sequence

from .localbatch import LocalBatch


def main(argv: Sequence[str] | None = None) -> int:
    """Start a LocalBatch, print its endpoints and the variables to export, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m joblib_azurebatch.emulator",
        description="Run a local Azure Batch account (emulator + Azurite) until interrupted.",
    )
    parser.add_argument("--nodes", type=int, default=1, help="dedicated nodes of the proposed pool")
    parser.add_argument("--spot-nodes", type=int, default=0, help="spot nodes of the proposed pool")
    parser.add_argument("--slots-per-node", type=int, default=1, help="task slots per node")
    parser.add_argument(
        "--allocation-delay", type=float, default=0.0, help="seconds for a node to become idle"
    )
    parser.add_argument("--max-processes", type=int, default=None, help="cap on task processes")
    parser.add_argument(
        "--bare-nodes",
        action="store_true",
        help="nodes are a fresh python:X.Y-slim (pip, no packages): only a start task installs",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalBatch(
        nodes=args.nodes,
        spot_nodes=args.spot_nodes,
        slots_per_node=args.slots_per_node,
        allocation_delay=args.allocation_delay,
        max_processes=args.max_processes,
        bare_nodes=args.bare_nodes,
    ) as local:
        print(f"Batch endpoint:  {local.batch_url}  (account {local.batch_account})")
        print(f"Blob endpoint:   {local.blob_url}  (account {local.storage_account})")
        print("\nExport these to use it:")
        for name, value in local.environment().items():
            print(f"export {name}={shlex.quote(value)}")
        print("\nPress Ctrl-C to stop.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
