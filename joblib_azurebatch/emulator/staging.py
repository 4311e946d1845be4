"""Moving a task's files in and out: ``resourceFiles`` before it runs, ``outputFiles`` after.

A node reaches storage only through the URLs in the task (SAS URLs, as on Azure), or as
one of its pool's managed identities when a file names it in ``identityReference`` (a
token of that identity; a pool without it is refused, ``BlobAccessDenied``), never through
the emulator's own credentials, so a task that works here works on a real pool. Failures
are returned as a Batch ``failureInfo`` (category and code) for the executor to record on
the task, the way the node agent reports them.
"""

from __future__ import annotations

import glob
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["StagingError", "TokenFor", "download_resource_files", "upload_output_files"]

#: ``token_for(identity resource id, url)``: a storage token of the pool's identity, or a
#: `StagingError` when the pool has no such identity.
TokenFor = Callable[[str, str], str]
#: Bearer tokens need a storage API version of 2017-11-09 or later.
_BLOB_API_VERSION = "2021-08-06"


class StagingError(Exception):
    """A file could not be staged; carries the ``failureInfo`` the task ends with."""

    def __init__(self, category: str, code: str, message: str) -> None:
        super().__init__(message)
        self.failure_info: dict[str, Any] = {
            "category": category,
            "code": code,
            "message": message,
            "details": [{"name": "Message", "value": message}],
        }


def _inside(base: Path, rel: str) -> Path:
    target = (base / rel.replace("\\", "/")).resolve()
    if base.resolve() not in (target, *target.parents):
        raise StagingError(
            "usererror", "InvalidFilePath", f"filePath {rel!r} points outside the task directory"
        )
    return target


#: Certificates the node agent trusts besides the system's: the local account's own, when
#: it serves https (a real node trusts Azure Storage's public certificates).
_TRUSTED: set[str] = set()
_trust_lock = threading.Lock()


def trust(cafile: str | Path) -> None:
    """Trust ``cafile`` for resource and output files, as a node trusts Azure's certificates."""
    with _trust_lock:
        _TRUSTED.add(str(cafile))


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    with _trust_lock:
        for cafile in sorted(_TRUSTED):
            if os.path.exists(cafile):  # an account that stopped took its certificate along
                context.load_verify_locations(cafile=cafile)
    return context


def _verify_path() -> str | None:
    """A trusted certificate file for the SDK's ``connection_verify`` (which takes one)."""
    with _trust_lock:
        return next((c for c in sorted(_TRUSTED) if os.path.exists(c)), None)


def _bearer(token: str | None) -> dict[str, str]:
    if token is None:
        return {}
    return {"Authorization": f"Bearer {token}", "x-ms-version": _BLOB_API_VERSION}


def _identity(spec: Mapping[str, Any], token_for: TokenFor | None, url: str) -> str | None:
    """The token a file is fetched with: None for a URL that carries its own access."""
    resource_id = (spec.get("identityReference") or {}).get("resourceId")
    if not resource_id:
        return None
    if token_for is None:
        raise StagingError(
            "usererror",
            "BlobAccessDenied",
            f"Access to {_redact(url)} was denied: this node has no managed identity",
        )
    return token_for(str(resource_id), _redact(url))


