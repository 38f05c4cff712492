"""Runs INSIDE the DIRAC side venv, in the node directory: one job through DIRAC 9's worker-node code.

Usage: ``python jobagent.py <state dir>`` (``<state dir>/request.json`` says what to run; see
tests/dirac_node/__init__.py). What a pilot's JobAgent does for one matched job, with DIRAC's own code:

1. the JDL, if it does not come from a JobDB yet, is prepared as DIRAC's JobDB.insertNewJobIntoDB does
   (JobManifest check and defaults, JobID, Owner/OwnerGroup/VO, JobRequirements);
2. JobAgent._getJDLParameters turns it into the job parameters, _extractValuesFromJobParams into processors,
   _setCEDict completes the resource description of an InProcess CE; the JobAgent's status reports;
3. DIRAC_JOB_PROCESSORS goes into ExecutionEnvironment and DIRAC's createJobWrapper writes the real
   JobWrapperTemplate (Wrapper_<id>, its .json and the Job<id> script), exactly as JobAgent._submitJob does;
4. DIRAC's InProcessComputingElement runs Job<id>, i.e. the JobWrapperTemplate: initialize →
   transferInputSandbox → execute (payload + Watchdog) → processJobOutputs → finalize, rescheduling on the
   failures where DIRAC reschedules. Its Python is wrapper_boot.py, which replaces only the transport
   (intercept.py) before running the unmodified template;
5. JobAgent._checkSubmittedJobs' rule: a payload that failed while the job is still Running becomes Failed.

The result (wrapper exit code) is written to ``<state dir>/result.json``; everything reported is in rpc.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import intercept

HERE = Path(__file__).resolve().parent


def write_pilot_cfg(request: dict, path: Path) -> None:
    """The local configuration a pilot leaves for its JobAgent and job wrappers (no Configuration Server)."""
    from diraccfg import CFG

    options = {
        "/LocalSite/Site": request["site"],
        "/LocalSite/GridCE": request["grid_ce"],
        "/LocalSite/CEQueue": request["queue"],
        "/LocalSite/PilotReference": request["pilot_reference"],
        "/LocalSite/CPUNormalizationFactor": "1.0",
        "/DIRAC/Security/UseServerCertificate": "no",
        # What a pilot sets, so that every job wrapper loads the pilot's configuration too.
        "/AgentJobRequirements/ExtraOptions": "pilot.cfg",
        "/Systems/WorkloadManagement/JobWrapper/PollingTime": str(request["watchdog_polling_seconds"]),
        f"/Registry/Groups/{request['owner_group']}/VO": request["vo"],
        f"/Registry/Groups/{request['owner_group']}/Users": request["owner"],
        f"/Registry/Users/{request['owner']}/DN": f"/O=GalaxyDirac/CN={request['owner']}",
    }
    if request.get("output_sandbox_limit") is not None:
        options["/Systems/WorkloadManagement/JobWrapper/OutputSandboxLimit"] = str(request["output_sandbox_limit"])
    if request.get("keep_job_dir"):
        options["/Systems/WorkloadManagement/JobWrapper/CleanUpFlag"] = "no"
    cfg = CFG()
    for option, value in options.items():
        section, _, name = option.rpartition("/")
        node = cfg
        for part in section.strip("/").split("/"):
            if not node.isSection(part):
                node.createNewSection(part)
            node = node[part]
        node.setOption(name, value)
    cfg.writeToFile(str(path))


def prepare_like_jobdb(jdl: str, job_id: int, owner: str, group: str, vo: str) -> str:
    """The JDL as DIRAC's JobDB stores it at submission (JobDB.insertNewJobIntoDB), which the Matcher hands out."""
    from DIRAC.Core.Utilities.ClassAd.ClassAdLight import ClassAd
    from DIRAC.Core.Utilities.ReturnValues import returnValueOrRaise
    from DIRAC.WorkloadManagementSystem.DB.JobDBUtils import (
        checkAndAddOwner,
        checkAndPrepareJob,
        createJDLWithInitialStatus,
    )

    manifest = returnValueOrRaise(checkAndAddOwner(jdl, owner, group))
    manifest.setOption("JobID", job_id)
    job_jdl = manifest.dumpAsJDL().replace("%j", str(job_id))
    class_ad_job = ClassAd(job_jdl)
    class_ad_req = ClassAd("[]")
    if not class_ad_job.isOK():
        raise ValueError(f"Error in JDL syntax: {jdl}")
    class_ad_job.insertAttributeInt("JobID", job_id)
    returnValueOrRaise(checkAndPrepareJob(job_id, class_ad_job, class_ad_req, owner, group, {}, vo))
    return createJDLWithInitialStatus(class_ad_job, class_ad_req, [], {}, "Received", "Job accepted")


