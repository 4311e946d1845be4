"""Benchmark: what a busy account costs a run.

Runs the same Parallel workload (``--calls`` calls of a ``--seconds`` sleep) on a local
account of 2 nodes x 2 slots whose pool is already up, first fault-free, then with a share
(``--share``, 20 % by default) of every Batch request answered 429 and of every blob
request (the client's and the nodes') answered 503 ``ServerBusy``, both with
``Retry-After: 1``. Prints both wall times, their ratio, and which requests were refused.

The blob proxy stands in front of Azurite in both runs, so the difference is the refusals
alone. Nothing here asserts; the target is a ratio of at most 2.

    .venv/bin/python bench/throttling.py [--calls 40] [--seconds 1] [--share 0.2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections import Counter

import cloudpickle
import joblib

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.emulator import LocalBatch

# The nodes cannot import this script by name: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nap(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def run(local: LocalBatch, pool_id: str, calls: int, seconds: float) -> float:
    cfg = local.config(pool_id=pool_id, keep_pool=True)
    started = time.perf_counter()
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(nap)(i, seconds) for i in range(calls))
    wall = time.perf_counter() - started
    if out != list(range(calls)):
        raise SystemExit(f"wrong results: {out}")
    return wall


def refused(records: list, start: int) -> Counter[str]:
    return Counter(r.operation_id for r in records[start:] if r.fault)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    with LocalBatch(nodes=2, slots_per_node=2, blob_faults=True) as local:
        emu, blobs = local.emulator, local.blob_faults
        pool_id = f"bench-throttling-{secrets.token_hex(3)}"
        warm = run(local, pool_id, 4, 0.0)  # creates the pool and starts its nodes
        print(f"warm-up (pool {pool_id} created): {warm:.1f} s")
        for round_ in range(1, args.repeat + 1):
            calm = run(local, pool_id, args.calls, args.seconds)
            batch_start, blob_start = len(emu.requests()), len(blobs.requests())
            emu.throttle_share(
                args.share, status=429, retry_after=args.retry_after, times=10**6, seed=round_
            )
            blobs.throttle_share(
                args.share, status=503, retry_after=args.retry_after, times=10**6, seed=round_
            )
            try:
                busy = run(local, pool_id, args.calls, args.seconds)
            finally:
                emu.faults.clear()
                blobs.faults.clear()
            batch_all = len(emu.requests()) - batch_start
            blob_all = len(blobs.requests()) - blob_start
            batch_refused = refused(emu.requests(), batch_start)
            blob_refused = refused(blobs.requests(), blob_start)
            print(
                f"round {round_}: {args.calls} calls of {args.seconds:g} s on 2 nodes x 2 slots: "
                f"fault-free {calm:.1f} s, {args.share:.0%} throttled {busy:.1f} s, "
                f"ratio {busy / calm:.2f}"
            )
            print(
                f"  Batch: {sum(batch_refused.values())} of {batch_all} requests refused "
                f"{dict(batch_refused.most_common())}"
            )
            print(
                f"  blobs: {sum(blob_refused.values())} of {blob_all} requests refused "
                f"{dict(blob_refused.most_common())}"
            )


if __name__ == "__main__":
    main()
