"""Hostile input against the scheduler's API, in process, on SQLite, PostgreSQL and MariaDB: no answer is a 500.

Each case here gave a 500 (or a frozen server) before the one error tree (``wms/errors.py``) and the bounded regex
search (``wms/safe_regex.py``); fuzzed bodies come from hypothesis with small example counts.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy_dirac.wms import safe_regex
from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from tests.wms.helpers import jdl_text, make_settings

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Client:
    """An in-process app on one database, with tokens of its own signing key; 500s come back as answers."""

    def __init__(self, client: TestClient, app: Any) -> None:
        self.client, self.app = client, app

    def headers(self, role: str = "runner", owner: str = "alice", **claims: Any) -> dict[str, str]:
        token = create_token(self.app.state.ctx.key, role=role, owner=owner, group="galaxy_user", **claims)
        return {"Authorization": f"Bearer {token}"}

    def raw(self, method: str, path: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        headers = {**(headers or self.headers()), "Content-Type": "application/json"}
        return self.client.request(method, path, content=data, headers=headers)

    def json(self, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        return self.raw(method, path, json.dumps(body).encode(), headers)

    def submit(self, n: int = 1, **attrs: Any) -> list[int]:
        response = self.json("POST", "/api/jobs/jdl", [jdl_text(**attrs)] * n)
        assert response.status_code == 201, response.text
        return [j["JobID"] for j in response.json()]

    def search(self, *specs: dict[str, Any]) -> Any:
        return self.json("POST", "/api/jobs/search", {"search": list(specs)}, self.headers("admin", "admin"))


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[Client]:
    app = create_app(make_settings(tmp_path, db_url, maintenance_interval=0, max_sandbox_size=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Client(client, app)


def refused(response: Any, *statuses: int) -> str:
    """The answer is one of ``statuses`` (4xx by default) with a JSON ``detail``; returns the detail as text."""
    assert response.status_code in (statuses or range(400, 500)), (response.status_code, response.text)
    return json.dumps(response.json()["detail"])


# Every route that takes a JSON body, with a body of the right shape for it.
JSON_ROUTES = [
    ("POST", "/api/jobs/jdl", lambda v: [v]),
    ("POST", "/api/jobs/search", lambda v: {"search": [{"parameter": "JobID", "operator": "eq", "value": v}]}),
    ("POST", "/api/jobs/summary", lambda v: {"grouping": ["Status"], "search": [
        {"parameter": "UserPriority", "operator": "in", "values": [v]}]}),
    ("PATCH", "/api/jobs/status", lambda v: {"1": {"2030-01-01T00:00:00Z": {"Status": v}}}),
    ("PATCH", "/api/jobs/heartbeat", lambda v: {"1": {"CPUConsumed": v}}),
    ("POST", "/api/jobs/reschedule", lambda v: {"job_ids": [v]}),
    ("POST", "/api/jobs/sandbox", lambda v: {"checksum_algorithm": "sha256", "checksum": "0" * 64, "size": v,
                                             "format": "tar"}),
    ("PATCH", "/api/jobs/1/sandbox/output", lambda v: v),
    ("POST", "/api/x-embedded/pilots", lambda v: {"stamps": [v]}),
    ("POST", "/api/x-embedded/pilots/tokens", lambda v: {"stamps": ["s1"], "lifetime": v}),
    ("POST", "/api/x-embedded/pilots/register", lambda v: {"stamp": "s1", "processors": v}),
    ("PATCH", "/api/x-embedded/pilots/s1", lambda v: {"status": "Running", "matched_jobs": v}),
    ("POST", "/api/x-embedded/match", lambda v: {"Site": "X", "CPUTime": v}),
    ("POST", "/api/x-embedded/monitoring/sitedirector", lambda v: [{"queue": "q", "x": v}]),
]
NON_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


@pytest.mark.parametrize(("method", "path", "shape"), JSON_ROUTES, ids=[r[1] for r in JSON_ROUTES])
def test_nan_infinity_and_overflowing_numbers_are_refused_on_every_route(
    api: Client, method: str, path: str, shape: Any
) -> None:
    for literal in NON_JSON_NUMBERS:
        body = json.dumps(shape("__X__")).replace('"__X__"', literal).encode()
        for role in ("admin", "runner", "director", "pilot"):
            detail = refused(api.raw(method, path, body, api.headers(role, role)), 422)
            assert "not valid JSON" in detail or "out of range" in detail, (literal, detail)
    assert api.search().json() == []  # nothing was written


def test_lone_surrogates_in_a_jdl_or_anywhere_else_are_refused(api: Client) -> None:
    body = b'["[ Executable = \\"/bin/true\\"; JobName = \\"\\ud800\\"; ]"]'
    assert "lone surrogate" in refused(api.raw("POST", "/api/jobs/jdl", body), 422)
    key = b'{"\\udfff": {"2030-01-01T00:00:00Z": {"Status": "Killed"}}}'
    refused(api.raw("PATCH", "/api/jobs/status", key), 422)
    pair = b'["[ Executable = \\"/bin/true\\"; JobName = \\"\\ud83d\\ude00\\"; ]"]'  # a valid pair is fine
    assert api.raw("POST", "/api/jobs/jdl", pair).status_code == 201
    assert [j["JobName"] for j in api.search().json()] == ["\U0001f600"]


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_times_out_of_range_in_utc_are_400(api: Client, when: str) -> None:
    [job_id] = api.submit()
    detail = refused(api.json("PATCH", "/api/jobs/status", {str(job_id): {when: {"MinorStatus": "x"}}}), 400)
    assert "out of range" in detail
    for op in ("gt", "lt", "eq"):
        refused(api.search({"parameter": "LastUpdateTime", "operator": op, "value": when}), 400)
    refused(api.search({"parameter": "SubmissionTime", "operator": "in", "values": [when]}), 400)
    [job] = api.search().json()
    assert job["MinorStatus"] == "Pilot Agent Submission"


def test_numbers_too_large_for_an_integer_column_are_400(api: Client) -> None:
    api.submit()
    for value in (1e300, -1e300, 2.0**63, 1.5):
        refused(api.search({"parameter": "JobID", "operator": "eq", "value": value}), 400)
        refused(api.search({"parameter": "UserPriority", "operator": "in", "values": [1, value]}), 400)
    assert len(api.search({"parameter": "UserPriority", "operator": "in", "values": [1, 2.0]}).json()) == 1


@pytest.mark.parametrize("pattern", ["(", "[a-", "a{2,1}", "*a", "(?P<x>a)(?P=x)"])
def test_invalid_or_unsupported_regexes_are_400_on_every_database(api: Client, pattern: str) -> None:
    api.submit(JobName="abc")
    refused(api.search({"parameter": "JobName", "operator": "regex", "value": pattern}), 400)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("^(a|a)*$", "repeats a group"),
        ("^(a+)+$", "repeats a group"),
        ("(x?){20}x{20}", "repeats a group"),
        (".*a.*a.*a.*x", "repetitions"),
        ("(?=a)a", "lookahead"),
        ("a" * 300, "longer than"),
    ],
)
def test_regexes_that_could_run_for_minutes_are_refused(api: Client, pattern: str, why: str) -> None:
    api.submit(JobName="a" * 29)
    assert why in refused(api.search({"parameter": "JobName", "operator": "regex", "value": pattern}), 400)


def test_safe_regexes_still_search(api: Client) -> None:
    api.submit(JobName="galaxy-42-align")
    api.submit(JobName="galaxy-x-sort")
    for pattern, count in [("^galaxy-[0-9]+-", 1), ("sort$", 1), ("^(galaxy|pulsar)-", 2), (r"\d", 1)]:
        found = api.search({"parameter": "JobName", "operator": "regex", "value": pattern})
        assert found.status_code == 200 and len(found.json()) == count, (pattern, found.text)


def test_a_regex_search_past_its_time_budget_is_400(api: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the scheduler's own REGEXP stops a statement past its budget (here: none at all)."""
    if api.app.state.ctx.engine.dialect.name != "sqlite":
        pytest.skip("the budget is for SQLite's in-process REGEXP")
    api.submit(3, JobName="abc")
    monkeypatch.setattr(safe_regex, "DEFAULT_BUDGET", -1.0)
    assert "took too long" in refused(api.search({"parameter": "JobName", "operator": "regex", "value": "b"}), 400)


