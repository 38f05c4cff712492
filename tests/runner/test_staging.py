"""galaxy_dirac.staging without Galaxy: path rewriting, bundle layout, manifest, and the launcher on this machine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import List

import pytest

from galaxy_dirac import staging
from galaxy_dirac.archive import create_archive, safe_extract
from galaxy_dirac.states import JOB_SCRIPT_INCOMPLETE, OUTPUT_SANDBOX_TOO_LARGE, PAYLOAD_EXIT
from tests.pilot.conftest import LocalServer, Reply, Request, parse_multipart


def _node_env() -> dict:
    """A worker node's environment: nothing of this test process (no PYTHONPATH to our package)."""
    return {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8"}


def _sandbox_of(node: Path, patterns: list) -> io.BytesIO:
    """The output sandbox as a JobWrapper would pack it: the listed files, here under an absolute-path prefix."""
    prefix = str(node).lstrip("/")
    pairs = [(f"{prefix}/{name}", node / name) for name in patterns if (node / name).exists()]
    archive = node.parent / "out.tar.bz2"
    create_archive(archive, pairs, "tar.bz2")
    return io.BytesIO(archive.read_bytes())


def _spec(tmp_path: Path, transport: str = "galaxy") -> staging.JobSpec:
    files = tmp_path / "galaxy" / "files"
    work = tmp_path / "galaxy" / "jobs" / "7"
    (work / "working").mkdir(parents=True)
    (work / "outputs").mkdir()
    files.mkdir(parents=True)
    (files / "dataset_1.dat").write_text("in one\n")
    (files / "dataset_1_files").mkdir()
    (files / "dataset_1_files" / "index.txt").write_text("extra\n")
    (files / "dataset_10.dat").write_text("not an input\n")
    out = files / "dataset_2.dat"
    ec = work / "galaxy_7.ec"
    script = work / "galaxy_7.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"cd {work}/working\n"
        f"cat {files}/dataset_1.dat {files}/dataset_1_files/index.txt > {out}\n"
        f"echo done > {work}/working/made.txt\n"
        f"echo 0 > {ec}\n"
    )
    return staging.JobSpec(
        exit_code_file=str(ec),
        galaxy_job_id=7,
        working_directory=str(work),
        job_script=str(script),
        inputs=[str(files / "dataset_1.dat")],
        input_extra_dirs=[str(files / "dataset_1_files")],
        outputs=[str(out)],
        transport=transport,
        galaxy_url="http://galaxy.example:8080",
        encoded_job_id="abc123",
        job_key="key456",
    )


