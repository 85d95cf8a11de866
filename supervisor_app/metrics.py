"""Prometheus metrics, built at scrape time from the supervisor's own state.

Children report job outcomes (counts and duration buckets) through their heartbeat pipe;
the supervisor adds them up, so one `/metrics` covers every process. Plug-ins add their
own metrics (`Plugin.metrics`) from a read-only view of the same figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from supervisor_app.children import STATES
from workers.core import plugins
from workers.core.plugins import MetricsView
from workers.core.queue import STATUSES
from workers.core.runtime import DURATION_BUCKETS

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor

# The core's own; a plug-in's come on top (the learning plug-in's: analysis_jobs_inflight,
# ai_worker_retry_total, ai_worker_failed_total).
METRIC_NAMES = (
    "jobvisor_queue_depth", "jobvisor_queue_lag_seconds", "jobvisor_job_duration_seconds",
    "jobvisor_jobs_total", "jobvisor_queue_unserved", "jobvisor_worker_processes",
    "jobvisor_worker_restarts_total",
    "jobvisor_worker_resident_memory_bytes", "jobvisor_worker_cpu_seconds_total",
    "jobvisor_capacity_slots", "jobvisor_gpu_memory_free_bytes",
    "jobvisor_gpu_memory_total_bytes", "jobvisor_memory_available_bytes",
    "jobvisor_cpus", "jobvisor_reserve_bytes", "jobvisor_up",
    "jobvisor_model_limit", "jobvisor_model_in_flight", "jobvisor_model_latency_seconds",
    "jobvisor_model_baseline_seconds", "jobvisor_model_queue_share",
    "jobvisor_model_requests_total", "jobvisor_model_busy_total",
    "jobvisor_model_timeouts_total",
)


class SupervisorCollector:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        slots = [s for group in list(sup.slots.values()) for s in list(group)]
        yield GaugeMetricFamily("jobvisor_up", "1 while the supervisor loop runs", value=1)
        yield from self._outcomes()
        yield from self._queue()

        procs = GaugeMetricFamily("jobvisor_worker_processes", "Child processes by state",
                                  labels=["job_type", "state"])
        for job_type in sorted({s.job_type for s in slots} | set(sup.plan)):
            for state in STATES:
                procs.add_metric([job_type, state], sum(
                    1 for s in slots if s.job_type == job_type and s.state == state))
        yield procs

        restarts = CounterMetricFamily("jobvisor_worker_restarts", "Child restarts",
                                       labels=["job_type"])
        for job_type, n in sorted(sup.restarts.items()):
            restarts.add_metric([job_type], n)
        yield restarts

        rss = GaugeMetricFamily("jobvisor_worker_resident_memory_bytes",
                                "Resident memory of each child", labels=["job_type", "slot"])
        cpu = CounterMetricFamily("jobvisor_worker_cpu_seconds", "CPU seconds of each child",
                                  labels=["job_type", "slot"])
        for s in slots:
            if s.proc is not None:
                rss.add_metric([s.job_type, str(s.index)], s.rss)
                cpu.add_metric([s.job_type, str(s.index)], s.cpu_seconds)
        yield rss
        yield cpu

        plan = GaugeMetricFamily("jobvisor_capacity_slots", "Processes planned per type",
                                 labels=["job_type"])
        for job_type, entry in sorted(sup.plan.items()):
            plan.add_metric([job_type], entry.processes)
        yield plan
        yield from self._readings()
        yield from self._models()

    def _outcomes(self) -> Iterator[Metric]:
        outcomes = dict(self.sup.outcomes)
        jobs = CounterMetricFamily("jobvisor_jobs", "Finished job attempts by outcome",
                                   labels=["job_type", "outcome"])
        duration = HistogramMetricFamily("jobvisor_job_duration_seconds",
                                         "Handler run time per attempt",
                                         labels=["job_type", "outcome"])
        per_outcome: dict[tuple[str, str], list[float]] = {}
        for (job_type, outcome, _code), row in outcomes.items():
            acc = per_outcome.setdefault((job_type, outcome), [0.0] * len(row))
            for i, v in enumerate(row):
                acc[i] += v
        for (job_type, outcome), row in sorted(per_outcome.items()):
            jobs.add_metric([job_type, outcome], row[0])
            buckets = [(f"{b:g}", row[2 + i]) for i, b in enumerate(DURATION_BUCKETS)]
            buckets.append(("+Inf", row[0]))
            duration.add_metric([job_type, outcome], buckets, sum_value=row[1])
        yield jobs
        yield duration

    def _queue(self) -> Iterator[Metric]:
        stats = dict(self.sup.queue_stats)
        depth = GaugeMetricFamily("jobvisor_queue_depth", "Jobs by type and status",
                                  labels=["job_type", "status"])
        lag = GaugeMetricFamily("jobvisor_queue_lag_seconds",
                                "Age of the oldest visible queued job", labels=["job_type"])
        for job_type, c in sorted(stats.items()):
            for status in STATUSES:
                depth.add_metric([job_type, status], c.get(status, 0))
            lag.add_metric([job_type], c.get("oldest_queued_s", 0.0))
        unserved = GaugeMetricFamily(
            "jobvisor_queue_unserved",
            "1 while a type has queued jobs and no live supervisor serves it",
            labels=["job_type"])
        for job_type in sorted(self.sup.duties.unserved):
            unserved.add_metric([job_type], 1)
        yield depth
        yield lag
        yield unserved

    def _readings(self) -> Iterator[Metric]:
        r = self.sup.readings
        gpu_free = GaugeMetricFamily("jobvisor_gpu_memory_free_bytes", "Free GPU memory",
                                     labels=["gpu"])
        gpu_total = GaugeMetricFamily("jobvisor_gpu_memory_total_bytes", "GPU memory",
                                      labels=["gpu"])
        mem = GaugeMetricFamily("jobvisor_memory_available_bytes",
                                "Available RAM (bounded by the cgroup limit)")
        cpus = GaugeMetricFamily("jobvisor_cpus", "CPUs this supervisor may use")
        reserve = GaugeMetricFamily("jobvisor_reserve_bytes", "Reserves kept free",
                                    labels=["resource"])
        if r is not None:
            for g in r.gpus:
                gpu_free.add_metric([str(g.index)], g.free_bytes)
                gpu_total.add_metric([str(g.index)], g.total_bytes)
            mem.add_metric([], r.memory_available)
            cpus.add_metric([], r.cpu_count)
        res = self.sup.cfg.supervisor.reserve
        reserve.add_metric(["memory"], res.memory)
        reserve.add_metric(["gpu_memory"], res.gpu_memory)
        yield from (gpu_free, gpu_total, mem, cpus, reserve)


    def _models(self) -> Iterator[Metric]:
        """Each model endpoint's shared limit (workers/core/model_gate.py), as the duties
        last read it from jobvisor.model_limits and the tokens held."""
        labels = ["endpoint", "model"]
        limit = GaugeMetricFamily("jobvisor_model_limit",
                                  "Concurrent requests allowed per model endpoint", labels=labels)
        in_flight = GaugeMetricFamily("jobvisor_model_in_flight",
                                      "Requests holding a token of the endpoint now", labels=labels)
        latency = GaugeMetricFamily("jobvisor_model_latency_seconds",
                                    "Recent round trip per request (moving average)",
                                    labels=labels)
        baseline = GaugeMetricFamily("jobvisor_model_baseline_seconds",
                                     "Shortest recent service time (the no-queue baseline)",
                                     labels=labels)
        share = GaugeMetricFamily("jobvisor_model_queue_share",
                                  "Recent time waiting in the server per second of service",
                                  labels=labels)
        requests = CounterMetricFamily("jobvisor_model_requests", "Requests to the endpoint",
                                       labels=labels)
        busy = CounterMetricFamily("jobvisor_model_busy", "503/429 answers (server busy)",
                                   labels=labels)
        timeouts = CounterMetricFamily("jobvisor_model_timeouts", "Requests that timed out",
                                       labels=labels)
        for e in list(self.sup.model_endpoints):
            key = [e["endpoint"], e["model"]]
            limit.add_metric(key, e["limit"])
            in_flight.add_metric(key, e["in_flight"])
            for family, name in ((latency, "latency_s"), (baseline, "baseline_s"),
                                 (share, "wait_share")):
                if e[name] is not None:
                    family.add_metric(key, e[name])
            requests.add_metric(key, e["requests"])
            busy.add_metric(key, e["busy"])
            timeouts.add_metric(key, e["timeouts"])
        yield from (limit, in_flight, latency, baseline, share, requests, busy, timeouts)


class PluginCollector:
    """Each plug-in's `metrics(view)`, over a snapshot of the supervisor's figures."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.hooks = [plugins.resolve(p.metrics, what=f"plug-in {p.name!r} metrics")
                      for p in plugins.installed() if p.metrics]

    def collect(self) -> Iterator[Metric]:
        if not self.hooks:
            return
        inflight: dict[str, int] = {}
        for group in list(self.sup.slots.values()):
            for s in list(group):
                inflight[s.job_type] = inflight.get(s.job_type, 0) + s.inflight
        view = MetricsView(inflight=inflight, outcomes={
            key: row[0] for key, row in dict(self.sup.outcomes).items()})
        for hook in self.hooks:
            yield from hook(view)


def build_registry(sup: Supervisor) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(sup))
    registry.register(PluginCollector(sup))
    return registry
