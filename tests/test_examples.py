"""The example plug-in (examples/jobvisor_example) under a real `jobvisor run`: its job
types, its migration, its command and its metric, through the public mechanisms only.

The package is "installed" the way importlib.metadata sees an installed distribution: a
`.dist-info` directory with the entry points of its pyproject.toml (its `jobvisor.plugins`
entry point), on PYTHONPATH, next to its sources. That is what `pip install` leaves
behind, without changing the test virtualenv that other tests (and other people) use.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import queue as q

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "jobvisor_example"
HANDLERS_GROUP = "jobvisor.handlers"


def install_metadata(site: Path, extra_entry_points: dict[str, str] | None = None) -> Path:
    """A dist-info for the example in `site`, its entry points read from pyproject.toml;
    `extra_entry_points` are added to the `jobvisor.handlers` group (created if need be)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = {group: dict(points) for group, points in project.get("entry-points", {}).items()}
    if extra_entry_points:
        groups.setdefault(HANDLERS_GROUP, {}).update(extra_entry_points)
    lines: list[str] = []
    for group, points in groups.items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in points.items()), ""]
    (dist / "entry_points.txt").write_text("\n".join(lines))
    return site


@pytest.fixture
def example_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    site = install_metadata(tmp_path / "site")
    return _with_path(worker_env, site, EXAMPLE / "src")


def _with_path(env: dict[str, str], *paths: Path) -> dict[str, str]:
    return env | {"PYTHONPATH": os.pathsep.join([*map(str, paths), env["PYTHONPATH"]])}


def example_types() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLE / "jobvisor.yaml").read_text())["types"]


