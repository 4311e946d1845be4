"""Small helpers the emulator tests share: wait for a state, name things, run a shell."""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["FAST", "sh", "unique", "wait_for"]

#: Seconds between looks, and the SDK pollers' interval in these tests.
FAST = 0.05


def wait_for(what: str, probe: Callable[[], Any], *, timeout: float = 30.0) -> Any:
    """Poll ``probe`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(FAST)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sh(script: str) -> str:
    """A command line that runs ``script`` in a shell (a Batch command line has none)."""
    return f"/bin/sh -c {shlex.quote(script)}"
