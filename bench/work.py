"""The work every backend runs in the benchmark, and the data it is given.

The same functions go to the azurebatch nodes, the dask workers and the loky workers.
None of those processes can import this module by name (it is not installed, and each
starts from its own folder), so ``bench.run`` registers it with cloudpickle to be sent by
value: each backend then ships the same bytes for the same function.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def nap(seconds: float) -> float:
    """A call that only waits: the backend's overhead is everything beyond ``seconds``."""
    time.sleep(seconds)
    return seconds


def tiny(i: int) -> int:
    """A call that costs nothing, so the wall time is all scheduling and transport."""
    return i + 1


def touch(obj: Any, i: int) -> int:
    """A call that receives a large argument and sends back almost nothing, so that what
    crosses the network is the argument (and the call's own few bytes)."""
    return i if obj is not None else -1


def checksum(a: np.ndarray) -> float:
    """A call with its own array argument; its small result keeps the client's memory the
    measure of what the backend holds on to, not of the results."""
    return float(a[0])


# ----------------------------------------------------------------------------- the data


def array_mb(megabytes: float) -> np.ndarray:
    """A float64 matrix of 100 columns and about ``megabytes`` MB (52.4 MB is 65,536 rows)."""
    rows = max(1, round(megabytes * 1e6 / 800))
    return np.random.default_rng(0).standard_normal((rows, 100))


def forest(trees: int, samples: int) -> Any:
    """A fitted random forest; 200 trees on 7,200 noisy samples pickle to about 11 MB."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    X, y = make_classification(n_samples=samples, n_features=20, flip_y=0.05, random_state=0)
    return RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=1).fit(X, y)


def frame(rows: int) -> Any:
    """A DataFrame with an int, a float and a string column; 360,000 rows pickle to ~13 MB."""
    import pandas as pd  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "id": np.arange(rows),
            "x": rng.standard_normal(rows),
            "name": [f"sample-{i:08d}-{'abcdefgh'[i % 8]}" for i in range(rows)],
        }
    )


def ints(n: int) -> list[int]:
    """A plain list of ``n`` ints (1,000,000 pickle to ~4.9 MB): no buffer protocol to lean on."""
    return list(range(n))


def own_array(i: int, kilobytes: int) -> np.ndarray:
    """The ``i``-th call's own array of about ``kilobytes`` kB, made when the call is."""
    return np.random.default_rng(i).random(max(1, kilobytes * 1000 // 8))
