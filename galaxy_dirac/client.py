"""Client for the DiracX 0.7 job API over ``requests``; works against the embedded scheduler and a real DiracX.

Only user-side calls: submit, search (all pages), status/kill, reschedule, sandboxes. Bulk by design: the runner
submits many JDLs per request (DiracX takes at most 20 per request, all with the same attribute names) and asks for
the status of every watched job in one search per monitor cycle. Connection errors and 502/503/504 are retried with
back-off; any other error raises :class:`WMSError` carrying the HTTP status and the server's ``detail``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import requests

from galaxy_dirac import jdl as jdl_mod

#: DiracX refuses more than this many JDLs per request for ordinary users.
MAX_JDLS_PER_REQUEST = 20
#: Rows asked for per search page.
SEARCH_PAGE_SIZE = 500
RETRYABLE_STATUS = (502, 503, 504)

DEFAULT_PARAMETERS = [
    "JobID",
    "Status",
    "MinorStatus",
    "ApplicationStatus",
    "Site",
    "RescheduleCounter",
    "StartExecTime",
    "EndExecTime",
]


class WMSError(Exception):
    """A call to the scheduler failed: ``status`` is the HTTP status (None when it could not be reached)."""

    def __init__(self, message: str, status: Optional[int] = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _attribute_names(text: str) -> tuple:
    try:
        return tuple(sorted(jdl_mod.parse(text)))
    except Exception:  # noqa: BLE001 - an unparsable JDL goes alone; the server says what is wrong with it
        return ("\0unparsable", text)


class WMSClient:
    """Talks to ``url`` (base URL of a DiracX-compatible server) with a bearer ``token`` (or ``token_file``)."""

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        *,
        token_file: Optional[str] = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        verify: Union[bool, str] = True,
        session: Optional[requests.Session] = None,
    ) -> None:
        if not token and not token_file:
            raise ValueError("a token or a token file is needed")
        self.url = url.rstrip("/")
        self._token = token
        self.token_file = token_file
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = session or requests.Session()
        self.session.verify = verify

    # -- plumbing -----------------------------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The bearer token; a token file is re-read on every call so a rotated token is picked up."""
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as stream:
                return stream.read().strip()
        return str(self._token)

    def request(self, method: str, path: str, *, expect: Iterable[int] = (200,), **kwargs: Any) -> requests.Response:
        """One call with retries on connection errors and gateway errors; raises :class:`WMSError` otherwise."""
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self.timeout)
        last: Optional[str] = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
            headers = dict(kwargs.pop("headers", None) or {})
            headers["Authorization"] = f"Bearer {self.token}"
            try:
                response = self.session.request(method, url, headers=headers, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{method} {url}: cannot reach the scheduler: {exc}"
                kwargs["headers"] = headers
                continue
            kwargs["headers"] = headers
            if response.status_code in RETRYABLE_STATUS:
                last = f"{method} {url}: HTTP {response.status_code}"
                continue
            if response.status_code not in tuple(expect):
                try:
                    detail = response.json().get("detail")
                except Exception:  # noqa: BLE001 - not JSON
                    detail = response.text[:500]
                raise WMSError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code, detail)
            return response
        raise WMSError(last or f"{method} {url} failed", None)

    # -- jobs ---------------------------------------------------------------------------------------------------------

    def submit(self, jdls: Sequence[str]) -> List[Dict[str, Any]]:
        """Submit plain JDLs; returns one ``{JobID, Status, MinorStatus, TimeStamp}`` per JDL, in order.

        JDLs are grouped by attribute-name set and sent at most :data:`MAX_JDLS_PER_REQUEST` per request.
        """
        groups: Dict[tuple, List[int]] = {}
        for index, text in enumerate(jdls):
            groups.setdefault(_attribute_names(text), []).append(index)
        results: List[Optional[Dict[str, Any]]] = [None] * len(jdls)
        for indexes in groups.values():
            for start in range(0, len(indexes), MAX_JDLS_PER_REQUEST):
                chunk = indexes[start : start + MAX_JDLS_PER_REQUEST]
                response = self.request("POST", "api/jobs/jdl", json=[jdls[i] for i in chunk], expect=(200, 201))
                inserted = response.json()
                if len(inserted) != len(chunk):
                    raise WMSError(f"submitted {len(chunk)} JDLs, got {len(inserted)} jobs back", response.status_code)
                for i, job in zip(chunk, inserted):
                    results[i] = job
        return [r for r in results if r is not None]

    def search(
        self,
        search: Sequence[Mapping[str, Any]],
        parameters: Optional[Sequence[str]] = None,
        sort: Optional[Sequence[Mapping[str, str]]] = None,
        per_page: int = SEARCH_PAGE_SIZE,
    ) -> List[Dict[str, Any]]:
        """Every row matching ``search``, following pages (206 + Content-Range) to the end."""
        body: Dict[str, Any] = {"search": list(search)}
        if parameters:
            body["parameters"] = list(parameters)
        body["sort"] = list(sort or [{"parameter": "JobID", "direction": "asc"}])
        rows: List[Dict[str, Any]] = []
        page = 1
        while True:
            response = self.request(
                "POST",
                "api/jobs/search",
                params={"page": page, "per_page": per_page},
                json=body,
                expect=(200, 206, 416),
            )
            if response.status_code == 416:
                break
            chunk = response.json()
            rows.extend(chunk)
            if response.status_code == 200 or not chunk:
                break
            content_range = response.headers.get("Content-Range", "")
            try:
                span, total = content_range.split(" ", 1)[1].split("/")
                last = int(span.split("-")[1])
                if last + 1 >= int(total):
                    break
            except (IndexError, ValueError):
                pass
            page += 1
        return rows

    def statuses(
        self, job_ids: Iterable[int], parameters: Optional[Sequence[str]] = None, batch: int = 1000
    ) -> Dict[int, Dict[str, Any]]:
        """``{JobID: row}`` for the given jobs, one search per ``batch`` ids; unknown ids are absent."""
        ids = sorted({int(i) for i in job_ids})
        found: Dict[int, Dict[str, Any]] = {}
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            rows = self.search(
                [{"parameter": "JobID", "operator": "in", "values": chunk}], parameters or DEFAULT_PARAMETERS
            )
            for row in rows:
                found[int(row["JobID"])] = row
        return found

    def set_status(self, updates: Mapping[int, Mapping[str, Any]], force: bool = False) -> Dict[str, Any]:
        """``{job_id: {"Status"?, "MinorStatus"?, "ApplicationStatus"?, "Source"?}}``, stamped now (timezone-aware)."""
        when = _now_iso()
        body = {str(job_id): {when: dict(fields)} for job_id, fields in updates.items()}
        response = self.request("PATCH", "api/jobs/status", params={"force": str(force).lower()}, json=body)
        return response.json()

    def kill(self, job_ids: Iterable[int], reason: str = "Marked for termination") -> Dict[str, Any]:
        """Kill jobs (Status Killed); already-final jobs end up in ``failed`` and are not an error."""
        ids = list(job_ids)
        if not ids:
            return {"success": {}, "failed": {}}
        return self.set_status({i: {"Status": "Killed", "MinorStatus": reason, "Source": "GalaxyRunner"} for i in ids})

    def reschedule(self, job_ids: Iterable[int]) -> Dict[str, Any]:
        return self.request("POST", "api/jobs/reschedule", json={"job_ids": [int(i) for i in job_ids]}).json()

    # -- sandboxes ----------------------------------------------------------------------------------------------------

    def upload_sandbox(self, path: str, fmt: str = "tar.bz2") -> str:
        """Upload an archive (content-addressed: nothing is sent when the server has it already); returns its pfn."""
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        info = {
            "checksum_algorithm": "sha256",
            "checksum": digest.hexdigest(),
            "size": os.path.getsize(path),
            "format": fmt,
        }
        target = self.request("POST", "api/jobs/sandbox", json=info).json()
        if target.get("url"):
            last: Optional[Exception] = None
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
                try:
                    with open(path, "rb") as stream:
                        sent = self.session.post(
                            target["url"],
                            data=target.get("fields") or {},
                            files={"file": (os.path.basename(path), stream)},
                            timeout=max(self.timeout, 300.0),
                        )
                except (requests.ConnectionError, requests.Timeout) as exc:
                    last = exc
                    continue
                if sent.status_code in RETRYABLE_STATUS:
                    last = WMSError(f"sandbox upload: HTTP {sent.status_code}", sent.status_code)
                    continue
                if sent.status_code not in (200, 201, 204):
                    raise WMSError(f"sandbox upload: HTTP {sent.status_code}: {sent.text[:300]}", sent.status_code)
                break
            else:
                raise WMSError(f"sandbox upload failed: {last}")
        return str(target["pfn"])

    def sandbox_pfns(self, job_id: int, kind: str = "output") -> List[str]:
        return list(self.request("GET", f"api/jobs/{int(job_id)}/sandbox/{kind}").json())

    def download_sandbox(self, pfn: str) -> bytes:
        """The archive bytes of a sandbox; ``pfn`` as listed for a job, with or without ``SB:SandboxSE|``."""
        full = pfn if pfn.startswith("SB:") else f"SB:SandboxSE|{pfn}"
        target = self.request("GET", "api/jobs/sandbox", params={"pfn": full}).json()
        url = target["url"]
        if not url.startswith(("http://", "https://")):
            url = f"{self.url}/{url.lstrip('/')}"
        last: Optional[Exception] = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
            try:
                response = self.session.get(url, timeout=max(self.timeout, 300.0))
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = exc
                continue
            if response.status_code in RETRYABLE_STATUS:
                last = WMSError(f"sandbox download: HTTP {response.status_code}", response.status_code)
                continue
            if response.status_code != 200:
                raise WMSError(f"sandbox download: HTTP {response.status_code}", response.status_code)
            return response.content
        raise WMSError(f"sandbox download failed: {last}")

    def consumption(self, job_id: int) -> Dict[str, float]:
        """What the job consumed per its heartbeats (CPUConsumed, MaxMemoryUsed, WallClockTime...).

        Only the embedded scheduler has this route; a real DiracX answers 404 and the result is empty.
        """
        response = self.request("GET", f"api/x-embedded/jobs/{int(job_id)}", expect=(200, 404))
        if response.status_code == 404:
            return {}
        return dict(response.json().get("HeartBeat") or {})

    def download_output_sandboxes(self, job_id: int) -> List[io.BytesIO]:
        return [io.BytesIO(self.download_sandbox(pfn)) for pfn in self.sandbox_pfns(job_id, "output")]
