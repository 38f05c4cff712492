"""Bearer tokens and roles.

Tokens are HS256 JWTs signed with the scheduler's secret. The claims mirror DiracX's access tokens (``sub``, ``vo``,
``dirac_group``, ``preferred_username``) so the same client code reads both, plus ``role`` and, for job tokens,
``job_id`` and ``run`` (the job's reschedule counter when it was matched): a pilot that lost its job to a reschedule
can no longer change it. Pilot tokens the SiteDirector asks for carry ``pilot_stamp`` and ``pilot_site``: that pilot
acts for itself only, at its own site.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import jwt

from .errors import AuthError, Forbidden, Unauthorized  # noqa: F401 - AuthError: the base both are caught as

ROLES = ("admin", "runner", "reader", "director", "pilot", "job")
ALGORITHM = "HS256"
ISSUER = "galaxy-dirac-wms"


@dataclasses.dataclass(frozen=True)
class Principal:
    role: str
    owner: str
    group: str
    vo: str
    job_id: int | None = None
    run: int | None = None
    pilot_stamp: str | None = None
    pilot_site: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_one_pilot(self) -> bool:
        """A pilot token minted for one pilot (stamp), as opposed to a site-wide pilot token."""
        return self.role == "pilot" and bool(self.pilot_stamp)

    def require(self, *roles: str) -> None:
        """Refuse unless the role is among ``roles`` (the rule lives in policy.py)."""
        from .policy import require_role

        require_role(self, *roles)

    def require_job(self, job_id: int) -> None:
        """Job tokens act on their own job only; admin and runner tokens are checked against owners elsewhere."""
        if self.role == "job" and self.job_id != job_id:
            raise Forbidden(f"this job token is for job {self.job_id}, not job {job_id}")


def create_token(
    key: bytes,
    *,
    role: str,
    owner: str = "",
    group: str = "",
    vo: str = "galaxy",
    lifetime: float = 86400.0,
    job_id: int | None = None,
    run: int | None = None,
    pilot_stamp: str | None = None,
    pilot_site: str | None = None,
) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if role == "job" and job_id is None:
        raise ValueError("a job token needs a job id")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": owner or role,
        "preferred_username": owner or role,
        "vo": vo,
        "dirac_group": group or f"{vo}_{role}",
        "role": role,
        "iat": now,
        "exp": now + int(lifetime),
        "jti": uuid.uuid4().hex,
    }
    if job_id is not None:
        claims["job_id"] = int(job_id)
        claims["run"] = int(run or 0)
    if pilot_stamp:
        claims["pilot_stamp"] = pilot_stamp
    if pilot_site:
        claims["pilot_site"] = pilot_site
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def create_pilot_tokens(key: bytes, stamps: list[str], *, site: str, vo: str, lifetime: float) -> dict[str, str]:
    """One token per pilot the director is about to submit: a node that leaks its token leaks only its own pilot."""
    return {
        stamp: create_token(
            key, role="pilot", owner="pilot", vo=vo, lifetime=lifetime, pilot_stamp=stamp, pilot_site=site
        )
        for stamp in stamps
    }


def create_refresh_token(key: bytes, access_token: str, lifetime: float = 30 * 86400.0) -> str:
    """A refresh token carrying the access token's identity; the token endpoint swaps it for a new pair."""
    claims = _decode(key, access_token)
    now = int(time.time())
    claims.update(kind="refresh", iat=now, exp=now + int(lifetime), jti=uuid.uuid4().hex)
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def refresh_tokens(key: bytes, refresh_token: str, lifetime: float) -> tuple[str, str, float]:
    """Return (access token, refresh token, access lifetime) for a valid refresh token."""
    claims = _decode(key, refresh_token)
    if claims.get("kind") != "refresh":
        raise Unauthorized("not a refresh token")
    if claims.get("role") not in ("admin", "runner", "reader"):
        raise Forbidden(f"{claims.get('role')} tokens cannot be refreshed")
    access = create_token(
        key,
        role=claims["role"],
        owner=claims["sub"],
        group=claims.get("dirac_group", ""),
        vo=claims.get("vo", ""),
        lifetime=lifetime,
    )
    return access, create_refresh_token(key, access), lifetime


def _decode(key: bytes, token: str) -> dict[str, Any]:
    try:
        return jwt.decode(token, key, algorithms=[ALGORITHM], issuer=ISSUER, options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise Unauthorized("token signature does not verify (wrong server or forged token)") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from exc


def verify_token(key: bytes, token: str) -> Principal:
    return verify_token_with_expiry(key, token)[0]


def verify_token_with_expiry(key: bytes, token: str) -> tuple[Principal, float]:
    """The token's principal and its expiry time (epoch seconds)."""
    claims = _decode(key, token)
    if claims.get("kind") == "refresh":
        raise Unauthorized("a refresh token is not an access token")
    role = claims.get("role")
    if role not in ROLES:
        raise Unauthorized(f"invalid token: unknown role {role!r}")
    principal = Principal(
        role=role,
        owner=str(claims["sub"]),
        group=str(claims.get("dirac_group", "")),
        vo=str(claims.get("vo", "")),
        job_id=claims.get("job_id"),
        run=claims.get("run"),
        pilot_stamp=claims.get("pilot_stamp"),
        pilot_site=claims.get("pilot_site"),
    )
    return principal, float(claims["exp"])
