"""The pytest plugin that points joblib's own parallel tests at the azurebatch backend.

See azurebatch_conformance.py for the order of operations and why it matters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from azurebatch_conformance import (
    BACKEND,
    ConformanceBackend,
    full_run,
    involves_azurebatch,
    not_applicable_reason,
    register,
    sampled_out_reason,
    stop,
)

HERE = Path(__file__).parent

# Before the test module (and with it joblib.test.test_parallel) is imported.
register()

_figures: dict[str, int] = {"selected": 0, "not_applicable": 0, "sampled_out": 0}


def pytest_configure(config: pytest.Config) -> None:
    # Markers joblib's test module uses; joblib registers them in a conftest it does not ship.
    config.addinivalue_line("markers", "thread_unsafe: joblib: not safe to run in threads")
    config.addinivalue_line("markers", "no_cover: joblib: excluded from coverage")


def _here(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep joblib's tests that run on azurebatch; deselect the others and the inapplicable."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if not _here(item) or item.module is None or item.module.__name__ != "test_joblib_parallel":
            keep.append(item)
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is None or not involves_azurebatch(callspec.params):
            dropped.append(item)  # another backend's test: not ours to run
            continue
        original = item.originalname if isinstance(item, pytest.Function) else item.name
        if not_applicable_reason(item.name, original) is not None:
            _figures["not_applicable"] += 1
            dropped.append(item)
            continue
        if not full_run() and sampled_out_reason(original, callspec.params) is not None:
            _figures["sampled_out"] += 1
            dropped.append(item)
            continue
        _figures["selected"] += 1
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)
def _azurebatch_is_the_conformance_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """joblib's tests look "azurebatch" up by name: give them the local-account backend."""
    from joblib import parallel

    monkeypatch.setitem(parallel.BACKENDS, BACKEND, ConformanceBackend)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _figures["selected"] and not _figures["not_applicable"]:
        return
    stats = terminalreporter.stats

    def ours(key: str) -> int:
        return sum(
            1
            for r in stats.get(key, [])
            if getattr(r, "when", "call") in ("setup", "call")
            and "test_joblib_parallel.py" in getattr(r, "nodeid", "")
        )

    terminalreporter.write_line(
        f"joblib conformance ({BACKEND}): {_figures['selected']} ran: {ours('passed')} passed, "
        f"{ours('xpassed')} xpassed, {ours('failed') + ours('error')} failed or errored; "
        f"{_figures['not_applicable']} not applicable, {_figures['sampled_out']} left out "
        "for time (JOBLIB_AZUREBATCH_CONFORMANCE=full runs them); see docs/conformance.md"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    stop()
