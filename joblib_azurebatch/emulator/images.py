"""Container images as the emulator knows them: a registry of names mapped to local interpreters.

A Batch node pulls the images a pool prefetches, a start task runs in, or a task runs in;
an image nobody publishes fails to pull, and that is the first failure a real user meets
(a typo in a tag, an image that was never pushed, a Python version nobody built). The
emulator has no registry and no Docker engine, so its "registry" is a table of image
references, each mapped to the Python interpreter that stands in for the image. A
reference that is not in the table fails to pull with the failure Batch reports, instead
of silently running with some other interpreter.

:class:`BareImage` stands in for the public ``python:X.Y-slim`` image: a virtualenv with
pip and nothing else. Each run in it (start task or task) gets a fresh writable layer of its
own, as each container starts from the pristine image, so what one run installs into the
image is gone for the next one; what must outlive a run goes to the node's shared directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BareImage",
    "ImageReference",
    "default_images",
    "node_pull_error",
    "parse_reference",
    "pull_failure",
    "python_version",
    "resolve",
    "slim_image",
]

_DEFAULT_DOMAIN = "docker.io"
_LEGACY_DOMAINS = frozenset({"index.docker.io", "registry-1.docker.io"})

#: The code and message Batch reports when a container image cannot be pulled.
#: ``ContainerInvalidImage`` is the task failure code the Batch docs list for "the container
#: image was invalid" (TaskFailureInformationCodes, learn.microsoft.com/dotnet/api/
#: microsoft.azure.batch.common.taskfailureinformationcodes); the message and the
#: ``ContainerImage``/``Message`` details are those the service sent for an image it could not
#: pull (github.com/Azure/Batch/issues/49). A pool whose prefetched image cannot be pulled
#: reports the same code as a node error (github.com/microsoft/ProjectAcoustics/issues/76).
PULL_FAILURE_CODE = "ContainerInvalidImage"
PULL_FAILURE_MESSAGE = "One or more container images specified are invalid"


@dataclass(frozen=True)
class ImageReference:
    """An image reference split as ``docker pull`` reads it."""

    repository: str
    tag: str | None
    digest: str | None

    @property
    def canonical(self) -> str:
        """The full reference with the implicit registry and ``:latest`` filled in."""
        if self.digest is not None:
            head = f"{self.repository}:{self.tag}" if self.tag else self.repository
            return f"{head}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"


def parse_reference(image: str) -> ImageReference:
    """Split ``image`` into repository, tag and digest, filling in what Docker implies.

    ``python:3.11-slim``, ``library/python:3.11-slim`` and
    ``docker.io/library/python:3.11-slim`` are the same image; so are ``worker`` and
    ``worker:latest`` (the specification: "If no tag is provided as part of the Image name,
    the tag ':latest' is used as a default"). Case is kept: Docker refuses upper-case
    repository names, so ``Python:3.11`` is another, unpullable, image.
    """
    name, _, digest = image.strip().partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, parts[1:]
    else:
        domain, path = _DEFAULT_DOMAIN, parts
    if domain in _LEGACY_DOMAINS:
        domain = _DEFAULT_DOMAIN
    if domain == _DEFAULT_DOMAIN and len(path) == 1:
        path = ["library", *path]
    return ImageReference("/".join([domain, *path]), tag or None, digest or None)


def resolve(table: Mapping[str, str], image: str) -> str | None:
    """The interpreter that stands in for ``image``, or None when ``image`` cannot be pulled.

    An entry with a tag or digest matches that exact image; an entry without either stands
    for every tag of its repository (``{"myregistry.azurecr.io/worker": python}`` serves
    ``worker:1`` and ``worker:2``). An exact entry wins over a repository-wide one.
    """
    if not image.strip():
        return None
    wanted = parse_reference(image)
    repository_wide: str | None = None
    for key, python in table.items():
        ref = parse_reference(key)
        if ref.repository != wanted.repository:
            continue
        explicit = ":" in key.rsplit("/", 1)[-1] or "@" in key
        if not explicit:
            repository_wide = repository_wide or python
            continue
        if ref.digest is not None:
            if ref.digest == wanted.digest:
                return python
        elif (ref.tag or "latest") == (wanted.tag or "latest"):
            return python
    return repository_wide


def slim_image(version: tuple[int, int] | None = None) -> str:
    """The official Python image for a ``major.minor`` version: ``python:3.11-slim``."""
    major, minor = version or sys.version_info[:2]
    return f"python:{major}.{minor}-slim"


def python_version(python: str) -> tuple[int, int]:
    """The ``(major, minor)`` of the interpreter at ``python``.

    An interpreter that cannot say (a stand-in script that is not Python) counts as this
    process's version: the emulator must still start, and the runs it serves show the fault.
    """
    own = (sys.version_info[0], sys.version_info[1])
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return own
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        return (int(out[0]), int(out[1]))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return own


def default_images(python: str) -> dict[str, str]:
    """The images every emulated account can pull, all run by ``python``.

    The project's standard worker image for the interpreter's Python (the client's default
    ``BatchConfig.image``) and the official ``python:X.Y-slim`` image that the no-Docker
    path runs on. Both need the interpreter's own minor version: cloudpickle loads only
    what the same minor version dumped.
    """
    from joblib_azurebatch.config import default_image

    major, minor = python_version(python)
    return {default_image(f"{major}.{minor}"): python, slim_image((major, minor)): python}


def _failure_details(image: str, table: Mapping[str, str]) -> list[dict[str, str]]:
    known = ", ".join(sorted(table)) or "none"
    why = (
        f"manifest for {image} not found: manifest unknown (the emulator pulls only the "
        f"images of its images table: {known})"
    )
    return [{"name": "ContainerImage", "value": image}, {"name": "Message", "value": why}]


def pull_failure(image: str, table: Mapping[str, str]) -> dict[str, Any]:
    """The ``failureInfo`` of a task or start task whose container image cannot be pulled.

    A pre-processing error: the command never ran, so there is no exit code, and Batch does
    not retry it (the specification's ``retryCount``: "pre-processing errors (the Task could
    not be run) ... are not retried").
    """
    return {
        "category": "usererror",
        "code": PULL_FAILURE_CODE,
        "message": PULL_FAILURE_MESSAGE,
        "details": _failure_details(image, table),
    }


def node_pull_error(image: str, table: Mapping[str, str]) -> dict[str, Any]:
    """The node ``errors`` entry of a node whose pool prefetches an image it cannot pull.

    The Batch docs ("Check for pool and node errors", Container download failure,
    learn.microsoft.com/azure/batch/batch-pool-node-error-checking): "The node errors
    property reports a failure to download a container and sets the node state to
    unusable", and "Batch will not automatically attempt to recover VMs that failed to
    install ... containers".
    """
    return {
        "code": PULL_FAILURE_CODE,
        "message": PULL_FAILURE_MESSAGE,
        "errorDetails": _failure_details(image, table),
    }


class BareImage:
    """The official ``python:X.Y-slim`` image on the local disk: Python and pip, nothing else.

    One virtualenv, made once with ``python -m venv`` (without the system site-packages,
    with pip, as the image has pip), is the image. No run uses it in place: :meth:`layer`
    makes a thin virtualenv per run whose site-packages come first and are writable, with
    the image's site-packages (pip, setuptools) behind them. So a run that installs into the
    image changes only its own layer, which the executor throws away when the run ends,
    as Batch throws away a task's container.
    """

    def __init__(self, path: Path, *, base_python: str | None = None) -> None:
        self.path = path
        self.base_python = base_python or sys.executable

    @property
    def python(self) -> str:
        """The image's interpreter (``bin/python`` of the virtualenv)."""
        return str(self.path / "bin" / "python")

    @property
    def exists(self) -> bool:
        """Whether :meth:`create` has made the image."""
        return (self.path / "pyvenv.cfg").is_file() and os.path.exists(self.python)

    def create(self) -> None:
        """Make the virtualenv (about four seconds, most of it ensurepip)."""
        if self.exists:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [self.base_python, "-m", "venv", str(self.path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=_clean_environment(),
            check=False,
        )
        if done.returncode != 0 or not self.exists:
            raise RuntimeError(
                f"could not make the bare python image with {self.base_python} -m venv "
                f"{self.path} (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )

    def _config(self) -> dict[str, str]:
        out = {}
        for line in (self.path / "pyvenv.cfg").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def _site_packages(self) -> Iterator[Path]:
        yield from sorted((self.path / "lib").glob("python*/site-packages"))

    def layer(self, dest: Path) -> str:
        """Make a fresh writable layer over the image at ``dest``; returns its interpreter."""
        config = self._config()
        real = os.path.realpath(self.python)
        version = config.get("version", "")
        libs = [p.parent.name for p in self._site_packages()]  # ["python3.11"]
        short = libs[0].removeprefix("python") if libs else ".".join(version.split(".")[:2])
        bindir = dest / "bin"
        bindir.mkdir(parents=True)
        (dest / "pyvenv.cfg").write_text(
            f"home = {config.get('home', os.path.dirname(real))}\n"
            "include-system-site-packages = false\n"
            f"version = {version}\n",
            encoding="utf-8",
        )
        exe = f"python{short}"
        os.symlink(real, bindir / exe)
        for alias in ("python", "python3"):
            os.symlink(exe, bindir / alias)
        site = dest / "lib" / f"python{short}" / "site-packages"
        site.mkdir(parents=True)
        lines = "".join(
            f"import site; site.addsitedir({str(p)!r})\n" for p in self._site_packages()
        )
        (site / "_image.pth").write_text(lines, encoding="utf-8")
        self._copy_scripts(bindir / exe, bindir)
        return str(bindir / "python")

    def _copy_scripts(self, python: Path, bindir: Path) -> None:
        """The image's console scripts (``pip``), started by the layer's interpreter."""
        source = self.path / "bin"
        for entry in source.iterdir():
            if entry.is_symlink() or not entry.is_file() or not os.access(entry, os.X_OK):
                continue
            with open(entry, "rb") as f:
                first = f.readline()
                rest = f.read()
            if not first.startswith(b"#!") or str(source).encode() not in first:
                continue
            target = bindir / entry.name
            target.write_bytes(b"#!" + str(python).encode() + b"\n" + rest)
            shutil.copymode(entry, target)


def _clean_environment() -> dict[str, str]:
    """The environment to make the image in: nothing that points Python elsewhere."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("__PYVENV")}
