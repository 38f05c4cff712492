"""Schema migrations: databases made by older releases (built by their own code, in a subprocess) upgrade to head
with nothing lost and everything readable by today's code; a fresh database is created at head; the head matches
the models on every backend; concurrent upgrades (several API workers starting) run the migration once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import Engine, MetaData, select, text

from galaxy_dirac import states
from galaxy_dirac.wms import jobs, matcher, migrations, monitoring, pilots, sandbox_metadata
from galaxy_dirac.wms.auth import AuthError
from galaxy_dirac.wms.db import create_schema, make_engine, read_transaction

from .helpers import ADMIN, ALICE, BOB, at, job_token, make_settings

REPO = Path(__file__).resolve().parents[2]
#: Releases whose databases must upgrade: the first shape, the last one before sb_JobUploads, and the main branch
#: when migrations arrived (sb_JobUploads, no alembic_version).
OLD_COMMITS = {
    "first": "a186b08d92788c33c30cc3b2e924380e1eb520d5",
    "before-job-uploads": "3a96e4de82a3af308cc700c5864823486a4a9460",
    "main-before-migrations": "79b0170180989eabd906ad336c667e406766ba2a",
}
EXPECTED_DETECTION = {
    "first": "0001_dirac_tables",
    "before-job-uploads": "0002_monitoring",
    "main-before-migrations": "0003_sandbox_job_uploads",
}

#: Run with an old copy of galaxy_dirac first on sys.path: puts jobs in every DIRAC state into the database with
#: that copy's own logic functions and prints what it made as JSON.
POPULATE = r"""
import dataclasses, datetime as dt, inspect, json, sys
import galaxy_dirac
assert galaxy_dirac.__file__.startswith(sys.argv[3]), galaxy_dirac.__file__
from galaxy_dirac import states
from galaxy_dirac.wms import jobs, matcher, pilots, sandbox_metadata
from galaxy_dirac.wms.auth import Principal
from galaxy_dirac.wms.config import load_settings
from galaxy_dirac.wms.db import create_schema, make_engine

url, home = sys.argv[1:3]
settings = load_settings(overrides={"home": home, "db": url}, environ={})
engine = make_engine(url)
create_schema(engine)
try:
    from galaxy_dirac.wms import monitoring
except ImportError:  # the first release had no monitoring page
    monitoring = None
else:
    monitoring.ensure_schema(engine)
    monitoring.record_decisions(engine, [{"queue": "gd-queue", "submit": 2}], director="sd-1")

alice = Principal("runner", "alice", "galaxy_user", "galaxy")
admin = Principal("admin", "admin", "galaxy_admin", "galaxy")
def job_principal(job_id):
    return Principal("job", "alice", "galaxy_user", "galaxy", job_id=job_id, run=0)
def at(seconds):
    return dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)

input_pfn = jobs.sandbox_pfn(alice, "sha256", "a" * 64, "tar.bz2")
sandbox_metadata.register(engine, dataclasses.asdict(alice), input_pfn, 1234)
input_ref = sandbox_metadata.full_ref(input_pfn)
made = {"input_pfn": input_pfn, "jobs": {}, "expected": {}}

def submit(name):
    jdl = f'[ Executable = "/bin/true"; JobName = "{name}"; InputSandbox = {{"{input_ref}"}}; CPUTime = 3600; ]'
    job_id = jobs.submit(engine, [jdl], alice, settings)[0]["JobID"]
    made["jobs"][name] = job_id
    return job_id

def status(job_id, seconds, new, minor, principal=None, **extra):
    result = jobs.set_statuses(
        engine, {job_id: {at(seconds): {"Status": new, "MinorStatus": minor, "Source": "JobWrapper", **extra}}},
        principal or job_principal(job_id), force=principal is admin)
    assert not result["failed"], result

