"""Client for the DiracX 0.7 job API over ``requests``; works against the embedded scheduler and a real DiracX.

Only user-side calls: submit, search (all pages), status/kill, reschedule, sandboxes. Bulk by design: the runner
submits many JDLs per request (DiracX takes at most 20 per request, all with the same attribute names) and asks for
the status of every watched job in one search per monitor cycle.

Retries are urllib3's (``HTTPAdapter(max_retries=Retry(...))``, exponential back-off with jitter, Retry-After
respected). Connection errors (raised before anything is sent) are retried for every call. Read errors and
502/503/504 are retried only where doing a call twice is harmless: GETs, the read-only POSTs (search, summary),
sandbox initiation and upload (content-addressed: the same bytes land under the same key) and the status PATCH (the
retry carries the same body with the same timestamp, so the job ends in the same state and a kill stays a kill).
``POST /api/jobs/jdl`` and reschedule are never retried blindly: after a lost answer to a submission, the jobs are
looked up by their (unique) ``JobName`` and only those not found are posted again.

A real DiracX login (``credentials_file``, written by ``galaxy-dirac login``) is refreshed before it expires and
after a 401 (see :mod:`galaxy_dirac.credentials`); when it cannot be refreshed any more, calls raise
:class:`LoginExpired`. Any other error raises :class:`WMSError` with the HTTP status and the server's ``detail``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import requests

from galaxy_dirac import jdl as jdl_mod
from galaxy_dirac.sessions import retrying_session
from galaxy_dirac.times import format_time, now

if TYPE_CHECKING:
    from galaxy_dirac.credentials import DiracxCredentials

#: DiracX refuses more than this many JDLs per request for ordinary users.
MAX_JDLS_PER_REQUEST = 20
#: Rows asked for per search page.
SEARCH_PAGE_SIZE = 500
#: POST routes that change nothing (or nothing twice): retried like GETs.
IDEMPOTENT_POSTS = ("api/jobs/search", "api/jobs/summary", "api/jobs/sandbox")

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


class LoginExpired(WMSError):
    """The DiracX login can no longer be refreshed: nothing works until someone runs ``galaxy-dirac login`` again."""

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message, 401, message)
        self.path = path


def _attribute_names(text: str) -> tuple:
    try:
        return tuple(sorted(jdl_mod.parse(text)))
    except Exception:  # noqa: BLE001 - an unparsable JDL goes alone; the server says what is wrong with it
        return ("\0unparsable", text)


def _job_name(text: str) -> Optional[str]:
    try:
        name = jdl_mod.lookup(jdl_mod.parse(text), "JobName")
    except Exception:  # noqa: BLE001 - unparsable: the server refuses it with a 400, nothing to look up
        return None
    return name if isinstance(name, str) and name else None


class WMSClient:
    """Talks to ``url`` (base URL of a DiracX-compatible server) as the owner of one of its logins.

    The login is a static bearer ``token``, a ``token_file`` re-read on every call (the embedded scheduler's
    tokens), or a DiracX ``credentials_file`` from ``galaxy-dirac login`` that is refreshed as needed. A given
    ``session`` gets this client's retrying adapters mounted.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        *,
        token_file: Optional[str] = None,
        credentials_file: Optional[str] = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        verify: Union[bool, str] = True,
        session: Optional[requests.Session] = None,
        refresh_margin: float = 30.0,
    ) -> None:
        given = [
            name
            for name, value in (("token", token), ("token_file", token_file), ("credentials_file", credentials_file))
            if value
        ]
        if not given:
            raise ValueError("a token, a token file or a credentials file is needed")
        if len(given) > 1:
            raise ValueError(f"give one of token, token_file, credentials_file, not {' and '.join(given)}")
        self.url = url.rstrip("/")
        self._token = token
        self.token_file = token_file
        self.credentials: Optional[DiracxCredentials] = None
        if credentials_file:
            from galaxy_dirac.credentials import DiracxCredentials  # it imports this module

            self.credentials = DiracxCredentials(
                credentials_file, self.url, refresh_margin=refresh_margin, timeout=min(timeout, 60.0), verify=verify
            )
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = retrying_session(retries, backoff, replay=True, verify=verify, session=session)
        #: For calls that must not be replayed (submission, reschedule): same settings, no read/status retries.
        self.once = retrying_session(retries, backoff, replay=False, verify=verify)
        self.once.trust_env = self.session.trust_env
        self.once.proxies = dict(self.session.proxies)
        self.once.cert = self.session.cert

    # -- plumbing -----------------------------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The bearer token: refreshed from the credentials file, re-read from the token file, or the static one."""
        if self.credentials is not None:
            return self.credentials.access_token()
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as stream:
                return stream.read().strip()
        return str(self._token)

    def request(
        self,
        method: str,
        path: str,
        *,
        expect: Iterable[int] = (200,),
        idempotent: Optional[bool] = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One call; raises :class:`WMSError` unless the status is in ``expect``.

        ``idempotent`` (default: every verb but POST, and the POSTs of :data:`IDEMPOTENT_POSTS`) says whether read
        errors and gateway errors may be retried. A 401 with a refreshable login is retried once after a refresh.
        """
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/{path.lstrip('/')}"
        if idempotent is None:
            idempotent = method.upper() != "POST" or path.strip("/") in IDEMPOTENT_POSTS
        session = self.session if idempotent else self.once
        kwargs.setdefault("timeout", self.timeout)
        headers = dict(kwargs.pop("headers", None) or {})
        token = self.token
        refreshed = False
        while True:
            headers["Authorization"] = f"Bearer {token}"
            try:
                response = session.request(method, url, headers=headers, **kwargs)
            except requests.RequestException as exc:
                raise WMSError(f"{method} {url}: cannot reach the scheduler: {exc}", None) from exc
            if response.status_code == 401 and self.credentials is not None and not refreshed:
                refreshed = True  # one refresh per call: a second 401 is the server's final word
                token = self.credentials.refresh(rejected=token)
                continue
            break
        if response.status_code not in tuple(expect):
            try:
                detail = response.json().get("detail")
            except Exception:  # noqa: BLE001 - not JSON
                detail = response.text[:500]
            raise WMSError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code, detail)
        return response

    def _pause(self, attempt: int) -> None:
        """Back-off between submission attempts (urllib3 does it for everything else)."""
        delay = min(self.backoff * 2**attempt, 10.0)
        time.sleep(delay + random.uniform(0, self.backoff))

    # -- jobs ---------------------------------------------------------------------------------------------------------

    def submit(self, jdls: Sequence[str]) -> List[Dict[str, Any]]:
        """Submit plain JDLs; returns one ``{JobID, Status, MinorStatus, TimeStamp}`` per JDL, in order.

        JDLs are grouped by attribute-name set and sent at most :data:`MAX_JDLS_PER_REQUEST` per request. When the
        answer to a request is lost (connection error, timeout, 5xx), the jobs are looked up by ``JobName`` and only
        the ones not found are posted again; JDLs without a unique JobName are then not re-posted at all.
        """
        groups: Dict[tuple, List[int]] = {}
        for index, text in enumerate(jdls):
            groups.setdefault(_attribute_names(text), []).append(index)
        results: List[Optional[Dict[str, Any]]] = [None] * len(jdls)
        for indexes in groups.values():
            for start in range(0, len(indexes), MAX_JDLS_PER_REQUEST):
                chunk = indexes[start : start + MAX_JDLS_PER_REQUEST]
                for i, job in zip(chunk, self._submit_chunk([jdls[i] for i in chunk])):
                    results[i] = job
        return [r for r in results if r is not None]

    def _submit_chunk(self, texts: Sequence[str]) -> List[Dict[str, Any]]:
        """One request's worth of JDLs, re-posting after a lost answer only what the server does not have."""
        names = [_job_name(t) for t in texts]
        results: List[Optional[Dict[str, Any]]] = [None] * len(texts)
        pending = list(range(len(texts)))
        failure: Optional[WMSError] = None
        for attempt in range(self.retries + 1):
            try:
                response = self.request(
                    "POST", "api/jobs/jdl", json=[texts[i] for i in pending], expect=(200, 201), idempotent=False
                )
            except LoginExpired:
                raise
            except WMSError as exc:
                if exc.status is not None and exc.status < 500:
                    raise  # refused: nothing was inserted
                failure = exc
            else:
                inserted = response.json()
                if len(inserted) != len(pending):
                    raise WMSError(
                        f"submitted {len(pending)} JDLs, got {len(inserted)} jobs back", response.status_code
                    )
                for i, job in zip(pending, inserted):
                    results[i] = job
                return [r for r in results if r is not None]
            # The server may have inserted the jobs before the answer was lost: ask it before posting again.
            wanted = [names[i] for i in pending]
            if None in wanted or len(set(wanted)) != len(wanted):
                raise WMSError(
                    f"{failure}; not re-posted: without a unique JobName per JDL there is no telling whether the "
                    "jobs were created",
                    failure.status,
                    failure.detail,
                )
            self._pause(attempt)
            try:
                found = self.find_by_name(wanted)  # type: ignore[arg-type]
            except WMSError as exc:
                raise WMSError(
                    f"{failure}; and looking the jobs up by JobName failed too ({exc}): they may have been created",
                    failure.status,
                    failure.detail,
                ) from exc
            for i in pending:
                results[i] = found.get(str(names[i]))
            pending = [i for i in pending if results[i] is None]
            if not pending:
                return [r for r in results if r is not None]
        assert failure is not None
        raise WMSError(
            f"submission failed after {self.retries + 1} attempts: {failure}", failure.status, failure.detail
        )

    def find_by_name(self, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """``{JobName: {JobID, Status, MinorStatus, TimeStamp}}`` of this owner's jobs (the newest one per name)."""
        found: Dict[str, Dict[str, Any]] = {}
        if not names:
            return found
        rows = self.search(
            [{"parameter": "JobName", "operator": "in", "values": list(names)}],
            ["JobID", "JobName", "Status", "MinorStatus", "SubmissionTime"],
        )
        for row in rows:  # JobID ascending: a later job with the same name wins
            found[str(row["JobName"])] = {
                "JobID": row["JobID"],
                "Status": row.get("Status"),
                "MinorStatus": row.get("MinorStatus"),
                "TimeStamp": row.get("SubmissionTime"),
            }
        return found

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

    def wait_for_updates(self, cursor: Optional[str], wait: float) -> Optional[Tuple[List[int], str]]:
        """Block until one of our jobs changes status after ``cursor`` (at most ``wait`` s); returns (job ids, next
        cursor), or ``None`` where the server has no such long poll (a real DiracX): then poll on a timer."""
        params: Dict[str, Any] = {"wait": f"{wait:g}"}
        if cursor:
            params["since"] = cursor
        try:
            response = self.request(
                "GET", "api/x-embedded/jobs/updates", params=params, expect=(200, 404), timeout=wait + self.timeout
            )
        except WMSError as exc:
            if exc.status in (401, 403, 405):
                return None
            raise
        if response.status_code == 404:
            return None
        answer = response.json()
        return [int(i) for i in answer.get("JobIDs", [])], str(answer.get("Cursor") or cursor or "")

    def set_status(self, updates: Mapping[int, Mapping[str, Any]], force: bool = False) -> Dict[str, Any]:
        """``{job_id: {"Status"?, "MinorStatus"?, "ApplicationStatus"?, "Source"?}}``, stamped now (timezone-aware)."""
        when = format_time(now())
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
        """Reschedule jobs; never replayed (each reschedule counts towards DIRAC's MaxRescheduling)."""
        body = {"job_ids": [int(i) for i in job_ids]}
        return self.request("POST", "api/jobs/reschedule", json=body, idempotent=False).json()

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
            try:
                with open(path, "rb") as stream:
                    sent = self.session.post(
                        target["url"],
                        data=target.get("fields") or {},
                        files={"file": (os.path.basename(path), stream)},
                        timeout=max(self.timeout, 300.0),
                    )
            except requests.RequestException as exc:
                raise WMSError(f"sandbox upload failed: {exc}") from exc
            if sent.status_code not in (200, 201, 204):
                raise WMSError(f"sandbox upload: HTTP {sent.status_code}: {sent.text[:300]}", sent.status_code)
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
        try:
            response = self.session.get(url, timeout=max(self.timeout, 300.0))
        except requests.RequestException as exc:
            raise WMSError(f"sandbox download failed: {exc}") from exc
        if response.status_code != 200:
            raise WMSError(f"sandbox download: HTTP {response.status_code}", response.status_code)
        return response.content

    def consumption(self, job_id: int) -> Dict[str, Any]:
        """What the job consumed per its heartbeats (CPUConsumed, MaxMemoryUsed, WallClockTime...) and where it ran.

        Where: the last pilot that was handed the job, under DIRAC's job-parameter names (``Pilot_Reference``,
        ``GridCE``, ``CEQueue``). The embedded scheduler has it all on one route of its own; a real DiracX 0.7
        answers that route with 404, keeps no heartbeat figures a job's owner can read, and finds the pilots of a
        job through its pilot search (the ``JobID`` pseudo-parameter), open to the users of the pilot's VO.
        """
        response = self.request("GET", f"api/x-embedded/jobs/{int(job_id)}", expect=(200, 404))
        used: Dict[str, Any] = {}
        if response.status_code == 200:
            details = response.json()
            used.update(details.get("HeartBeat") or {})
            stamps = details.get("Pilots") or []
            rows = [p for p in details.get("PilotAgents") or [] if stamps and p.get("PilotStamp") == stamps[-1]]
            pilot = rows[0] if rows else ({"PilotStamp": stamps[-1]} if stamps else {})
        else:
            found = self.request(
                "POST",
                "api/pilots/search",
                json={
                    "parameters": ["PilotID", "PilotStamp", "PilotJobReference", "DestinationSite", "Queue"],
                    "search": [{"parameter": "JobID", "operator": "eq", "value": int(job_id)}],
                    "sort": [{"parameter": "PilotID", "direction": "desc"}],
                },
                expect=(200, 206, 403, 404, 416),
                idempotent=True,
            )
            rows = found.json() if found.status_code in (200, 206) else []
            pilot = rows[0] if rows else {}
        reference = pilot.get("PilotJobReference")
        reference = reference if reference and reference != "Unknown" else pilot.get("PilotStamp")
        if reference:
            used["Pilot_Reference"] = reference
            for key, column in (("GridCE", "DestinationSite"), ("CEQueue", "Queue")):
                if pilot.get(column) and pilot[column] not in ("NotAssigned", "Unknown"):
                    used[key] = pilot[column]
        return used

    def download_output_sandboxes(self, job_id: int) -> List[io.BytesIO]:
        return [io.BytesIO(self.download_sandbox(pfn)) for pfn in self.sandbox_pfns(job_id, "output")]
