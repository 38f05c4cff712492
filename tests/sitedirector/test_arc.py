"""The ARC backend against a real A-REX (ARC 6 from Debian, fork LRMS, REST 1.0) started by ``arc_server``.

No double: submissions, states, kills, cleaning, delegation and token checks are all the real CE's. Test
payloads are small shell wrappers where the point is the CE; the end-to-end test runs the real pilot zipapp on
the CE, which registers with a real scheduler and runs jobs to Done. The fork LRMS does not kill a killed job's
payload, so a test that kills one ends its payload itself (and the fixture ends every job process at the end).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from sitedirector.bundle import Bundle
from sitedirector.ce.arc import ArcComputingElement, load_csr_public_key, parse_options, pilot_state
from sitedirector.ce.base import ABORTED, DONE, FAILED, RUNNING, UNKNOWN, WAITING, CEError, PilotRef
from sitedirector.config import ConfigError, Credential, PilotSettings, QueueConfig, load, parse
from sitedirector.director import Director

from . import arc_server
from .conftest import Scheduler, jdl, wait_for, write_config


@pytest.fixture(scope="module")
def arex() -> Iterator[arc_server.ArcCE]:
    with arc_server.running_arex() as ce:
        yield ce


class Wrapper:
    """A stand-in pilot bundle: one small shell script taking the stamp as ``$1``."""

    def __init__(self, script: str) -> None:
        self.script = script

    def wrapper(self, stamp: Any = None) -> str:
        return "#!/bin/sh\n" + self.script

    def token_files(self, stamps: Any) -> dict[str, str]:
        return {}


def arc_queue(ce: arc_server.ArcCE, name: str, cred: Credential, tmp_path: Path, **options: Any) -> QueueConfig:
    opts = {"verify": str(ce.ca_file), "work_dir": str(tmp_path / name)}
    opts.update(options)
    return QueueConfig(
        name=name, type="arc", site="ARC.test.org", ce="localhost", endpoint=ce.endpoint, queue="fork",
        credentials=cred, options=opts,
    )  # fmt: skip


def proxy_cred(path: Path) -> Credential:
    return Credential("proxy", "proxy", {"file": str(path)})


def token_cred(path: Path) -> Credential:
    return Credential("token", "scitoken", {"file": str(path)})


def states(ce: ArcComputingElement, refs: list[PilotRef]) -> dict[str, str]:
    answer = ce.status(refs)
    return {r.stamp: answer[r.reference].state for r in refs}


def count_requests(ce: ArcComputingElement) -> list[str]:
    """Record each request the backend's session sends ("METHOD path?query") through a requests hook."""
    seen: list[str] = []

    def hook(resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        seen.append(f"{resp.request.method} {resp.request.path_url}")

    ce.session().hooks["response"].append(hook)
    return seen


# --- without a CE: mapping and validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state,expected",
    [("ACCEPTED", WAITING), ("QUEUING", "Scheduled"), ("RUNNING", RUNNING), ("EXITINGLRMS", RUNNING),
     ("FINISHED", DONE), ("FAILED", FAILED), ("KILLED", ABORTED), ("WIPED", "Deleted"), ("None", UNKNOWN),
     (None, UNKNOWN)],
)  # fmt: skip
def test_state_mapping(state: Any, expected: str) -> None:
    assert pilot_state(state).state == expected


ARC_DOC = {
    "scheduler": {"url": "http://127.0.0.1:8080", "token": "t"},
    "credentials": {"p": {"type": "proxy", "file": "/tmp/x509up"}, "k": {"type": "keystone_password",
                    "auth_url": "https://k:5000/v3", "username": "u", "password": "p"}},
    "queues": [{"name": "arc1", "type": "arc", "site": "LCG.A.org", "endpoint": "https://arc.a.org/arex",
                "queue": "grid", "credentials": "p", "options": {"delegation_lifetime": 3600}}],
}  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        ({"endpoint": ""}, r"queues\.0\.endpoint: required for type arc"),
        ({"endpoint": "http://arc.a.org/arex"}, r"\.endpoint: must be an https URL"),
        ({"queue": ""}, r"\.queue: required for type arc"),
        ({"credentials": None}, r"\.credentials: required for type arc"),
        ({"credentials": "k"}, r"\.credentials: 'k' is of type 'keystone_password'; an ARC queue takes proxy or"),
        ({"options": {"delegation_lifetme": 3600}}, r"\.options\.delegation_lifetme: Extra inputs are not permitted"),
        ({"options": {"delegation_lifetime": 10}}, r"\.options\.delegation_lifetime: Input should be greater than"),
        ({"options": {"rest_version": "2.0"}}, r"\.options\.rest_version: Input should be 'auto', '1\.0' or '1\.1'"),
        ({"options": {"environment": {"1X": "y"}}}, r"\.options\.environment: must be a mapping"),
    ],
)
def test_config_errors_name_the_key(change: dict, message: str) -> None:
    doc = {**ARC_DOC, "queues": [{**ARC_DOC["queues"][0], **change}]}
    with pytest.raises(ConfigError, match=message):
        parse(doc)


