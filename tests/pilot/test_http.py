"""The pilot's urllib client: retries, errors, tokens and multipart bodies."""

from __future__ import annotations

import json

import pytest

from galaxy_dirac.pilot.http import Backoff, Client, FileBody, HTTPError, MultipartBody, upload

from .conftest import Reply, json_reply, parse_multipart


def fast_client(url: str, **kwargs) -> Client:
    return Client(url, "tok", backoff=Backoff(base=0.01, cap=0.02), **kwargs)


def test_backoff_grows_with_jitter_and_cap():
    backoff = Backoff(base=1.0, cap=10.0)
    for attempt, ceiling in enumerate([1, 2, 4, 8, 10, 10]):
        delays = {backoff.delay(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


def test_json_call_retries_transient_errors(file_server):
    answers = [json_reply({"detail": "busy"}, 503), json_reply({"detail": "busy"}, 502), json_reply({"ok": 1})]
    file_server.app = lambda request: answers.pop(0)
    assert fast_client(file_server.url).call("POST", "api/x", {"a": 1}) == {"ok": 1}
    assert len(file_server.requests) == 3
    request = file_server.requests[0]
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.body) == {"a": 1}


def test_refusals_are_not_retried_and_carry_the_detail(file_server):
    file_server.app = lambda request: json_reply({"detail": "job 3 belongs to someone else"}, 403)
    with pytest.raises(HTTPError) as caught:
        fast_client(file_server.url).call("GET", "api/jobs/3")
    assert caught.value.status == 403 and caught.value.detail == "job 3 belongs to someone else"
    assert len(file_server.requests) == 1


def test_no_content_and_query_parameters(file_server):
    file_server.app = lambda request: Reply(204)
    client = fast_client(file_server.url + "/base/")
    assert client.call("POST", "api/x-embedded/match", {}, params={"job_ids": [1, 2]}) is None
    assert file_server.requests[0].path == "/base/api/x-embedded/match"
    assert file_server.requests[0].query == {"job_ids": ["1", "2"]}


def test_token_is_only_sent_to_its_own_server(file_server):
    file_server.app = lambda request: json_reply({})
    client = fast_client("http://scheduler.invalid:1/")
    assert client.same_origin("/api/x") and client.same_origin("http://scheduler.invalid:1/y")
    assert not client.same_origin(file_server.url + "/x")
    client.call("GET", file_server.url + "/elsewhere")
    assert "authorization" not in file_server.requests[0].headers


def test_connection_refused_is_retried_then_raised():
    client = fast_client("http://127.0.0.1:9", retries=2)
    with pytest.raises(OSError):
        client.call("GET", "x")


def test_multipart_body_streams_fields_and_files(tmp_path, file_server):
    data = bytes(range(256)) * 5000
    (tmp_path / "f.bin").write_bytes(data)
    body = MultipartBody({"key": "k", "n": 3}, [("file", 'we"ird.bin', str(tmp_path / "f.bin"))])
    first = body.read(1000) + body.read()
    body.reset()
    assert body.read() == first and len(first) == body.length
    answers = [json_reply({}, 503), Reply(204)]
    file_server.app = lambda request: answers.pop(0)
    upload("POST", file_server.url + "/up", body, backoff=Backoff(0.01, 0.02))
    form = parse_multipart(file_server.requests[-1])
    assert form["key"] == "k" and form["n"] == "3"
    assert form["file"][1] == data
    put = FileBody(str(tmp_path / "f.bin"))
    file_server.app = lambda request: Reply(201)
    upload("PUT", file_server.url + "/put", put)
    assert file_server.requests[-1].body == data


def test_error_messages_do_not_leak_query_secrets(file_server):
    file_server.app = lambda request: json_reply({"detail": "nope"}, 404)
    with pytest.raises(HTTPError) as caught:
        fast_client(file_server.url).call("GET", "api/jobs/1/files", params={"job_key": "s3cr3t"})
    assert "s3cr3t" not in str(caught.value) and "/api/jobs/1/files" in str(caught.value)
