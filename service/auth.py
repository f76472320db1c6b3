"""API tokens and who a request speaks for.

A token is 32 random bytes shown once; only its SHA-256 is stored, which is
enough for secrets of that much entropy (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduling.errors import Forbidden, RateLimited, Unauthorized
from scheduling.models import ApiToken
from storage.repository import Accounts, ConsoleSession, ConsoleStore

TOKEN_PREFIX = "cr_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(repo: Accounts, *, user_id: int, label: str, now: datetime) -> tuple[ApiToken, str]:
    """A new token for a user: its record and the secret (never stored)."""
    token = new_token()
    record = repo.add_token(user_id=user_id, token_hash=token_hash(token), label=label, now=now)
    return record, token


@dataclass(frozen=True)
class Caller:
    """Who a request speaks for: one user, or the administrator."""

    user_id: int | None = None
    admin: bool = False

    def require_user(self) -> int:
        if self.user_id is None:
            raise Forbidden("the admin token manages users and tokens; use a user's token")
        return self.user_id

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden("needs the admin token")


class Authenticator:
    """Bearer token → Caller. A token found valid is trusted for
    ``cache_s`` without asking the database again; revoking through this
    instance forgets every cached token at once."""

    def __init__(
        self,
        user_for_token: Callable[[str], int | None],
        *,
        admin_token: str | None,
        cache_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._user_for_token = user_for_token
        self._admin_token = admin_token
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Caller | None:
        """The answer without I/O, when there is one."""
        if self._admin_token and hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return Caller(admin=True)
        with self._lock:
            hit = self._cache.get(token_hash(token))
        if hit is not None and hit[1] > self._clock():
            return Caller(user_id=hit[0])
        return None

    def authenticate(self, token: str) -> Caller:
        """May ask the database; run it off the event loop."""
        known = self.cached(token)
        if known is not None:
            return known
        digest = token_hash(token)
        user_id = self._user_for_token(digest)
        if user_id is None:
            raise Unauthorized("unknown or revoked token", "authorization")
        with self._lock:
            self._cache[digest] = (user_id, self._clock() + self._cache_s)
        return Caller(user_id=user_id)

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


class RateLimiter:
    """A token bucket per user: ``per_s`` requests a second sustained,
    ``burst`` at once."""

    def __init__(
        self, *, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_s = per_s
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # user: (tokens, at)
        self._lock = threading.Lock()

    def take(self, user_id: int) -> None:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(user_id, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._per_s)
            if tokens < 1.0:
                self._buckets[user_id] = (tokens, now)
                wait_s = (1.0 - tokens) / self._per_s
                raise RateLimited(
                    f"over {self._per_s:g} requests/s for this user", retry_after_s=wait_s
                )
            self._buckets[user_id] = (tokens - 1.0, now)


@dataclass(frozen=True)
class Viewer:
    """Who a console page is shown to: the caller its session speaks for,
    and the session's CSRF token (every form sends it back)."""

    caller: Caller
    csrf_token: str
    session_hash: str


class ConsoleSessions:
    """An API token exchanged for a console session: the browser keeps a
    random session id in an HttpOnly cookie, the database its SHA-256 and
    the token's (never the token), so revoking the token or signing out
    ends the session at once, on every API replica."""

    def __init__(self, store: ConsoleStore, accounts: Accounts, *, lifetime_s: float) -> None:
        self._store, self._accounts, self._lifetime_s = store, accounts, lifetime_s

    def sign_in(self, caller: Caller, token: str, *, now: datetime) -> tuple[str, Viewer]:
        """The new session's id (for the cookie) and who it shows pages to."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(
            session_hash=token_hash(session_id),
            token_hash=None if caller.admin else token_hash(token),
            admin=caller.admin,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(seconds=self._lifetime_s),
        )
        self._store.add_console_session(session)
        return session_id, Viewer(caller, session.csrf_token, session.session_hash)

    def viewer(self, session_id: str, *, now: datetime) -> Viewer:
        session = self._store.console_session(token_hash(session_id), now=now)
        if session is None:
            raise Unauthorized("sign in again: no session, or it ended", "session")
        if session.admin:
            return Viewer(Caller(admin=True), session.csrf_token, session.session_hash)
        assert session.token_hash is not None
        user_id = self._accounts.user_for_token(session.token_hash)
        if user_id is None:  # the token was revoked since
            self._store.end_console_session(session.session_hash)
            raise Unauthorized("the token of this session was revoked", "session")
        return Viewer(Caller(user_id=user_id), session.csrf_token, session.session_hash)

    def sign_out(self, session_hash: str) -> None:
        self._store.end_console_session(session_hash)