def test_config_accepts_proxy_and_token_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {**ARC_DOC, "credentials": {**ARC_DOC["credentials"], "t": {"type": "scitoken", "file": "/tmp/tok"}}}
    doc["queues"] = [*ARC_DOC["queues"], {**ARC_DOC["queues"][0], "name": "arc2", "queue": "long", "credentials": "t"}]
    cfg = parse(doc)
    assert [q.credentials.type for q in cfg.queues] == ["proxy", "scitoken"]
    assert parse_options(cfg.queues[0].options).delegation_lifetime == 3600
    example = Path(__file__).resolve().parents[2] / "examples" / "sitedirector.yml"
    monkeypatch.setenv("SITEDIRECTOR_TOKEN", "t")
    assert "arc" in {q.type for q in load(example).queues}


def test_arc6_delegation_csr_with_version_2_is_read() -> None:
    """A-REX 6 sends PKCS#10 requests with version 2; the key is still read (cryptography alone refuses it)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    offset = der.index(b"\x02\x01\x00")  # the version INTEGER, first in CertificationRequestInfo
    der[offset + 2] = 2
    import base64

    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
    pem += "-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(x509.InvalidVersion):
        x509.load_pem_x509_csr(pem.encode())
    assert load_csr_public_key(pem).public_numbers() == key.public_key().public_numbers()


# --- against the real A-REX ----------------------------------------------------------------------------------------

SCRIPT = """echo "hello $1 as $(id -un)"
echo "trouble for $1" >&2
case "$1" in fail*) exit 3 ;; esac
sleep 3
"""


@pytest.mark.arc
@pytest.mark.slow
def test_batch_submit_states_failure_output_and_clean(arex: arc_server.ArcCE, tmp_path: Path) -> None:
    ce = ArcComputingElement(arc_queue(arex, "batch", proxy_cred(arex.proxy), tmp_path), Wrapper(SCRIPT))
    try:
        requests_seen = count_requests(ce)
        refs = ce.submit(["good1", "good2", "fail1"])
        assert [r.stamp for r in refs] == ["good1", "good2", "fail1"]
        assert len({r.reference for r in refs}) == 3 and all(r.reference.startswith(arex.endpoint + "/") for r in refs)
        creates = [r for r in requests_seen if "action=new" in r and "/jobs" in r]
        assert len(creates) == 1, requests_seen  # the three pilots went in one ADL batch
        seen: dict[str, list[str]] = {r.stamp: [] for r in refs}

        def finished() -> bool:
            for stamp, state in states(ce, refs).items():
                if not seen[stamp] or seen[stamp][-1] != state:
                    seen[stamp].append(state)
            return all(s[-1] in (DONE, FAILED) for s in seen.values())

        wait_for(finished, 90, "the pilots to end", interval=0.5)
        assert seen["good1"][0] == WAITING and seen["good1"][-1] == DONE, seen
        assert RUNNING in seen["good1"] + seen["good2"], seen
        assert seen["fail1"][-1] == FAILED
        reason = ce.status(refs)[refs[2].reference].reason
        assert "exit code 3" in reason and "trouble for fail1" in reason and "hello fail1 as gdarc" in reason, reason
        assert (tmp_path / "batch" / "failed" / "fail1" / "pilot.err").read_text() == "trouble for fail1\n"
        # Every pilot named our delegation; A-REX keeps it with the job.
        used = ce._manage("delegations", [ce.job_id(r.reference) for r in refs])
        assert {item.get("delegation_id") for item in used.values()} == {ce.delegation()}

        # Tracked pilots are left alone; untracked finished ones of this queue are cleaned.
        removed = ce.cleanup([refs[0]])
        assert sorted(r.stamp for r in removed) == ["fail1", "good2"]
        assert ce.job_id(refs[0].reference) in ce.list_jobs()
        assert [r.stamp for r in ce.cleanup([])] == ["good1"]
        wait_for(lambda: not set(ce.list_jobs()) & {ce.job_id(r.reference) for r in refs}, 30, "clean to finish")
        assert set(states(ce, refs).values()) == {UNKNOWN}
    finally:
        ce.close()


@pytest.mark.arc
@pytest.mark.slow
def test_kill_and_the_payload_it_leaves(arex: arc_server.ArcCE, tmp_path: Path) -> None:
    script = f'echo $$ > {arex.shared}/"$1".pid\nexec sleep 300\n'
    ce = ArcComputingElement(arc_queue(arex, "kill", proxy_cred(arex.proxy), tmp_path), Wrapper(script))
    pid_file = arex.shared / "victim.pid"
    try:
        refs = ce.submit(["victim"])
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, "the payload to start")
        wait_for(lambda: states(ce, refs)["victim"] == RUNNING, 60, "the CE to report Running", interval=0.5)
        # Renewing the delegation keeps its id (running pilots keep using it).
        first = ce.delegation()
        ce._delegation_expiry = 0
        assert ce.delegation() == first
        ce.kill(refs)
        wait_for(lambda: states(ce, refs)["victim"] == ABORTED, 60, "the CE to report the kill", interval=0.5)
        assert ce.status(refs)[refs[0].reference].reason == "killed on the ARC CE"
        assert [r.stamp for r in ce.cleanup([])] == ["victim"]
    finally:
        ce.close()
        # The fork LRMS leaves the killed payload running: end it here.
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.arc
@pytest.mark.slow
def test_bad_credentials_back_the_queue_off(arex: arc_server.ArcCE, scheduler: Scheduler, tmp_path: Path) -> None:
    # A proxy from the same CA whose identity the CE does not allow.
    intruder = ArcComputingElement(arc_queue(arex, "intruder", proxy_cred(arex.intruder_proxy), tmp_path), Wrapper(""))
    with pytest.raises(CEError, match=r"not authorised \(HTTP 403 .*proxy .*intruder.*check that it is valid"):
        intruder.submit(["x"])
    missing = ArcComputingElement(arc_queue(arex, "missing", proxy_cred(tmp_path / "nope"), tmp_path), Wrapper(""))
    with pytest.raises(CEError, match="cannot read the proxy file .*nope"):
        missing.status([PilotRef(f"{arex.endpoint}/abc", "s")])
    # A token with a bad signature or one that expired.
    assert arex.issuer is not None
    for token in (arex.issuer.mint()[:-8] + "AAAAAAAA", arex.issuer.mint(lifetime=-300)):
        (tmp_path / "bad.token").write_text(token)
        bad = ArcComputingElement(
            arc_queue(arex, "badtoken", token_cred(tmp_path / "bad.token"), tmp_path), Wrapper("")
        )
        with pytest.raises(CEError, match=r"not authorised \(HTTP 403 .*token .*bad\.token"):
            bad.submit(["x"])

    # Through the director: the failed cycle backs the queue off with the CE's message.
    cfg = parse({
        "scheduler": {"url": scheduler.url, "token": scheduler.director_token}, "backoff_cycles": 2,
        "credentials": {"intruder": {"type": "proxy", "file": str(arex.intruder_proxy)}},
        "queues": [{"name": "intruder", "type": "arc", "site": "ARC.test.org", "endpoint": arex.endpoint,
                    "queue": "fork", "credentials": "intruder", "options": {"verify": str(arex.ca_file)}}],
        "work_dir": str(tmp_path / "work"),
    })  # fmt: skip
    director = Director(cfg)
    try:
        st = director.queues["intruder"]
        director._queue_task(st, [], 2)
        assert (st.health.failures, st.health.skip_cycles) == (1, 2)
        assert "not authorised (HTTP 403" in st.health.last_error
    finally:
        director.shutdown()


#: A stand-in pilot zipapp: prints its stamp and the token the wrapper handed it, and ends.
SHOW_TOKEN = """import sys
args = sys.argv[1:]
print(args[args.index("--stamp") + 1], open(args[args.index("--token-file") + 1]).read())
"""


@pytest.mark.arc
@pytest.mark.slow
def test_each_pilot_gets_its_own_token_file(arex: arc_server.ArcCE, tmp_path: Path) -> None:
    """The real shared wrapper on the real CE: each job's session gets its own pilot-token-<stamp>, which the
    wrapper hands to its pilot and deletes; no pilot sees another's token, none sees the director's."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", SHOW_TOKEN)
    queue = arc_queue(arex, "tokens", proxy_cred(arex.proxy), tmp_path)
    bundle = Bundle("http://127.0.0.1:1", "director-token", queue, PilotSettings(python="/usr/bin/python3"),
                    zipapp=buffer.getvalue())  # fmt: skip
    bundle.issue({"tokA": "token-of-A", "tokB": "token-of-B"})
    ce = ArcComputingElement(queue, bundle)
    try:
        refs = ce.submit(["tokA", "tokB"])
        wait_for(lambda: set(states(ce, refs).values()) == {DONE}, 90, "the pilots to finish", interval=0.5)
        for ref, token in zip(refs, ("token-of-A", "token-of-B")):
            job = ce.job_id(ref.reference)
            out = ce._api("GET", f"/jobs/{job}/session/pilot.out", "fetch").text
            assert out == f"{ref.stamp} {token}\n"
            with pytest.raises(CEError, match="404"):
                ce._api("GET", f"/jobs/{job}/session/pilot-token-{ref.stamp}", "fetch the delivered token")
        assert sorted(r.stamp for r in ce.cleanup([])) == ["tokA", "tokB"]
    finally:
        ce.close()


