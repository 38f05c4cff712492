"""Pure parts of the OpenStack CE, table-tested: status mapping, quota detection, reaping decisions, credentials.

Everything that talks to OpenStack is tested against the real Keystone and nova-api in test_openstack.py.
"""

from __future__ import annotations

import calendar
import threading
import time

import pytest

pytest.importorskip("keystoneauth1")

from sitedirector.ce.base import (  # noqa: E402
    DELETED,
    DONE,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUBMITTED,
    UNKNOWN,
    CEError,
    CEQueueFull,
    PilotRef,
)
from sitedirector.ce.openstack import (  # noqa: E402
    OpenStackComputingElement,
    choose_project,
    is_quota_error,
    make_session,
    parse_time,
    pilot_state,
)
from sitedirector.config import Credential, QueueConfig  # noqa: E402


@pytest.mark.parametrize(
    "server, state",
    [
        (None, DELETED),
        ({"status": "BUILD", "OS-EXT-STS:task_state": "scheduling"}, SUBMITTED),
        ({"status": "BUILD", "OS-EXT-STS:task_state": None}, SUBMITTED),
        ({"status": "BUILD", "OS-EXT-STS:task_state": "spawning"}, SCHEDULED),
        ({"status": "BUILD", "OS-EXT-STS:task_state": "networking"}, SCHEDULED),
        ({"status": "ACTIVE"}, RUNNING),
        ({"status": "REBOOT"}, RUNNING),
        ({"status": "PAUSED"}, RUNNING),
        ({"status": "SHUTOFF"}, DONE),
        ({"status": "SHELVED_OFFLOADED"}, DONE),
        ({"status": "ERROR", "fault": {"message": "No valid host was found."}}, FAILED),
        ({"status": "DELETED"}, DELETED),
        ({"status": "SOFT_DELETED"}, DELETED),
        ({"status": "UNKNOWN"}, UNKNOWN),
        ({"status": "SOMETHING_NEW"}, UNKNOWN),
    ],
)
def test_pilot_state(server, state) -> None:
    assert pilot_state(server).state == state


def test_error_reason_carries_fault() -> None:
    assert "No valid host" in pilot_state({"status": "ERROR", "fault": {"message": "No valid host was found."}}).reason


@pytest.mark.parametrize(
    "code, message, quota",
    [
        (403, "Quota exceeded for instances: Requested 1, but already used 1 of 1 instances", True),
        (403, "Quota exceeded for cores: Requested 2, but already used 9 of 10 cores", True),
        (413, "Maximum number of instances exceeded", True),
        (403, "Policy doesn't allow os_compute_api:servers:create to be performed.", False),
        (400, "Invalid flavorRef provided.", False),
    ],
)
def test_quota_detection(code: int, message: str, quota: bool) -> None:
    assert is_quota_error(code, message) is quota


def test_parse_time() -> None:
    expected = calendar.timegm((2026, 11, 24, 22, 40, 0, 0, 0, 0))
    assert parse_time("2026-11-24T22:40:00Z") == expected
    assert parse_time("2026-11-24T22:40:00.123456+00:00") == expected
    assert parse_time("") is None and parse_time("garbage") is None


def _ce(now: float, **options) -> OpenStackComputingElement:
    queue = QueueConfig(name="q", type="openstack", site="S", ce="nova", options=options)
    return OpenStackComputingElement(queue, None, session=object(), clock=lambda: now)  # type: ignore[arg-type]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


T0 = 1_800_000_000.0


@pytest.mark.parametrize(
    "status, age, options, ref_extra, expect",
    [
        ("ACTIVE", 10, {}, {}, ""),
        ("SHUTOFF", 10, {}, {}, "status SHUTOFF"),
        ("ERROR", 10, {}, {}, "status ERROR"),
        ("BUILD", 100, {"build_timeout": 600}, {}, ""),
        ("BUILD", 700, {"build_timeout": 600}, {}, "BUILD for more than 600s"),
        ("ACTIVE", 7200, {"max_lifetime": 3600}, {}, "older than max_lifetime 3600s"),
        ("ACTIVE", 7200, {}, {}, ""),
        ("ACTIVE", 100, {"idle_timeout": 60}, {"idle_since": T0 - 90}, "idle for more than 60s"),
        ("ACTIVE", 100, {"idle_timeout": 60}, {"idle_since": T0 - 30}, ""),
        ("PAUSED", 100, {"idle_timeout": 60}, {}, "idle for more than 60s"),
    ],
)
def test_reap_reason(status, age, options, ref_extra, expect) -> None:
    ce = _ce(T0, **options)
    server = {"id": "x", "status": status, "created": _iso(T0 - age), "updated": _iso(T0 - age)}
    assert ce.reap_reason(server, PilotRef("x", "s", dict(ref_extra))) == expect


