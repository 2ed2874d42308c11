"""Who may use the desk: users from ``node.toml``, bcrypt passwords, sessions, CSRF, login rate limit.

Sessions live in the node's memory (a restart logs everybody out): the cookie carries a
random token and its HMAC under a key drawn at start, so a forged or altered cookie is
refused before any lookup. A session ends after ``idle_seconds`` without a request, or
``max_seconds`` after the login, or at logout. Each session has its own CSRF token, which
every form of the desk posts back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import bcrypt

from medclass.errors import MedClassError

ROLES = ("viewer", "admin")

# bcrypt reads at most 72 bytes; a longer password would be cut silently by older versions.
MAX_PASSWORD_BYTES = 72

# Checked against when the user name is unknown, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=12))


def hash_password(password: str, rounds: int = 12) -> str:
    """The bcrypt hash of ``password`` for ``password_hash`` in ``[[users]]``.

    Raises
    ------
    MedClassError
        The password is empty or longer than bcrypt reads.
    """
    raw = password.encode()
    if not raw:
        raise MedClassError("the password is empty", "type a password")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise MedClassError(f"the password is {len(raw)} bytes long; bcrypt reads at most {MAX_PASSWORD_BYTES}",
                            "choose a shorter passphrase")
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode()


def check_users(users: Sequence[dict]) -> None:
    """Raise :class:`MedClassError` (one line) for a ``[[users]]`` entry that is not usable."""
    seen = set()
    for u in users:
        if set(u) != {"name", "role", "password_hash"} or not all(isinstance(v, str) for v in u.values()):
            raise MedClassError(f"[[users]] entry for {u.get('name', '?')!r} needs exactly name, role and "
                                "password_hash (strings)",
                                'write e.g. name = "admin", role = "admin", password_hash = "$2b$12$..."')
        if u["role"] not in ROLES:
            raise MedClassError(f"[[users]] {u['name']!r}: role {u['role']!r} is not one of {', '.join(ROLES)}",
                                'write role = "viewer" or role = "admin"')
        if not u["password_hash"].startswith(("$2a$", "$2b$", "$2y$")) or len(u["password_hash"]) != 60:
            raise MedClassError(f"[[users]] {u['name']!r}: password_hash is not a bcrypt hash",
                                "paste the line 'medclass node hash-password' prints (never the password itself)")
        if u["name"] in seen:
            raise MedClassError(f"[[users]] {u['name']!r} appears twice", "keep one entry per user")
        seen.add(u["name"])


@dataclass
class Session:
    """A logged-in user."""

    user: str
    role: str
    csrf: str
    created: float
    last_seen: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class LoginLimiter:
    """At most ``attempts`` failed logins per (user name, client address) in ``window_seconds``."""

    attempts: int = 5
    window_seconds: float = 300.0
    _failures: dict[tuple[str, str], deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_seconds(self, user: str, client: str, now: float) -> float:
        """How long this user from this client must wait before trying again (0: may try now)."""
        with self._lock:
            q = self._failures.get((user, client))
            if not q:
                return 0.0
            while q and q[0] <= now - self.window_seconds:
                q.popleft()
            return q[0] + self.window_seconds - now if len(q) >= self.attempts else 0.0

    def failed(self, user: str, client: str, now: float) -> None:
        with self._lock:
            self._failures.setdefault((user, client), deque()).append(now)

    def succeeded(self, user: str, client: str) -> None:
        with self._lock:
            self._failures.pop((user, client), None)


class Authenticator:
    """Users, sessions and the login rate limit of one desk.

    Parameters
    ----------
    users : sequence of dict
        ``[[users]]`` of node.toml (checked by :func:`check_users`).
    idle_seconds, max_seconds : float
        A session ends after this long without a request, or this long after the login.
    """

    def __init__(self, users: Sequence[dict], idle_seconds: float = 8 * 3600, max_seconds: float = 24 * 3600,
                 limiter: LoginLimiter | None = None) -> None:
        check_users(users)
        self.users = {u["name"]: u for u in users}
        self.idle_seconds, self.max_seconds = idle_seconds, max_seconds
        self.limiter = limiter or LoginLimiter()
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def verify(self, name: str, password: str) -> str | None:
        """The user's role when the password is right, else ``None`` (same cost for an unknown name)."""
        raw = password.encode()[:MAX_PASSWORD_BYTES]
        user = self.users.get(name)
        stored = user["password_hash"].encode() if user else _DUMMY_HASH
        ok = bcrypt.checkpw(raw, stored)
        return user["role"] if ok and user else None

    def _sign(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def open_session(self, name: str, role: str, now: float | None = None) -> str:
        """A new session; returns the cookie value."""
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = Session(name, role, secrets.token_urlsafe(32), now, now)
        return f"{token}.{self._sign(token)}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The live session a cookie names (and note the request), or ``None``."""
        if not cookie or "." not in cookie:
            return None
        token, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sign(token)):
            return None
        now = time.time() if now is None else now
        with self._lock:
            s = self._sessions.get(token)
            if s is None:
                return None
            if now - s.last_seen > self.idle_seconds or now - s.created > self.max_seconds:
                del self._sessions[token]
                return None
            s.last_seen = now
            return s

    def close_session(self, cookie: str | None) -> None:
        if cookie and "." in cookie:
            with self._lock:
                self._sessions.pop(cookie.rsplit(".", 1)[0], None)
