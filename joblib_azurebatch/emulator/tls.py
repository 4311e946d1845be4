"""HTTPS and Entra ID tokens for the emulator, so the token path of a client can be tested.

azure-core refuses to send a bearer token over plain http, so testing ``TokenCredential``
code needs the emulator on https: :func:`self_signed_certificate` makes a certificate for
127.0.0.1 that the client trusts through ``connection_verify`` (or ``REQUESTS_CA_BUNDLE``).
Tokens are issued by the emulator itself (:class:`LocalTokenCredential`): unsigned JWTs it
remembers together with the scope they were asked for, and accepts only for the Batch
resource, as Entra ID tokens are only good for their audience. Their claims (audience,
issuer, lifetime) are those of Entra ID, so that Azurite started with ``--oauth basic``,
which checks claims but not signatures, accepts the same credential's storage tokens.
"""

from __future__ import annotations

import base64
import datetime as _dt
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BATCH_SCOPE", "LocalTokenCredential", "TokenRegistry", "self_signed_certificate"]

#: The scope azure-batch asks its credential for.
BATCH_SCOPE = "https://batch.core.windows.net//.default"
#: The tenant named in the tokens' issuer and ``tid`` claims.
_TENANT = "72f988bf-0000-4000-8000-00000000b47c"


def _jwt(scope: str, issued: float, expires: float, claims: Mapping[str, str] | None = None) -> str:
    """An unsigned JWT shaped like Entra ID's for ``scope``'s resource; ``claims`` name
    the principal (a managed identity's ``oid`` and ``appid``) when it is not the default."""

    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    body: dict[str, Any] = {
        "aud": scope.removesuffix("/.default").rstrip("/"),
        "iss": f"https://sts.windows.net/{_TENANT}/",
        "iat": int(issued),
        "nbf": int(issued) - 60,
        "exp": int(expires),
        "oid": "00000000-0000-4000-8000-00000000e417",
        "tid": _TENANT,
        "jti": secrets.token_urlsafe(16),
        **(claims or {}),
    }
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body)}.{secrets.token_urlsafe(8)}"


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a certificate and key for 127.0.0.1/localhost into ``folder``; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "joblib-azurebatch local Batch")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "batch-emulator-cert.pem"
    key_path = folder / "batch-emulator-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class TokenRegistry:
    """The tokens this emulator issued: token → (scope, expiry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}

    def issue(
        self, scope: str, *, lifetime: float = 3600.0, claims: Mapping[str, str] | None = None
    ) -> tuple[str, int]:
        """A new token for ``scope`` (with ``claims`` on top of the defaults); returns
        (token, expiry as a Unix time)."""
        now = time.time()
        expires = now + lifetime
        token = _jwt(scope, now, expires, claims)
        with self._lock:
            self._tokens[token] = (scope, expires)
        return token, int(expires)

    def check(self, token: str) -> str | None:
        """Why ``token`` is refused, or None when it is a live token for the Batch resource."""
        with self._lock:
            found = self._tokens.get(token)
        if found is None:
            return "The access token was not issued for this account."
        scope, expires = found
        if time.time() >= expires:
            return "The access token has expired."
        if (
            scope.rstrip("/").removesuffix("/.default").rstrip("/")
            != "https://batch.core.windows.net"
        ):
            return f"The access token's audience ({scope}) is not the Batch service."
        return None


class LocalTokenCredential:
    """A ``TokenCredential`` whose tokens the emulator accepts, standing in for Entra ID."""

    def __init__(self, registry: TokenRegistry, *, lifetime: float = 3600.0) -> None:
        self._registry = registry
        self._lifetime = lifetime
        self.requests = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """Issue a token for the first scope, as ``azure.identity`` credentials do."""
        from azure.core.credentials import AccessToken

        self.requests += 1
        token, expires = self._registry.issue(scopes[0] if scopes else "", lifetime=self._lifetime)
        return AccessToken(token, expires)
