"""``/metrics`` in the Prometheus text format (0.0.4), written by hand to add no dependency.

Gauges (jobs by status and site, pilots by queue and state, waiting jobs in task queues) are read from the database
at scrape time with ``GROUP BY`` on indexed columns. Counters and the request-latency histogram live in the process
and are fed by ``MetricsMiddleware``, which also counts matches (``POST /api/x-embedded/match`` answering 200 vs 204)
and heartbeats, so the existing routes stay untouched. With several API workers each process counts its own
requests (the ``pid`` label keeps them apart; sum them in PromQL).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable

from sqlalchemy import Engine, func, select

from .db import Jobs, PilotAgents, TQJobs, read_transaction

#: Latency bucket bounds in seconds (Prometheus' defaults, fine for an API answering in milliseconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _value(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else f"{int(value)}"


class Registry:
    """Process-local counters and one latency histogram; thread-safe (routes run in a thread pool)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.matches: dict[str, int] = {"matched": 0, "no_job": 0}
        self.heartbeats = 0
        self.requests: dict[tuple[str, str, str], int] = {}
        # (method, route) → [bucket counts..., +Inf count], sum
        self.latency: dict[tuple[str, str], tuple[list[int], float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished request and derive the match and heartbeat counters from it."""
        with self.lock:
            key = (method, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            counts, total = self.latency.get((method, route), ([0] * (len(LATENCY_BUCKETS) + 1), 0.0))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self.latency[(method, route)] = (counts, total + seconds)
            if route == "/api/x-embedded/match" and method == "POST":
                if status == 200:
                    self.matches["matched"] += 1
                elif status == 204:
                    self.matches["no_job"] += 1
            elif route == "/api/jobs/heartbeat" and method == "PATCH" and status == 200:
                self.heartbeats += 1

    def lines(self) -> Iterable[str]:
        pid = {"pid": os.getpid()}
        with self.lock:
            yield "# HELP galaxy_dirac_matches_total Match requests answered, by outcome (rate() gives matches/s)."
            yield "# TYPE galaxy_dirac_matches_total counter"
            for result, n in self.matches.items():
                yield f"galaxy_dirac_matches_total{_labels({'result': result, **pid})} {n}"
            yield "# HELP galaxy_dirac_heartbeats_total Heartbeat requests accepted."
            yield "# TYPE galaxy_dirac_heartbeats_total counter"
            yield f"galaxy_dirac_heartbeats_total{_labels(pid)} {self.heartbeats}"
            yield "# HELP galaxy_dirac_http_requests_total HTTP requests by method, route template and status."
            yield "# TYPE galaxy_dirac_http_requests_total counter"
            for (method, route, status), n in sorted(self.requests.items()):
                labels = {"method": method, "route": route, "status": status, **pid}
                yield f"galaxy_dirac_http_requests_total{_labels(labels)} {n}"
            yield "# HELP galaxy_dirac_http_request_duration_seconds Request latency by method and route template."
            yield "# TYPE galaxy_dirac_http_request_duration_seconds histogram"
            for (method, route), (counts, total) in sorted(self.latency.items()):
                labels = {"method": method, "route": route, **pid}
                for bound, n in zip(LATENCY_BUCKETS, counts):
                    le = {**labels, "le": repr(bound)}
                    yield f"galaxy_dirac_http_request_duration_seconds_bucket{_labels(le)} {n}"
                inf = _labels({**labels, "le": "+Inf"})
                yield f"galaxy_dirac_http_request_duration_seconds_bucket{inf} {counts[-1]}"
                yield f"galaxy_dirac_http_request_duration_seconds_count{_labels(labels)} {counts[-1]}"
                yield f"galaxy_dirac_http_request_duration_seconds_sum{_labels(labels)} {_value(total)}"


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request; the route template (not the raw path) keeps label sets small."""

    def __init__(self, app: Any, registry: Registry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.registry.observe(scope.get("method", ""), route, status, time.perf_counter() - started)


def database_lines(engine: Engine) -> Iterable[str]:
    """Gauges read from the database at scrape time."""
    with read_transaction(engine) as conn:
        jobs = conn.execute(select(Jobs.Status, Jobs.Site, func.count()).group_by(Jobs.Status, Jobs.Site)).all()
        pilots = conn.execute(
            select(PilotAgents.Queue, PilotAgents.Status, func.count()).group_by(PilotAgents.Queue, PilotAgents.Status)
        ).all()
        waiting = conn.execute(select(func.count()).select_from(TQJobs)).scalar_one()
        queues = conn.execute(select(func.count(func.distinct(TQJobs.TQId)))).scalar_one()
    yield "# HELP galaxy_dirac_jobs Jobs in the scheduler by status and site."
    yield "# TYPE galaxy_dirac_jobs gauge"
    for status, site, n in jobs:
        yield f"galaxy_dirac_jobs{_labels({'status': status, 'site': site})} {n}"
    yield "# HELP galaxy_dirac_pilots Pilots by SiteDirector queue and state."
    yield "# TYPE galaxy_dirac_pilots gauge"
    for queue, status, n in pilots:
        yield f"galaxy_dirac_pilots{_labels({'queue': queue, 'status': status})} {n}"
    yield "# HELP galaxy_dirac_taskqueue_waiting_jobs Jobs waiting in task queues."
    yield "# TYPE galaxy_dirac_taskqueue_waiting_jobs gauge"
    yield f"galaxy_dirac_taskqueue_waiting_jobs {waiting}"
    yield "# HELP galaxy_dirac_taskqueues Non-empty task queues."
    yield "# TYPE galaxy_dirac_taskqueues gauge"
    yield f"galaxy_dirac_taskqueues {queues}"


def render(engine: Engine, registry: Registry) -> str:
    """The whole exposition: database gauges then process counters."""
    return "\n".join([*database_lines(engine), *registry.lines()]) + "\n"
