"""galaxy_dirac.staging without Galaxy: path rewriting, bundle layout, manifest, and the launcher on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from galaxy_dirac import staging
from galaxy_dirac.archive import safe_extract


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


def test_galaxy_transport_manifest(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    bundle = staging.build_bundle(spec)
    assert bundle.output_sandbox == [staging.STDOUT, staging.STDERR]
    inputs = {entry["path"]: entry for entry in bundle.manifest["inputs"]}
    assert set(inputs) == {"inputs/dataset_1.dat", "inputs/dataset_1_files/index.txt"}
    assert inputs["inputs/dataset_1.dat"]["url"].startswith("http://galaxy.example:8080/api/jobs/abc123/files?")
    assert "job_key=key456" in inputs["inputs/dataset_1.dat"]["url"]
    assert inputs["inputs/dataset_1.dat"]["size"] == len("in one\n")
    outputs = {entry["path"]: entry for entry in bundle.manifest["outputs"]}
    assert outputs["outputs/dataset_2.dat"]["fields"] == {"path": spec.outputs[0], "job_key": "key456"}
    assert "?" not in outputs["outputs/dataset_2.dat"]["url"]  # job_key only once, in the form
    assert outputs[staging.WORK_TAR]["optional"] is False
    with tarfile.open(bundle.archive) as tf:
        names = set(tf.getnames())
    assert {staging.LAUNCHER, staging.MANIFEST, "work/galaxy_7.sh", "outputs/dataset_2.dat"} <= names
    assert not any(name.startswith("inputs/") for name in names)  # pulled by the wrapper, not in the sandbox


def test_unknown_transport_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transport"):
        staging.build_bundle(_spec(tmp_path, transport="carrier-pigeon"))


def test_sandbox_bundle_runs_on_a_node_and_results_come_back(tmp_path: Path) -> None:
    """Run the launcher in a fresh directory (a fake node) and install its results Galaxy-side."""
    spec = _spec(tmp_path, transport="sandbox")
    bundle = staging.build_bundle(spec)
    assert json.loads(json.dumps(bundle.manifest)) == {"inputs": [], "outputs": []}
    node = tmp_path / "node" / "job-1"
    node.mkdir(parents=True)
    safe_extract(bundle.archive, node)
    assert (node / "inputs" / "dataset_1_files" / "index.txt").read_text() == "extra\n"
    script = (node / "work" / "galaxy_7.sh").read_text()
    assert str(tmp_path / "galaxy") not in script.replace(str(tmp_path / "galaxy" / "files") + "/dataset_10", "")
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (node / "outputs" / "dataset_2.dat").read_text() == "in one\nextra\n"
    with tarfile.open(node / staging.WORK_TAR) as tf:
        produced = set(tf.getnames())
    assert "./working/made.txt" in produced and "./galaxy_7.ec" in produced
    assert "./galaxy_7.sh" not in produced  # only what the job created or changed comes back
    placed = staging.install_sandbox_outputs(spec, str(node))
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
    result = subprocess.run(["/bin/sh", staging.LAUNCHER], cwd=node, capture_output=True, text=True)
    assert result.returncode == 5
    assert "broken" in result.stderr


def test_state_roundtrip(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    staging.save_state(spec.working_directory, {"dirac_id": "12", "spec": staging.spec_to_dict(spec)})
    state = staging.load_state(spec.working_directory)
    assert state and staging.spec_from_dict(state["spec"]) == spec
    assert staging.load_state(os.fspath(tmp_path)) is None