def main() -> int:
    state = intercept.State(sys.argv[1])
    request = state.request
    intercept.install(state)
    node = Path.cwd()
    write_pilot_cfg(request, node / "pilot.cfg")
    log_level = request["log_level"]
    sys.argv = [sys.argv[0], "--cfg", "pilot.cfg", "-o", f"LogLevel={log_level}"]
    from DIRAC.Core.Base.Script import Script

    Script.parseCommandLine(ignoreErrors=True)

    from DIRAC import gConfig, gLogger
    from DIRAC.Core.Utilities.ClassAd.ClassAdLight import ClassAd
    from DIRAC.Resources.Computing.InProcessComputingElement import InProcessComputingElement
    from DIRAC.WorkloadManagementSystem.Agent.JobAgent import JobAgent
    from DIRAC.WorkloadManagementSystem.Client.JobReport import JobReport
    from DIRAC.WorkloadManagementSystem.Client.JobStatus import FAILED, RUNNING
    from DIRAC.WorkloadManagementSystem.DB.JobDBUtils import fixJDL
    from DIRAC.WorkloadManagementSystem.JobWrapper.JobWrapper import RESCHEDULED
    from DIRAC.WorkloadManagementSystem.Utilities.Utils import createJobWrapper

    job_id = int(request["job_id"])
    jdl = fixJDL(request["jdl"])
    if not ClassAd(jdl).lookupAttribute("JobID"):
        jdl = prepare_like_jobdb(jdl, job_id, request["owner"], request["owner_group"], request["vo"])
    (state.dir / "matched.jdl").write_text(jdl)

    # The JobAgent's own per-job steps, from JobAgent.execute, with the agent's state as attributes.
    agent = types.SimpleNamespace(
        log=gLogger.getSubLogger("JobAgent"),
        extraOptions=gConfig.getValue("/AgentJobRequirements/ExtraOptions", ""),
        pilotReference=request["pilot_reference"],
        cpuPower=gConfig.getValue("/LocalSite/CPUNormalizationFactor", 0.0),
        pilotInfoReportedFlag=False,
    )
    ce = InProcessComputingElement("InProcess")
    ce.setParameters(
        {
            "Site": request["site"],
            "GridCE": request["grid_ce"],
            "Queue": request["queue"],
            "NumberOfProcessors": request["processors"],
            "MaxRAM": request["max_ram_mb"],
            "CPUTime": request["cpu_time"],
        }
    )
    ce_dict = ce.getDescription()["Value"]
    JobAgent._setCEDict(agent, ce_dict)
    report = JobReport(job_id, f"JobAgent@{request['site']}")
    agent.jobs = {str(job_id): {"JobReport": report}}
    parameters = JobAgent._getJDLParameters(agent, jdl)
    if not parameters["OK"]:
        report.setJobStatus(status=FAILED, minorStatus="Could Not Extract JDL Parameters")
        return _done(state, None, "Could Not Extract JDL Parameters")
    params = parameters["Value"]
    submission = JobAgent._extractValuesFromJobParams(agent, params)
    if not submission["OK"]:
        report.setJobStatus(status=FAILED, minorStatus=submission["Message"])
        return _done(state, None, submission["Message"])
    processors = submission["Value"]["processors"]
    report.setJobStatus(minorStatus="Job Received by Agent", sendFlag=False)
    report.setJobStatus(minorStatus="Installing Software", sendFlag=False)
    software = JobAgent._checkInstallSoftware(agent, params, ce_dict)
    if not software["OK"]:  # as JobAgent.execute: reschedule the job (and the agent stops)
        JobAgent._rescheduleFailedJob(agent, str(job_id), software["Message"] or "Failed software installation")
        return _done(state, None, f"software installation failed: {software['Message']}")

    # JobAgent._submitJob
    if isinstance(params.get("ExecutionEnvironment"), str):
        params["ExecutionEnvironment"] = params["ExecutionEnvironment"].split(";")
    params.setdefault("ExecutionEnvironment", []).append(f"DIRAC_JOB_PROCESSORS={processors:d}")
    boot = f"{sys.executable} {HERE / 'wrapper_boot.py'} {state.dir}"
    wrapper = createJobWrapper(
        jobID=str(job_id),
        jobParams=params,
        resourceParams=ce_dict,
        optimizerParams={},
        extraOptions=agent.extraOptions,
        pythonPath=boot,
        log=agent.log,
        logLevel=log_level,
    )
    if not wrapper["OK"]:  # JobAgent.execute: "Job submission failed" → reschedule
        JobAgent._rescheduleFailedJob(agent, str(job_id), f"Job submission failed: {wrapper['Message']}")
        return _done(state, None, f"createJobWrapper: {wrapper['Message']}")
    files = wrapper["Value"]
    report.setJobStatus(minorStatus="Submitting To CE")
    result = ce.submitJob(
        files["JobExecutablePath"],
        "",
        numberOfProcessors=processors,
        inputs=[files["JobWrapperPath"], files["JobWrapperConfigPath"]],
    )
    # JobAgent._checkSubmittedJobs
    if not result["OK"]:
        JobAgent._rescheduleFailedJob(agent, str(job_id), result["Message"])
        return _done(state, None, result["Message"])
    exit_code = result["Value"]
    if exit_code and exit_code != RESCHEDULED and state.last_status() == RUNNING:
        report.setJobStatus(status=FAILED, minorStatus="Payload failed", sendFlag=False)
    report.commit()
    job_dir = node / str(job_id)
    for name, kept in ((params.get("StdOutput", "std.out"), "payload.stdout"), (params.get("StdError", "std.err"),
                                                                               "payload.stderr")):
        if (job_dir / name).is_file() and not (state.dir / kept).exists():
            shutil.copyfile(job_dir / name, state.dir / kept)
    return _done(state, exit_code, "")


def _done(state: intercept.State, exit_code, message: str) -> int:
    (state.dir / "result.json").write_text(json.dumps({"wrapper_exit_code": exit_code, "error": message}))
    return 0


if __name__ == "__main__":
    os.umask(0o22)
    sys.exit(main())
