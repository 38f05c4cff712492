"""Data staging driven by a manifest that travels in the input sandbox.

Large datasets must not pass through the scheduler, so the job bundle can name files the job wrapper fetches before the
payload runs and files it pushes afterwards (for Galaxy: its job files API). The manifest is a JSON file in the input
sandbox, by default ``galaxy_dirac_manifest.json``::

    {
      "headers": {"X-Common": "sent with every transfer"},
      "inputs":  [{"url": "https://...", "path": "inputs/a.dat",
                   "headers": {...}, "size": 123, "sha256": "<hex>"}],
      "outputs": [{"url": "https://...", "path": "outputs/b.dat",
                   "method": "POST", "field": "file", "fields": {"path": "..."},
                   "headers": {...}, "optional": false}]
    }

``path`` is relative to the job directory. Inputs are fetched with GET; a transfer cut short is resumed with an HTTP
``Range`` request when the server honours it and restarted otherwise; ``size`` and ``sha256``, when given, are
checked. Outputs are sent with ``PUT`` (the file is the body) or ``POST`` (``multipart/form-data``, the file in the
part named ``field``, default ``file``, next to the text ``fields``); an ``optional`` output may be missing. Transfers
run on a bounded number of threads and each is retried with exponential back-off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional

from galaxy_dirac.pilot.http import Backoff, FileBody, HTTPError, MultipartBody, is_retryable, iter_chunks, open_url
from galaxy_dirac.pilot.http import redact as _redact
from galaxy_dirac.pilot.http import upload as _upload

log = logging.getLogger(__name__)

MANIFEST_NAME = "galaxy_dirac_manifest.json"


class StagingError(Exception):
    """One or more transfers failed for good; ``failures`` maps each manifest path to its reason."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        summary = "; ".join(f"{path}: {reason}" for path, reason in sorted(self.failures.items()))
        super().__init__(summary[:1000])


class ManifestError(ValueError):
    """The manifest is not valid; staging does not start."""


class ChecksumError(Exception):
    """Downloaded bytes differ from what the manifest promised (size or sha256)."""


class InputFile:
    """An input to fetch."""

    def __init__(
        self,
        url: str,
        path: str,
        headers: Optional[Mapping[str, str]] = None,
        size: Optional[int] = None,
        sha256: Optional[str] = None,
    ) -> None:
        self.url = url
        self.path = path
        self.headers = dict(headers or {})
        self.size = size
        self.sha256 = sha256.lower() if sha256 else None


class OutputFile:
    """An output to push."""

    def __init__(
        self,
        url: str,
        path: str,
        method: str = "PUT",
        field: str = "file",
        fields: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        optional: bool = False,
    ) -> None:
        self.url = url
        self.path = path
        self.method = method.upper()
        self.field = field
        self.fields = dict(fields or {})
        self.headers = dict(headers or {})
        self.optional = optional


class Manifest:
    def __init__(self, inputs: List[InputFile], outputs: List[OutputFile]) -> None:
        self.inputs = inputs
        self.outputs = outputs


