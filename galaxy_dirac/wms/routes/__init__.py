"""The scheduler's HTTP API, one router per concern; each route is a few lines over a logic function.

Add a route to the router of its concern; a new concern gets a module here and a line in :data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from . import auth, jobs, monitoring, pilots, sandboxes

ROUTERS: tuple[APIRouter, ...] = (jobs.router, sandboxes.router, pilots.router, auth.router, monitoring.router)


def install(app: FastAPI) -> None:
    """Add every router to ``app`` (each is made with the error tree's route class: strict JSON, foreign errors
    mapped to refusals)."""
    for router in ROUTERS:
        app.include_router(router)