def test_path_mapper_longest_prefix_and_boundaries(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    mapper = staging.PathMapper(spec)
    files = tmp_path / "galaxy" / "files"
    assert mapper.relative(str(files / "dataset_1.dat")) == "inputs/dataset_1.dat"
    assert mapper.relative(str(files / "dataset_1_files" / "a" / "b")) == "inputs/dataset_1_files/a/b"
    assert mapper.relative(spec.working_directory + "/working/x") == "work/working/x"
    assert mapper.relative(str(files / "dataset_10.dat")) is None
    text = f"cat {files}/dataset_1.dat {files}/dataset_10.dat > {files}/dataset_2.dat"
    assert mapper.rewrite(text) == (
        f"cat {staging.PLACEHOLDER}/inputs/dataset_1.dat {files}/dataset_10.dat "
        f"> {staging.PLACEHOLDER}/outputs/dataset_2.dat"
    )


def test_same_basename_gets_unique_names(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    other = tmp_path / "elsewhere" / "dataset_1.dat"
    other.parent.mkdir()
    other.write_text("x")
    spec.inputs.append(str(other))
    mapper = staging.PathMapper(spec)
    assert mapper.relative(str(other)) == "inputs/1_dataset_1.dat"


def test_the_same_dataset_named_twice_is_staged_once(tmp_path: Path) -> None:
    """Galaxy lists a dataset once per use (repeats, multiple="true"); the node gets it once, under one name."""
    spec = _spec(tmp_path)
    spec.inputs = spec.inputs * 3
    spec.input_extra_dirs = spec.input_extra_dirs * 2
    bundle = staging.build_bundle(spec)
    paths = [entry["path"] for entry in bundle.config["inputs"]]
    assert paths == ["inputs/dataset_1.dat", "inputs/dataset_1_files/index.txt"]
    assert staging.PathMapper(spec).relative(spec.inputs[2]) == "inputs/dataset_1.dat"


def test_galaxy_transport_manifest(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    bundle = staging.build_bundle(spec)
    assert bundle.output_sandbox == [staging.STDOUT, staging.STDERR]
    inputs = {entry["path"]: entry for entry in bundle.config["inputs"]}
    assert set(inputs) == {"inputs/dataset_1.dat", "inputs/dataset_1_files/index.txt"}
    assert inputs["inputs/dataset_1.dat"]["url"].startswith("http://galaxy.example:8080/api/jobs/abc123/files?")
    assert "job_key=key456" in inputs["inputs/dataset_1.dat"]["url"]
    assert inputs["inputs/dataset_1.dat"]["size"] == len("in one\n")
    outputs = {entry["path"]: entry for entry in bundle.config["outputs"]}
    run = f"{spec.working_directory}/__galaxy_dirac_attempts/{staging.ATTEMPT}"  # each run pushes to its own place
    assert outputs["outputs/dataset_2.dat"]["fields"] == {"path": f"{run}/outputs/dataset_2.dat", "job_key": "key456"}
    assert "?" not in outputs["outputs/dataset_2.dat"]["url"]  # job_key only once, in the form
    assert outputs[staging.WORK_TAR]["optional"] is False
    with tarfile.open(bundle.archive) as tf:
        names = set(tf.getnames())
    assert {staging.LAUNCHER, staging.CONFIG, staging.ZIPAPP, "work/galaxy_7.sh", "outputs/dataset_2.dat"} <= names
    assert not any(name.startswith("inputs/") for name in names)  # pulled by the wrapper, not in the sandbox


def test_unknown_transport_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transport"):
        staging.build_bundle(_spec(tmp_path, transport="carrier-pigeon"))


def test_sandbox_bundle_runs_on_a_node_and_results_come_back(tmp_path: Path) -> None:
    """Run the launcher in a fresh directory (a fake node) and install its results Galaxy-side."""
    spec = _spec(tmp_path, transport="sandbox")
    bundle = staging.build_bundle(spec)
    assert bundle.output_sandbox == [staging.STDOUT, staging.STDERR, staging.RESULTS]
    assert json.loads(json.dumps(bundle.config))["inputs"] == []
    node = tmp_path / "node" / "job-1"
    node.mkdir(parents=True)
    safe_extract(bundle.archive, node)
    assert (node / "inputs" / "dataset_1_files" / "index.txt").read_text() == "extra\n"
    script = (node / "work" / "galaxy_7.sh").read_text()
    assert str(tmp_path / "galaxy") not in script.replace(str(tmp_path / "galaxy" / "files") + "/dataset_10", "")
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True, env=_node_env())
    assert result.returncode == 0, result.stderr
    assert (node / "outputs" / "dataset_2.dat").read_text() == "in one\nextra\n"
    with tarfile.open(node / staging.WORK_TAR) as tf:
        produced = set(tf.getnames())
    assert "working/made.txt" in produced and "galaxy_7.ec" in produced
    assert "galaxy_7.sh" not in produced  # only what the job created or changed comes back
    with tarfile.open(node / staging.RESULTS) as tf:
        assert set(tf.getnames()) == {"outputs/dataset_2.dat", staging.WORK_TAR}  # relative, whoever tars it
    placed = staging.install_results(spec, lambda: [_sandbox_of(node, bundle.output_sandbox)])
    assert placed == spec.outputs
    assert Path(spec.outputs[0]).read_text() == "in one\nextra\n"
    assert (Path(spec.working_directory) / "working" / "made.txt").read_text() == "done\n"
    assert (Path(spec.working_directory) / "galaxy_7.ec").read_text() == "0\n"


def test_launcher_fails_when_the_job_script_cannot_run(tmp_path: Path) -> None:
    spec = _spec(tmp_path, transport="sandbox")
    Path(spec.job_script).write_text("#!/bin/sh\necho broken >&2\nexit 5\n")
    bundle = staging.build_bundle(spec)
    node = tmp_path / "node"
    node.mkdir()
    safe_extract(bundle.archive, node)
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True, env=_node_env())
    assert result.returncode == PAYLOAD_EXIT[JOB_SCRIPT_INCOMPLETE]
    assert "galaxy-dirac: Galaxy job script did not finish" in result.stderr
    assert "broken" in result.stderr


def test_state_roundtrip(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    staging.save_state(spec.working_directory, {"dirac_id": "12", "spec": staging.spec_to_dict(spec)})
    state = staging.load_state(spec.working_directory)
    assert state and staging.spec_from_dict(state["spec"]) == spec
    assert staging.load_state(os.fspath(tmp_path)) is None


def _run_on_node(tmp_path: Path, spec: staging.JobSpec, env: dict) -> tuple:
    bundle = staging.build_bundle(spec)
    node = tmp_path / "node"
    node.mkdir()
    safe_extract(bundle.archive, node)
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True, env=env)
    (node / staging.STDOUT).write_text(result.stdout)  # the JDL's StdOutput/StdError, as a JobWrapper keeps them
    (node / staging.STDERR).write_text(result.stderr)
    return node, result


def test_slots_and_memory_come_from_the_slot_then_the_request(tmp_path: Path) -> None:
    spec = _spec(tmp_path, transport="sandbox")
    spec.processors, spec.memory_mb = 2, 3000
    out = tmp_path / "galaxy" / "files" / "dataset_2.dat"
    Path(spec.job_script).write_text(
        f'#!/bin/sh\necho "$GALAXY_SLOTS $GALAXY_MEMORY_MB" > {out}\necho 0 > {spec.exit_code_file}\n'
    )
    node, result = _run_on_node(tmp_path, spec, {**_node_env(), "DIRAC_JOB_PROCESSORS": "8", "DIRAC_PROCESSORS": "1"})
    assert result.returncode == 0, result.stderr
    assert (node / "outputs" / "dataset_2.dat").read_text() == "8 3000\n"
    (tmp_path / "again").mkdir()
    node2, result = _run_on_node(tmp_path / "again", spec, _node_env())
    assert result.returncode == 0, result.stderr
    assert (node2 / "outputs" / "dataset_2.dat").read_text() == "2 3000\n"


def test_outputs_over_the_output_sandbox_limit_fail_with_the_limit_named(tmp_path: Path) -> None:
    spec = _spec(tmp_path, transport="sandbox")
    spec.max_output_bytes = 100_000
    out = tmp_path / "galaxy" / "files" / "dataset_2.dat"
    Path(spec.job_script).write_text(
        f"#!/bin/sh\nhead -c 300000 /dev/urandom > {out}\necho 0 > {spec.exit_code_file}\n"
    )
    node, result = _run_on_node(tmp_path, spec, _node_env())
    assert result.returncode == PAYLOAD_EXIT[OUTPUT_SANDBOX_TOO_LARGE]
    assert "output sandbox limit of 0.1 MB" in result.stderr and "transport: galaxy" in result.stderr
    assert not (node / staging.RESULTS).exists()


def test_a_bundle_over_the_input_sandbox_limit_is_refused_before_submission(tmp_path: Path) -> None:
    spec = _spec(tmp_path, transport="sandbox")
    Path(spec.inputs[0]).write_bytes(os.urandom(200_000))
    spec.max_input_bytes = 50_000
    with pytest.raises(staging.LimitError, match=r"input sandbox limit of 0\.1 MB"):
        staging.build_bundle(spec)
    spec.transport = "galaxy"  # the data does not travel in the sandbox: fits
    assert staging.build_bundle(spec).size < 50_000


def test_only_the_tool_files_the_job_names_travel_from_a_big_shared_directory(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    tools = tmp_path / "tools"
    (tools / "lib").mkdir(parents=True)
    for n in range(100):
        (tools / f"other_{n}.xml").write_text("<tool/>\n" * 100)
    (tools / "mine.py").write_text("print('mine')\n")
    (tools / "lib" / "helper.py").write_text("x = 1\n")
    (tools / "lib" / "data.txt").write_text("d\n")
    spec.tool_dir = str(tools)
    Path(spec.job_script).write_text(
        f"#!/bin/sh\npython3 {tools}/mine.py --lib {tools}/lib > /dev/null\necho 0 > {spec.exit_code_file}\n"
    )
    with tarfile.open(staging.build_bundle(spec).archive) as tf:
        shipped = sorted(m.name for m in tf.getmembers() if m.isfile() and m.name.startswith("tool/"))
    assert shipped == ["tool/lib/data.txt", "tool/lib/helper.py", "tool/mine.py"]
    Path(spec.job_script).write_text(f"#!/bin/sh\ncd {tools} && ./mine.py\n")  # names the directory itself
    with tarfile.open(staging.build_bundle(spec).archive) as tf:
        assert len([m for m in tf.getmembers() if m.isfile() and m.name.startswith("tool/")]) == 103


def test_a_done_job_without_its_results_is_never_taken_for_a_success(tmp_path: Path) -> None:
    """Transport galaxy: no pushed work archive; sandbox: an output sandbox without the results archive."""
    spec = _spec(tmp_path)
    with pytest.raises(staging.ResultsMissing, match="never reached Galaxy"):
        staging.install_results(spec, lambda: [])
    spec.transport = "sandbox"
    node = tmp_path / "node"
    node.mkdir()
    (node / staging.STDERR).write_text("galaxy-dirac: Galaxy job payload error: boom\n")
    with pytest.raises(staging.ResultsMissing, match="holds no galaxy_dirac_results.tar"):
        staging.install_results(spec, lambda: [_sandbox_of(node, [staging.STDERR])])


def test_a_purged_input_is_a_clear_error_before_submission(tmp_path: Path) -> None:
    for transport in staging.TRANSPORTS:
        spec = _spec(tmp_path / transport, transport=transport)
        Path(spec.inputs[0]).unlink()
        with pytest.raises(staging.InputMissing, match=r"1 input dataset\(s\) have no data.*dataset_1\.dat"):
            staging.build_bundle(spec)


def test_a_tool_directory_over_the_cap_still_sends_the_files_the_job_names(tmp_path: Path, monkeypatch) -> None:
    """A huge shared tool directory: never whole, but a script or data file the command names does travel."""
    monkeypatch.setattr(staging, "MAX_TOOL_DIR_BYTES", 1_500_000)
    spec = _spec(tmp_path)
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "huge.bin").write_bytes(os.urandom(2_000_000))
    (tools / "value.txt").write_text("value beside the tool\n")
    spec.tool_dir = str(tools)
    Path(spec.job_script).write_text(f"#!/bin/sh\ncd {tools}\nexport V=$(cat {tools}/value.txt)\n")
    bundle = staging.build_bundle(spec)
    with tarfile.open(bundle.archive) as tf:
        shipped = sorted(m.name for m in tf.getmembers() if m.isfile() and m.name.startswith("tool/"))
        script = tf.extractfile("work/galaxy_7.sh").read().decode()
    assert shipped == ["tool/value.txt"]
    assert f"$(cat {staging.PLACEHOLDER}/tool/value.txt)" in script and str(tools) not in script


def test_links_to_inputs_in_the_working_directory_do_not_break_the_results(tmp_path: Path) -> None:
    """Tools link their inputs under working/ (same basenames from several directories); those links stay behind."""
    spec = _spec(tmp_path, transport="sandbox")
    out = Path(spec.outputs[0])
    work = Path(spec.working_directory) / "working"
    Path(spec.job_script).write_text(
        "#!/bin/sh\n"
        f"mkdir -p {work}/first && ln -s {spec.inputs[0]} {work}/first/same.txt && ln -s first {work}/inside\n"
        f"cat {work}/first/same.txt > {out}\necho 0 > {spec.exit_code_file}\n"
    )
    node, result = _run_on_node(tmp_path, spec, _node_env())
    assert result.returncode == 0, result.stderr
    with tarfile.open(node / staging.WORK_TAR) as tf:
        names = set(tf.getnames())
    assert "working/first/same.txt" not in names and "galaxy_7.ec" in names
    assert staging.install_results(spec, lambda: [_sandbox_of(node, [staging.STDOUT, staging.STDERR, staging.RESULTS])])
    assert out.read_text() == "in one\n"


def _composite_spec(tmp_path: Path, transport: str) -> staging.JobSpec:
    """A job that reads reference data a data table names (an index prefix) and writes an html output's extra files."""
    spec = _spec(tmp_path, transport=transport)
    tool_data = tmp_path / "galaxy" / "tool-data"
    (tool_data / "hg19" / "bowtie2").mkdir(parents=True)
    for name in ("hg19.1.bt2", "hg19.rev.1.bt2"):
        (tool_data / "hg19" / "bowtie2" / name).write_text(f"index {name}\n")
    (tool_data / "hg19" / "bowtie2" / "other.1.bt2").write_text("not named\n")
    (tool_data / "secret.loc").write_text("not named either\n")
    out = Path(spec.outputs[0])
    extra = out.parent / "dataset_2_files"
    index = tool_data / "hg19" / "bowtie2" / "hg19"
    Path(spec.job_script).write_text(
        "#!/bin/sh\n"
        f"mkdir -p '{extra}/img' && cat '{index}.1.bt2' '{index}.rev.1.bt2' > '{extra}/img/index.txt'\n"
        f"echo '<a href=\"img/index.txt\">' > '{out}'\n"
        f"ls {tool_data}/../tool-data/../files > /dev/null 2>&1; echo 0 > {spec.exit_code_file}\n"
    )
    spec.output_extra_dirs = [str(extra)]
    spec.reference_dirs = [str(tool_data)]
    return spec


def test_reference_data_and_output_extra_files_travel_by_sandbox(tmp_path: Path) -> None:
    spec = _composite_spec(tmp_path, "sandbox")
    bundle = staging.build_bundle(spec)
    with tarfile.open(bundle.archive) as tf:
        shipped = {m.name for m in tf.getmembers() if m.isfile() and m.name.startswith("reference/")}
    assert shipped == {f"reference/tool-data/hg19/bowtie2/hg19.{n}.bt2" for n in ("1", "rev.1")}
    assert bundle.config["output_dirs"] == ["outputs/dataset_2_files"]
    node = tmp_path / "node"
    node.mkdir()
    safe_extract(bundle.archive, node)
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True, env=_node_env())
    assert result.returncode == 0, result.stderr
    with tarfile.open(node / staging.RESULTS) as tf:
        assert "outputs/dataset_2_files/img/index.txt" in tf.getnames()
    extra = Path(spec.output_extra_dirs[0])
    assert not extra.exists()
    staging.install_results(spec, lambda: [_sandbox_of(node, bundle.output_sandbox)])
    assert (extra / "img" / "index.txt").read_text() == "index hg19.1.bt2\nindex hg19.rev.1.bt2\n"


