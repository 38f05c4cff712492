"""Local HTTP servers for the pilot's unit tests: a file server with injectable failures and a fake scheduler."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional

import pytest


@dataclass
class Request:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: Dict[str, str] = field(default_factory=dict)
    #: Send only this many bytes of the body (with the full Content-Length), then close: a dropped connection.
    truncate_to: Optional[int] = None


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


class LocalServer:
    """A threaded HTTP server on a free loopback port; ``app(Request) -> Reply`` answers every request.

    A test double, not the scheduler (that is ``tests.conftest.WMSServer``): the pilot's unit tests and the runner's
    staging tests script failures into the answers and read back every request.
    """

    def __init__(self, app: Callable[[Request], Reply]) -> None:
        self.app = app
        self.requests: List[Request] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parsed = urllib.parse.urlsplit(self.path)
                request = Request(
                    self.command,
                    parsed.path,
                    urllib.parse.parse_qs(parsed.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                outer.requests.append(request)
                reply = outer.app(request)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.truncate_to is not None:
                    self.wfile.write(reply.body[: reply.truncate_to])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(reply.body)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_multipart(request: Request) -> Dict[str, Any]:
    """Form fields (str) and files ((filename, bytes)) of a multipart/form-data request."""
    raw = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    fields: Dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        fields[name] = (filename, payload) if filename is not None else payload.decode()
    return fields


class FileStore:
    """Serves ``files`` (with Range support unless disabled), stores PUT/POST uploads, plays scripted failures.

    ``plan[path]`` is a list of actions consumed one per request: ``"503"``, ``"drop"`` (half the body, then close),
    ``"corrupt"`` (different bytes of the same length).
    """

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.uploads: Dict[str, Any] = {}
        self.plan: Dict[str, List[str]] = defaultdict(list)
        self.range_support = True
        self.delay = 0.0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            return self._answer(request)
        finally:
            with self._lock:
                self.active -= 1

    def _answer(self, request: Request) -> Reply:
        action = self.plan[request.path].pop(0) if self.plan[request.path] else None
        if action == "503":
            return json_reply({"detail": "try later"}, 503)
        if request.method == "PUT":
            self.uploads[request.path] = request.body
            return Reply(201)
        if request.method == "POST":
            self.uploads[request.path] = parse_multipart(request)
            return json_reply({"ok": True})
        data = self.files.get(request.path)
        if data is None:
            return json_reply({"detail": "no such file"}, 404)
        if action == "corrupt":
            data = bytes(b ^ 0xFF for b in data)
        status, headers, start = 200, {}, 0
        if self.range_support:
            headers["Accept-Ranges"] = "bytes"
            wanted = request.headers.get("range", "")
            if wanted.startswith("bytes=") and wanted.endswith("-"):
                start = int(wanted[len("bytes=") : -1])
                if start >= len(data):
                    return Reply(416, headers={"Content-Range": f"bytes */{len(data)}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if action == "drop":
            return Reply(status, body, headers, truncate_to=len(body) // 2)
        return Reply(status, body, headers)


@pytest.fixture
def file_server():
    store = FileStore()
    server = LocalServer(store)
    server.store = store  # type: ignore[attr-defined]
    yield server
    server.close()


class FakeScheduler:
    """Just enough of the scheduler's pilot and job routes to drive the outbox and a whole pilot in-process."""

    def __init__(self) -> None:
        self.statuses: List[Dict[str, Any]] = []
        self.sandboxes: Dict[str, bytes] = {}
        self.output_pfns: Dict[int, str] = {}
        self.matches: List[Dict[str, Any]] = []
        self.match_requests: List[Dict[str, Any]] = []
        self.pilot_reports: List[Dict[str, Any]] = []
        self.registrations: List[Dict[str, Any]] = []
        self.heartbeats: List[Dict[str, Any]] = []
        self.reschedules: List[int] = []
        self.kill: set = set()
        self.refuse_sandbox = False
        self.down = False
        self.url = ""

    def __call__(self, request: Request) -> Reply:
        if self.down:
            return json_reply({"detail": "maintenance"}, 503)
        method, path = request.method, request.path
        if method == "PATCH" and path == "/api/jobs/status":
            body = json.loads(request.body)
            for job_id, updates in body.items():
                for when, update in updates.items():
                    self.statuses.append({"job_id": int(job_id), "time": when, **update})
            return json_reply({"success": {k: {} for k in body}, "failed": {}})
        if method == "POST" and path == "/api/jobs/sandbox":
            if self.refuse_sandbox:
                return json_reply({"detail": "sandbox too large"}, 413)
            body = json.loads(request.body)
            pfn = f"SB:SandboxSE|/S3/b/vo/g/o/sha256:{body['checksum']}.tar.bz2"
            return json_reply({"pfn": pfn, "url": f"/upload/{body['checksum']}", "fields": {"key": "k1"}})
        if method == "GET" and path == "/api/jobs/sandbox":
            sha = request.query["pfn"][0].split("sha256:")[1].split(".")[0]
            return json_reply({"url": f"{self.url}/download/{sha}", "expires_in": 60})
        if method == "GET" and path.startswith("/download/"):
            data = self.sandboxes.get(path.rsplit("/", 1)[1])
            return Reply(200, data) if data is not None else json_reply({"detail": "gone"}, 404)
        if method == "POST" and path.startswith("/upload/"):
            form = parse_multipart(request)
            assert form["key"] == "k1"
            self.sandboxes[path.rsplit("/", 1)[1]] = form["file"][1]
            return Reply(204)
        if method == "PATCH" and path.endswith("/sandbox/output"):
            self.output_pfns[int(path.split("/")[3])] = json.loads(request.body)
            return json_reply(None)
        if method == "PATCH" and path == "/api/jobs/heartbeat":
            body = json.loads(request.body)
            self.heartbeats.append(body)
            return json_reply(
                [{"job_id": int(j), "command": "Kill", "arguments": ""} for j in body if int(j) in self.kill]
            )
        if method == "POST" and path == "/api/jobs/reschedule":
            self.reschedules.extend(int(j) for j in json.loads(request.body)["job_ids"])  # DiracX 0.7 body
            return json_reply({"success": {}, "failed": {}})
        if method == "POST" and path == "/api/x-embedded/pilots/register":
            body = json.loads(request.body)
            self.registrations.append(body)
            return json_reply({"PilotID": len(self.registrations), "PilotStamp": body["stamp"]})
        if method == "PATCH" and path.startswith("/api/x-embedded/pilots/"):
            self.pilot_reports.append({"stamp": path.rsplit("/", 1)[1], **json.loads(request.body)})
            return json_reply({})
        if method == "POST" and path == "/api/x-embedded/match":
            self.match_requests.append(json.loads(request.body))
            return json_reply(self.matches.pop(0)) if self.matches else Reply(204)
        return json_reply({"detail": "not found"}, 404)


@pytest.fixture
def fake_scheduler():
    app = FakeScheduler()
    server = LocalServer(app)
    app.url = server.url
    server.app_state = app  # type: ignore[attr-defined]
    yield server
    server.close()
