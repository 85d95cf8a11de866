"""A plug-in that can't load stops what would use it, naming it, in one line: the CLI
(exit 2), `jobvisor run` (exit 2 before it binds or migrates), a bare worker (exit 2).
Installed the way importlib.metadata sees a distribution: a .dist-info on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.supervisor_harness import REPO, base_config, free_port

BROKEN = {
    "missing_module": "jobvisor_nowhere.plugin:PLUGIN",
    "not_a_plugin": "json:dumps",
}


def _env(worker_env: dict[str, str], site: Path, name: str) -> dict[str, str]:
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[jobvisor.plugins]\n{name} = {BROKEN[name]}\n")
    return worker_env | {"PYTHONPATH": os.pathsep.join([str(site), worker_env["PYTHONPATH"]])}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plug_in_is_named_by_the_cli_the_supervisor_and_a_worker(
        worker_env, tmp_path, name):
    import yaml

    env = _env(worker_env, tmp_path / "site", name)
    status = _run(env, "-m", "supervisor_app", "status")
    assert status.returncode == 2, status.stderr
    assert status.stderr.count("\n") == 1 and f"plug-in {name!r}" in status.stderr
    config = tmp_path / "jobvisor.yaml"
    config.write_text(yaml.safe_dump(base_config(free_port(), {"noop": {
        "memory_per_job": "1MiB", "processes": {"min": 1, "max": 1}}})))
    run = _run(env | {"JOBVISOR_HOME": str(tmp_path / "home")}, "-m", "supervisor_app",
               "run", "--config", str(config))
    assert run.returncode == 2 and f"plug-in {name!r}" in run.stderr.strip().splitlines()[-1]
    worker = _run(env, "-m", "workers", "--type", "noop")
    assert worker.returncode == 2 and f"plug-in {name!r}" in worker.stderr
