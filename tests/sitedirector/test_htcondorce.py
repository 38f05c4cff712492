"""HTCondorCE backend through the real ``htcondor2``/``classad2`` bindings, with a double of the schedd.

HTCondor daemons cannot run here, so :class:`ScheddDouble` replaces ``htcondor2.Schedd`` — and only it: it
expands the backend's real ``htcondor2.Submit`` (``queue stamp in (...)``), keeps real ``classad2`` ads,
evaluates constraints and the jobs' policy expressions with the real ClassAd evaluator, and raises the real
``htcondor2.HTCondorException`` for connection failures. The director tests use the real scheduler process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

htcondor2 = pytest.importorskip("htcondor2")

from sitedirector.bundle import Bundle  # noqa: E402
from sitedirector.ce.base import CEError, PilotRef  # noqa: E402
from sitedirector.ce.htcondorce import HTCondorCEComputingElement, pilot_state  # noqa: E402
from sitedirector.config import load, parse  # noqa: E402
from sitedirector.director import Director  # noqa: E402
from tests.conftest import free_port  # noqa: E402

from .conftest import Scheduler, jdl, write_config  # noqa: E402
from .schedd_double import ScheddDouble  # noqa: E402

SITE = "LCG.Condor.test"


@pytest.fixture
def schedd() -> Iterator[ScheddDouble]:
    double = ScheddDouble()
    HTCondorCEComputingElement.schedd_factory = lambda ce: double
    yield double
    HTCondorCEComputingElement.schedd_factory = None


def make_ce(
    tmp_path: Path, mode: str = "remote", token: str = "", name: str = "ce1", cred_type: str = "scitoken"
) -> HTCondorCEComputingElement:
    doc = {
        "scheduler": {"url": "http://127.0.0.1:1", "token": "shared-token-value"},
        "credentials": {},
        "queues": [
            {
                "name": name,
                "type": "htcondorce",
                "site": SITE,
                "ce": "ce.example.org",
                "endpoint": "ce.example.org:9619",
                "queue": "long",
                "processors": 8,
                "memory": 16000,
                "options": {"mode": mode, "work_dir": str(tmp_path / name)},
            }
        ],
    }
    if token:
        doc["credentials"]["tok"] = {"type": cred_type, "file": token}
        doc["queues"][0]["credentials"] = "tok"
    cfg = parse(doc)
    q = cfg.queues[0]
    return HTCondorCEComputingElement(q, Bundle(cfg.url, cfg.token, q, cfg.pilot, zipapp=b"zipapp"))


def test_n_pilots_in_one_cluster_one_transaction(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path)
    refs = ce.submit(["s1", "s2", "s3"])
    assert schedd.transactions == 1 and schedd.spooled == [1]
    assert [r.reference for r in refs] == [f"htcondorce://ce.example.org:9619/1.{i}" for i in range(3)]
    assert [r.stamp for r in refs] == ["s1", "s2", "s3"]
    ads = [schedd.jobs[(1, i)] for i in range(3)]
    assert [ad["PilotStamp"] for ad in ads] == ["s1", "s2", "s3"]
    assert [ad["Args"] for ad in ads] == ["s1", "s2", "s3"]
    assert {ad["JobUniverse"] for ad in ads} == {5}
    assert ads[0]["queue"] == "long" and ads[0]["SiteDirectorQueue"] == "ce1"
    assert ads[0].eval("RequestCpus") == 8 and ads[0].eval("RequestMemory") == 16000
    wrapper = Path(ads[0]["Cmd"]).read_text()
    assert '--stamp "$1"' in wrapper and "shared-token-value" not in wrapper
    # After spool() the jobs are idle: Waiting.
    assert {s.state for s in ce.status(refs).values()} == {"Waiting"}


def test_grid_universe_through_a_local_schedd(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path, mode="grid")
    ce.submit(["g1", "g2"])
    ad = schedd.jobs[(1, 1)]
    assert ad["JobUniverse"] == 9
    assert ad["GridResource"] == "condor ce.example.org ce.example.org:9619"
    assert schedd.spooled == [] and ad["JobStatus"] == 1


@pytest.mark.parametrize(
    "attrs, state, reason",
    [
        ({"JobStatus": 1}, "Waiting", ""),
        ({"JobStatus": 2}, "Running", ""),
        ({"JobStatus": 6}, "Running", ""),
        ({"JobStatus": 7}, "Running", ""),
        ({"JobStatus": 4, "ExitCode": 0}, "Done", ""),
        ({"JobStatus": 4, "ExitCode": 3}, "Failed", "exited with 3"),
        ({"JobStatus": 3}, "Aborted", "removed"),
        ({"JobStatus": 5, "HoldReasonCode": 16, "HoldReason": "Spooling input"}, "Waiting", "code 16"),
        ({"JobStatus": 5, "HoldReasonCode": 1, "HoldReason": "via condor_hold"}, "Aborted", "via condor_hold"),
        ({"JobStatus": 5, "HoldReasonCode": 13, "HoldReason": "Transfer input files failure"}, "Aborted", "code 13"),
        ({"JobStatus": 5, "HoldReasonCode": 34, "HoldReason": "memory usage exceeded"}, "Aborted", "memory"),
    ],
)
def test_status_maps_job_status_and_held_codes(schedd, tmp_path, attrs, state, reason) -> None:
    ce = make_ce(tmp_path)
    (ref,) = ce.submit(["h1"])
    schedd.set_job(1, 0, **attrs)
    got = ce.status([ref])[ref.reference]
    assert got.state == state and reason in got.reason
    assert pilot_state(schedd.jobs[(1, 0)]).state == state


def test_removal_and_history(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path)
    refs = ce.submit(["r1", "r2"])
    ce.kill(refs[:1])
    assert (1, 0) not in schedd.jobs and (1, 1) in schedd.jobs
    states = ce.status(refs)
    assert states[refs[0].reference].state == "Aborted"  # found in history
    assert states[refs[1].reference].state == "Waiting"
    gone = PilotRef("htcondorce://ce.example.org:9619/99.0", "x")
    assert ce.status([gone])[gone.reference].state == "Unknown"


def test_finished_jobs_are_removed_by_policy_and_cleanup(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path)
    refs = ce.submit(["f1", "f2", "f3", "f4"])
    long_ago = int(time.time()) - 2 * ce.keep_finished
    schedd.set_job(1, 0, JobStatus=4, ExitCode=0)  # just finished: left in the queue
    schedd.set_job(1, 1, JobStatus=4, ExitCode=0, EnteredCurrentStatus=long_ago)  # past keep_finished
    schedd.set_job(1, 2, JobStatus=5, HoldReasonCode=13, EnteredCurrentStatus=int(time.time()) - 2 * ce.keep_held)
    schedd.evaluate_policies()  # the schedd's own periodic_remove / leave_in_queue, real ClassAd evaluation
    assert set(schedd.jobs) == {(1, 0), (1, 3)}
    assert ce.status(refs[1:2])[refs[1].reference].state == "Done", "status still found in history"
    # cleanup removes finished jobs the director no longer tracks, and never a waiting one.
    assert ce.cleanup(refs) == []
    removed = ce.cleanup([refs[3]])
    assert [r.stamp for r in removed] == ["f1"] and set(schedd.jobs) == {(1, 3)}


def test_scitoken_settings_per_queue(schedd: ScheddDouble, tmp_path: Path) -> None:
    tok_a, tok_b = tmp_path / "a.token", tmp_path / "b.token"
    tok_a.write_text("a")
    tok_b.write_text("b")
    ce_a = make_ce(tmp_path, token=str(tok_a), name="qa")
    ce_b = make_ce(tmp_path, token=str(tok_b), name="qb")
    ce_a.submit(["a1"])
    ce_b.submit(["b1"])
    ce_a.status([PilotRef("htcondorce://ce.example.org:9619/1.0", "a1")])
    seen = [(c["method"], c["SCITOKENS_FILE"], c["BEARER_TOKEN_FILE"]) for c in schedd.calls]
    assert seen[0] == ("submit", str(tok_a), str(tok_a))
    assert ("submit", str(tok_b), str(tok_b)) in seen
    assert seen[-1] == ("query", str(tok_a), str(tok_a))
    assert {c["SEC_CLIENT_AUTHENTICATION_METHODS"] for c in schedd.calls} == {"SCITOKENS"}
    assert "ScitokensFile" not in schedd.jobs[(1, 0)], "remote submission authenticates, nothing to forward"
    plain = make_ce(tmp_path, name="qplain")
    plain.submit(["p1"])
    assert (schedd.calls[-2]["SCITOKENS_FILE"], schedd.calls[-2]["BEARER_TOKEN_FILE"]) == (None, None), (
        "a queue without credentials does not inherit another queue's token"
    )
    grid = make_ce(tmp_path, mode="grid", token=str(tok_b), name="qg")
    grid.submit(["g1"])
    assert schedd.jobs[(4, 0)]["ScitokensFile"] == str(tok_b), "grid universe: the local schedd needs the token"


def test_proxy_is_an_ssl_client_certificate(schedd: ScheddDouble, tmp_path: Path) -> None:
    proxy = tmp_path / "x509up"
    proxy.write_text("cert+key")
    ce = make_ce(tmp_path, token=str(proxy), cred_type="proxy")
    ce.submit(["x1"])
    assert schedd.calls[0]["SEC_CLIENT_AUTHENTICATION_METHODS"] == "SSL"
    assert htcondor2.param.get("AUTH_SSL_CLIENT_CERTFILE") == str(proxy)
    assert schedd.jobs[(1, 0)]["x509userproxy"] == str(proxy), "the pilot gets the proxy delegated"


def test_connection_failure_is_a_ce_error(schedd: ScheddDouble, tmp_path: Path) -> None:
    schedd.down = True
    ce = make_ce(tmp_path)
    with pytest.raises(CEError, match="Failed to connect"):
        ce.submit(["x"])


@pytest.mark.parametrize("option", ["location", "pool"])
def test_real_bindings_unreachable_ce_is_a_ce_error(tmp_path: Path, option: str) -> None:
    """No double: the real htcondor2 Collector/Schedd against a closed port raise HTCondorException."""
    port = free_port()
    ce = make_ce(tmp_path)
    setattr(ce, option, f"127.0.0.1:{port}")
    with pytest.raises(CEError, match="submit failed"):
        ce.submit(["x"])
    with pytest.raises(CEError, match="query failed"):
        ce.status([PilotRef(f"htcondorce://127.0.0.1:{port}/1.0", "x")])


def test_connection_failure_backs_the_queue_off(
    schedd: ScheddDouble, scheduler: Scheduler, tmp_path: Path, uid: str
) -> None:
    """Director + real scheduler: a failing CE is skipped for backoff_cycles, then served again."""
    name, site = f"condor{uid}", f"LCG.{uid}.test"
    queue = {
        "name": name,
        "type": "htcondorce",
        "site": site,
        "ce": "ce.example.org",
        "endpoint": "ce.example.org:9619",
        "max_total": 5,
        "max_waiting": 5,
    }
    cfg = write_config(tmp_path / "sd.yml", scheduler, [queue], backoff_cycles=2)
    scheduler.submit(jdl(site), jdl(site))
    director = Director(load(cfg))
    try:
        schedd.down = True
        (d,) = director.cycle(wait=True)
        assert d.submit == 2 and director.queues[name].health.skip_cycles == 2
        schedd.down = False
        for _ in range(2):
            (d,) = director.cycle(wait=True)
            assert d.skipped.startswith("backing off") and d.submit == 0
        assert schedd.transactions == 0
        (d,) = director.cycle(wait=True)
        assert d.submit == 2 and schedd.transactions == 1
        rows = scheduler.pilots(queue=name)
        assert {r["PilotJobReference"] for r in rows} == {f"htcondorce://ce.example.org:9619/1.{i}" for i in (0, 1)}
        assert {r["GridType"] for r in rows} == {"htcondorce"}
        # The next cycle asks the CE and records Waiting (idle after spool) in PilotAgents.
        (d,) = director.cycle(wait=True)
        assert d.submit == 0
        assert {r["Status"] for r in scheduler.pilots(queue=name)} == {"Waiting"}
        # A held pilot becomes Aborted in the scheduler.
        schedd.set_job(1, 0, JobStatus=5, HoldReasonCode=34, HoldReason="memory usage exceeded")
        director.cycle(wait=True)
        by_ref = {r["PilotJobReference"]: r for r in scheduler.pilots(queue=name)}
        held = by_ref["htcondorce://ce.example.org:9619/1.0"]
        assert held["Status"] == "Aborted" and "memory usage exceeded" in held["StatusReason"]
    finally:
        director.shutdown()


def test_unknown_too_long_becomes_aborted(schedd: ScheddDouble, scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    name, site = f"condor{uid}", f"LCG.{uid}.test"
    queue = {"name": name, "type": "htcondorce", "site": site, "endpoint": "ce.example.org:9619"}
    cfg = write_config(tmp_path / "sd.yml", scheduler, [queue], unknown_timeout=600)
    scheduler.submit(jdl(site))
    now = [time.time()]
    director = Director(load(cfg), clock=lambda: now[0])
    try:
        director.cycle(wait=True)
        assert len(scheduler.pilots(queue=name)) == 1
        schedd.jobs.clear()  # the CE lost the job: neither queue nor history knows it
        director.cycle(wait=True)
        assert scheduler.pilots(queue=name)[0]["Status"] == "Submitted"
        now[0] += 601
        director.cycle(wait=True)
        (row,) = scheduler.pilots(queue=name)
        assert row["Status"] == "Aborted" and "Unknown for more than 600" in row["StatusReason"]
    finally:
        director.shutdown()


def ad_values(ad: object) -> str:
    """Everything a job ad shows to whoever can query the schedd."""
    return ad.printOld()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["remote", "grid"])
def test_each_proc_transfers_its_own_token_file(schedd: ScheddDouble, tmp_path: Path, mode: str) -> None:
    ce = make_ce(tmp_path, mode=mode)
    tokens = {"s1": "token-of-s1", "s2": "token-of-s2"}
    ce.bundle.issue(tokens)
    sent: dict[str, str] = {}
    spool = schedd.spool

    def spool_reading_inputs(result: object) -> None:
        for ad in schedd.jobs.values():  # what spool() sends: each proc's own input files, read now
            sent[ad["PilotStamp"]] = Path(ad["Submit_transfer_input_files"]).read_text()
        spool(result)

    schedd.spool = spool_reading_inputs  # type: ignore[method-assign]
    ce.submit(["s1", "s2"])
    ads = {schedd.jobs[(1, i)]["PilotStamp"]: schedd.jobs[(1, i)] for i in range(2)}
    for stamp, ad in ads.items():
        path = Path(ad["Submit_transfer_input_files"])
        assert path.name == f"pilot-token-{stamp}" and path.parent == ce.token_dir
        assert not any(token in ad_values(ad) for token in tokens.values()), "no token in a job ad"
    assert not any(token in Path(ads["s1"]["Cmd"]).read_text() for token in tokens.values())
    if mode == "remote":
        assert sent == tokens and list(ce.token_dir.iterdir()) == [], "spooled to the CE, then deleted here"
    else:
        assert {p.name: p.read_text() for p in ce.token_dir.iterdir()} == {
            f"pilot-token-{s}": t for s, t in tokens.items()
        }
        assert {p.stat().st_mode & 0o777 for p in ce.token_dir.iterdir()} == {0o600}
        assert ce.token_dir.stat().st_mode & 0o777 == 0o700


def test_token_files_go_when_the_schedd_no_longer_holds_the_pilot(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path, mode="grid")
    ce.bundle.issue({"g1": "token-of-g1", "g2": "token-of-g2"})
    refs = ce.submit(["g1", "g2"])
    schedd.set_job(1, 0, JobStatus=4, ExitCode=0)
    assert [r.stamp for r in ce.cleanup(refs[1:])] == ["g1"]
    assert sorted(p.name for p in ce.token_dir.iterdir()) == ["pilot-token-g1", "pilot-token-g2"]
    ce.cleanup(refs[1:])  # g1 is gone from the queue: its token file goes; g2 still waits to be forwarded
    assert [p.name for p in ce.token_dir.iterdir()] == ["pilot-token-g2"]


def test_the_queues_own_input_files_are_kept(schedd: ScheddDouble, tmp_path: Path) -> None:
    ce = make_ce(tmp_path, mode="grid")
    ce.extra["transfer_input_files"] = "/data/site.conf"
    ce.bundle.issue({"x1": "token-of-x1"})
    ce.submit(["x1"])
    assert schedd.jobs[(1, 0)]["Submit_transfer_input_files"] == f"{ce.token_dir}/pilot-token-x1, /data/site.conf"


def test_a_failed_submission_leaves_no_token_file(schedd: ScheddDouble, tmp_path: Path) -> None:
    schedd.down = True
    ce = make_ce(tmp_path, mode="grid")
    ce.bundle.issue({"f1": "token-of-f1"})
    with pytest.raises(CEError):
        ce.submit(["f1"])
    assert list(ce.token_dir.iterdir()) == []
