"""Shared Key verification, computed from the request exactly as the Batch service does.

The string to sign is rebuilt from what arrived on the wire: the method, the eleven standard
headers (``content-length`` counted as ``"0"`` for a bodied verb that sent none), every
``ocp-*`` header sorted by name, ``/{account}{raw path}`` with the path still
percent-encoded, then the decoded query parameters sorted by name. A request whose
signature, account or date does not hold gets 403 ``AuthenticationFailed`` before any
handler runs, so a refused request never changes state.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import email.utils
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qs

from .errors import BatchServiceError, batch_error

__all__ = ["SharedKeyVerifier", "string_to_sign"]

_HEADERS_TO_SIGN = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def string_to_sign(
    *,
    method: str,
    headers: Mapping[str, str],
    account: str,
    raw_path: str,
    query_string: str,
) -> str:
    """Rebuild the string that the client signed; ``headers`` must have lower-case names."""
    present = {k: v for k, v in headers.items() if v}
    if method not in ("GET", "HEAD") and "content-length" not in present:
        present["content-length"] = "0"
    out = method + "\n"
    out += "\n".join(present.get(h, "") for h in _HEADERS_TO_SIGN) + "\n"
    ocp = sorted((k, v) for k, v in present.items() if "ocp-" in k)
    for name, value in ocp:
        out += f"{name}:{value}\n"
    out += f"/{account}{raw_path}"
    query = parse_qs(query_string)
    for name in sorted(query):
        value = query[name][0]
        if value:
            out += f"\n{name}:{value}"
    return out


class SharedKeyVerifier:
    """Checks the ``Authorization: SharedKey`` header of each request against the account key."""

    def __init__(self, *, account: str, key: str, max_clock_skew: float = 900.0) -> None:
        self.account = account
        try:
            self._key = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(
                "the emulator's account key must be base64, like a real Batch account key"
            ) from e
        self.max_clock_skew = max_clock_skew

    def sign(self, text: str) -> str:
        """The base64 HMAC-SHA256 of ``text`` under the account key."""
        digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")

    def verify(
        self,
        *,
        method: str,
        headers: Mapping[str, str],
        raw_path: str,
        query_string: str,
        now: _dt.datetime | None = None,
    ) -> None:
        """Raise 403 ``AuthenticationFailed`` unless the request is signed with the account key."""
        auth = headers.get("authorization", "")
        if not auth:
            raise _refused("The request does not carry an Authorization header.")
        scheme, _, credential = auth.partition(" ")
        if scheme != "SharedKey":
            raise _refused(f"The authentication scheme {scheme!r} is not supported.")
        account, _, signature = credential.strip().partition(":")
        if account != self.account:
            raise _refused(f"The account {account!r} does not match this account.")
        self._check_date(headers, now or _dt.datetime.now(_dt.timezone.utc))
        expected = self.sign(
            string_to_sign(
                method=method,
                headers=headers,
                account=self.account,
                raw_path=raw_path,
                query_string=query_string,
            )
        )
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise _refused(
                "The MAC signature found in the HTTP request is not the same as any computed "
                "signature."
            )

    def _check_date(self, headers: Mapping[str, str], now: _dt.datetime) -> None:
        raw = headers.get("ocp-date") or headers.get("date")
        if not raw:
            raise _refused("The request carries neither an ocp-date nor a Date header.")
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError) as e:
            raise _refused(f"The request date {raw!r} is not an RFC 1123 date.") from e
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        skew = abs((now - when).total_seconds())
        if skew > self.max_clock_skew:
            raise _refused(
                f"The request date {raw!r} is {skew:.0f} s away from the server's clock "
                f"(more than {self.max_clock_skew:.0f} s)."
            )


def _refused(reason: str) -> BatchServiceError:
    return batch_error("AuthenticationFailed", AuthenticationErrorDetail=reason)