@pytest.mark.arc
@pytest.mark.slow
def test_token_auth(arex: arc_server.ArcCE, tmp_path: Path) -> None:
    assert arex.issuer is not None
    token_file = tmp_path / "pilot.token"
    token_file.write_text(arex.issuer.mint() + "\n")
    ce = ArcComputingElement(arc_queue(arex, "token", token_cred(token_file), tmp_path), Wrapper(SCRIPT))
    by_proxy = ArcComputingElement(arc_queue(arex, "token", proxy_cred(arex.proxy), tmp_path), Wrapper(SCRIPT))
    try:
        refs = ce.submit(["tok1"])
        assert ce.delegation() == "", "REST 1.0 has no token delegation"
        first_session = ce.session()
        # Jobs belong to the identity that made them: the X.509 identity does not see the token's job.
        assert ce.job_id(refs[0].reference) in ce.list_jobs()
        assert ce.job_id(refs[0].reference) not in by_proxy.list_jobs()
        wait_for(lambda: states(ce, refs)["tok1"] == DONE, 90, "the token pilot to finish", interval=0.5)
        out = ce._api("GET", f"/jobs/{ce.job_id(refs[0].reference)}/session/pilot.out", "fetch").text
        assert out == "hello tok1 as gdarc\n"
        # A renewed token is a new identity for A-REX: it gets a new connection.
        token_file.write_text(arex.issuer.mint())
        assert ce.session() is not first_session
        assert [r.stamp for r in ce.cleanup([])] == ["tok1"]
    finally:
        ce.close()
        by_proxy.close()


