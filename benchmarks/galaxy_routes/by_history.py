"""Route each job by its history's name, so one Galaxy runs the same tools and workflow through every system."""

from __future__ import annotations

from typing import Any

PREFIX = "bench:"


def bench_route(job: Any) -> str:
    """The environment named after ``bench:`` in the job's history name; the local runner for any other history."""
    name = job.history.name if job.history is not None else ""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else "local"
