"""One Entra ID credential per config, shared by the Batch and blob clients, closed with them.

Without an account key, both clients of a config authenticate with a token credential. When
the config names none, this library creates a ``DefaultAzureCredential``; one per client
would walk the credential chain twice, hold two token caches and two sets of HTTP sessions
(managed identity, workload identity), and nobody would close either. So the credential is
created once per :class:`~joblib_azurebatch.config.BatchConfig` object, every client that
uses it holds a :class:`CredentialLease`, and the last lease released closes it.

A credential the user passed (``batch_credential=``, ``storage_credential=``) is theirs:
it is used as given and never closed here.

The cache is keyed by the identity of the config, not by equality: two equal configs made
separately get two credentials, and a config that is garbage-collected never hands its
credential to a new config that happens to reuse its ``id``. The entry goes away when its
last lease is released; a config whose clients are never closed leaves an entry that the
next lookup drops once the config is gone.

This module imports no Azure SDK: the caller passes the factory (batch.py and storage.py,
the only modules that speak to the SDKs, import ``azure.identity``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from .forks import after_fork

if TYPE_CHECKING:
    from .config import BatchConfig, TokenCredentialLike

__all__ = ["CredentialLease", "lease_credential"]

_log = logging.getLogger(__name__)


class _Shared:
    """A credential this library created for one config, and how many clients hold it."""

    def __init__(
        self, key: int, owner: weakref.ref[BatchConfig], credential: TokenCredentialLike
    ) -> None:
        self.key = key
        self.owner = owner
        self.credential = credential
        self.holders = 0


# Reentrant: a garbage collection inside the lock may finalize a client, whose close
# releases its lease.
_lock = threading.RLock()
_shared: dict[int, _Shared] = {}


def _forget_after_fork() -> None:
    """A forked child makes its own credentials: the parent's hold its connections and
    their tokens' refresh (:mod:`joblib_azurebatch.forks`)."""
    global _lock, _shared
    _lock = threading.RLock()
    _shared = {}


after_fork(_forget_after_fork)


class CredentialLease:
    """One client's hold on a token credential.

    :meth:`release` is called by the client's ``close`` and may be called again: only the
    first call counts. Releasing a user's credential does nothing.
    """

    def __init__(self, credential: TokenCredentialLike, shared: _Shared | None = None) -> None:
        self._credential = credential
        self._shared = shared

    @property
    def credential(self) -> TokenCredentialLike:
        """The credential to give the SDK client."""
        return self._credential

    @property
    def owned(self) -> bool:
        """Whether this library created the credential (and so closes it)."""
        return self._shared is not None

    def release(self) -> None:
        """Let go of the credential; the last holder of a created one closes it."""
        with _lock:
            shared, self._shared = self._shared, None
            if shared is None:
                return
            shared.holders -= 1
            if shared.holders > 0:
                return
            if _shared.get(shared.key) is shared:
                del _shared[shared.key]
        close = getattr(shared.credential, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:  # closing must not hide what the caller is doing
                _log.warning("closing the Entra ID credential failed: %s", e)


def lease_credential(
    cfg: BatchConfig,
    given: TokenCredentialLike | None,
    create: Callable[[], TokenCredentialLike],
) -> CredentialLease:
    """The token credential a client of ``cfg`` should use, held until the client closes.

    ``given`` is the user's own credential for this client (``cfg.batch_credential`` or
    ``cfg.storage_credential``): when set it is returned as is and never closed. Otherwise
    the credential shared by every client of this config object is returned, made by
    ``create`` on first use.
    """
    if given is not None:
        return CredentialLease(given)
    key = id(cfg)
    with _lock:
        shared = _current(key, cfg)
        if shared is not None:
            shared.holders += 1
            return CredentialLease(shared.credential, shared)
    # Made outside the lock: building a DefaultAzureCredential imports modules, and a
    # garbage collection then may close another client, whose release takes the lock.
    made: TokenCredentialLike | None = create()
    with _lock:
        shared = _current(key, cfg)
        if shared is None:
            assert made is not None
            shared = _Shared(key, weakref.ref(cfg), made)
            _shared[key] = shared
            made = None
        shared.holders += 1
    if made is not None:  # another thread made one first: use it, close ours
        close = getattr(made, "close", None)
        if callable(close):
            close()
    return CredentialLease(shared.credential, shared)


def _current(key: int, cfg: BatchConfig) -> _Shared | None:
    """The live shared credential of ``cfg`` (call with the lock held)."""
    for stale in [k for k, s in _shared.items() if s.owner() is None]:
        del _shared[stale]
    shared = _shared.get(key)
    return shared if shared is not None and shared.owner() is cfg else None
