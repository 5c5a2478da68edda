"""Accounts, API tokens and browser sessions: creation, lookup and ending.

Passwords are hashed with Argon2id (argon2-cffi's defaults, RFC 9106's second recommended
set); tokens and session ids are 256-bit random strings stored as SHA-256, so a copy of the
database lets no one in. Functions take an open ``Session`` and never commit (see
``db.repository``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import ApiToken, Role, User, WebSession
from db.repository import as_utc, utcnow

_hasher = PasswordHasher()
#: Verified when the name is unknown, so a wrong name costs as long as a wrong password
#: (no telling which accounts exist from the answer's timing).
_DUMMY_HASH = _hasher.hash("not a password of anyone")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10


class AccountError(ValueError):
    """A refused account operation, with a message fit for the command line."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    name: str
    role: Role
    #: ``user`` (browser session) or ``token`` (``Authorization: Bearer``).
    kind: str
    #: The session's CSRF token (browser sessions only).
    csrf_token: str | None = None

    @property
    def actor(self) -> str:
        """The name the audit trail records."""
        return self.name if self.kind == "user" else f"token:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise AccountError(
            f"invalid name {name!r}: 1-64 letters, digits or . _ @ -, starting with a letter"
            " or digit"
        )
    return name


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AccountError(
            f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}"
        ) from None


# --------------------------------------------------------------------------- users


def add_user(session: Session, name: str, role: Role, password: str) -> User:
    check_name(name)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AccountError(f"a user named {name!r} exists already")
    user = User(name=name, role=role, password_hash=_hasher.hash(password), created_at=utcnow())
    session.add(user)
    session.flush()
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def disable_user(session: Session, name: str) -> User:
    """No more logins for ``name``; its open sessions end now."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AccountError(f"no user named {name!r}")
    if user.disabled_at is None:
        user.disabled_at = utcnow()
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    return user


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The enabled user with this name and password, else None (always one Argon2 verify)."""
    user = session.scalar(select(User).where(User.name == name))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


def generate_password() -> str:
    """A password to print once: 20 URL-safe characters (120 bits)."""
    return secrets.token_urlsafe(15)


# --------------------------------------------------------------------------- API tokens


def create_token(session: Session, name: str, role: Role) -> tuple[ApiToken, str]:
    """A new token; the secret is returned here only (the row holds its hash)."""
    check_name(name)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise AccountError(f"a token named {name!r} exists already (revoke it, pick another)")
    secret = "ftt_" + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_sha256=sha256_hex(secret), created_at=utcnow())
    session.add(token)
    session.flush()
    return token, secret


def revoke_token(session: Session, name: str) -> ApiToken:
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise AccountError(f"no token named {name!r}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def token_principal(session: Session, secret: str) -> Principal | None:
    token = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == sha256_hex(secret)))
    if token is None or token.revoked_at is not None:
        return None
    now = utcnow()
    # Written at most once a minute: a busy RIS does not make every request a write.
    if token.last_used_at is None or now - as_utc(token.last_used_at) > timedelta(minutes=1):
        token.last_used_at = now
    return Principal(name=token.name, role=token.role, kind="token")


# --------------------------------------------------------------------------- browser sessions


def start_session(session: Session, user: User, hours: float) -> str:
    """A new browser session for ``user``; returns the cookie value."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        WebSession(
            session_sha256=sha256_hex(secret),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(hours=hours),
        )
    )
    # Expired sessions of anyone are removed on the way (a login is rare enough).
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    return secret


def session_principal(
    session: Session, secret: str, now: datetime | None = None
) -> Principal | None:
    """The user of a live session cookie, else None (unknown, expired, or user disabled)."""
    row = session.scalar(select(WebSession).where(WebSession.session_sha256 == sha256_hex(secret)))
    if row is None or as_utc(row.expires_at) <= (now or utcnow()):
        return None
    user = row.user
    if user.disabled_at is not None:
        return None
    return Principal(name=user.name, role=user.role, kind="user", csrf_token=row.csrf_token)


def end_session(session: Session, secret: str) -> None:
    session.execute(delete(WebSession).where(WebSession.session_sha256 == sha256_hex(secret)))
