"""The /metrics exposition of a real `jobvisor run`: lint-clean for Prometheus
(`promtool check metrics`, when Debian's `prometheus` package is installed; `.ci/run`
installs it), parseable by prometheus_client's own parser always, and served as
OpenMetrics to a scraper that asks for it."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import queue as q
from workers.core.model_gate import ModelGate, Policy

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
IN_FLIGHT_ONE = ('jobvisor_model_in_flight{endpoint="http://gpu:11434",'
                 'model="qwen2.5vl:7b"} 1.0')


@pytest.fixture
def scraped(db, worker_env, tmp_path):
    """(classic text, OpenMetrics text, OpenMetrics content type) after jobs ran and failed."""
    cfg = base_config(free_port(), {
        "noop": {"memory_per_job": "1MiB", "processes": {"min": 1, "max": 1}},
        "fail": {"memory_per_job": "1MiB", "processes": {"min": 1, "max": 1},
                 "retry": {"max_attempts": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    # A model call in flight, as a worker holds it (workers/core/model_gate.py).
    gate = ModelGate(worker_env["DATABASE_URL"], Policy("fixed", 3, 8))
    ticket = gate.acquire("http://user:pw@gpu:11434/", "qwen2.5vl:7b", 5.0)
    try:
        q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(3)])
        q.enqueue(db, q.NewJob("fail", {"kind": "permanent"}, max_attempts=1))
        # The held token itself, not just the endpoint's row: the supervisor reads both
        # together, and a read between the gate's insert of the row and its token (seen
        # once in CI) shows the endpoint with nothing in flight until the next read.
        wanted = ('outcome="failed"', 'job_type="noop",outcome="completed"', IN_FLIGHT_ONE)

        def scraped_all() -> bool:  # one scrape per look, not one per string
            body = sup.get("/metrics")[1]
            return all(w in body for w in wanted)

        wait_for(scraped_all, what="outcomes and the model call in flight in /metrics")
        _, text, _ = sup.get("/metrics")
        req = urllib.request.Request(f"http://127.0.0.1:{sup.port}/metrics",
                                     headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(req, timeout=5) as resp:
            om_text, om_type = resp.read().decode(), resp.headers["Content-Type"]
    finally:
        gate.release(ticket, None, None)
        assert sup.stop() == 0
    return text, om_text, om_type


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package `prometheus`; "
                           ".ci/run installs it)")
def test_promtool_finds_nothing_to_lint_in_the_exposition(scraped):
    text, _, _ = scraped
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), \
        lint.stdout + lint.stderr


def test_the_exposition_parses_and_names_the_core_and_plug_in_families(scraped):
    text, _, _ = scraped
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"jobvisor_up", "jobvisor_cpus", "jobvisor_jobs", "jobvisor_queue_depth",
            "analysis_jobs_inflight", "ai_worker_failed"} <= names
    assert not [n for n in names if n.endswith("_count")]


def test_each_model_endpoint_shows_its_limit_and_requests_in_flight(scraped):
    """Issue #16: jobvisor_model_limit{endpoint,model} and the tokens held, labelled
    with the server's URL without its credentials."""
    text, _, _ = scraped
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"endpoint": "http://gpu:11434", "model": "qwen2.5vl:7b"}
    [limit] = families["jobvisor_model_limit"].samples
    [in_flight] = families["jobvisor_model_in_flight"].samples
    assert (limit.labels, limit.value) == (labels, 3)
    assert (in_flight.labels, in_flight.value) == (labels, 1)
    assert {"jobvisor_model_requests", "jobvisor_model_busy", "jobvisor_model_timeouts"} <= \
        set(families)
    assert "pw" not in text.replace("jobvisor_", "")


def test_a_scraper_asking_for_openmetrics_gets_it(scraped):
    _, om_text, om_type = scraped
    assert om_type.startswith("application/openmetrics-text")
    assert om_text.rstrip().endswith("# EOF")
    families = {f.name: f for f in om_families(om_text)}
    failed = [s for s in families["ai_worker_failed"].samples if s.name.endswith("_total")]
    assert [s.labels["error_code"] for s in failed] == ["fail_permanent"]