pilot_id = pilots.register(engine, "stamp-old-1", {"site": "GD.Test.uk", "ce": "ce.test", "queue": "q1"}, "galaxy")
made["pilot_id"] = pilot_id
slot = matcher.Slot(site="GD.Test.uk", grid_ce="ce.test", queue="q1", pilot_stamp="stamp-old-1")

def matched(name):
    job_id = submit(name)
    assert matcher.match(engine, slot, pilot_id=pilot_id) == job_id
    return job_id

def running(name):
    job_id = matched(name)
    status(job_id, 1, states.RUNNING, "Application", ApplicationStatus="step 1")
    jobs.heartbeat(engine, {job_id: {"LoadAverage": 1.5, "MemoryUsed": 512, "CPUConsumed": 30,
                                     "StandardOutput": "hello from " + name}}, job_principal(job_id))
    return job_id

matched("matched")
running("running")
done = running("done")
output_pfn = jobs.sandbox_pfn(alice, "sha256", "b" * 64, "tar.bz2")
sandbox_metadata.register(engine, dataclasses.asdict(job_principal(done)), output_pfn, 99)
if len(inspect.signature(sandbox_metadata.assign).parameters) > 4:
    sandbox_metadata.assign(engine, done, output_pfn, "Output", job_principal(done))
else:
    sandbox_metadata.assign(engine, done, output_pfn, "Output")
made["output_pfn"] = output_pfn
status(done, 2, states.DONE, "Execution Complete")
status(running("failed"), 2, states.FAILED, "Application Finished With Errors")
killed = running("killed")
status(killed, 2, states.KILLED, "Marked for termination", principal=alice)
rescheduled = running("rescheduled")
assert not jobs.reschedule(engine, [rescheduled], admin, settings)["failed"]
# Every other DIRAC state, as an admin may force it.
for state in states.JOB_STATES:
    if state not in (states.WAITING, states.MATCHED, states.RUNNING, states.DONE, states.FAILED, states.KILLED):
        status(submit("forced-" + state), 3, state, "forced " + state, principal=admin)
submit("waiting")
for name, job_id in made["jobs"].items():
    made["expected"][name] = jobs.get_job_row(engine, job_id, admin).Status
print(json.dumps(made))
"""


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each old release's galaxy_dirac, extracted from git."""
    root = tmp_path_factory.mktemp("old-code")
    copies = {}
    for name, commit in OLD_COMMITS.items():
        target = root / name
        target.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "galaxy_dirac"], capture_output=True)
        assert archive.returncode == 0, archive.stderr.decode()
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        copies[name] = target
    return copies