@pytest.mark.arc
@pytest.mark.slow
@pytest.mark.e2e
def test_director_pilots_on_arc_run_jobs(
    arex: arc_server.ArcCE, scheduler: Scheduler, tmp_path: Path, uid: str
) -> None:
    """Demand → the director submits real pilots to A-REX → they register and run the jobs → Done → cleaned.

    A-REX is restarted while the pilots run: the pilots carry on (fork jobs survive it) and so does the director.
    """
    site = f"ARC.{uid}.test"
    queue = {
        "name": f"arc{uid}", "type": "arc", "site": site, "ce": f"arc-{uid}", "endpoint": arex.endpoint,
        "queue": "fork", "max_total": 2, "max_waiting": 2, "per_cycle": 2, "credentials": "proxy",
        # The pilots hold empty matches open 1 s (not the 20 s default): end of the test comes sooner.
        "options": {"verify": str(arex.ca_file), "environment": {"GALAXY_DIRAC_PILOT_MATCH_WAIT": "1"}},
    }  # fmt: skip
    cfg = write_config(
        tmp_path / "sd.yml", scheduler, [queue], credentials={"proxy": {"type": "proxy", "file": str(arex.proxy)}},
        pilot={"python": "/usr/bin/python3", "max_idle": 5, "max_empty_matches": 1, "heartbeat_interval": 1},
    )  # fmt: skip
    # Jobs of 10 s each: the pilots are still running them while A-REX restarts.
    job_ids = scheduler.submit(*(jdl(site, Executable="/bin/sleep", Arguments="10") for _ in range(3)))
    wait_for(lambda: sum(tq["WaitingJobs"] for tq in scheduler.demand() if tq["Sites"] == [site]) == 3, 10, "demand")
    director = Director(load(cfg))
    try:
        st = director.queues[queue["name"]]
        director.cycle(wait=True)
        assert st.submitted == 2 and st.health.failures == 0, st.health
        pilots = scheduler.pilots(queue="fork")
        mine = [p for p in pilots if p["GridSite"] == site]
        assert len(mine) == 2 and all(p["PilotJobReference"].startswith(arex.endpoint) for p in mine), mine
        wait_for(lambda: any(p["Status"] == "Running" for p in scheduler.pilots(queue="fork") if p["GridSite"] == site),
                 60, "a pilot on the CE to register")  # fmt: skip
        arex.restart()

        def pilots_done() -> bool:
            return all(p["Status"] == "Done" for p in scheduler.pilots(queue="fork") if p["GridSite"] == site)

        for job_id in job_ids:
            wait_for(lambda j=job_id: scheduler.job(j)["Status"] == "Done", 120, f"job {job_id} Done")
        wait_for(pilots_done, 60, "the pilots to stop when idle and report Done")
        assert sum(p["MatchedJobs"] for p in scheduler.pilots(queue="fork") if p["GridSite"] == site) == 3
        ids = {st.ce.job_id(p["PilotJobReference"]) for p in mine}

        def cleaned() -> bool:
            director.cycle(wait=True)
            assert st.health.failures == 0, st.health.last_error  # the CE answers again after its restart
            return not set(st.ce.list_jobs()) & ids

        # Once A-REX sees them finished and the scheduler has them Done, the director cleans them on the CE.
        wait_for(cleaned, 90, "the director to clean the finished pilots on the CE", interval=1)
        assert st.submitted == 2, "no demand left: no new pilots"
    finally:
        director.shutdown()
        arex.kill_jobs()


