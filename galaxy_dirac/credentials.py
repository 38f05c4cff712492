"""A DiracX login that lasts: the credentials file, its refresh under a lock, and the device-flow login.

DiracX (0.7) access tokens live minutes (20 by default). Its refresh tokens rotate: every refresh revokes the token
it was given and hands out a new one that only gets what was left of the old one's lifetime, and a revoked refresh
token presented again makes DiracX revoke every refresh token of that user ("potential attack detected"). So one
login lasts the server's refresh-token lifetime (60 min by default) whatever we do, and a refresh token must never
be used twice, even by two Galaxy handler processes sharing the file.

The file has diracx-client's own layout (``{"access_token", "refresh_token", "expires_on"}``, epoch seconds, 15 s
before the real expiry), mode 0600, replaced atomically (tmp + ``os.replace``) so a reader never sees half a file.
Refreshes are serialised by an exclusive ``fcntl`` lock on the sibling ``<file>.lock``; under it the file is read
again, and if another process rotated already its token is used instead of refreshing.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import requests

from galaxy_dirac.client import LoginExpired, WMSError
from galaxy_dirac.sessions import retrying_session

#: The OAuth2 client id DiracX accepts for its own clients (``DIRACX_SERVICE_AUTH_DIRAC_CLIENT_ID``'s default;
#: DiracX's docs: "There is no real reason to change that"). The device flow refuses any other.
CLIENT_ID = "myDIRACClientID"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: diracx-client writes ``expires_on`` this many seconds before the token's real expiry; so do we.
EXPIRES_GRACE_SECONDS = 15
#: Environment variable naming the credentials file (for ``galaxy-dirac login`` and the Galaxy runner).
CREDENTIALS_ENV = "GALAXY_DIRAC_CREDENTIALS_FILE"


def default_credentials_file() -> str:
    """``$GALAXY_DIRAC_CREDENTIALS_FILE``, else ``$XDG_CONFIG_HOME/galaxy-dirac/diracx-credentials.json``."""
    if os.environ.get(CREDENTIALS_ENV):
        return os.environ[CREDENTIALS_ENV]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "galaxy-dirac", "diracx-credentials.json")


def token_claims(token: Optional[str]) -> Dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies; we only read expiry, user and group); {} if opaque."""
    try:
        payload = str(token).split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
    except (IndexError, ValueError, TypeError):
        return {}


