"""The scheduler's ASGI app: the DiracX 0.7 job API plus ``/api/x-embedded/`` for pilots and the SiteDirector.

This module only assembles: the request-size guard, the error tree's handlers, the monitoring middleware, the
routers (``routes/``) and the lifespan (maintenance leader, cross-worker wake-ups). What a route does lives in the
logic modules it calls (jobs, matcher, pilots, sandbox_metadata, taskqueues, monitoring).
"""

import asyncio
import functools
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.staticfiles import StaticFiles

from . import errors, jobs, maintenance, metrics, routes, taskqueues
from .config import Settings
from .context import Context
from .db import JobCommands, Jobs, QueueEvents, newest

log = logging.getLogger(__name__)


# --- app -------------------------------------------------------------------------------------------------------
class BodyLimit:
    """Refuse request bodies over the limit with 413 before reading them into memory (ASGI middleware)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.default = settings.max_request_size
        self.upload = settings.max_sandbox_size + 1024 * 1024  # room for multipart framing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload if "/sandboxes/upload/" in scope["path"] else self.default
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _too_large(send, limit)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(HTTPException):
    """Raised from inside ``receive``: an HTTPException, so FastAPI's body reading passes it on as a 413 instead of
    turning it into "There was an error parsing the body" (400) when a chunked body has no Content-Length."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


async def _too_large(send: Any, limit: int) -> None:
    body = orjson.dumps({"detail": f"request body larger than {limit} bytes"})
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


#: How often each API worker asks the database whether another host queued jobs, sent commands or moved statuses.
FOLLOW_INTERVAL = 1.0


def create_app(settings: Settings) -> FastAPI:
    ctx = Context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = maintenance.leader(ctx.engine, ctx.settings, ctx.delete_sandbox)
        if worker is not None:
            worker.start()
        # Jobs queued and Kills sent by the other API workers of this host wake this one's long polls too.
        watchers = []
        shared = (("taskqueues", taskqueues.changes), ("commands", jobs.commands_queued), ("jobs", jobs.status_changes))
        for name, signal in shared:
            signal.share(os.path.join(ctx.settings.sandbox_dir, f".{name}.changed"))
            watchers.append(asyncio.create_task(signal.watch()))
        # ...and those of other hosts, from one cheap query a second each, however many long polls are waiting.
        probes = (
            (taskqueues.changes, QueueEvents.ID),
            (jobs.commands_queued, JobCommands.ID),
            (jobs.status_changes, Jobs.LastUpdateTime),
        )
        stopping = asyncio.Event()
        followers = [
            asyncio.create_task(signal.follow(functools.partial(newest, ctx.engine, column), stopping, FOLLOW_INTERVAL))
            for signal, column in probes
        ]
        try:
            yield
        finally:
            for task in watchers:
                task.cancel()
            stopping.set()
            await asyncio.gather(*followers)  # no probe may reach the database once it is closed
            if worker is not None:
                worker.stop()
            ctx.close()

    app = FastAPI(
        title="galaxy-dirac embedded scheduler",
        description="DiracX-compatible job API plus matching routes for pilots",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
    )
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, settings=settings)
    errors.install_handlers(app)
    app.state.metrics = metrics.Registry()
    app.add_middleware(metrics.MetricsMiddleware, registry=app.state.metrics)
    app.mount("/monitor/static", StaticFiles(directory=routes.monitoring.STATIC_DIR), name="monitor-static")
    routes.install(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings come from GALAXY_DIRAC_WMS_* variables."""
    from .config import load_settings

    return create_app(load_settings())
