"""One exception tree for the scheduler, and the one place it becomes HTTP.

Every refusal the scheduler makes is a :class:`WMSError` subclass whose class says which HTTP status it is, so no
caller decides 403 or 404 by reading a message. :func:`install_handlers` maps these, the request validation errors
FastAPI raises, and the errors that come from outside our code (database, disk, arithmetic on hostile numbers) to
``{"detail": ...}`` answers; nothing a client sends should surface as a 500.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import re
from typing import Any, Awaitable, Callable, Mapping, Optional

log = logging.getLogger(__name__)


class WMSError(Exception):
    """A request the scheduler refuses; the class's ``status`` is the HTTP status the API answers with."""

    status = 500
    headers: Optional[Mapping[str, str]] = None

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class Invalid(WMSError, ValueError):
    """The request is malformed or asks for something that cannot be done (400). Also a ``ValueError``."""

    status = 400


class AuthError(WMSError):
    """The caller is not who it claims (401) or may not do this (403)."""

    status = 403


class Unauthorized(AuthError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(AuthError):
    status = 403


class NotFound(WMSError):
    status = 404


class Conflict(WMSError):
    status = 409


class TooLarge(WMSError):
    status = 413


class Unavailable(WMSError):
    """A dependency (the database) is down or overloaded: try again later (503 with ``Retry-After``)."""

    status = 503

    def __init__(self, detail: Any, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(int(retry_after))}


class InsufficientStorage(WMSError):
    """The sandbox store (or the database) has no room left (507)."""

    status = 507


# --- classifying errors that come from outside our code ----------------------------------------------------------
#: MySQL/MariaDB error numbers: deadlock, lock wait timeout; PostgreSQL SQLSTATEs: deadlock, serialization failure.
_MYSQL_RETRY = {1205, 1213}
_PG_RETRY = {"40P01", "40001"}
#: MySQL/MariaDB: server gone, lost connection, can't connect, too many connections, server shutdown.
_MYSQL_DOWN = {1040, 1053, 2002, 2003, 2005, 2006, 2013, 2055}
#: MySQL/MariaDB: the regular expression cannot be compiled or run.
_MYSQL_REGEX = {1139, 3685, 3686, 3687, 3688, 3692, 3693, 3695, 3696, 3697, 3698, 3699}


def _mysql_errno(orig: Any) -> Optional[int]:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _sqlstate(orig: Any) -> str:
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


def is_transient(exc: BaseException) -> bool:
    """A deadlock or lock timeout: the transaction was rolled back and running it again may well succeed."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    if _mysql_errno(orig) in _MYSQL_RETRY or _sqlstate(orig) in _PG_RETRY:
        return True
    return "database is locked" in str(orig)  # SQLite past its busy timeout


def from_database(exc: BaseException) -> WMSError:
    """The typed refusal for a database error, or an :class:`Unavailable` when the database cannot be reached.

    Unrecognised database errors stay 500s: they are bugs on our side, not something the client did.
    """
    from sqlalchemy import exc as sa_exc

    orig = getattr(exc, "orig", None)
    code, state, text = _mysql_errno(orig), _sqlstate(orig), str(orig or exc)
    if isinstance(exc, sa_exc.DataError) or state.startswith("22"):
        reason = text.strip().splitlines()[0] if text.strip() else "invalid value"
        return Invalid(f"a value in the request does not fit the database: {reason}")
    if code in _MYSQL_REGEX or state == "2201B" or "regular expression" in text.lower():
        return Invalid(f"the regular expression is not valid: {text.strip().splitlines()[0]}")
    if is_transient(exc):
        return Unavailable("the database is busy (deadlock or lock timeout); try again", retry_after=1)
    if "database or disk is full" in text or code in (1021, 1114) or state == "53100":
        return InsufficientStorage("the scheduler's database has no room left; ask the operator to free space")
    if (
        isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError))
        or getattr(exc, "connection_invalidated", False)
        or code in _MYSQL_DOWN
        or state.startswith("08")
        or state in ("57P01", "57P02", "57P03", "53300")
        or isinstance(exc, sa_exc.OperationalError)
        and any(s in text.lower() for s in ("connection", "could not connect", "server closed", "unable to open"))
    ):
        return Unavailable("the scheduler's database is unavailable; try again later", retry_after=10)
    return WMSError("internal database error")


def from_os_error(exc: OSError) -> Optional[WMSError]:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"the scheduler has no disk space left for this ({exc.strerror})")
    return None


# --- JSON that can always be sent ----------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot carry made printable: non-finite floats, lone surrogates, bytes,
    exceptions and other objects (what a validation error echoes back of a hostile body)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return jsonable(str(value))


def body(detail: Any) -> bytes:
    return json.dumps({"detail": jsonable(detail)}, separators=(",", ":"), allow_nan=False).encode()


# --- the handlers --------------------------------------------------------------------------------------------------
def to_wms_error(exc: BaseException) -> Optional[WMSError]:
    """Which refusal an exception stands for; ``None`` when it is a bug (answered 500 and logged)."""
    from sqlalchemy import exc as sa_exc

    from ..jdl import JDLError

    if isinstance(exc, WMSError):
        return exc
    if isinstance(exc, JDLError):
        return Invalid(str(exc))
    if isinstance(exc, OverflowError):
        return Invalid(f"a number or time in the request is out of range: {exc}")
    if isinstance(exc, RecursionError):
        return Invalid("the request is nested too deeply")
    if isinstance(exc, UnicodeError):
        return Invalid(f"the request holds text that is not valid Unicode: {exc}")
    if isinstance(exc, (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        error = from_database(exc)
        return None if type(error) is WMSError else error
    if isinstance(exc, OSError):
        return from_os_error(exc)
    return None


def install_handlers(app: Any) -> None:
    """Register the one mapping from exceptions to HTTP answers on a FastAPI app, and make every route added after
    this call parse JSON strictly and turn foreign exceptions (database, disk, overflow) into refusals."""
    from fastapi import Request, Response
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def answer(status: int, detail: Any, headers: Optional[Mapping[str, str]] = None) -> Response:
        return Response(body(detail), status_code=status, media_type="application/json", headers=dict(headers or {}))

    async def refusal(_: Request, exc: WMSError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.detail, exc_info=exc.__cause__)
        return answer(exc.status, exc.detail, exc.headers)

    async def validation(_: Request, exc: RequestValidationError) -> Response:
        return answer(422, exc.errors())  # jsonable(): the errors echo NaN, lone surrogates, exceptions...

    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return answer(exc.status_code, exc.detail, getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(WMSError, refusal)
    app.router.route_class = route_class()


@functools.cache
def route_class() -> Any:
    """The APIRoute class every router is made with (``APIRouter(route_class=route_class())``)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request

    class StrictJSONRequest(Request):
        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                self._json = strict_json(await self.body())
            return self._json

    class WMSRoute(APIRoute):
        """Routes that read JSON strictly and answer foreign exceptions with the refusal they stand for."""

        def get_route_handler(self) -> Callable[[Request], Awaitable[Any]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Any:
                try:
                    return await handler(StrictJSONRequest(request.scope, request.receive))
                except (WMSError, StarletteHTTPException, RequestValidationError):
                    raise
                except Exception as exc:
                    error = to_wms_error(exc)
                    if error is None:
                        raise
                    raise error from exc

            return route

    return WMSRoute


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def strict_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: no ``NaN``/``Infinity``, no number that overflows a double (``1e400``), no lone
    surrogate (``"\\ud800"``), which no database column nor JSON answer can hold. Refusals are JSONDecodeErrors,
    which FastAPI answers with 422."""
    text = raw.decode("utf-8")

    def constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not valid JSON", text, 0)

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise json.JSONDecodeError(f"number {literal} is out of range", text, 0)
        return value

    data = json.loads(text, parse_constant=constant, parse_float=number)
    if _SURROGATE_ESCAPE.search(raw):
        _check_text(data, text)
    return data


def _check_text(value: Any, text: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise json.JSONDecodeError("a string holds a lone surrogate (\\ud800-\\udfff)", text, 0) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


__all__ = [
    "AuthError",
    "Conflict",
    "Forbidden",
    "InsufficientStorage",
    "Invalid",
    "NotFound",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "WMSError",
    "from_database",
    "install_handlers",
    "is_transient",
    "jsonable",
    "to_wms_error",
]