def _http_get(url: str, token: str | None = None) -> bytes:
    try:
        request = urllib.request.Request(url, headers=_bearer(token))
        with urllib.request.urlopen(request, timeout=60, context=_context()) as resp:
            data: bytes = resp.read()
            return data
    except urllib.error.HTTPError as e:
        category = "usererror" if 400 <= e.code < 500 else "servererror"
        code = "BlobAccessDenied" if e.code == 403 else "BlobDownloadMiscError"
        if e.code == 404:
            code = "BlobNotFound"
        raise StagingError(
            category, code, f"Downloading {_redact(url)} failed with HTTP {e.code}"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise StagingError(
            "servererror", "BlobDownloadMiscError", f"Downloading {_redact(url)} failed: {e}"
        ) from e


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class _FixedToken:
    """A token credential that hands out one token (the node agent's, for one file)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, int(time.time()) + 3600)


def _container_blobs(
    container_url: str, prefix: str | None, token: str | None = None
) -> list[tuple[str, bytes]]:
    from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
    from azure.storage.blob import ContainerClient

    try:
        credential = _FixedToken(token) if token is not None else None
        container = ContainerClient.from_container_url(
            container_url,
            credential=credential,
            connection_verify=_verify_path() or True,
        )
        out = []
        for props in container.list_blobs(name_starts_with=prefix or None):
            out.append((props.name, container.download_blob(props.name).readall()))
        return out
    except ClientAuthenticationError as e:
        raise StagingError(
            "usererror", "ResourceContainerAccessDenied", f"Listing {_redact(container_url)}: {e}"
        ) from e
    except HttpResponseError as e:
        status = e.status_code or 500
        raise StagingError(
            "usererror" if 400 <= status < 500 else "servererror",
            "ResourceContainerListMiscError",
            f"Listing {_redact(container_url)} failed with HTTP {status}",
        ) from e
    except AzureError as e:
        raise StagingError(
            "servererror", "ResourceContainerListMiscError", f"{_redact(container_url)}: {e}"
        ) from e


def download_resource_files(
    files: Sequence[Mapping[str, Any]], workdir: Path, *, token_for: TokenFor | None = None
) -> None:
    """Fetch each resource file into ``workdir`` as the node agent does before the task runs.

    A file with ``identityReference`` is fetched with a token of that identity
    (``token_for``), which the node's pool must have.
    """
    for spec in files:
        file_path = spec.get("filePath")
        if spec.get("httpUrl"):
            url = str(spec["httpUrl"])
            rel = file_path or os.path.basename(urlsplit(url).path)
            target = _inside(workdir, str(rel))
            token = _identity(spec, token_for, url)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_http_get(url, token))
            _chmod(target, spec.get("fileMode"))
        elif spec.get("storageContainerUrl"):
            base = _inside(workdir, str(file_path)) if file_path else workdir
            container_url = str(spec["storageContainerUrl"])
            token = _identity(spec, token_for, container_url)
            for name, data in _container_blobs(container_url, spec.get("blobPrefix"), token):
                target = _inside(base, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                _chmod(target, spec.get("fileMode"))
        else:
            raise StagingError(
                "usererror",
                "ResourceFileSourceNotSupported",
                "A resource file needs httpUrl or storageContainerUrl in the emulator "
                "(autoStorageContainerName needs a linked storage account).",
            )


def _chmod(path: Path, mode: Any) -> None:
    if mode:
        path.chmod(int(str(mode), 8))


def _wanted(condition: str, exit_code: int) -> bool:
    cond = condition.lower()
    if cond == "tasksuccess":
        return exit_code == 0
    if cond == "taskfailure":
        return exit_code != 0
    return True


def _blob_names(pattern: str, workdir: Path, path: str | None) -> list[tuple[Path, str]]:
    """Match ``pattern`` and name each blob as Batch does: a single file goes to ``path``;
    with wildcards, ``path`` is a virtual directory and each file keeps its name relative
    to the pattern's fixed leading directories."""
    pattern = pattern.replace("\\", "/")
    full = pattern if os.path.isabs(pattern) else str(workdir / pattern)
    matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    parts = pattern.split("/")
    fixed: list[str] = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    has_wildcard = any(ch in pattern for ch in "*?[")
    anchor = Path(os.path.normpath(os.path.join(str(workdir), *fixed))) if fixed else workdir
    if os.path.isabs(pattern):
        anchor = Path(os.path.normpath("/" + "/".join(fixed)))
    out: list[tuple[Path, str]] = []
    for match in matches:
        if not has_wildcard:
            name = path or match.name
        else:
            rel = os.path.relpath(os.path.normpath(match), anchor).replace(os.sep, "/")
            name = f"{path.rstrip('/')}/{rel}" if path else rel
        out.append((match, name))
    return out


def _put(
    container_url: str,
    name: str,
    data: bytes,
    headers: Sequence[Mapping[str, str]],
    token: str | None = None,
) -> None:
    parts = urlsplit(container_url)
    blob_path = parts.path.rstrip("/") + "/" + quote(name)
    url = urlunsplit((parts.scheme, parts.netloc, blob_path, parts.query, ""))
    req = urllib.request.Request(url, data=data, method="PUT")
    req.add_header("x-ms-blob-type", "BlockBlob")
    req.add_header("x-ms-version", _BLOB_API_VERSION)
    for header, value in _bearer(token).items():
        req.add_header(header, value)
    for h in headers:
        req.add_header(str(h.get("name")), str(h.get("value", "")))
    try:
        with urllib.request.urlopen(req, timeout=60, context=_context()):
            pass
    except urllib.error.HTTPError as e:
        code = {
            403: "FileUploadAuthenticationError",
            404: "FileUploadContainerNotFound",
        }.get(e.code, "FileUploadMiscError")
        raise StagingError(
            "usererror" if 400 <= e.code < 500 else "servererror",
            code,
            f"Uploading {name!r} to {_redact(container_url)} failed with HTTP {e.code}",
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise StagingError(
            "servererror", "FileUploadMiscError", f"Uploading {name!r} failed: {e}"
        ) from e


def upload_output_files(
    files: Sequence[Mapping[str, Any]],
    workdir: Path,
    exit_code: int,
    *,
    token_for: TokenFor | None = None,
) -> None:
    """Upload the output files whose ``uploadCondition`` holds for ``exit_code`` (as the
    pool's identity when the destination names one in ``identityReference``)."""
    for spec in files:
        condition = str(spec.get("uploadOptions", {}).get("uploadCondition", "taskCompletion"))
        if not _wanted(condition, exit_code):
            continue
        container = spec.get("destination", {}).get("container")
        if not container:
            raise StagingError(
                "usererror", "FileUploadMiscError", "outputFiles needs destination.container"
            )
        pattern = str(spec.get("filePattern", ""))
        container_url = str(container["containerUrl"])
        token = _identity(container, token_for, container_url)
        for local, name in _blob_names(pattern, workdir, container.get("path")):
            _put(
                container_url,
                name,
                local.read_bytes(),
                container.get("uploadHeaders", []),
                token,
            )
