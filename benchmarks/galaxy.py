"""Submit→ok of the same small tool through Galaxy's local runner and through galaxy_dirac.runner, in one run.

    python benchmarks/galaxy.py [--runs 5]

Starts the real scheduler, one warm pilot and one Galaxy (side venv, SQLite), like tests/runner/test_galaxy.py.
Target: the DIRAC path within local + 1 s with a warm pilot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import WMSServer  # noqa: E402
from tests.galaxy_server import GalaxyServer  # noqa: E402
from tests.galaxy_stack import Pilot  # noqa: E402


def submit_to_ok(galaxy: GalaxyServer, history: str, tool_id: str, first: str, second: str) -> float:
    started = time.monotonic()
    run = galaxy.run_tool(
        history, tool_id, {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
    )
    job = galaxy.wait_job(run["jobs"][0]["id"], timeout=300)
    elapsed = time.monotonic() - started
    if job["state"] != "ok":
        raise SystemExit(f"{tool_id}: job ended {job['state']}: {job.get('stderr')}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gd-bench-") as tmp:
        home = Path(tmp)
        wms = WMSServer(home / "wms", maintenance_interval=5).start()
        token_file = home / "runner.token"
        token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
        galaxy = GalaxyServer(
            home / "galaxy", env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)}
        )
        pilot = None
        try:
            galaxy.start()
            print(f"galaxy startup: {galaxy.startup_seconds[-1]:.1f} s")
            pilot = Pilot(wms, wms.token("pilot"), home / "pilot")
            history = galaxy.new_history("bench")
            first = galaxy.upload(history, "a\n")
            second = galaxy.upload(history, "b\n")
            submit_to_ok(galaxy, history, "gd_cat", first, second)  # warm up both paths
            submit_to_ok(galaxy, history, "gd_cat_local", first, second)
            results = {"local": [], "dirac": []}
            for _ in range(args.runs):
                results["local"].append(submit_to_ok(galaxy, history, "gd_cat_local", first, second))
                results["dirac"].append(submit_to_ok(galaxy, history, "gd_cat", first, second))
            for name, values in results.items():
                print(
                    f"{name:6s} submit->ok: median {statistics.median(values):.2f} s "
                    f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
                )
            delta = statistics.median(results["dirac"]) - statistics.median(results["local"])
            print(f"dirac - local: {delta:+.2f} s (target <= +1.00 s)")
        finally:
            if pilot:
                pilot.stop()
            galaxy.stop()
            wms.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
