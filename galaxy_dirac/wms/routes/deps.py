"""The dependencies every route injects: the worker's context, the caller, the public base URL.

Each is a plain FastAPI dependency, so an in-process test replaces any of them with
``app.dependency_overrides[deps.context] = ...`` instead of starting a server.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Optional

import orjson
from fastapi import Depends, Path, Query, Request, Response

from ..auth import Principal
from ..context import Context
from ..errors import Unauthorized
from ..policy import require_role


def context(request: Request) -> Context:
    return request.app.state.ctx


Ctx = Annotated[Context, Depends(context)]


def caller(request: Request, ctx: Ctx) -> Principal:
    """The bearer token's principal (401 without a valid one)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header is missing")
    return ctx.verify(token.strip())


Caller = Annotated[Principal, Depends(caller)]


def reader(principal: Caller) -> Principal:
    """Monitoring data: admins and readers."""
    require_role(principal, "admin", "reader")
    return principal


Reader = Annotated[Principal, Depends(reader)]


def base_url(request: Request, ctx: Ctx) -> str:
    """Where clients reach this server (``public_url`` behind a proxy), for the URLs answers carry."""
    return (ctx.settings.public_url or str(request.base_url)).rstrip("/")


BaseURL = Annotated[str, Depends(base_url)]
PathJobId = Annotated[int, Path(ge=0, le=2**63 - 1)]
#: How long a long-polling route may hold its answer, in seconds.
LongPollWait = Annotated[float, Query(ge=0, le=120)]


def json_response(data: Any, status_code: int = 200, headers: Optional[Mapping[str, str]] = None) -> Response:
    """orjson (a dependency) serialises a 10,000-row status page several times faster than json."""
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status_code=status_code, media_type="application/json", headers=dict(headers or {}))
