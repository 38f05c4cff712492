"""A test double of ``htcondor2.Schedd`` — the ONLY thing faked in the HTCondorCE tests.

HTCondor daemons cannot be installed here (neither Debian nor PyPI ships them), so this class stands in at
the schedd boundary: it has ``htcondor2.Schedd``'s method signatures (submit, spool, query, history, act),
expands the caller's real ``htcondor2.Submit`` (its ``queue ... in (...)`` itemdata and ``$(macro)``
expansion via ``Submit.expand``), keeps real ``classad2.ClassAd`` job ads, evaluates constraints and the
jobs' own policy expressions (``periodic_remove``, ``leave_in_queue``) with the real ClassAd evaluator,
returns real ``htcondor2.SubmitResult`` objects, and raises the real ``htcondor2.HTCondorException`` when
"the connection" is down. Everything above it — the backend, submit descriptions, credentials via
``htcondor2.param`` — is the production code.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, List, Optional, Union

import classad2
import htcondor2

_UNIVERSES = {"vanilla": 5, "grid": 9, "local": 12}
_EXPR_KEYS = {
    "leave_in_queue": "LeaveJobInQueue",
    "periodic_remove": "PeriodicRemove",
    "request_cpus": "RequestCpus",
    "request_memory": "RequestMemory",
}
_STRING_KEYS = {
    "executable": "Cmd",
    "arguments": "Args",
    "grid_resource": "GridResource",
    "scitokens_file": "ScitokensFile",
    "x509userproxy": "x509userproxy",
    "output": "Out",
    "error": "Err",
}


class ScheddDouble:
    """In-memory schedd: job ads keyed by (cluster, proc), a history list, and a call log."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[int, int], classad2.ClassAd] = {}
        self.history_ads: list[classad2.ClassAd] = []
        self.next_cluster = 1
        self.transactions = 0
        self.down = False
        self.calls: list[dict[str, Any]] = []  # method + the HTCondor credential settings in effect
        self.spooled: list[int] = []

    # --- helpers for tests ----------------------------------------------------------------------------
    def _enter(self, method: str) -> None:
        self.calls.append(
            {
                "method": method,
                "SCITOKENS_FILE": htcondor2.param.get("SCITOKENS_FILE"),
                "SEC_CLIENT_AUTHENTICATION_METHODS": htcondor2.param.get("SEC_CLIENT_AUTHENTICATION_METHODS"),
                "BEARER_TOKEN_FILE": os.environ.get("BEARER_TOKEN_FILE"),
            }
        )
        if self.down:
            raise htcondor2.HTCondorException("Failed to connect to schedd at <192.0.2.1:9619>")

    def set_job(self, cluster: int, proc: int, **attrs: Any) -> None:
        ad = self.jobs[(cluster, proc)]
        for k, v in attrs.items():
            ad[k] = v
        if "JobStatus" in attrs and "EnteredCurrentStatus" not in attrs:
            ad["EnteredCurrentStatus"] = int(time.time())

    def evaluate_policies(self) -> None:
        """What the schedd does periodically: PeriodicRemove, and drop finished jobs not left in the queue."""
        for key, ad in list(self.jobs.items()):
            remove = ad.get("PeriodicRemove") is not None and ad.eval("PeriodicRemove") is True
            finished = ad["JobStatus"] in (3, 4)
            leave = ad.get("LeaveJobInQueue") is not None and ad.eval("LeaveJobInQueue") is True
            if remove or (finished and not leave):
                if remove:
                    ad["JobStatus"] = 3
                    ad["RemoveReason"] = "The job attribute PeriodicRemove expression evaluated to TRUE"
                self.history_ads.append(self.jobs.pop(key))

    # --- htcondor2.Schedd API -------------------------------------------------------------------------
    def submit(
        self,
        description: htcondor2.Submit,
        count: int = 0,
        spool: bool = False,
        itemdata: Optional[Union[Iterator[str], Iterator[dict]]] = None,
        queue: Optional[str] = None,
    ) -> htcondor2.SubmitResult:
        self._enter("submit")
        self.transactions += 1
        items = list(itemdata) if itemdata is not None else list(description.itemdata() or [])
        if not items:
            items = [{}] * max(count, 1)
        cluster = self.next_cluster
        self.next_cluster += 1
        now = int(time.time())
        for proc, item in enumerate(items):
            job = htcondor2.Submit(dict(description.items()))
            for k, v in (item or {}).items():
                job[k] = v
            job["Cluster"], job["Process"] = str(cluster), str(proc)
            ad = classad2.ClassAd({"ClusterId": cluster, "ProcId": proc, "QDate": now, "EnteredCurrentStatus": now})
            # Spooled submissions wait on hold (SpoolingInput) until spool() delivers the input files.
            ad["JobStatus"] = 5 if spool else 1
            if spool:
                ad["HoldReasonCode"], ad["HoldReasonSubCode"] = 16, 0
                ad["HoldReason"] = "Spooling input data files"
            for key in description:
                value = job.expand(key)
                if key.startswith("MY."):
                    ad[key[3:]] = classad2.ExprTree(value)
                elif key in _EXPR_KEYS:
                    ad[_EXPR_KEYS[key]] = classad2.ExprTree(value)
                elif key in _STRING_KEYS:
                    ad[_STRING_KEYS[key]] = value
                elif key == "universe":
                    ad["JobUniverse"] = _UNIVERSES[value]
                else:
                    ad[f"Submit_{key}"] = value
            self.jobs[(cluster, proc)] = ad
        cluster_ad = classad2.ClassAd({"ClusterId": cluster})
        return htcondor2.SubmitResult(cluster, 0, len(items), cluster_ad, None)

    def spool(self, result: htcondor2.SubmitResult) -> None:
        self._enter("spool")
        self.spooled.append(result.cluster())
        for (cluster, _), ad in self.jobs.items():
            if cluster == result.cluster() and ad["JobStatus"] == 5 and ad.get("HoldReasonCode") == 16:
                ad["JobStatus"] = 1
                ad["EnteredCurrentStatus"] = int(time.time())

    @staticmethod
    def _selects(constraint: Union[str, classad2.ExprTree, None]) -> Callable[[classad2.ClassAd], bool]:
        if constraint in (None, ""):
            return lambda ad: True
        expr = constraint if isinstance(constraint, classad2.ExprTree) else classad2.ExprTree(str(constraint))
        return lambda ad: expr.eval(ad) is True

    @staticmethod
    def _project(ad: classad2.ClassAd, projection: List[str]) -> classad2.ClassAd:
        if not projection:
            return classad2.ClassAd(ad.printOld())
        out = classad2.ClassAd()
        for name in projection:
            if name in ad:
                out[name] = ad.lookup(name)
        return out

    def query(
        self,
        constraint: Union[str, classad2.ExprTree] = "True",
        projection: List[str] = [],  # noqa: B006 - htcondor2.Schedd's own signature
        callback: Optional[Callable[[classad2.ClassAd], Any]] = None,
        limit: int = -1,
        opts: Any = None,
    ) -> List[classad2.ClassAd]:
        self._enter("query")
        selected = self._selects(constraint)
        ads = [self._project(ad, projection) for ad in self.jobs.values() if selected(ad)]
        if limit >= 0:
            ads = ads[:limit]
        return [callback(ad) for ad in ads] if callback else ads

    def history(
        self,
        constraint: Union[str, classad2.ExprTree, None] = None,
        projection: List[str] = [],  # noqa: B006 - htcondor2.Schedd's own signature
        match: int = -1,
        since: Any = None,
    ) -> List[classad2.ClassAd]:
        self._enter("history")
        selected = self._selects(constraint)
        ads = [self._project(ad, projection) for ad in reversed(self.history_ads) if selected(ad)]
        return ads[:match] if match >= 0 else ads

    def act(
        self,
        action: htcondor2.JobAction,
        job_spec: Union[List[str], str, classad2.ExprTree, int],
        reason: Optional[str] = None,
    ) -> classad2.ClassAd:
        self._enter("act")
        if isinstance(job_spec, list):
            keys = {tuple(int(x) for x in spec.split(".")) for spec in job_spec}
            targets = [k for k in self.jobs if k in keys]
        elif isinstance(job_spec, int):
            targets = [k for k in self.jobs if k[0] == job_spec]
        else:
            selected = self._selects(job_spec)
            targets = [k for k, ad in self.jobs.items() if selected(ad)]
        for key in targets:
            ad = self.jobs[key]
            if action == htcondor2.JobAction.Remove:
                ad["JobStatus"] = 3
                ad["RemoveReason"] = reason or ""
                self.history_ads.append(self.jobs.pop(key))
            elif action == htcondor2.JobAction.Hold:
                ad["JobStatus"], ad["HoldReasonCode"], ad["HoldReason"] = 5, 1, reason or "via condor_hold"
            elif action == htcondor2.JobAction.Release:
                ad["JobStatus"] = 1
        return classad2.ClassAd({"TotalSuccess": len(targets), "TotalError": 0})