def _check_relative(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise ManifestError(f"path must be a relative POSIX path: {path!r}")
    if any(part in ("..", "") for part in path.split("/")):
        raise ManifestError(f"path must not contain '..' or empty components: {path!r}")
    return path


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ManifestError(f"url must be http(s): {url!r}")
    return url


def _headers(value: Any, where: str) -> Dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ManifestError(f"{where}: headers must be an object of strings")
    return dict(value)


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest; paths may not escape the job directory."""
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a JSON object")
    common = _headers(data.get("headers"), "manifest")
    inputs, outputs = [], []
    for n, item in enumerate(data.get("inputs") or []):
        if not isinstance(item, dict):
            raise ManifestError(f"inputs[{n}] must be an object")
        size = item.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ManifestError(f"inputs[{n}].size must be a non-negative integer")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise ManifestError(f"inputs[{n}].sha256 must be 64 hex digits")
        headers = dict(common)
        headers.update(_headers(item.get("headers"), f"inputs[{n}]"))
        inputs.append(InputFile(_check_url(item.get("url")), _check_relative(item.get("path")), headers, size, sha))
    for n, item in enumerate(data.get("outputs") or []):
        if not isinstance(item, dict):
            raise ManifestError(f"outputs[{n}] must be an object")
        method = str(item.get("method", "PUT")).upper()
        if method not in ("PUT", "POST"):
            raise ManifestError(f"outputs[{n}].method must be PUT or POST")
        fields = item.get("fields") or {}
        if not isinstance(fields, dict):
            raise ManifestError(f"outputs[{n}].fields must be an object")
        headers = dict(common)
        headers.update(_headers(item.get("headers"), f"outputs[{n}]"))
        outputs.append(
            OutputFile(
                _check_url(item.get("url")),
                _check_relative(item.get("path")),
                method=method,
                field=str(item.get("field") or "file"),
                fields=fields,
                headers=headers,
                optional=bool(item.get("optional", False)),
            )
        )
    seen = set()
    for spec in inputs:
        if spec.path in seen:
            raise ManifestError(f"two inputs write {spec.path!r}")
        seen.add(spec.path)
    return Manifest(inputs, outputs)


def load_manifest(path: str) -> Manifest:
    """Read and validate the manifest file at ``path``."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except ValueError as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    return parse_manifest(data)


def confined_path(root: str, relative: str, create_parents: bool = False) -> str:
    """``root/relative``, refusing paths that leave ``root`` through ``..`` or a symbolic link."""
    _check_relative(relative)
    target = os.path.join(root, *relative.split("/"))
    parent = os.path.dirname(target)
    if create_parents:
        os.makedirs(parent, exist_ok=True)
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(parent)
    if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
        raise ManifestError(f"{relative!r} leaves the job directory")
    if os.path.islink(target):
        raise ManifestError(f"{relative!r} is a symbolic link")
    return target


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Transfers:
    """Settings shared by all transfers of one job: timeouts, retries, back-off, TLS and concurrency."""

    def __init__(
        self,
        *,
        concurrency: int = 4,
        retries: int = 5,
        timeout: float = 60.0,
        backoff: Optional[Backoff] = None,
        context: Optional[ssl.SSLContext] = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff or Backoff(base=1.0, cap=30.0)
        self.context = context
        self.sleep = sleep

    def download(self, spec: InputFile, root: str) -> int:
        """Fetch one input into ``root``; returns its size. Resumes with ``Range`` when the server allows it."""
        dest = confined_path(root, spec.path, create_parents=True)
        part = dest + ".part"
        resume = True
        last: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff.delay(attempt - 1)
                log.info("retrying download of %s in %.1f s after: %s", spec.path, delay, last)
                self.sleep(delay)
            offset = os.path.getsize(part) if resume and os.path.exists(part) else 0
            headers = dict(spec.headers)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                self._fetch(spec, part, offset, headers)
                self._verify(spec, part)
            except HTTPError as exc:
                last = exc
                if exc.status == 416:
                    resume = False
                    continue
                if not exc.retryable:
                    break
                continue
            except ChecksumError as exc:
                last = exc
                resume = False
                continue
            except Exception as exc:
                last = exc
                resume = True
                if not is_retryable(exc):
                    break
                continue
            os.replace(part, dest)
            return os.path.getsize(dest)
        if os.path.exists(part):
            os.unlink(part)
        raise last if last is not None else RuntimeError("download failed")

    def _fetch(self, spec: InputFile, part: str, offset: int, headers: Mapping[str, str]) -> None:
        with open_url("GET", spec.url, headers=headers, timeout=self.timeout, context=self.context) as response:
            mode = "wb"
            if offset and response.status == 206:
                content_range = response.headers.get("Content-Range", "")
                start = content_range.split(" ", 1)[-1].split("-", 1)[0]
                if start.strip() == str(offset):
                    mode = "ab"
                    log.info("resuming %s at byte %d", spec.path, offset)
                else:
                    raise ChecksumError(f"server sent range {content_range!r}, asked for bytes={offset}-")
            elif offset:
                log.info("server does not resume %s; restarting", spec.path)
            with open(part, mode) as stream:
                for chunk in iter_chunks(response):
                    stream.write(chunk)
                    if spec.size is not None and stream.tell() > spec.size:
                        raise ChecksumError(f"more than the expected {spec.size} bytes")

    @staticmethod
    def _verify(spec: InputFile, part: str) -> None:
        size = os.path.getsize(part)
        if spec.size is not None and size != spec.size:
            os.unlink(part)
            raise ChecksumError(f"size mismatch: got {size} bytes, expected {spec.size}")
        if spec.sha256 is not None:
            actual = sha256_of(part)
            if actual != spec.sha256:
                os.unlink(part)
                raise ChecksumError(f"sha256 mismatch: got {actual}, expected {spec.sha256}")

    def upload(self, spec: OutputFile, root: str) -> Optional[int]:
        """Push one output from ``root``; returns its size, or ``None`` when an optional output is missing."""
        source = confined_path(root, spec.path)
        if not os.path.isfile(source):
            if spec.optional:
                log.info("optional output %s is absent; skipped", spec.path)
                return None
            raise FileNotFoundError(f"output {spec.path} was not produced")
        if spec.method == "PUT":
            body = FileBody(source)
        else:
            body = MultipartBody(spec.fields, [(spec.field, os.path.basename(source), source)])
        _upload(
            spec.method,
            spec.url,
            body,
            headers=spec.headers,
            timeout=max(self.timeout, 300.0),
            context=self.context,
            retries=self.retries,
            backoff=self.backoff,
            sleep=self.sleep,
        )
        log.info("uploaded %s to %s", spec.path, _redact(spec.url))
        return body.length if isinstance(body, FileBody) else os.path.getsize(source)

    def _run_all(self, items: List[Any], action: Callable[[Any], Any]) -> Dict[str, Any]:
        results: Dict[str, Any] = {}
        failures: Dict[str, str] = {}
        if not items:
            return results
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = [(item, pool.submit(action, item)) for item in items]
            for item, future in futures:
                try:
                    results[item.path] = future.result()
                except Exception as exc:
                    failures[item.path] = str(exc) or type(exc).__name__
        if failures:
            raise StagingError(failures)
        return results

    def stage_in(self, inputs: List[InputFile], root: str) -> Dict[str, int]:
        """Fetch all inputs; raises :class:`StagingError` naming every input that could not be fetched."""
        return self._run_all(inputs, lambda spec: self.download(spec, root))

    def stage_out(self, outputs: List[OutputFile], root: str) -> Dict[str, Optional[int]]:
        """Push all outputs; raises :class:`StagingError` naming every output that could not be pushed."""
        return self._run_all(outputs, lambda spec: self.upload(spec, root))
