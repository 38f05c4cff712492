"""The runner's job bundle under DIRAC 9's own JobWrapper: outputs back byte for byte, slots, sandbox limits.

The bundle and JDL are what ``DiracJobRunner`` makes (``staging.build_bundle`` and the same JDL attributes), run by
DIRAC's JobAgent steps and JobWrapper in a clean node directory (``run_under_dirac``); the runner's own
``install_results`` then takes the output sandbox DIRAC packed. Galaxy's job files API (transport ``galaxy``) is
exercised under the same JobWrapper in ``tests/e2e/test_diracx_galaxy.py``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from galaxy_dirac import jdl as jdl_mod
from galaxy_dirac import staging
from galaxy_dirac.archive import sha256_file
from galaxy_dirac.states import OUTPUT_SANDBOX_TOO_LARGE
from tests.dirac_node import run_under_dirac
from tests.runner.test_staging import _spec

pytestmark = [pytest.mark.dirac, pytest.mark.slow]


def _submit(spec: staging.JobSpec, node: Path, **attributes: object):
    """Build the bundle and the runner's JDL for it, and run it on a DIRAC node."""
    bundle = staging.build_bundle(spec)
    sha, _size = sha256_file(bundle.archive)
    pfn = f"SB:SandboxSE|/S3/sandboxes/galaxy/galaxy_user/sha256:{sha}.tar.bz2"
    text = jdl_mod.render(
        {
            "Executable": staging.LAUNCHER,
            "JobName": f"galaxy-{spec.galaxy_job_id}-test",
            "InputSandbox": [pfn],
            "OutputSandbox": bundle.output_sandbox,
            "StdOutput": staging.STDOUT,
            "StdError": staging.STDERR,
            **attributes,
        }
    )
    return run_under_dirac(text, {pfn: bundle.archive}, node, 4242, processors=4)


def _installed(spec: staging.JobSpec, run) -> list:
    assert run.output_sandbox is not None, run.log[-3000:]
    return staging.install_results(spec, lambda: [io.BytesIO(run.output_sandbox.read_bytes())])


def test_sandbox_transport_outputs_come_back_byte_for_byte(dirac_node_venv, tmp_path: Path) -> None:
    spec = _spec(tmp_path / "galaxy-side", transport="sandbox")
    data = os.urandom(300_000) + b"\x00\xff binary, not text\n"
    Path(spec.inputs[0]).write_bytes(data)
    spec.processors, spec.memory_mb = 2, 3000
    out = Path(spec.outputs[0])
    Path(spec.job_script).write_text(
        "#!/bin/sh\n"
        f"cat {spec.inputs[0]} {spec.input_extra_dirs[0]}/index.txt > {out}\n"
        f'echo "slots=$GALAXY_SLOTS memory=$GALAXY_MEMORY_MB" > {spec.working_directory}/working/made.txt\n'
        f"echo 0 > {spec.exit_code_file}\n"
    )
    run = _submit(spec, tmp_path / "node", NumberOfProcessors=2, MaxRAM=3000)
    assert run.final_status == "Done", f"{run.statuses}\n{run.stderr}\n{run.log[-3000:]}"
    assert _installed(spec, run) == spec.outputs
    assert out.read_bytes() == data + b"extra\n"
    # DIRAC's JobAgent granted 2 of the slot's 4 cores (DIRAC_JOB_PROCESSORS); DIRAC gives no memory figure.
    assert (Path(spec.working_directory) / "working" / "made.txt").read_text() == "slots=2 memory=3000\n"
    assert (Path(spec.working_directory) / "galaxy_7.ec").read_text() == "0\n"


def test_outputs_over_the_destination_limit_fail_clearly_instead_of_being_lost(dirac_node_venv, tmp_path) -> None:
    """Without our limit DIRAC's own (10 MiB) reschedules the job and drops the outputs; ours fails it, saying why."""
    spec = _spec(tmp_path / "galaxy-side", transport="sandbox")
    spec.max_output_bytes = 1_000_000
    out = Path(spec.outputs[0])
    Path(spec.job_script).write_text(
        f"#!/bin/sh\nhead -c 3000000 /dev/urandom > {out}\necho 0 > {spec.exit_code_file}\n"
    )
    run = _submit(spec, tmp_path / "node")
    assert run.final_status == "Failed", run.statuses
    assert run.payload_exit_code == 83
    last = [line for line in run.stderr.splitlines() if line.startswith("galaxy-dirac: ")][-1]
    assert last.startswith(f"galaxy-dirac: {OUTPUT_SANDBOX_TOO_LARGE}: the job's outputs are 3.0 MB"), run.stderr
    assert "output sandbox limit of 1.0 MB" in last and "transport: galaxy" in last
    with pytest.raises(staging.ResultsMissing):
        _installed(spec, run)
