"""The plug-in's `metrics` (plugin.py): called by the supervisor at each /metrics scrape
with a `MetricsView` of its own figures. Outcomes reach the supervisor through its
children's heartbeats, so a count shows a moment after the job finished.

The core already exports `jobvisor_jobs_total{job_type, outcome}` for every type; this
counter only shows how a plug-in derives metrics of its own from the view.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from workers.core.plugins import MetricsView

JOB_TYPE = "example_wordcount"


def collect(view: MetricsView) -> Iterator[Metric]:
    # Exposed as example_wordcount_jobs_total.
    jobs = CounterMetricFamily("example_wordcount_jobs",
                               "Finished example_wordcount attempts by outcome "
                               "(completed, failed, retried, timeout, ...)",
                               labels=["outcome"])
    per_outcome: dict[str, float] = {}
    for (job_type, outcome, _code), n in view.outcomes.items():
        if job_type == JOB_TYPE:
            per_outcome[outcome] = per_outcome.get(outcome, 0) + n
    for outcome, n in sorted(per_outcome.items()):
        jobs.add_metric([outcome], n)
    yield jobs
