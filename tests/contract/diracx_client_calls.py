"""Drive a DiracX-compatible server with the OFFICIAL diracx-client and print what happened as JSON.

This script runs INSIDE the DiracX side venv (`python diracx_client_calls.py`), never in ours: diracx-client is
GPL and is not a dependency of galaxy_dirac. It is the yardstick for "speaks the DiracX 0.7 job API": whatever
server it is pointed at (a real DiracX, or our embedded scheduler) must let the official client do these calls.

Configuration is the client's own, from the environment:
  DIRACX_URL               base URL of the server (the client GETs <url>/.well-known/openid-configuration first)
  DIRACX_CREDENTIALS_PATH  JSON file {"access_token", "refresh_token", "expires_on"}; the client refreshes the
                           access token through the openid-configuration's token_endpoint when fewer than 300 s
                           of validity are left (per expires_on, not the JWT's exp), and rewrites the file.
  DIRACX_CA_PATH           optional CA bundle.

Output on stdout: one JSON document {"ok": true, "client_version", "steps": {...}} or {"ok": false, "error", ...};
the exit status is 0 only when every step worked.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import datetime, timedelta, timezone
from typing import Any


def _plain(obj: Any) -> Any:
    """Turn autorest models (and lists/dicts of them) into JSON-able data with wire names (JobID, Status...)."""
    if hasattr(obj, "serialize") and hasattr(obj, "_attribute_map"):
        return obj.serialize(keep_readonly=True)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def run(job_name_prefix: str) -> dict:
    """Submit two jobs, search them, summarise them, kill one, and search again."""
    from importlib.metadata import version

    from diracx.client.sync import SyncDiracClient

    steps: dict = {}
    # Both JDLs carry the same attribute names: DiracX 0.7 inserts a bulk submission with one executemany, so
    # JDLs with different sets of Jobs-table attributes (JobName, JobGroup, Site...) make it fail with 400.
    jdls = [
        f'Executable = "/bin/echo"; Arguments = "job {i}"; JobName = "{job_name_prefix}-{i}"; '
        f'JobGroup = "{job_name_prefix}"; OutputSandbox = {{"std.out", "std.err"}}; '
        f'StdOutput = "std.out"; StdError = "std.err";'
        for i in (1, 2)
    ]
    with SyncDiracClient() as client:
        inserted = _plain(client.jobs.submit_jdl_jobs(jdls))
        steps["submit"] = inserted
        job_ids = [job["JobID"] for job in inserted]

        id_filter = [{"parameter": "JobID", "operator": "in", "values": job_ids}]
        steps["search"] = _plain(
            client.jobs.search(
                parameters=["JobID", "Status", "MinorStatus", "JobName", "JobGroup", "Owner", "OwnerGroup", "VO"],
                search=id_filter,
                sort=[{"parameter": "JobID", "direction": "asc"}],
            )
        )
        steps["search_all_columns"] = _plain(client.jobs.search(search=id_filter))
        steps["summary"] = _plain(client.jobs.summary(grouping=["Status"], search=id_filter))

        when = (datetime.now(timezone.utc) + timedelta(milliseconds=10)).isoformat()
        update = {
            str(job_ids[0]): {
                when: {"Status": "Killed", "MinorStatus": "Marked for termination", "Source": "galaxy-dirac-test"}
            }
        }
        steps["set_status"] = _plain(client.jobs.set_job_statuses(update))
        steps["search_after_kill"] = _plain(
            client.jobs.search(
                parameters=["JobID", "Status", "MinorStatus"],
                search=id_filter,
                sort=[{"parameter": "JobID", "direction": "asc"}],
            )
        )
        steps["summary_after_kill"] = _plain(client.jobs.summary(grouping=["Status"], search=id_filter))
    return {"ok": True, "client_version": version("diracx-client"), "steps": steps}


def main(argv: list) -> int:
    """Print the JSON result; a failure is reported as JSON too so the caller sees what broke."""
    prefix = argv[1] if len(argv) > 1 else "contract"
    try:
        result = run(prefix)
    except Exception as exc:  # report everything: the caller's assertion shows it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        response = getattr(exc, "response", None)
        if response is not None:
            result["status_code"] = getattr(response, "status_code", None)
            try:
                result["body"] = response.text()
            except Exception:
                result["body"] = None
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