def populate_with_old_code(code: Path, url: str, home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_WMS_")}
    env["PYTHONPATH"] = str(code)
    done = subprocess.run(
        [sys.executable, "-c", POPULATE, url, str(home), str(code)],
        cwd=code,  # not the work tree: `python -c` puts the working directory first on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def snapshot(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of every table, read without the models (what is stored, not what the code makes of it)."""
    metadata = MetaData()
    with read_transaction(engine) as conn:
        metadata.reflect(conn)
        tables = {}
        for name, table in metadata.tables.items():
            if name != "alembic_version":
                order = list(table.primary_key.columns) or list(table.columns)
                tables[name] = [tuple(row) for row in conn.execute(select(table).order_by(*order))]
    return tables


def schema_diff(engine: Engine) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": migrations.compare_type})
        return compare_metadata(context, migrations.target_metadata())


def versions(engine: Engine) -> list[str]:
    with read_transaction(engine) as conn:
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def wms_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "galaxy_dirac.wms.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def engine_for(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def check_readable(engine: Engine, made: dict[str, Any], tmp_path: Path, db_url: str) -> None:
    """Today's logic functions read every job the old code made, and can still act on them."""
    ids = made["jobs"]
    rows, total = jobs.search(
        engine, ADMIN, parameters=["JobID", "JobName", "Status", "RescheduleCounter"], per_page=500
    )
    assert total == len(ids)
    by_name = {r["JobName"]: r for r in rows}
    assert {name: r["Status"] for name, r in by_name.items()} == made["expected"]
    for name, state in {
        "waiting": states.WAITING,
        "matched": states.MATCHED,
        "running": states.RUNNING,
        "done": states.DONE,
        "failed": states.FAILED,
        "killed": states.KILLED,
        "rescheduled": states.WAITING,  # DIRAC's reschedule goes back through Received to Waiting
    }.items():
        assert by_name[name]["Status"] == state, name
    assert by_name["rescheduled"]["RescheduleCounter"] == 1
    own, _ = jobs.search(engine, ALICE, parameters=["JobID"], per_page=500)
    assert len(own) == len(ids)
    assert jobs.search(engine, BOB, parameters=["JobID"], per_page=500)[1] == 0
    summary = {r["Status"]: r["count"] for r in jobs.summary(engine, ADMIN, ["Status"])}
    assert sum(summary.values()) == len(ids)

    for name, job_id in ids.items():
        detail = monitoring.job_detail(engine, job_id)
        assert detail["JobName"] == name
        assert f'JobName = "{name}"' in detail["JDL"]
        assert detail["History"] and detail["History"][0]["Status"] == states.RECEIVED
        assert detail["Sandboxes"]["Input"] == [made["input_pfn"]]
    running = monitoring.job_detail(engine, ids["running"])
    assert [h["Status"] for h in running["History"]][-2:] == [states.MATCHED, states.RUNNING]
    assert running["HeartBeats"] and running["Parameters"]["StandardOutput"] == "hello from running"
    assert [p["PilotStamp"] for p in running["Pilots"]] == ["stamp-old-1"]
    assert jobs.heartbeat_summary(engine, ids["running"])
    assert sandbox_metadata.job_sandboxes(engine, ids["done"])["Output"] == [made["output_pfn"]]
    sandbox_metadata.check_read_access(engine, ALICE, made["input_pfn"])
    sandbox_metadata.check_read_access(engine, job_token(ids["done"]), made["output_pfn"])
    with pytest.raises(AuthError):
        sandbox_metadata.check_read_access(engine, BOB, made["input_pfn"])
    assert set(pilots.jobs_of_pilot(engine, made["pilot_id"])) >= {ids[n] for n in ("matched", "running", "done")}
    killed = [r for r in monitoring.job_detail(engine, ids["killed"])["History"] if r["Status"] == states.KILLED]
    assert killed

    # Still alive, not only readable: the running job reports, waiting jobs match, new jobs use the old sandbox.
    jobs.heartbeat(engine, {ids["running"]: {"LoadAverage": 0.5}}, job_token(ids["running"]))
    assert not jobs.set_statuses(
        engine,
        {ids["running"]: {at(10): {"Status": states.DONE, "MinorStatus": "Execution Complete", "Source": "t"}}},
        job_token(ids["running"]),
    )["failed"]
    settings = make_settings(tmp_path, db_url)
    ref = sandbox_metadata.full_ref(made["input_pfn"])
    new = jobs.submit(engine, [f'[ Executable = "/bin/true"; InputSandbox = {{"{ref}"}}; ]'], ALICE, settings)
    waiting = {ids["waiting"], ids["rescheduled"], new[0]["JobID"]}
    slot = matcher.Slot(site="GD.Test.uk", pilot_stamp="stamp-new")
    got = {matcher.match(engine, slot) for _ in range(3)}
    assert got == waiting


@pytest.mark.parametrize("release", ["before-job-uploads", "main-before-migrations"])
def test_old_database_upgrades_without_loss(
    release: str, old_code: dict[str, Path], db_url: str, engine_for: Engine, tmp_path: Path
) -> None:
    upgrade_and_check(release, old_code, db_url, engine_for, tmp_path)


def test_first_release_database_upgrades_without_loss(old_code: dict[str, Path], tmp_path: Path) -> None:
    """The oldest shape (no monitoring table or indexes yet), on SQLite: its tables are the baseline the others
    upgrade from on every backend."""
    url = f"sqlite:///{tmp_path / 'first.sqlite'}"
    engine = make_engine(url)
    try:
        upgrade_and_check("first", old_code, url, engine, tmp_path)
    finally:
        engine.dispose()


def upgrade_and_check(release: str, old_code: dict[str, Path], db_url: str, engine_for: Engine, tmp_path: Path) -> None:
    """Old code fills the database; today's upgrades it; every row is still there and today's code reads it."""
    made = populate_with_old_code(old_code[release], db_url, tmp_path / "old-home")
    before = snapshot(engine_for)
    assert "alembic_version" not in before and len(before["Jobs"]) == len(made["jobs"])
    with engine_for.connect() as conn:
        assert migrations.detect(conn) == EXPECTED_DETECTION[release]

    if release == "before-job-uploads":
        # Two API workers starting at once: each upgrades under the lock; one does the work.
        env = {**os.environ, "GALAXY_DIRAC_WMS_DB": db_url, "GALAXY_DIRAC_WMS_HOME": str(tmp_path / "home")}
        procs = [wms_cli("db", "upgrade", env=env) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        said = sorted(out.strip() for out, _ in outputs)
        head = migrations.head()
        assert said == [f"already at {head}"] + [
            f"database made before migrations recognised as 0002_monitoring, now at {head}"
        ]
        current = wms_cli("db", "current", env=env)
        assert current.communicate(timeout=60)[0].strip() == f"{head} (head {head})" and current.returncode == 0
    else:
        result = migrations.upgrade(engine_for)
        assert (result.before, result.detected, result.after) == (None, EXPECTED_DETECTION[release], migrations.head())

    assert versions(engine_for) == [migrations.head()]
    after = snapshot(engine_for)
    for table, rows in before.items():
        assert after[table] == rows, table  # nothing lost, nothing changed
    assert set(after) - set(before) <= {"sb_JobUploads", "gd_SiteDirectorDecisions", "gd_Leases", "gd_QueueEvents"}
    assert schema_diff(engine_for) == []
    again = migrations.upgrade(engine_for)
    assert not again.changed and snapshot(engine_for) == after and versions(engine_for) == [migrations.head()]
    if release != "first":
        assert [d["Queue"] for d in monitoring.last_decisions(engine_for)] == ["gd-queue"]
    check_readable(engine_for, made, tmp_path, db_url)


def test_fresh_database_is_created_at_head(db_url: str, engine_for: Engine) -> None:
    result = migrations.upgrade(engine_for)
    assert (result.before, result.detected, result.after) == (None, None, migrations.head())
    assert versions(engine_for) == [migrations.head()] and migrations.current(engine_for) == migrations.head()
    assert schema_diff(engine_for) == []
    create_schema(engine_for)  # what every API worker does on start
    assert not migrations.upgrade(engine_for).changed and versions(engine_for) == [migrations.head()]


def test_db_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`db current` reads without creating anything (exit 3 while an upgrade is due); `db upgrade` creates, then
    finds nothing to do."""
    from galaxy_dirac.wms.cli import main

    for name in [n for n in os.environ if n.startswith("GALAXY_DIRAC_WMS_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    head = migrations.head()
    assert main(["db", "current", "--home", str(home)]) == 3
    assert capsys.readouterr().out == f"none (head {head})\n" and not home.exists()
    assert main(["db", "upgrade", "--home", str(home)]) == 0
    assert capsys.readouterr().out == f"empty database: schema created at {head}\n"
    assert main(["db", "upgrade", "--home", str(home)]) == 0
    assert capsys.readouterr().out == f"already at {head}\n"
    assert main(["db", "current", "--home", str(home)]) == 0
    assert capsys.readouterr().out == f"{head} (head {head})\n"


def test_migrations_alone_build_the_models_schema(db_url: str, engine_for: Engine) -> None:
    """The revisions, run from nothing, make what create_all makes: an old database upgraded ends as a new one."""
    from alembic import command

    with engine_for.connect() as conn:
        command.upgrade(migrations._config(conn), "head")
        conn.commit()
    assert versions(engine_for) == [migrations.head()]
    assert schema_diff(engine_for) == []


HOLD_LOCK = r"""
import sys
from galaxy_dirac.wms import migrations
from galaxy_dirac.wms.db import make_engine
engine = make_engine(sys.argv[1])
with engine.connect() as conn, migrations._locked(conn):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_start_waits_for_another_upgrade_and_gives_up_clearly(
    db_url: str, engine_for: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock holds across processes: while another process upgrades, a start waits (here 1 s), then says so."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, db_url], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(migrations, "LOCK_TIMEOUT", 1)
        with pytest.raises(migrations.SchemaError, match="timed out after 1 s waiting for another schema upgrade"):
            migrations.upgrade(engine_for)
        assert migrations.current(engine_for) is None
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert migrations.upgrade(engine_for).after == migrations.head() == migrations.current(engine_for)


def test_partial_or_newer_databases_are_refused(tmp_path: Path) -> None:
    partial = make_engine(f"sqlite:///{tmp_path / 'partial.sqlite'}")
    with partial.begin() as conn:
        conn.execute(text('CREATE TABLE "Jobs" ("JobID" INTEGER PRIMARY KEY)'))
    with pytest.raises(migrations.SchemaError, match="some of the scheduler's tables"):
        migrations.upgrade(partial)
    newer = make_engine(f"sqlite:///{tmp_path / 'newer.sqlite'}")
    migrations.upgrade(newer)
    with newer.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(migrations.SchemaError, match="unknown to this galaxy-dirac"):
        migrations.upgrade(newer)
    for engine in (partial, newer):
        engine.dispose()


def test_sqlite_batch_alter_keeps_child_rows(tmp_path: Path) -> None:
    """A later revision's ALTER of Jobs on SQLite copies and drops the table: with foreign keys on, that drop would
    cascade into JobJDLs, LoggingInfo... The upgrade turns them off around the migrations."""
    import sqlalchemy as sa
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    url = f"sqlite:///{tmp_path / 'wms.sqlite'}"
    engine = make_engine(url)
    create_schema(engine)
    jobs.submit(engine, ['[ Executable = "/bin/true"; ]'] * 3, ALICE, make_settings(tmp_path, url))
    before = snapshot(engine)
    with engine.connect() as conn, migrations._sqlite_foreign_keys_off(conn):
        with Operations(MigrationContext.configure(conn)).batch_alter_table("Jobs", recreate="always") as batch:
            batch.add_column(sa.Column("Extra", sa.Integer(), nullable=True))
        conn.commit()
    after = snapshot(engine)
    assert len(after["Jobs"]) == 3 and all(row[-1] is None for row in after["Jobs"])
    for table in ("JobJDLs", "LoggingInfo", "tq_Jobs"):
        assert after[table] == before[table] != [], table
    engine.dispose()


def test_serve_upgrades_an_old_database_on_start(old_code: dict[str, Path], tmp_path: Path, wms_server_factory) -> None:
    """`serve --workers 2` on a database made before migrations: upgraded once, then served by both workers."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    made = populate_with_old_code(old_code["before-job-uploads"], url, tmp_path / "old-home")
    server = wms_server_factory(db=url, workers=2)
    token = server.token("admin", owner="admin")
    found = requests.post(
        f"{server.url}/api/jobs/search",
        json={"parameters": ["JobID", "Status"]},
        headers={"Authorization": f"Bearer {token}"},
        params={"per_page": 500},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    assert sorted(r["JobID"] for r in found.json()) == sorted(made["jobs"].values())
    assert server.cli("db", "current").strip() == f"{migrations.head()} (head {migrations.head()})"
