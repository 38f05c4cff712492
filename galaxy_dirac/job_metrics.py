"""Readable titles and units for the DIRAC metrics the runner records on each Galaxy job (metrics plugin ``dirac``).

Galaxy formats a job's metrics (job information page, ``GET /api/jobs/{id}/metrics``) with the formatter of the
metrics plugin whose type matches the metric's plugin name; a plugin it does not know gets the raw name and value
(``site``, ``12.3400000``). Galaxy 26.1 finds plugins only among the modules of ``galaxy.job_metrics.instrumenters``
and has no entry point for third-party ones, so ``register`` adds ours to the app's ``JobMetrics`` from the runner,
in every Galaxy process that loads DiracJobRunner: no Galaxy source and no ``job_metrics`` config to edit.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Dict

from galaxy.job_metrics import formatting
from galaxy.job_metrics.instrumenters import InstrumentPlugin
from galaxy.job_metrics.safety import Safety
from galaxy.util import nice_size

#: The metrics plugin name the runner records under (``job.add_metric(PLUGIN, name, value)``).
PLUGIN = "dirac"

#: Metric name → title shown by Galaxy.
TITLES: Dict[str, str] = {
    "dirac_job_id": "DIRAC job ID",
    "site": "DIRAC site",
    "ce": "Computing element",
    "queue": "Computing element queue",
    "pilot": "DIRAC pilot",
    "wall_clock_seconds": "Wall time on the worker node",
    "cpu_seconds": "CPU time on the worker node",
    "max_memory_mb": "Peak memory on the worker node",
    "reschedule_count": "DIRAC reschedules",
}


def duration(seconds: float) -> str:
    """Seconds as Galaxy writes durations, with a decimal below a minute (a 3.4 s job is not "3 seconds")."""
    if seconds < 60:
        return f"{seconds:.1f} seconds"
    return formatting.seconds_to_str(int(round(seconds)))


def _number(value: Any) -> float:
    """Galaxy hands numeric metrics back as Decimal (Numeric(22, 7) column) or as the string it stored."""
    return float(Decimal(str(value)))


class DiracMetricsFormatter(formatting.JobMetricFormatter):
    """Titles from TITLES; durations, sizes and counts with their units."""

    def format(self, key: str, value: Any) -> formatting.FormattedMetric:
        title = TITLES.get(key, key)
        try:
            if key in ("wall_clock_seconds", "cpu_seconds"):
                return formatting.FormattedMetric(title, duration(_number(value)))
            if key == "max_memory_mb":
                return formatting.FormattedMetric(title, nice_size(_number(value) * 1024 * 1024, binary=True))
            if key in ("dirac_job_id", "reschedule_count"):
                return formatting.FormattedMetric(title, str(int(_number(value))))
        except (ArithmeticError, ValueError):
            pass  # an unexpected value is still shown, as it is
        return formatting.FormattedMetric(title, str(value))


class DiracMetricsPlugin(InstrumentPlugin):
    """Formats the metrics the runner records; collects nothing from the job directory itself.

    Where a job ran (site, CE, pilot) says as much about the infrastructure as Galaxy's ``hostname`` plugin does,
    so it keeps Galaxy's default safety: admins see it, users too with ``expose_potentially_sensitive_job_metrics``.
    """

    plugin_type = PLUGIN
    formatter = DiracMetricsFormatter()
    default_safety = Safety.POTENTIALLY_SENSITVE

    def job_properties(self, job_id: Any, job_directory: str) -> Dict[str, Any]:
        return {}


def register(app: Any) -> None:
    """Make ``app.job_metrics`` format plugin ``dirac`` (idempotent; a no-op on an app without job metrics)."""
    classes = getattr(getattr(app, "job_metrics", None), "plugin_classes", None)
    if isinstance(classes, dict):
        classes.setdefault(PLUGIN, DiracMetricsPlugin)
