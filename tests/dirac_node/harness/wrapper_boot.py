"""Runs INSIDE the DIRAC side venv: starts DIRAC's real job wrapper (the JobWrapperTemplate that the JobAgent
wrote as ``Wrapper_<id>``) after installing the harness's transport replacement (intercept.py).

Usage (the ``python`` of the Job<id> script that DIRAC's createJobWrapper writes):
``python wrapper_boot.py <state dir> <Wrapper_id> [wrapper arguments...]``.
Besides the transport, it only observes: the payload's exit code as the JobWrapper saw it, and the payload's
StdOutput/StdError files, copied before DIRAC's own clean-up removes the job directory.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import intercept


def main() -> None:
    state_dir, wrapper, *args = sys.argv[1:]
    state = intercept.State(state_dir)
    intercept.install(state)

    from DIRAC.WorkloadManagementSystem.JobWrapper.JobWrapper import JobWrapper

    post_process = JobWrapper.postProcess
    clean_up = JobWrapper._JobWrapper__cleanUp

    def observed_post_process(self, payloadStatus, *rest, **kwargs):  # noqa: N803 - DIRAC's argument name
        (state.dir / "payload.json").write_text(json.dumps({"exit_code": payloadStatus}))
        return post_process(self, payloadStatus, *rest, **kwargs)

    def observed_clean_up(self):
        job_dir = Path(self.jobIDPath)
        (state.dir / "job_dir.json").write_text(
            json.dumps(sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*")) if job_dir.exists() else [])
        )
        for name, kept in ((self.outputFile, "payload.stdout"), (self.errorFile, "payload.stderr")):
            if (job_dir / name).is_file():
                shutil.copyfile(job_dir / name, state.dir / kept)
        return clean_up(self)

    JobWrapper.postProcess = observed_post_process
    JobWrapper._JobWrapper__cleanUp = observed_clean_up
    sys.argv = [wrapper, *args]
    runpy.run_path(wrapper, run_name="__main__")


if __name__ == "__main__":
    main()
