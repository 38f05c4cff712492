"""``/metrics``: Prometheus text that the reference parser reads, with counters fed by real match/heartbeat calls."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from galaxy_dirac.wms import metrics
from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from tests.wms.helpers import jdl_text, make_settings

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
def app_client(tmp_path: Any) -> Iterator[tuple[TestClient, Any]]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'wms.sqlite'}", maintenance_interval=0)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app


def bearer(app: Any, role: str, **claims: Any) -> dict[str, str]:
    token = create_token(app.state.ctx.key, role=role, owner="alice", group="galaxy_user", **claims)
    return {"Authorization": f"Bearer {token}"}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def samples(family: Any, name: str | None = None, **labels: str) -> list[Any]:
    return [
        s
        for s in family.samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_metrics_parse_and_count_real_traffic(app_client: tuple[TestClient, Any]) -> None:
    client, app = app_client
    runner, pilot = bearer(app, "runner"), bearer(app, "pilot")
    jdls = [jdl_text(JobName=f"m{i}", CPUTime=600) for i in range(3)]
    assert client.post("/api/jobs/jdl", json=jdls, headers=runner).status_code == 201
    slot = {"Site": "LCG.Metrics.org", "GridCE": "ce.metrics.org", "CPUTime": 86400}
    matched = client.post("/api/x-embedded/match", json=slot, headers=pilot)
    assert matched.status_code == 200
    job = matched.json()
    token = {"Authorization": f"Bearer {job['Token']}"}
    for _ in range(2):
        beat = client.patch("/api/jobs/heartbeat", json={str(job["JobID"]): {"CPUConsumed": 1.5}}, headers=token)
        assert beat.status_code == 200
    client.post("/api/x-embedded/match", json=slot, headers=pilot)
    client.post("/api/x-embedded/match", json=slot, headers=pilot)
    assert client.post("/api/x-embedded/match", json=slot, headers=pilot).status_code == 204
    client.post("/api/x-embedded/pilots", json={"stamps": ["s1", "s2"], "queue": "q1", "ce": "ce1"}, headers=pilot)

    answer = client.get("/metrics", headers=bearer(app, "reader"))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = families(answer.text)

    jobs = found["galaxy_dirac_jobs"]
    assert jobs.type == "gauge"
    assert samples(jobs, status="Running", site="LCG.Metrics.org")[0].value == 1
    assert samples(jobs, status="Matched", site="LCG.Metrics.org")[0].value == 2
    matches = found["galaxy_dirac_matches"]  # the parser drops the _total suffix from counter family names
    assert matches.type == "counter"
    assert samples(matches, result="matched")[0].value == 3
    assert samples(matches, result="no_job")[0].value == 1
    assert samples(found["galaxy_dirac_heartbeats"])[0].value == 2
    pilots = found["galaxy_dirac_pilots"]
    assert samples(pilots, queue="q1", status="Submitted")[0].value == 2
    assert found["galaxy_dirac_taskqueue_waiting_jobs"].samples[0].value == 0

    latency = found["galaxy_dirac_http_request_duration_seconds"]
    assert latency.type == "histogram"
    match_count = samples(latency, "galaxy_dirac_http_request_duration_seconds_count", route="/api/x-embedded/match")
    assert match_count[0].value == 4
    inf = samples(
        latency, "galaxy_dirac_http_request_duration_seconds_bucket", route="/api/x-embedded/match", le="+Inf"
    )
    assert inf[0].value == 4
    # Route templates, not raw paths, so job ids do not explode the label sets.
    requests_total = found["galaxy_dirac_http_requests"]
    assert not [s for s in requests_total.samples if str(job["JobID"]) in s.labels["route"]]


def test_metrics_need_a_reader(app_client: tuple[TestClient, Any]) -> None:
    client, app = app_client
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(app, "runner")).status_code == 403
    assert client.get("/metrics", headers=bearer(app, "admin")).status_code == 200


def test_registry_histogram_is_cumulative() -> None:
    registry = metrics.Registry()
    for seconds in (0.001, 0.02, 0.3, 20.0):
        registry.observe("GET", "/x", 200, seconds)
    text = "\n".join(registry.lines()) + "\n"
    family = families(text)["galaxy_dirac_http_request_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.005"] == 1 and buckets["0.025"] == 2 and buckets["0.5"] == 3 and buckets["+Inf"] == 4
    values = [buckets[k] for k in sorted(buckets, key=lambda k: float(k))]
    assert values == sorted(values)
    total = [s.value for s in family.samples if s.name.endswith("_sum")][0]
    assert total == pytest.approx(20.321)


def test_label_values_are_escaped() -> None:
    registry = metrics.Registry()
    registry.observe("GET", 'weird"route\\with\nnewline', 200, 0.01)
    family = families("\n".join(registry.lines()) + "\n")["galaxy_dirac_http_requests"]
    assert family.samples[0].labels["route"] == 'weird"route\\with\nnewline'