def read_credentials(path: str) -> Dict[str, Any]:
    """The credentials file's content; :class:`LoginExpired` when there is none or it is not credentials."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise LoginExpired(f"no DiracX login in {path}", path=path) from None
    except (OSError, ValueError) as exc:
        raise LoginExpired(f"unreadable DiracX credentials in {path}: {exc}", path=path) from None
    if not isinstance(data, dict) or not data.get("access_token"):
        raise LoginExpired(f"{path} holds no DiracX access token", path=path)
    return data


def write_credentials(path: str, token_response: Mapping[str, Any]) -> Dict[str, Any]:
    """Store a token response (``access_token``, ``expires_in``, ``refresh_token``) atomically, mode 0600."""
    data = {
        "access_token": token_response["access_token"],
        "refresh_token": token_response.get("refresh_token"),
        "expires_on": int(time.time() + float(token_response.get("expires_in", 0)) - EXPIRES_GRACE_SECONDS),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(data, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return data


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (on ``<path>.lock``: the file itself is replaced, never rewritten)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _token_session(verify: Union[bool, str]) -> requests.Session:
    """Token calls are retried on connection errors only: those happen before the request is sent, so a retry can
    never present a refresh token that the server already consumed."""
    return retrying_session(3, 0.5, replay=False, verify=verify)


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error_description") or body.get("error") or body)
    return str(body)[:300]


class DiracxCredentials:
    """Bearer tokens for :class:`~galaxy_dirac.client.WMSClient` from a credentials file, refreshed as needed.

    The access token is refreshed ``refresh_margin`` seconds before ``expires_on`` (which is already 15 s early)
    and after a 401; the file is re-read whenever it changes, so a new ``galaxy-dirac login`` is picked up at once.
    """

    def __init__(
        self,
        path: str,
        url: str,
        *,
        refresh_margin: float = 30.0,
        timeout: float = 30.0,
        verify: Union[bool, str] = True,
    ) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.url = url.rstrip("/")
        self.token_endpoint = f"{self.url}/api/auth/token"
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self._session = _token_session(verify)
        self._data: Dict[str, Any] = {}
        self._stamp: Optional[Tuple[int, int, int]] = None
        #: How many refreshes this object made (the tests count rotations with it).
        self.refreshes = 0

    def _fresh(self, data: Mapping[str, Any]) -> bool:
        try:
            return float(data.get("expires_on") or 0) - time.time() > self.refresh_margin
        except (TypeError, ValueError):
            return False

    def _load(self, force: bool = False) -> Dict[str, Any]:
        """The file's content, re-read only when it changed (inode, mtime or size) or ``force``."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self.expired("no DiracX login here") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if force or stamp != self._stamp or not self._data:
            self._data = read_credentials(self.path)
            self._stamp = stamp
        return self._data

    def expired(self, reason: str) -> LoginExpired:
        """The error that tells the operator exactly what to run."""
        group = token_claims(self._data.get("access_token")).get("dirac_group")
        command = f"galaxy-dirac login --url {self.url}"
        if group:
            command += f" --group {group}"
        command += f" --credentials {self.path}"
        return LoginExpired(
            f"the DiracX login in {self.path} can no longer be refreshed ({reason}); run `{command}` again",
            path=self.path,
        )

    def access_token(self) -> str:
        """A valid access token, refreshed first when it is about to expire."""
        data = self._load()
        if self._fresh(data):
            return str(data["access_token"])
        return self.refresh()

    def refresh(self, rejected: Optional[str] = None) -> str:
        """Refresh under the lock unless another process already did; ``rejected`` is a token the server refused."""
        with locked(self.path):
            data = self._load(force=True)
            token = str(data["access_token"])
            if token != rejected and self._fresh(data):
                return token  # still good, or rotated by someone else while we waited for the lock
            refresh_token = data.get("refresh_token")
            if not refresh_token:
                raise self.expired("there is no refresh token")
            try:
                response = self._session.post(
                    self.token_endpoint,
                    data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": CLIENT_ID},
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                # If the server consumed the token and the answer was lost, the next refresh is refused and the
                # operator has to log in again: DiracX's rotation leaves no safe way to ask again.
                raise WMSError(f"cannot refresh the DiracX token at {self.token_endpoint}: {exc}") from exc
            if response.status_code in (400, 401, 403):
                raise self.expired(f"HTTP {response.status_code}: {_detail(response)}")
            if response.status_code != 200:
                raise WMSError(
                    f"refreshing the DiracX token: HTTP {response.status_code}: {_detail(response)}",
                    response.status_code,
                )
            self._data = write_credentials(self.path, response.json())
            st = os.stat(self.path)
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            self.refreshes += 1
            return str(self._data["access_token"])


# --- login (device flow) --------------------------------------------------------------------------------------------


def _vo_of(session: requests.Session, url: str, timeout: float) -> str:
    """The installation's only VO (from /.well-known/dirac-metadata); several need ``--vo``."""
    response = session.get(f"{url}/.well-known/dirac-metadata", timeout=timeout)
    if response.status_code != 200:
        raise WMSError(
            f"cannot read {url}/.well-known/dirac-metadata: HTTP {response.status_code}", response.status_code
        )
    vos = sorted((response.json().get("virtual_organizations") or {}).keys())
    if len(vos) != 1:
        raise WMSError(f"{url} serves the VOs {', '.join(vos) or '(none)'}: say which one with --vo")
    return vos[0]


def device_login(
    url: str,
    path: str,
    *,
    vo: Optional[str] = None,
    group: Optional[str] = None,
    interval: float = 5.0,
    verify: Union[bool, str] = True,
    timeout: float = 30.0,
    show: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """DiracX's device flow: show the verification URL and user code, poll the token endpoint, store the login.

    Polling follows RFC 8628: ``authorization_pending`` waits ``interval``, ``slow_down`` adds 5 s to it.
    """
    url = url.rstrip("/")
    session = _token_session(verify)
    vo = vo or _vo_of(session, url, timeout)
    scope = f"vo:{vo}" + (f" group:{group}" if group else "")
    response = session.post(f"{url}/api/auth/device", params={"client_id": CLIENT_ID, "scope": scope}, timeout=timeout)
    if response.status_code != 200:
        raise WMSError(f"DiracX refused the login ({scope}): {_detail(response)}", response.status_code)
    flow = response.json()
    show(
        f"Open {flow['verification_uri_complete']} in a browser\n"
        f"(or open {flow['verification_uri']} and enter the code {flow['user_code']}) and log in."
    )
    deadline = time.monotonic() + float(flow.get("expires_in") or 600)
    wait = max(float(flow.get("interval") or interval), 0.05)
    while time.monotonic() < deadline:
        time.sleep(wait)
        answer = session.post(
            f"{url}/api/auth/token",
            data={"grant_type": DEVICE_CODE_GRANT, "client_id": CLIENT_ID, "device_code": flow["device_code"]},
            timeout=timeout,
        )
        if answer.status_code == 200:
            tokens = answer.json()
            with locked(path):
                write_credentials(path, tokens)
            return tokens
        error = ""
        with contextlib.suppress(ValueError, AttributeError):
            error = str(answer.json().get("error") or "")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            wait += 5.0
            continue
        raise WMSError(f"DiracX login failed: HTTP {answer.status_code}: {_detail(answer)}", answer.status_code)
    raise WMSError("DiracX login timed out: the code was not used in time; run the login again")


def describe(path: str) -> Tuple[str, bool]:
    """A human summary of a credentials file, and whether it can still be refreshed (per its own expiry)."""
    data = read_credentials(path)
    access = token_claims(data.get("access_token"))
    refresh = token_claims(data.get("refresh_token"))
    now = time.time()

    def when(epoch: Any) -> str:
        if not epoch:
            return "unknown"
        left = float(epoch) - now
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
        return f"{stamp} ({'in ' + str(int(left)) + ' s' if left > 0 else 'expired'})"

    usable = bool(data.get("refresh_token")) and float(refresh.get("exp") or 0) > now
    login = f"renewable until {when(refresh.get('exp'))}" if data.get("refresh_token") else "no refresh token"
    lines = [
        f"credentials: {path}",
        f"server:      {access.get('iss', 'unknown')}",
        f"user:        {access.get('preferred_username', 'unknown')} (vo {access.get('vo', '?')})",
        f"group:       {access.get('dirac_group', 'unknown')}",
        f"access:      expires {when(data.get('expires_on'))}",
        f"login:       {login}",
    ]
    if not usable:
        lines.append("The login can no longer be refreshed: run `galaxy-dirac login --url URL` again.")
    return "\n".join(lines), usable