class _JobFilesApi:
    """A double of Galaxy's job files API (GET ?path=, multipart POST path + file) on 127.0.0.1, for unit tests of
    the payload's pushes that need two runs of one job; real Galaxy serves the same pushes in test_galaxy and the
    tool-compatibility suite."""

    def __init__(self) -> None:
        self.pushed: List[str] = []
        self.server = LocalServer(self)
        self.url = self.server.url

    def __call__(self, request: Request) -> Reply:
        if request.method == "GET":
            return Reply(200, Path(request.query["path"][0]).read_bytes())
        form = parse_multipart(request)
        target = Path(form["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(form["file"][1])
        self.pushed.append(str(target))
        return Reply(200, b"{}")


def test_reference_data_and_output_extra_files_travel_through_the_job_files_api(tmp_path: Path) -> None:
    api = _JobFilesApi()
    try:
        spec = _composite_spec(tmp_path, "galaxy")
        spec.galaxy_url = api.url
        bundle = staging.build_bundle(spec)
        pulled = sorted(entry["path"] for entry in bundle.config["inputs"] if entry["path"].startswith("reference/"))
        assert pulled == [f"reference/tool-data/hg19/bowtie2/hg19.{n}.bt2" for n in ("1", "rev.1")]
        node, result = _run_on_node(tmp_path, spec, _node_env())
        assert result.returncode == 0, result.stderr
        # One archive for all extra files, not one request each.
        assert sum(1 for p in api.pushed if os.path.basename(p) == "galaxy_dirac_extra.tar") == 1
        staging.install_results(spec, lambda: [_sandbox_of(node, [staging.STDOUT, staging.STDERR])])
        extra = Path(spec.output_extra_dirs[0])
        assert (extra / "img" / "index.txt").read_text() == "index hg19.1.bt2\nindex hg19.rev.1.bt2\n"
        assert Path(spec.outputs[0]).read_text() == '<a href="img/index.txt">\n'
        assert not (Path(spec.working_directory) / "__galaxy_dirac_attempts").exists()
    finally:
        api.server.close()


def test_only_the_run_the_output_sandbox_names_is_installed(tmp_path: Path) -> None:
    """A rescheduled job's earlier run, still going on a lost node, pushes too: its results never reach Galaxy."""
    api = _JobFilesApi()
    try:
        spec = _spec(tmp_path, "galaxy")
        spec.galaxy_url = api.url
        out = Path(spec.outputs[0])
        runs = {}
        for run in ("current", "earlier"):  # the earlier run pushes last, as a slow lost node would
            Path(spec.job_script).write_text(f"#!/bin/sh\necho {run} > {out}\necho 0 > {spec.exit_code_file}\n")
            (tmp_path / run).mkdir()
            runs[run], result = _run_on_node(tmp_path / run, spec, _node_env())
            assert result.returncode == 0, result.stderr
        assert len({os.path.dirname(p) for p in api.pushed if p.endswith("dataset_2.dat")}) == 2
        with pytest.raises(staging.ResultsMissing):  # no run named: nothing is taken for the results
            staging.install_results(spec, lambda: [_sandbox_of(runs["current"], [staging.STDERR])])
        assert not out.exists()
        staging.install_results(spec, lambda: [_sandbox_of(runs["current"], [staging.STDOUT, staging.STDERR])])
        assert out.read_text() == "current\n"
        assert not (Path(spec.working_directory) / "__galaxy_dirac_attempts").exists()
    finally:
        api.server.close()


def test_named_reference_paths_expand_but_never_leave_their_folder(tmp_path: Path) -> None:
    data = tmp_path / "tool-data"
    (data / "genome").mkdir(parents=True)
    for name in ("g.fa", "g.fa.fai", "g.dict"):
        (data / "genome" / name).write_text(f"{name}\n")
    (data / "table.loc").write_text("x\n")
    (tmp_path / "secret").write_text("no\n")
    genome = [str(data / "genome" / n) for n in ("g.dict", "g.fa", "g.fa.fai")]

    def found(text: str) -> list:
        return sorted(f for files in staging.referenced_files([str(data)], [text]).values() for f in files)

    assert found(f"bwa mem '{data}/genome/g.fa' > out") == genome[1:]  # the file and its indexes
    assert found(f"--index={data}/genome, done") == genome  # a directory: all of it
    assert found(f"bowtie2 -x {data}/genome/g -U in") == genome  # an index prefix
    assert found(f"cat {data}/../secret {data}/genome/../../secret") == []  # never outside the folder
    assert found(f"ls {data} {data}/ {data}/missing/x x{data}/table.loc") == []  # nor the folder itself
    # Many folders (every data table's): the deepest one holding the path is the one it travels from.
    deep = staging.referenced_files([str(data), str(data / "genome"), "/"], [f"cat {data}/genome/g.dict"])
    assert deep == {str(data / "genome"): [str(data / "genome" / "g.dict")]}


def test_results_bigger_than_galaxy_allows_are_refused_not_written(tmp_path: Path) -> None:
    """A compromised node cannot fill Galaxy's disk: results expand at most to what Galaxy's limits allow."""
    spec = _spec(tmp_path, transport="sandbox")
    out = Path(spec.outputs[0])
    Path(spec.job_script).write_text(f"#!/bin/sh\nhead -c 200000 /dev/zero > {out}\necho 0 > {spec.exit_code_file}\n")
    node, result = _run_on_node(tmp_path, spec, _node_env())
    assert result.returncode == 0, result.stderr
    spec.max_result_bytes = 100_000
    with pytest.raises(staging.ResultsMissing, match="at most 0.1 MB may come back"):
        staging.install_results(spec, lambda: [_sandbox_of(node, [staging.STDOUT, staging.STDERR, staging.RESULTS])])
    assert not out.exists()
    spec.max_result_bytes = 1_000_000
    assert staging.install_results(spec, lambda: [_sandbox_of(node, [staging.STDOUT, staging.STDERR, staging.RESULTS])])
    assert out.stat().st_size == 200_000
