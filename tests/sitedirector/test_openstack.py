"""The OpenStack CE against real OpenStack code: Keystone (gunicorn, SQLite, fernet) and the real nova-api.

nova-api runs with nova's real conductor, scheduler, placement and compute manager (fake virt driver, in-memory
message transport), assembled from the fixtures nova ships for its functional tests (see ``openstack_servers.py``);
keystonemiddleware in nova validates our tokens against the Keystone server. No OpenStack double is involved,
except that the VM's own life is nova's fake virt driver: a pilot's end is simulated with the API's os-stop action
(the VM powers off as cloud-init's power_state would make it).
"""

from __future__ import annotations

import base64
import time
from typing import Any, Dict, Iterator

import pytest

pytest.importorskip("keystoneauth1")
pytest.importorskip("keystoneclient")

from keystoneauth1 import adapter  # noqa: E402
from keystoneauth1.identity import v3  # noqa: E402

from sitedirector.ce.base import (  # noqa: E402
    DELETED,
    DONE,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUBMITTED,
    CEError,
    CEQueueFull,
    PilotRef,
)
from sitedirector.ce.openstack import OWNER_TAG, OpenStackComputingElement, make_session  # noqa: E402
from sitedirector.config import Credential, QueueConfig  # noqa: E402

from . import openstack_servers as osrv  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE_ID = osrv.IMAGE_ID
NETWORK_ID = osrv.NETWORK_ID
NOVA_SERVICE_PASSWORD = "nova-service-secret"
ENTITLEMENT = "urn:mace:egi.eu:group:vo.test:role=member#aai.egi.eu"


class Bundle:
    """The part of sitedirector.bundle.Bundle the CE uses: cloud-init text per stamp."""

    def cloud_init(self, stamp: str) -> str:
        return f"#cloud-config\nruncmd:\n  - [echo, pilot, {stamp}]\npower_state: {{mode: poweroff}}\n"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    started = time.monotonic()
    venv = osrv.openstack_venv()
    venv_s = time.monotonic() - started
    workdir = tmp_path_factory.mktemp("openstack")
    keystone = osrv.Keystone(venv, workdir)
    nova = osrv.Nova(venv, workdir, keystone.url, NOVA_SERVICE_PASSWORD)
    try:
        keystone.start()
        osrv.register_nova_service(keystone.url, nova.url, NOVA_SERVICE_PASSWORD)
        pilots = osrv.create_tenant(keystone.url, "pilots", "pilot", "pilot-secret")
        small = osrv.create_tenant(keystone.url, "small", "smalluser", "small-secret")
        fed = osrv.setup_federation(keystone.url, "egi-checkin", ENTITLEMENT, ["vo.test.fed1", "vo.test.fed2"])
        nova.start()
        print(f"\nopenstack side venv ready in {venv_s:.1f}s, keystone started in {keystone.started_in:.1f}s "
              f"(keys, bootstrap, gunicorn), nova-api in {nova.started_in:.1f}s")  # fmt: skip
        yield {"keystone": keystone, "nova": nova, "pilots": pilots, "small": small, "fed": fed}
    finally:
        nova.stop()
        keystone.stop()


def password_cred(cloud: Dict[str, Any], user: str = "pilot", password: str = "pilot-secret", project: str = "pilots"):
    return Credential(
        name=f"{user}-pw",
        type="keystone_password",
        values={"auth_url": cloud["keystone"].url, "username": user, "password": password, "project_name": project},
    )


def make_queue(name: str, cred: Credential, **options: Any) -> QueueConfig:
    opts = {"flavor": "m1.tiny", "image": IMAGE_ID, "network": NETWORK_ID, "max_concurrent_creates": 3}
    opts.update(options)
    return QueueConfig(
        name=name, type="openstack", site="CLOUD.test.org", ce="nova", endpoint=cred.get("auth_url"),
        credentials=cred, options=opts,
    )  # fmt: skip


def admin_compute(cloud: Dict[str, Any], microversion: str = "2.79") -> adapter.Adapter:
    return adapter.Adapter(
        osrv.admin_session(cloud["keystone"].url), service_type="compute", default_microversion=microversion
    )


