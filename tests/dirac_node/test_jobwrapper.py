"""What DIRAC 9.1.22's real JobWrapper does with a job: the facts our payload is shaped after (README.md here).

Each test runs a tiny shell-script job through DIRAC's own worker-node code (tests/dirac_node) and checks what
came back: statuses, the payload's environment, the output sandbox archive DIRAC built.
"""

from __future__ import annotations

import io
import pathlib
import tarfile
from typing import Dict

import pytest

from tests.dirac_node import SITE, DiracRun, run_under_dirac

pytestmark = [pytest.mark.dirac, pytest.mark.slow]

ISB = "SB:SandboxSE|/S3/sandboxes/galaxy/test/isb.tar.bz2"

JOB_SH = """#!/bin/sh
# Reads the input the sandbox brought, writes outputs as files and in a directory, exits with $1.
echo "payload running in $(pwd)"
env | sort > env.txt
cp job.info job-info.txt
mkdir -p outputs/sub
tr a-z A-Z < input.txt > result.txt
cp result.txt outputs/dataset_2.dat
echo nested > outputs/sub/extra.txt
echo "payload says goodbye on stderr" >&2
exit "${1:-0}"
"""


def _sandbox(path: pathlib.Path, files: Dict[str, str]) -> pathlib.Path:
    """An input sandbox archive (bzip2 tar, as DIRAC's clients make them) with `files`."""
    with tarfile.open(path, "w:bz2") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def _jdl(exit_code: int, output_sandbox: str, extra: str = "") -> str:
    return f"""[
    Executable = "job.sh";
    Arguments = "{exit_code}";
    JobName = "dirac-node-test";
    StdOutput = "std.out";
    StdError = "std.err";
    InputSandbox = {{"{ISB}"}};
    OutputSandbox = {output_sandbox};
    {extra}
]"""


def _run(tmp_path: pathlib.Path, jdl: str, job_id: int, **kwargs: object) -> DiracRun:
    isb = _sandbox(tmp_path / "isb.tar.bz2", {"job.sh": JOB_SH, "input.txt": "galaxy on dirac\n"})
    return run_under_dirac(jdl, {ISB: isb}, tmp_path / "node", job_id, **kwargs)


def _env(run: DiracRun) -> Dict[str, str]:
    lines = run.output_file("env.txt").decode().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_successful_job_is_done_with_its_outputs_and_dirac_environment(
    dirac_node_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    run = _run(
        tmp_path,
        _jdl(
            0,
            '{"std.out", "std.err", "env.txt", "job-info.txt", "result.txt"}',
            'NumberOfProcessors = 2; MaxRAM = 3000; ExecutionEnvironment = {"FOO=bar%20baz"};',
        ),
        4321,
        processors=4,
    )
    assert (run.payload_exit_code, run.wrapper_exit_code) == (0, 0), run.log[-3000:]
    assert (run.final_status, run.final_minor_status) == ("Done", "Execution Complete")
    majors = [s["Status"] for s in run.statuses if s.get("Status")]
    assert majors[0] == "Running" and majors[-1] == "Done" and "Completing" in majors
    assert {"Downloading InputSandbox", "Application", "Output Sandbox Uploaded"} <= {
        s.get("MinorStatus") for s in run.statuses
    }
    assert sorted(run.output_members()) == ["env.txt", "job-info.txt", "result.txt", "std.err", "std.out"]
    assert run.output_file("result.txt") == b"GALAXY ON DIRAC\n"
    assert b"payload running in" in run.output_file("std.out")
    assert run.stderr.strip() == "payload says goodbye on stderr"

    env = _env(run)
    assert env["JOBID"] == "4321"
    assert env["DIRACSITE"] == SITE
    assert env["DIRAC_JOB_PROCESSORS"] == "2"  # the JDL's NumberOfProcessors, set by the JobAgent
    assert env["DIRAC_PROCESSORS"] == "1"  # ceArgs["Processors"], which no DIRAC 9.1 CE sets
    assert env["DIRAC_WHOLENODE"] == "False"
    assert env["PWD"] == str(run.node_dir / "4321")
    assert env["HOME"] == str(run.node_dir / "home")
    assert not [name for name in env if name.startswith(("GALAXY", "PYTEST")) or name in ("PYTHONPATH", "VIRTUAL_ENV")]
    assert env["FOO"] == "bar baz"  # ExecutionEnvironment entries, URL-unquoted
    assert not [name for name in env if "MEMORY" in name or "RAM" in name]  # MaxRAM does not reach the env

    # job.info: the JDL as "/<Name> = <value>" lines (only the first one carries DIRAC's intended "/Job" prefix).
    info = run.output_file("job-info.txt").decode().splitlines()
    assert info[0].startswith("/Job/")
    assert "/MaxRAM = 3000" in info and "/NumberOfProcessors = 2" in info
    assert "/ExecutionEnvironment = FOO=bar%20baz, DIRAC_JOB_PROCESSORS=2" in info


def test_nonzero_exit_fails_the_job_but_still_returns_its_sandbox(
    dirac_node_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    run = _run(tmp_path, _jdl(3, '{"std.err", "result.txt", "missing.txt"}'), 77)
    assert run.payload_exit_code == 3
    assert (run.final_status, run.final_minor_status) == ("Failed", "Application Finished With Errors")
    assert not run.rescheduled
    assert sorted(run.output_members()) == ["result.txt", "std.err"]
    assert run.parameters["OutputSandboxMissingFiles"] == "missing.txt"


def test_directory_entry_is_a_nested_tar_with_the_node_absolute_path(
    dirac_node_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    run = _run(tmp_path, _jdl(0, '{"outputs", "outputs/dataset_2.dat"}'), 1234)
    assert run.final_status == "Done", run.log[-3000:]
    # A file entry is stored under its basename; a directory entry as <name>.tar made by `tar cf /abs/dir.tar /abs/dir`.
    assert sorted(run.output_members()) == ["dataset_2.dat", "outputs.tar"]
    with tarfile.open(fileobj=io.BytesIO(run.output_file("outputs.tar"))) as inner:
        names = sorted(inner.getnames())
    prefix = str(run.node_dir / "1234" / "outputs").lstrip("/")
    assert names == [prefix, f"{prefix}/dataset_2.dat", f"{prefix}/sub", f"{prefix}/sub/extra.txt"]


def test_output_sandbox_over_the_limit_reschedules_the_job(
    dirac_node_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    run = _run(tmp_path, _jdl(0, '{"std.out", "env.txt", "result.txt"}'), 5, output_sandbox_limit=200)
    assert run.payload_exit_code == 0
    assert run.output_sandbox is None
    assert "Attempting to upload Sandbox with limit: 200" in run.log
    # No SE to put the oversized sandbox on as output data: processJobOutputs fails and DIRAC reschedules.
    assert run.rescheduled
    assert (run.final_status, run.final_minor_status) == ("Rescheduled", "Uploading Outputs")
    assert run.wrapper_exit_code == 2


def test_software_dist_module_diracx_puts_in_every_jdl_reschedules_the_job(
    dirac_node_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # DiracX 0.7's default Operations add SoftwareDistModule = "LocalSoftwareDist" to each JDL it stores.
    run = _run(tmp_path, _jdl(0, '{"std.out"}', 'SoftwareDistModule = "LocalSoftwareDist";'), 9)
    assert run.payload_exit_code is None  # the JobAgent never started the job wrapper
    assert run.rescheduled
    assert run.final_status == "Rescheduled"
    assert "No module LocalSoftwareDist found" in run.statuses[-1]["ApplicationStatus"]