def test_sqlite_connections_use_the_bounded_regexp(tmp_path: Path) -> None:
    """Every column the API writes is short, but SQLite would keep longer text: the scheduler's REGEXP (not
    SQLAlchemy's bare re.search) refuses to scan it, and refuses unsafe patterns however it is reached."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from galaxy_dirac.wms.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'regexp.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 'abc' REGEXP 'b'")).scalar() == 1
        for subject, pattern in [("x" * 600, "x"), ("a" * 29, "^(a|a)*$")]:
            with pytest.raises(OperationalError):
                conn.execute(text("SELECT :s REGEXP :p"), {"s": subject, "p": pattern})
    engine.dispose()


def test_in_searches_with_more_values_than_a_statement_can_bind(api: Client) -> None:
    [job_id] = api.submit()
    names = [f"name{i}" for i in range(70_000)]
    assert "too many values" in refused(api.search({"parameter": "JobName", "operator": "in", "values": names}), 400)
    refused(api.search({"parameter": "Status", "operator": "not in", "values": names}), 400)
    ids = list(range(job_id, job_id + 70_000))  # integers are written into the statement: no bind limit
    found = api.search({"parameter": "JobID", "operator": "in", "values": ids})
    assert found.status_code == 200 and [j["JobID"] for j in found.json()] == [job_id]


# --- fuzzing ----------------------------------------------------------------------------------------------------------
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),  # includes lone surrogates
    st.sampled_from(["Killed", "Done", "JobID", "eq", "in", "regex", "SB:SandboxSE|/S3/x", "2030-01-01T00:00:00Z",
                     "9999-12-31T23:59:59-23:59", "^(a|a)*$"]),
)
_JSON = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.text(max_size=8), st.sampled_from(["search", "parameter", "operator", "value", "values", "1",
                                                    "grouping", "job_ids", "Status", "Site", "stamps"])),
    inner, max_size=4), max_leaves=12)


@FUZZ
@given(
    body=_JSON,
    route=st.sampled_from(JSON_ROUTES),
    role=st.sampled_from(["admin", "runner", "job", "director", "pilot"]),
)
def test_fuzzed_json_bodies_never_get_a_500(api: Client, body: Any, route: tuple, role: str) -> None:
    method, path, _ = route
    data = json.dumps(body, allow_nan=True).encode()
    response = api.raw(method, path, data, api.headers(role, role, job_id=1) if role == "job" else api.headers(role))
    assert response.status_code < 500, (path, data[:300], response.status_code, response.text)
    json.loads(response.content)  # always a JSON answer


_JDL_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(lambda f: repr(f) if math.isfinite(f) else "1e400"),
    st.lists(st.text(max_size=8), max_size=3).map(lambda v: "{" + ", ".join(json.dumps(x) for x in v) + "}"),
)
_JDL_NAMES = st.sampled_from(["JobName", "CPUTime", "Priority", "NumberOfProcessors", "MinRAM", "MaxRAM", "Site",
                              "BannedSites", "Tags", "Platform", "JobGroup", "InputSandbox", "StdOutput", "Arguments"])


@FUZZ
@given(attrs=st.dictionaries(_JDL_NAMES, _JDL_VALUES, max_size=5), junk=st.text(max_size=10))
def test_fuzzed_jdls_are_accepted_or_refused_never_a_500(api: Client, attrs: dict, junk: str) -> None:
    text = "[ Executable = \"/bin/true\"; " + " ".join(f"{k} = {v};" for k, v in attrs.items()) + junk + " ]"
    response = api.json("POST", "/api/jobs/jdl", [text]) if _encodable(text) else api.raw(
        "POST", "/api/jobs/jdl", json.dumps([text]).encode())
    assert response.status_code in (201, 400, 403, 422), (text, response.status_code, response.text)
    if response.status_code == 201:
        [job] = response.json()
        found = api.search({"parameter": "JobID", "operator": "eq", "value": job["JobID"]})
        assert found.status_code == 200 and len(found.json()) == 1


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_validation_errors_echoing_hostile_input_are_json(api: Client) -> None:
    """A 422 repeats the bad input; the answer must still be JSON (it was a 500 with NaN before strict parsing)."""
    body = {"1": {"2030-01-01T00:00:00Z": {"Status": {"nested": [1.5, None, "x" * 10]}}}}
    detail = refused(api.json("PATCH", "/api/jobs/status", body), 422)
    assert "valid string" in detail
    past = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).isoformat()
    assert api.json("PATCH", "/api/jobs/status", {"1": {past: {"Status": "Killed"}}}).status_code == 404


@pytest.mark.parametrize(
    "query",
    ["since=99999999999999d", "since=9999-12-31T23:59:59-23:59", "until=0001-01-01T00:00:00%2B23:59",
     "bucket=99999999999999999999w"],
)
def test_hostile_query_strings_are_400(api: Client, query: str) -> None:
    """Overflow in a query string (accounting periods) is the request's fault, whichever route it reaches."""
    response = api.client.get(f"/api/x-embedded/accounting/jobs-by-site?{query}", headers=api.headers("reader"))
    refused(response, 400)


def test_nul_characters_in_paths_and_queries_are_not_500(api: Client) -> None:
    for method, path, params in [
        ("GET", "/api/jobs/sandbox", {"pfn": "/S3/sandboxes/galaxy/galaxy_user/alice/\x00sha256:" + "0" * 64 + ".tar"}),
        ("PATCH", "/api/x-embedded/pilots/st%00amp", None),
        ("GET", "/api/x-embedded/pilots", {"stamp": "a\x00b"}),
    ]:
        body = {"status": "Running"} if method == "PATCH" else None
        response = api.client.request(method, path, params=params, json=body, headers=api.headers("admin", "admin"))
        assert response.status_code < 500, (path, response.status_code, response.text)
