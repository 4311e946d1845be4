"""Small helpers the emulator tests share: wait for a state, name things, run a shell,
describe a pool's VM."""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from azure.batch import models as m

__all__ = ["FAST", "sh", "unique", "vm", "wait_for"]

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


def vm(images: list[str] | None = None) -> m.VirtualMachineConfiguration:
    """The VM configuration of the test pools: Ubuntu 22.04, containers of ``images``."""
    container = None
    if images is not None:
        container = m.BatchContainerConfiguration(
            type=m.ContainerType.DOCKER_COMPATIBLE, container_image_names=images
        )
    return m.VirtualMachineConfiguration(
        image_reference=m.BatchVmImageReference(
            publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204"
        ),
        node_agent_sku_id="batch.node.ubuntu 22.04",
        container_configuration=container,
    )