def test_owned_checks_metadata_not_only_name() -> None:
    ce = _ce(T0)
    mine = {"name": "gd-q-s1", "metadata": {"galaxy_dirac": "pilot", "gd_queue": "q"}}
    assert ce._owned(mine)
    assert not ce._owned(dict(mine, metadata={"galaxy_dirac": "pilot", "gd_queue": "other"}))
    assert not ce._owned(dict(mine, metadata={}))
    assert not ce._owned(dict(mine, name="someone-else"))


def test_choose_project() -> None:
    projects = [{"id": "1", "name": "a", "enabled": True}, {"id": "2", "name": "b", "enabled": True}]
    assert choose_project(projects, wanted_name="b")["id"] == "2"
    assert choose_project(projects, wanted_id="1")["name"] == "a"
    assert choose_project(projects[:1])["id"] == "1"
    with pytest.raises(CEError, match="several projects"):
        choose_project(projects)
    with pytest.raises(CEError, match="not among"):
        choose_project(projects, wanted_name="c")
    with pytest.raises(CEError, match="not among.*none"):
        choose_project([{"id": "3", "name": "c", "enabled": False}], wanted_name="c")


def test_bad_credential_types() -> None:
    with pytest.raises(CEError, match="not usable for OpenStack"):
        make_session(Credential(name="x", type="scitoken", values={"auth_url": "http://127.0.0.1:9/v3"}))
    with pytest.raises(CEError, match="without auth_url"):
        make_session(Credential(name="x", type="keystone_password", values={}))
    with pytest.raises(CEError, match="access_token"):
        make_session(
            Credential(name="x", type="oidc_access_token", values={"auth_url": "http://x/v3", "identity_provider": "i"})
        )


class _FakeBoots(OpenStackComputingElement):
    """Only the HTTP call of one boot is replaced, to table-test submit()'s bookkeeping (the real boots are
    exercised against nova-api in test_openstack.py)."""

    def __init__(self, outcomes, **options) -> None:
        queue = QueueConfig(name="q", type="openstack", site="S", ce="nova", options=options)
        super().__init__(queue, None, session=object())  # type: ignore[arg-type]
        self.outcomes = dict(outcomes)
        self.in_flight = 0
        self.peak = 0
        self.tried = []
        self._lock = threading.Lock()

    def _flavor_id(self) -> str:
        return "1"

    def _image_id(self) -> str:
        return "img"

    def _networks(self):
        return "none"

    def _create_one(self, stamp, base):
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.tried.append(stamp)
        time.sleep(0.05)
        with self._lock:
            self.in_flight -= 1
        outcome = self.outcomes.get(stamp, "ok")
        if outcome == "full":
            raise CEQueueFull("queue full: Quota exceeded for instances")
        if outcome == "error":
            raise CEError("boom")
        return PilotRef(f"id-{stamp}", stamp)


def test_submit_caps_concurrent_creates() -> None:
    ce = _FakeBoots({}, max_concurrent_creates=2)
    refs = ce.submit([f"s{i}" for i in range(7)])
    assert [r.stamp for r in refs] == [f"s{i}" for i in range(7)]
    assert ce.peak == 2


def test_submit_partial_and_queue_full() -> None:
    ce = _FakeBoots({"s2": "full"}, max_concurrent_creates=1)
    refs = ce.submit(["s0", "s1", "s2", "s3", "s4"])
    assert [r.stamp for r in refs] == ["s0", "s1"]  # nothing after the quota error is started
    assert "s4" not in ce.tried
    with pytest.raises(CEQueueFull):
        _FakeBoots({"a": "full", "b": "full"}, max_concurrent_creates=1).submit(["a", "b"])
    with pytest.raises(CEError, match="boom"):
        _FakeBoots({"a": "error"}).submit(["a"])
    assert [r.stamp for r in _FakeBoots({"a": "error"}).submit(["a", "b"])] == ["b"]