def wait_for(fn, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def statuses(ce: OpenStackComputingElement, refs) -> Dict[str, str]:
    return {k: v.state for k, v in ce.status(refs).items()}


def test_boot_with_user_data_status_and_shutoff_reaped(cloud: Dict[str, Any]) -> None:
    ce = OpenStackComputingElement(make_queue("q-boot", password_cred(cloud)), Bundle())
    started = time.monotonic()
    refs = ce.submit(["stampA", "stampB", "stampC"])
    boot_s = time.monotonic() - started
    assert len(refs) == 3 and {r.stamp for r in refs} == {"stampA", "stampB", "stampC"}
    assert wait_for(lambda: set(statuses(ce, refs).values()) == {RUNNING}), statuses(ce, refs)

    # What Nova stored: name prefix, owner tag, metadata and the user data, base64, byte for byte.
    admin = admin_compute(cloud, "2.79")
    for ref in refs:
        server = admin.get(f"/servers/{ref.reference}").json()["server"]
        assert server["name"] == f"gd-q-boot-{ref.stamp}"
        assert OWNER_TAG in server["tags"]
        assert server["metadata"]["galaxy_dirac"] == "pilot" and server["metadata"]["gd_stamp"] == ref.stamp
        assert base64.b64decode(server["OS-EXT-SRV-ATTR:user_data"]).decode() == Bundle().cloud_init(ref.stamp)

    # The pilot ends: the VM powers off (os-stop through the real API, as the pilot's owner).
    user = ce.compute
    assert user.post(f"/servers/{refs[0].reference}/action", json={"os-stop": None}).status_code == 202
    assert wait_for(lambda: statuses(ce, refs)[refs[0].reference] == DONE), statuses(ce, refs)
    assert statuses(ce, refs)[refs[1].reference] == RUNNING

    removed = ce.cleanup(refs)
    assert [r.reference for r in removed] == [refs[0].reference]
    assert wait_for(lambda: statuses(ce, refs)[refs[0].reference] == DELETED)

    ce.kill(refs[1:])
    assert wait_for(lambda: set(statuses(ce, refs).values()) == {DELETED}), statuses(ce, refs)
    print(f"\nboot of 3 VMs returned in {boot_s:.2f}s")


def test_error_vm_is_failed_and_reaped(cloud: Dict[str, Any]) -> None:
    # A flavor too big for the fake hypervisors: the real scheduler finds no host, the VM goes to ERROR.
    ce = OpenStackComputingElement(make_queue("q-err", password_cred(cloud), flavor="m1.xlarge"), Bundle())
    refs = ce.submit(["e1"])
    assert wait_for(lambda: statuses(ce, refs)[refs[0].reference] == FAILED), statuses(ce, refs)
    assert "ERROR" in ce.status(refs)[refs[0].reference].reason
    assert [r.reference for r in ce.cleanup(refs)] == [refs[0].reference]


def test_max_lifetime_and_orphans_after_restart(cloud: Dict[str, Any]) -> None:
    cred = password_cred(cloud)
    ce = OpenStackComputingElement(make_queue("q-life", cred), Bundle())
    refs = ce.submit(["l1", "l2"])
    assert wait_for(lambda: set(statuses(ce, refs).values()) == {RUNNING})
    # A neighbour queue in the same project: same tag, other name prefix and metadata; never ours to reap.
    other = OpenStackComputingElement(make_queue("q-other", cred), Bundle())
    other_refs = other.submit(["o1"])

    # Director restart: a new CE instance, nothing tracked. Without refs, live VMs are kept...
    later = OpenStackComputingElement(make_queue("q-life", cred), Bundle())
    assert sorted(s["id"] for s in later.list_owned()) == sorted(r.reference for r in refs)
    assert later.cleanup(None) == []
    # ...with the refs it does track (only l1), l2 is an orphan once past the grace period.
    aged = OpenStackComputingElement(
        make_queue("q-life", cred, orphan_grace=0), Bundle(), clock=lambda: time.time() + 5
    )
    removed = aged.cleanup([refs[0]])
    assert [(r.reference, r.stamp) for r in removed] == [(refs[1].reference, "l2")]
    assert "orphan" in removed[0].extra["reaped"]

    # Maximum lifetime: an hour later every VM of the queue goes, the neighbour stays.
    old = OpenStackComputingElement(
        make_queue("q-life", cred, max_lifetime=600), Bundle(), clock=lambda: time.time() + 3600
    )
    removed = old.cleanup([refs[0]])
    assert [r.reference for r in removed] == [refs[0].reference]
    assert "max_lifetime" in removed[0].extra["reaped"]
    assert wait_for(lambda: set(statuses(ce, refs).values()) == {DELETED})
    assert statuses(other, other_refs) == {other_refs[0].reference: RUNNING}
    other.kill(other_refs)


def test_build_state_and_build_timeout(cloud: Dict[str, Any]) -> None:
    """A VM that stays in BUILD (the harness makes this image spawn slowly) is Submitted/Scheduled, and once past
    build_timeout it is reported Failed and deleted by cleanup."""
    cred = password_cred(cloud)
    ce = OpenStackComputingElement(make_queue("q-build", cred, image=osrv.SLOW_IMAGE_ID), Bundle())
    refs = ce.submit(["b1"])
    server = ce._get(refs[0].reference)
    assert server is not None and server["status"] == "BUILD"
    assert statuses(ce, refs)[refs[0].reference] in (SUBMITTED, SCHEDULED)
    assert ce.cleanup(refs) == []  # young BUILD VMs are left alone

    late = OpenStackComputingElement(
        make_queue("q-build", cred, image=osrv.SLOW_IMAGE_ID, build_timeout=60),
        Bundle(),
        clock=lambda: time.time() + 3600,
    )
    st = late.status(refs)[refs[0].reference]
    assert st.state == FAILED and "BUILD" in st.reason
    removed = late.cleanup(refs)
    assert [r.reference for r in removed] == [refs[0].reference] and "BUILD" in removed[0].extra["reaped"]
    assert wait_for(lambda: statuses(ce, refs)[refs[0].reference] == DELETED, timeout=30), statuses(ce, refs)


def test_quota_exceeded_is_queue_full(cloud: Dict[str, Any]) -> None:
    admin = admin_compute(cloud)
    project_id = cloud["small"]["project_id"]
    resp = admin.put(f"/os-quota-sets/{project_id}", json={"quota_set": {"instances": 1}})
    assert resp.status_code == 200, resp.text
    ce = OpenStackComputingElement(
        make_queue("q-small", password_cred(cloud, "smalluser", "small-secret", "small"), max_concurrent_creates=1),
        Bundle(),
    )
    refs = ce.submit(["s1"])
    assert wait_for(lambda: statuses(ce, refs) == {refs[0].reference: RUNNING})
    # The project is full: Nova answers 403 "Quota exceeded for instances"; nothing booted → CEQueueFull.
    with pytest.raises(CEQueueFull, match="queue full.*[Qq]uota exceeded"):
        ce.submit(["s2", "s3"])
    assert [s["name"] for s in ce.list_owned()] == ["gd-q-small-s1"]
    ce.kill(refs)


def test_bad_credentials_clear_error(cloud: Dict[str, Any]) -> None:
    ce = OpenStackComputingElement(make_queue("q-bad", password_cred(cloud, password="wrong")), Bundle())
    with pytest.raises(CEError, match="authentication failed") as info:
        ce.submit(["x"])
    assert not isinstance(info.value, CEQueueFull)
    with pytest.raises(CEError, match="authentication failed"):
        ce.status([PilotRef("00000000-0000-0000-0000-000000000000", "x")])


def test_application_credential(cloud: Dict[str, Any]) -> None:
    from keystoneclient.v3 import client as ks_client

    user_sess = make_session(password_cred(cloud))
    ks = ks_client.Client(session=user_sess)
    appcred = ks.application_credentials.create(name="sitedirector", user=cloud["pilots"]["user_id"])
    cred = Credential(
        name="ac",
        type="application_credential",
        values={
            "auth_url": cloud["keystone"].url,
            "application_credential_id": appcred.id,
            "application_credential_secret": appcred.secret,
        },
    )
    ce = OpenStackComputingElement(make_queue("q-ac", cred), Bundle())
    refs = ce.submit(["ac1"])
    assert wait_for(lambda: statuses(ce, refs) == {refs[0].reference: RUNNING})
    ce.kill(refs)
    bad = Credential(
        name="ac-bad", type="application_credential", values=dict(cred.values, application_credential_secret="nope")
    )
    with pytest.raises(CEError, match="authentication failed"):
        OpenStackComputingElement(make_queue("q-ac", bad), Bundle()).submit(["ac2"])


def test_password_unscoped_project_discovery(cloud: Dict[str, Any]) -> None:
    from sitedirector.ce.openstack import choose_project, discover_projects

    url = cloud["keystone"].url
    unscoped = v3.Password(auth_url=url, username="pilot", password="pilot-secret", user_domain_name="Default")
    projects = discover_projects(url, unscoped)
    assert [p["name"] for p in projects] == ["pilots"]
    assert choose_project(projects)["id"] == cloud["pilots"]["project_id"]
    with pytest.raises(CEError, match="not among"):
        choose_project(projects, wanted_name="other")
    wrong = v3.Password(auth_url=url, username="pilot", password="bad", user_domain_name="Default")
    with pytest.raises(CEError, match="authentication failed"):
        discover_projects(url, wrong)


def oidc_cred(cloud: Dict[str, Any], token: str, **extra: Any) -> Credential:
    values = {
        "auth_url": cloud["keystone"].url,
        "identity_provider": "egi-checkin",
        "protocol": "openid",
        "access_token": token,
    }
    values.update(extra)
    return Credential(name="checkin", type="oidc_access_token", values=values)


def test_oidc_access_token_egi_flow(cloud: Dict[str, Any], tmp_path) -> None:
    """Check-in access token → unscoped federated token → project discovery → scoped token → a VM.

    Keystone's federation (identity provider, mapping, protocol, ephemeral user, group role assignments) is real;
    the bearer-token check in front of it stands in for Apache's mod_auth_openidc (see openstack_servers.py).
    """
    keystone = cloud["keystone"]
    claims = {"iss": osrv.OIDC_ISSUER, "sub": "0123abcd@egi.eu", "eduperson_entitlement": [ENTITLEMENT, "urn:x:other"]}
    keystone.add_oidc_token("checkin-access-token-1", claims)
    keystone.add_oidc_token("checkin-not-in-vo", dict(claims, eduperson_entitlement=["urn:x:other"]))

    # Two projects to choose from: the credential must say which one.
    with pytest.raises(CEError, match="several projects.*vo.test.fed1.*vo.test.fed2"):
        make_session(oidc_cred(cloud, "checkin-access-token-1"))
    with pytest.raises(CEError, match="not among"):
        make_session(oidc_cred(cloud, "checkin-access-token-1", project_name="vo.other"))

    token_file = tmp_path / "token"
    token_file.write_text("checkin-access-token-1\n")
    cred = oidc_cred(cloud, "", project_name="vo.test.fed2", access_token_file=str(token_file))
    ce = OpenStackComputingElement(make_queue("q-fed", cred), Bundle())
    refs = ce.submit(["f1"])
    assert wait_for(lambda: statuses(ce, refs) == {refs[0].reference: RUNNING})
    server = admin_compute(cloud).get(f"/servers/{refs[0].reference}").json()["server"]
    assert server["tenant_id"] == cloud["fed"]["vo.test.fed2"]
    ce.kill(refs)

    for bad in ("expired-or-forged", "checkin-not-in-vo"):
        with pytest.raises(CEError, match="authentication failed"):
            OpenStackComputingElement(make_queue("q-fed", oidc_cred(cloud, bad, project_name="vo.test.fed1"))).submit(
                ["x"]
            )
