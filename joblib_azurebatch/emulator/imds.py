"""Each node's instance metadata endpoint (IMDS): tokens of its pool's managed identities.

On Azure a process on a node asks ``http://169.254.169.254/metadata/identity/oauth2/token``
for a token of a managed identity the node has; nothing in the request proves anything but
that it comes from that VM. Tests cannot bind that address, and local processes cannot be
told apart by theirs, so the emulator serves the same protocol under a path that names the
node with a random token, ``{account url}/_imds/{token}/metadata/identity/oauth2/token``, and
tells the node's processes (tasks and start tasks) where it is through
``AZURE_POD_IDENTITY_AUTHORITY_HOST``, the variable that azure-identity, MSAL and the
library's ``bootstrap.py`` read in place of the IMDS address. Production code has no branch
for it: on Azure the variable is unset and the real IMDS answers.

The answers are IMDS's. A token of the requested identity (by ``client_id``, ``object_id``
or ``msi_res_id``; without one, the pool's only identity) for the requested ``resource``,
minted by the emulator's token service (:class:`~.tls.TokenRegistry`), which Azurite started
with OAuth accepts; ``400 invalid_request "Identity not found"`` when the node's pool has no
such identity (or none at all), as a VM without that identity answers; ``400`` without the
``Metadata: true`` header.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .models import Account, ManagedIdentity, Node
from .tls import TokenRegistry

__all__ = ["HOST_ENV", "PREFIX", "STORAGE_SCOPE", "TOKEN_PATH", "answer", "host_for", "token_for"]

#: Where the emulator serves the metadata endpoints (one per node, below this prefix).
PREFIX = "/_imds/"
#: IMDS's token path, below the host.
TOKEN_PATH = "/metadata/identity/oauth2/token"
#: The variable that moves IMDS for azure-identity, MSAL and bootstrap.py.
HOST_ENV = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
#: What Batch's node agent asks for when it fetches a resource file as an identity.
STORAGE_SCOPE = "https://storage.azure.com/.default"
#: IMDS hands out tokens valid for about a day.
TOKEN_LIFETIME = 86400.0

JSON = dict[str, Any]
_SELECTORS = ("client_id", "object_id", "msi_res_id", "mi_res_id")


def host_for(base_url: str, node: Node) -> str:
    """The value of ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` for the processes of ``node``."""
    return f"{base_url}{PREFIX}{node.metadata_token}"


def _error(code: str, description: str) -> tuple[int, JSON]:
    return 400, {"error": code, "error_description": description}


def _chosen(identities: list[ManagedIdentity], query: Mapping[str, str]) -> ManagedIdentity | str:
    """The identity the request names, or IMDS's error description."""
    given = [(name, query[name]) for name in _SELECTORS if query.get(name)]
    if len(given) > 1:
        return "Only one of client_id, object_id and msi_res_id may be given"
    if not given:
        if len(identities) == 1:
            return identities[0]
        if identities:
            return (
                "Multiple user assigned identities exist, please specify the clientId / "
                "resourceId of the identity in the token request"
            )
        return "Identity not found"
    name, value = given[0]
    wanted = value.lower()
    for identity in identities:
        found = {
            "client_id": identity.client_id,
            "object_id": identity.principal_id,
            "msi_res_id": identity.resource_id,
            "mi_res_id": identity.resource_id,
        }[name]
        if found.lower() == wanted:
            return identity
    return "Identity not found"


def token_for(tokens: TokenRegistry, identity: ManagedIdentity, scope: str) -> tuple[str, int]:
    """A token of ``identity`` for ``scope``: (token, expiry as a Unix time)."""
    return tokens.issue(
        scope,
        lifetime=TOKEN_LIFETIME,
        claims={
            "oid": identity.principal_id,
            "sub": identity.principal_id,
            "appid": identity.client_id,
            "xms_mirid": identity.resource_id,
        },
    )


def answer(
    account: Account,
    tokens: TokenRegistry,
    *,
    method: str,
    raw_path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
) -> tuple[int, JSON]:
    """IMDS's answer to one request below :data:`PREFIX` (call with the account lock held)."""
    token, _, rest = raw_path[len(PREFIX) :].partition("/")
    found = account.node_by_metadata_token(token) if token else None
    if found is None or f"/{rest}".rstrip("/") != TOKEN_PATH:
        return 404, {"error": "not_found", "error_description": "No such metadata endpoint"}
    if method != "GET":
        return 405, {"error": "invalid_request", "error_description": "Only GET is allowed"}
    if headers.get("metadata", "").lower() != "true":
        return _error("invalid_request", "Required metadata header not specified")
    for name in ("api-version", "resource"):
        if not query.get(name):
            return _error("invalid_request", f"Required query variable '{name}' is missing")
    pool, _node = found
    chosen = _chosen(pool.identities, query)
    if isinstance(chosen, str):
        return _error("invalid_request", chosen)
    resource = query["resource"]
    access_token, expires = token_for(tokens, chosen, resource)
    now = int(time.time())
    return 200, {
        "access_token": access_token,
        "client_id": chosen.client_id,
        "expires_in": str(expires - now),
        "expires_on": str(expires),
        "ext_expires_in": str(expires - now),
        "not_before": str(now),
        "resource": resource,
        "token_type": "Bearer",
    }