def _enqueue(env: dict[str, str], config: Path, job_type: str, payload: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor_app", "enqueue", job_type, "--payload", payload],
        env=env | {"JOBVISOR_CONFIG": str(config)}, cwd=REPO, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def _completed(db, job_id: int):
    return lambda: (job := q.get_job(db, job_id))["status"] in ("completed", "failed") and job


def _example_metric(sup: Supervisor) -> dict[str, float]:
    """`example_wordcount_jobs_total` of a /metrics scrape, {outcome: value}."""
    status, text, _headers = sup.get("/metrics")
    assert status == 200, text
    return {s.labels["outcome"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "example_wordcount_jobs_total"}


def test_the_plugin_is_registered_by_its_entry_point_alone():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    points = project["project"]["entry-points"]
    assert points["jobvisor.plugins"] == {"example": "jobvisor_example.plugin:PLUGIN"}
    # The plug-in declares example_wordcount: no second declaration as a handler.
    assert "example_wordcount" not in points.get(HANDLERS_GROUP, {})
    # The migrations ship with the package.
    assert project["tool"]["setuptools"]["package-data"]["jobvisor_example"] == ["sql/*.sql"]


def test_the_example_types_run_under_jobvisor_run(db, example_env, tmp_path):
    sup = Supervisor(tmp_path, example_env, base_config(free_port(), example_types())).start()
    try:
        text = "\n".join(f"line {i} has five words" for i in range(2500))
        counted = _enqueue(example_env, sup.config_path, "example_wordcount",
                           json.dumps({"text": text}))
        digested = _enqueue(example_env, sup.config_path, "example_checksum",
                            '{"data": "hello"}')
        bad = _enqueue(example_env, sup.config_path, "example_wordcount", '{"text": 7}')
        jobs = {i: wait_for(_completed(db, i), what=f"job {i}") for i in (counted, digested, bad)}
        # The plug-in's metric, from the running supervisor: outcomes reach it through
        # the children's heartbeats, so wait until both have been reported.
        metric = wait_for(lambda: (m := _example_metric(sup)).keys() >= {"completed", "failed"}
                          and m, what="example_wordcount_jobs_total in /metrics")
    finally:
        code = sup.stop()
    assert code == 0, sup.log()
    assert metric == {"completed": 1.0, "failed": 1.0}
    assert jobs[counted]["status"] == "completed", jobs[counted]
    assert jobs[counted]["result"] == {"lines": 2500, "words": 12500}
    assert jobs[counted]["progress"] == 1
    assert jobs[digested]["result"] == {"algorithm": "sha256", "bytes": 5,
                                        "digest": hashlib.sha256(b"hello").hexdigest()}
    assert (jobs[bad]["status"], jobs[bad]["error_code"], jobs[bad]["attempts"]) == (
        "failed", "invalid_payload", 1)
    # Each type ran in children of its own, with its own quotas.
    started = {e["job_type"] for e in sup.events("worker_started")}
    assert {"example_wordcount", "example_checksum"} <= started

    # `jobvisor run` applied the plug-in's migration, recorded under the plug-in's name,
    # and granted the worker role what the handler needs.
    assert db.execute("SELECT component, version, name FROM jobvisor.schema_migrations"
                      " WHERE component = 'example'").fetchall() == [("example", 1, "wordcounts")]
    assert db.execute("SELECT has_table_privilege('jobvisor_worker',"
                      " 'jobvisor_example.wordcounts', 'INSERT')").fetchone() == (True,)
    # The handler's row, committed in the very transaction that completed the job (one
    # xmin); the job that failed wrote none.
    assert db.execute(
        "SELECT w.job_id, w.lines, w.words, w.xmin::text = j.xmin::text"
        " FROM jobvisor_example.wordcounts w JOIN jobvisor.jobs j ON j.id = w.job_id"
    ).fetchall() == [(counted, 2500, 12500, True)]

    # The plug-in's command, through the `jobvisor` CLI.
    proc = subprocess.run([sys.executable, "-m", "supervisor_app", "example-totals", "--json"],
                          env=example_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    totals = json.loads(proc.stdout)
    assert (totals["jobs"], totals["lines"], totals["words"]) == (1, 2500, 12500), totals
    assert totals["last_counted_at"]


BROKEN = {
    "broken_import.py": "import a_dependency_that_is_not_installed  # noqa\n"
                        "def handle(job, ctx):\n    return None\n",
    "wrong_signature.py": "def handle(job):\n    return None\n",
    "not_callable.py": "handle = 42\n",
}


@pytest.mark.parametrize(("handler", "detail"), [
    ("broken_import:handle", "a_dependency_that_is_not_installed"),
    ("wrong_signature:handle", "must accept (job, ctx)"),
    ("not_callable:handle", "not callable"),
    ("wrong_signature:no_such_function", "no_such_function"),
    (None, "jobvisor_example.missing"),  # the entry point names a module that isn't there
])
def test_a_handler_that_cannot_load_stops_the_start_naming_the_type(
        example_env, tmp_path, handler, detail):
    modules = tmp_path / "mods"
    modules.mkdir()
    for name, source in BROKEN.items():
        (modules / name).write_text(source)
    site = install_metadata(tmp_path / "site2",
                            {"example_broken": "jobvisor_example.missing:handle"})
    env = _with_path(example_env, site, modules)
    types = example_types() | {"example_broken": {"processes": {"min": 1, "max": 1},
                                                  "memory_per_job": "16MiB"}}
    if handler:
        types["example_broken"]["handler"] = handler
    sup = Supervisor(tmp_path, env, base_config(free_port(), types))
    proc = subprocess.run([sys.executable, "-m", "supervisor_app", "run", "--config",
                           str(sup.config_path)], env=sup.env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "'example_broken'" in line and detail in line, line


def test_a_reload_with_a_broken_handler_is_rejected_naming_the_type(db, example_env,
                                                                     tmp_path):
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "wrong_signature.py").write_text(BROKEN["wrong_signature.py"])
    env = _with_path(example_env, modules)
    good = base_config(free_port(), example_types())
    sup = Supervisor(tmp_path, env, good).start()
    try:
        before = wait_for(lambda: sup.pids(db, "example_wordcount"), what="wordcount children")
        bad = dict(good, types=good["types"] | {"example_broken": {
            "handler": "wrong_signature:handle", "memory_per_job": "16MiB"}})
        sup.write_config(bad)
        sup.proc.send_signal(signal.SIGHUP)
        (event,) = wait_for(lambda: sup.events("reload_rejected"), what="the rejected reload")
        assert "'example_broken'" in event["error"] and "(job, ctx)" in event["error"]
        # The running quotas stay: the example's children keep their pids.
        assert sup.pids(db, "example_wordcount") == before
        job_id = q.enqueue(db, q.NewJob("example_wordcount", {"text": "still running"}))
        assert wait_for(_completed(db, job_id), what="a job after the rejected reload"
                        )["result"] == {"lines": 1, "words": 2}
    finally:
        code = sup.stop()
    assert code == 0, sup.log()
