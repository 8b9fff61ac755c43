"""API keys, origin checks and session admission for the HTTP and WebSocket endpoints."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.server.table import MAX_SESSIONS, MAX_SESSIONS_PER_KEY, WorkerSlot, key_hash


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. ``key_id`` is a short hash of the key, safe to log and to count by;
    the key itself is never stored beyond the comparison."""

    key_id: str


ANONYMOUS = Principal(key_id="anonymous")


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class KeyChecker:
    def __init__(self, keys: Iterable[str]) -> None:
        # Compare digests: equal length inputs, so compare_digest's time does not depend
        # on how much of a guess matches or on the real key's length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Principal | None:
        """The caller's principal, or None if a key is required and missing or wrong."""
        if not self._digests:
            return ANONYMOUS
        token = ""
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
        elif query.get("access_token"):
            token = query["access_token"]
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for d in self._digests:  # no early exit: time does not reveal which key matched
            ok |= hmac.compare_digest(d, digest)
        return Principal(key_id(token)) if ok else None


# The page scheme that goes with a connection's scheme.
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


class OriginPolicy:
    """Cross-site WebSocket hijacking defence.

    A browser always sends ``Origin`` on a WebSocket upgrade, and cookies or cached
    credentials ride along, so a page on another site must not be able to open a session.
    With an allowlist, only listed origins pass (``*`` allows all). Without one, a browser
    origin must be the gateway's own: the ``Host`` it connects to, and the matching scheme
    (``http`` for ``ws``, ``https`` for ``wss``; behind a TLS proxy, uvicorn takes the
    scheme from a trusted ``X-Forwarded-Proto``). Clients without ``Origin`` (servers,
    scripts) are not browsers and pass.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = {o.rstrip("/").lower() for o in allowed}

    def allows(self, origin: str | None, host: str | None, scheme: str | None = None) -> bool:
        """``scheme`` is the connection's own (``ws``/``wss``); None skips that check."""
        if origin is None:
            return True
        o = origin.rstrip("/").lower()
        if self._allowed:
            return "*" in self._allowed or o in self._allowed
        if o == "null" or not host:
            return False
        parts = urlsplit(o)
        if scheme is not None and parts.scheme != _HTTP_SCHEME.get(scheme.lower()):
            return False
        return parts.netloc == host.lower()


class SessionLimiter:
    """Global and per-key caps on concurrent sessions.

    With a ``table`` (``voicegw serve --workers N``) the caps are global across worker
    processes: admission counts every worker's sessions under the table's lock. Without
    one, this process's own counts are the whole story. ``on_refuse`` hears each refusal's
    reason (``max_sessions`` or ``max_sessions_per_key``), for the refusal counter."""

    def __init__(
        self,
        max_sessions: int,
        max_per_key: int,
        *,
        table: WorkerSlot | None = None,
        on_refuse: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_key = max_per_key
        self._table = table
        self._on_refuse = on_refuse
        self._total = 0
        self._per_key: dict[str, int] = {}

    @property
    def active(self) -> int:
        """Sessions held in this process."""
        return self._total

    def try_acquire(self, principal: Principal) -> str | None:
        """None on success, else why not."""
        n = self._per_key.get(principal.key_id, 0)
        anonymous = principal is ANONYMOUS
        if self._table is not None:
            key = None if anonymous else key_hash(principal.key_id)
            reason = self._table.try_admit(key, self.max_sessions, self.max_per_key)
        elif self._total >= self.max_sessions:
            reason = MAX_SESSIONS
        elif not anonymous and n >= self.max_per_key:
            reason = MAX_SESSIONS_PER_KEY
        else:
            reason = None
        if reason is not None:
            self._on_refuse(reason)
            if reason == MAX_SESSIONS:
                return f"the gateway is at its limit of {self.max_sessions} sessions"
            return f"this key is at its limit of {self.max_per_key} sessions"
        self._total += 1
        self._per_key[principal.key_id] = n + 1
        return None

    def release(self, principal: Principal) -> None:
        self._total -= 1
        n = self._per_key.get(principal.key_id, 0) - 1
        if n <= 0:
            self._per_key.pop(principal.key_id, None)
        else:
            self._per_key[principal.key_id] = n
        if self._table is not None:
            self._table.release(None if principal is ANONYMOUS else key_hash(principal.key_id))