@pytest.mark.arc
@pytest.mark.slow
def test_failed_pilot_output_reaches_the_scheduler(
    arex: arc_server.ArcCE, scheduler: Scheduler, tmp_path: Path, uid: str
) -> None:
    """A pilot that cannot start on the CE (no such python) ends Failed with its stderr in PilotAgents."""
    site = f"ARC.{uid}.test"
    queue = {
        "name": f"arcfail{uid}", "type": "arc", "site": site, "ce": f"arc-{uid}", "endpoint": arex.endpoint,
        "queue": "fork", "max_total": 1, "max_waiting": 1, "credentials": "proxy",
        "options": {"verify": str(arex.ca_file)},
    }  # fmt: skip
    cfg = write_config(
        tmp_path / "sd.yml", scheduler, [queue], credentials={"proxy": {"type": "proxy", "file": str(arex.proxy)}},
        pilot={"python": "/nonexistent/python3"},
    )  # fmt: skip
    scheduler.submit(jdl(site))
    director = Director(load(cfg))
    try:
        director.cycle(wait=True)
        assert director.queues[queue["name"]].submitted == 1

        def failed() -> list[dict]:
            director.cycle(wait=True)
            return [p for p in scheduler.pilots(queue="fork") if p["GridSite"] == site and p["Status"] == "Failed"]

        row = wait_for(failed, 90, "the pilot to fail on the CE", interval=1)[0]
        assert "exit code 70" in row["StatusReason"], row
        assert "/nonexistent/python3 not found" in row["StatusReason"], row
        kept = tmp_path / "work" / queue["name"] / "failed" / row["PilotStamp"] / "pilot.err"
        assert "/nonexistent/python3 not found" in kept.read_text()
        [status] = director.status_table()
        assert status["states"] == {"Failed": 1}
        assert "/nonexistent/python3 not found" in status["failed"][0]["reason"]  # what `sitedirector status` prints
    finally:
        director.shutdown()
