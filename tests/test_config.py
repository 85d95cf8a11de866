"""Loading and validating the supervisor's YAML, and telling what a reload changed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from supervisor_app.config import (
    PACKAGED_CONFIG,
    Config,
    ConfigError,
    diff_types,
    load_config,
    parse_config,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "jobvisor.yaml"

FULL = """
supervisor:
  http: {host: 127.0.0.1, port: 9999}
  replan: 2s
  grace: 10s
  reserve: {memory: 256MiB, gpu_memory: 512MiB}
  restart: {backoff: 500ms, max_backoff: 30s, healthy_after: 5s, max_quick_failures: 3}
  child_heartbeat_timeout: 20s
  health_token_env: MY_TOKEN
queue:
  lease: 30s
  heartbeat: 10s
  poll: 1s
  listen: false
  retention: {completed: 1d, failed: 2d, cancelled: 3h}
  rescue_every: 2s
  prune_every: 5m
types:
  vision:
    handler: workers.learning.handlers.vision:handle
    processes: {min: 1, max: 4}
    concurrency: 2
    prefetch: 1
    memory_per_job: 300MiB
    memory_limit: 2GiB
    gpu_memory_per_job: 2GiB
    priority: 10
    timeout: 300s
    lease: 45s
    retry: {max_attempts: 5, backoff: 5s, max_backoff: 10m}
    global_concurrency: 4
    schedule: "0 3 * * *"
    options: {engine: ollama, dpi: 200}
"""


def write(tmp_path: Path, text: str, name: str = "jobvisor.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_full_example_loads_with_units_converted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.supervisor.http.port == 9999
    assert cfg.supervisor.replan == 2.0
    assert cfg.supervisor.reserve.memory == 256 * 1024**2
    assert cfg.supervisor.restart.backoff == 0.5
    assert cfg.queue.listen is False
    assert cfg.queue.retention.cancelled == 3 * 3600.0
    assert cfg.queue.prune_every == 300.0
    vision = cfg.types["vision"]
    assert vision.memory_per_job == 300 * 1024**2
    assert vision.memory_limit == 2 * 1024**3
    assert vision.gpu_memory_per_job == 2 * 1024**3
    assert vision.retry.max_backoff == 600.0
    assert vision.schedule == "0 3 * * *"
    assert vision.options == {"engine": "ollama", "dpi": 200}
    assert cfg.lease_for("vision") == 45.0


def test_omitted_settings_take_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "types:\n  mine:\n"))
    assert cfg.supervisor.http.port == 9464
    assert cfg.supervisor.reserve.memory == 512 * 1024**2
    assert cfg.supervisor.reserve.gpu_memory == 1024**3
    assert cfg.queue.lease == 60.0 and cfg.queue.heartbeat == 15.0
    assert cfg.queue.listen is True
    assert cfg.queue.retention.failed == 30 * 86400.0
    mine = cfg.types["mine"]
    assert (mine.processes.min, mine.processes.max) == (1, 1)
    assert mine.concurrency == 1 and mine.gpu_memory_per_job == 0
    assert mine.options == {}
    assert cfg.lease_for("mine") == 60.0


def test_shipped_config_loads_with_the_documented_types() -> None:
    cfg = load_config(SHIPPED)
    assert {"pdf", "vision", "feedback", "backup", "noop", "sleep"} <= set(cfg.types)
    pdf, vision, feedback, backup = (cfg.types[n] for n in ("pdf", "vision", "feedback", "backup"))
    assert pdf.gpu_memory_per_job == 0
    assert vision.gpu_memory_per_job == 2 * 1024**3 and vision.priority == 10
    assert feedback.gpu_memory_per_job > 0 and feedback.priority == 5
    assert (backup.processes.min, backup.processes.max, backup.concurrency) == (1, 1, 1)
    assert backup.schedule == "0 3 * * *" and backup.timeout == 420.0
    # The job's hard timeout must leave the backup engine time to time out by itself and
    # write its backup_timeout manifest.
    from workers.backup import dump

    assert backup.timeout > dump.DEFAULT_TIMEOUT_S + dump.DEFAULT_KILL_GRACE_S


def test_invalid_file_error_names_file_key_and_problem(tmp_path: Path) -> None:
    problem = error_for(tmp_path, "types:\n  vision:\n    processes: {min: 3, max: 2}\n")
    assert problem == "types.vision.processes.max: must be >= min (2 < 3)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("types: {vision: {processes: {max: 0}}}", "types.vision.processes.max: must be >= 1"),
        ("types: {vision: {concurrency: 0}}", "types.vision.concurrency: must be >= 1"),
        ("types: {vision: {prefetch: -1}}", "types.vision.prefetch: must be >= 0"),
        ("types: {vision: {memory_per_job: lots}}", "types.vision.memory_per_job: invalid size"),
        ("types: {vision: {timeout: soon}}", "types.vision.timeout: invalid duration 'soon'"),
        ("types: {vision: {timeout: 0}}", "types.vision.timeout: must be > 0"),
        ("types: {vision: {priority: high}}", "types.vision.priority: must be an integer"),
        ("types: {vision: {schedule: '61 * * * *'}}", "types.vision.schedule: '61 * * * *' is not"),
        ("types: {vision: {handler: 'not a ref'}}", "types.vision.handler: 'not a ref' is not"),
        (
            "types: {vision: {global_concurrency: 0}}",
            "types.vision.global_concurrency: must be >= 1",
        ),
        (
            "types: {vision: {memory_per_job: 1GiB, memory_limit: 512MiB}}",
            "types.vision.memory_limit: must be >= memory_per_job (512MiB < 1GiB)",
        ),
        (
            "types: {vision: {retry: {backoff: 1m, max_backoff: 10s}}}",
            "types.vision.retry.max_backoff: must be >= backoff (10s < 1m)",
        ),
        ("queue: {lease: 10s, heartbeat: 10s}", "queue.heartbeat: must be < lease (10s >= 10s)"),
        ("queue: {listen: maybe}", "queue.listen: must be true or false"),
        (
            "types: {vision: {lease: 10s}}",
            "types.vision.lease: must be > queue.heartbeat (10s <= 15s)",
        ),
        ("supervisor: {http: {port: 70000}}", "supervisor.http.port: must be <= 65535"),
        (
            "supervisor: {restart: {backoff: 10s, max_backoff: 1s}}",
            "supervisor.restart.max_backoff: must be >= backoff",
        ),
        ("supervisor: {health_token_env: 'a b'}", "supervisor.health_token_env: 'a b' is not"),
        ("types: {vision: {processes: [1, 2]}}", "types.vision.processes: must be a mapping"),
        ("types: [vision]", "types: must be a mapping"),
    ],
)
def test_cross_field_and_range_errors_name_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert error_for(tmp_path, text).startswith(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("supervisor: {model_servers: http://localhost:11434}",
     "supervisor.model_servers: must be a list of URLs, e.g. [http://localhost:11434] (got str)"),
    ("supervisor: {model_servers: [localhost:11434]}",
     "supervisor.model_servers.0: 'localhost:11434' is not an http:// or https:// URL"),
    ("supervisor: {model_servers: [http://localhost:11434, 'ftp://x']}",
     "supervisor.model_servers.1: 'ftp://x' is not an http:// or https:// URL"),
    ("supervisor: {model_servers: [11434]}",
     "supervisor.model_servers.0: must be a URL such as http://localhost:11434 (got 11434)"),
    ("supervisor: {model_servers: ['http://me:pw@localhost:11434']}",
     "supervisor.model_servers.0: 'http://localhost:11434': no user or password in the URL"),
    ("supervisor: {model_servers: ['http://localhost:99999']}",
     "supervisor.model_servers.0: 'http://localhost:99999' has an invalid port"),
    ("supervisor: {model_servers: ['http://localhost:11434/?x=1']}",
     "supervisor.model_servers.0: 'http://localhost:11434/?x=1': a base URL has no query"),
    ("supervisor: {model_servers: ['http://:11434']}",
     "supervisor.model_servers.0: 'http://:11434' has no host"),
    ("supervisor: {model_servers: [http://localhost:11434/, http://LOCALHOST:11434]}",
     "supervisor.model_servers: 'http://localhost:11434' is listed twice (entries 0 and 1)"),
    ("supervisor: {model_servers: [" + ", ".join(f"http://h{i}" for i in range(9)) + "]}",
     "supervisor.model_servers: at most 8 servers (got 9)"),
    ("supervisor: {model_servers_memory_ttl: 2d}",
     "supervisor.model_servers_memory_ttl: must be <= 1d (got 2d)"),
    ("supervisor: {model_servers_memory_ttl: 0}",
     "supervisor.model_servers_memory_ttl: must be > 0"),
    ("supervisor: {model_servers_memory_ttl: later}",
     "supervisor.model_servers_memory_ttl: invalid duration 'later'"),
])
def test_model_server_errors_name_the_key_and_the_entry(tmp_path: Path, text: str,
                                                        expected: str) -> None:
    assert error_for(tmp_path, text).startswith(expected)


def test_model_servers_default_to_the_environment_url_and_are_normalised() -> None:
    sup = parse_config({}).supervisor
    assert sup.model_servers is None and sup.model_servers_memory_ttl == 3600.0
    sup = parse_config({"supervisor": {"model_servers": ["HTTP://Ollama:11434/base/"],
                                       "model_servers_memory_ttl": "30m"}}).supervisor
    assert sup.model_servers == ("http://ollama:11434/base",)
    assert sup.model_servers_memory_ttl == 1800.0
    assert parse_config({"supervisor": {"model_servers": []}}).supervisor.model_servers == ()


@pytest.mark.parametrize("name", ["Vision", "1pdf", "my-type", "a" * 64, "_x"])
def test_invalid_type_name_is_rejected(tmp_path: Path, name: str) -> None:
    problem = error_for(tmp_path, f"types: {{'{name}': {{}}}}")
    assert problem.startswith(f"types: invalid type name '{name}'")


def test_longest_valid_type_name_is_accepted() -> None:
    name = "a" + "b_9" * 20 + "cd"  # 63 chars
    assert name in parse_config({"types": {name: {}}}).types


def test_misspelt_key_is_an_error_not_a_default(tmp_path: Path) -> None:
    problem = error_for(tmp_path, "types:\n  vision:\n    procesess: {max: 4}\n")
    assert problem == "types.vision.procesess: unknown key"


def test_unknown_top_level_section_is_rejected(tmp_path: Path) -> None:
    assert error_for(tmp_path, "workers: {}\n") == "workers: unknown key"


def test_several_errors_are_counted_on_one_line(tmp_path: Path) -> None:
    problem = error_for(tmp_path, "types: {vision: {concurrency: 0, prefetch: -1, priority: x}}")
    assert problem.startswith("types.vision.concurrency: must be >= 1")
    assert problem.endswith("(and 2 more errors)")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    problem = error_for(tmp_path, "types:\n  vision: {processes: [\n")
    assert problem.startswith("YAML syntax error at line ")


def test_duplicate_type_is_an_error_not_a_silent_merge(tmp_path: Path) -> None:
    problem = error_for(tmp_path, "types:\n  vision: {}\n  vision: {concurrency: 3}\n")
    assert "duplicate key 'vision'" in problem and "line 3" in problem


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(err.value) == f"{missing}: file not found"


@pytest.mark.parametrize(("text", "got"), [("", "an empty document"), ("- a\n- b\n", "list")])
def test_non_mapping_top_level_is_rejected(tmp_path: Path, text: str, got: str) -> None:
    assert error_for(tmp_path, text) == f"top level must be a mapping, got {got}"


def test_error_uses_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "types: {vision: {processes: {min: 3, max: 2}}}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("config/jobvisor.yaml")
    assert str(err.value) == (
        "config/jobvisor.yaml: types.vision.processes.max: must be >= min (2 < 3)"
    )


# --- where the file comes from -----------------------------------------------------------


def test_cli_value_wins_over_env(tmp_path: Path) -> None:
    env = {"JOBVISOR_CONFIG": "/from/env.yaml"}
    assert resolve_config_path("/from/cli.yaml", environ=env, cwd=tmp_path) == Path(
        "/from/cli.yaml"
    )


def test_env_wins_over_files_and_is_returned_even_if_missing(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "{}")
    env = {"JOBVISOR_CONFIG": str(tmp_path / "missing.yaml")}
    assert resolve_config_path(None, environ=env, cwd=tmp_path) == tmp_path / "missing.yaml"


def test_cwd_config_then_etc_then_packaged(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "jobvisor.yaml"
    packaged = tmp_path / "pkg" / "jobvisor.yaml"
    kw = {"environ": {}, "cwd": tmp_path, "etc_path": etc, "packaged_path": packaged}

    assert resolve_config_path(None, **kw) == packaged
    etc.parent.mkdir()
    etc.write_text("{}")
    assert resolve_config_path(None, **kw) == etc
    (tmp_path / "config").mkdir()
    local = write(tmp_path / "config", "{}")
    assert resolve_config_path(None, **kw) == local


def test_packaged_default_is_the_shipped_file() -> None:
    assert PACKAGED_CONFIG == SHIPPED
    assert PACKAGED_CONFIG.is_file()


# --- what a reload changed -----------------------------------------------------------------


def with_changes(cfg: Config, type_name: str, **changes: object) -> Config:
    data = cfg.model_dump()
    data["types"][type_name].update(changes)
    return Config.model_validate(data)


def test_fingerprint_ignores_process_count_only() -> None:
    cfg = load_config(SHIPPED)
    resized = with_changes(cfg, "vision", processes={"min": 2, "max": 3})
    assert resized.worker_fingerprint("vision") == cfg.worker_fingerprint("vision")
    retuned = with_changes(cfg, "vision", concurrency=5)
    assert retuned.worker_fingerprint("vision") != cfg.worker_fingerprint("vision")
    assert hash(cfg.worker_fingerprint("vision"))  # usable as a dict key / set member


def test_fingerprint_changes_with_options_and_inherited_queue_lease() -> None:
    cfg = load_config(SHIPPED)
    other_options = with_changes(cfg, "pdf", options={"dpi": 300})
    assert other_options.worker_fingerprint("pdf") != cfg.worker_fingerprint("pdf")
    data = cfg.model_dump()
    data["queue"]["lease"] = 120.0
    longer_lease = Config.model_validate(data)
    # pdf inherits queue.lease, so its children must be replaced to pick it up.
    assert longer_lease.worker_fingerprint("pdf") != cfg.worker_fingerprint("pdf")


def test_diff_tells_resize_from_settings_change() -> None:
    old = load_config(SHIPPED)
    new = with_changes(old, "vision", processes={"min": 1, "max": 8})
    new = with_changes(new, "pdf", timeout=900.0)
    data = new.model_dump()
    del data["types"]["sleep"]
    data["types"]["extra"] = {}
    new = Config.model_validate(data)

    diff = diff_types(old, new)
    assert diff.processes_changed == {"vision"}
    assert diff.settings_changed == {"pdf"}
    assert diff.added == {"extra"}
    assert diff.removed == {"sleep"}
    assert not diff.unchanged
    assert diff_types(old, load_config(SHIPPED)).unchanged


# --- upper bounds: absurd quotas are refused, naming the key and the bound --------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("types: {vision: {processes: {max: 100000000}}}",
         "types.vision.processes.max: must be <= 1024 (got 100000000)"),
        ("types: {vision: {processes: {min: 2000, max: 2000}}}",
         "types.vision.processes.min: must be <= 1024 (got 2000)"),
        ("types: {vision: {concurrency: 100000000}}",
         "types.vision.concurrency: must be <= 1024 (got 100000000)"),
        ("types: {vision: {prefetch: 5000}}", "types.vision.prefetch: must be <= 1024"),
        ("types: {vision: {priority: 99999999999}}",
         "types.vision.priority: must be <= 2147483647"),
        ("types: {vision: {priority: -99999999999}}",
         "types.vision.priority: must be >= -2147483648"),
        ("types: {vision: {retry: {max_attempts: 1000000}}}",
         "types.vision.retry.max_attempts: must be <= 1000"),
        ("types: {vision: {global_concurrency: 10000000}}",
         "types.vision.global_concurrency: must be <= 100000"),
        ("types: {vision: {timeout: 99999d}}",
         "types.vision.timeout: must be <= 30d (got 99999d)"),
        ("types: {vision: {lease: 99999d}}", "types.vision.lease: must be <= 1d"),
        ("types: {vision: {retry: {backoff: 400d, max_backoff: 400d}}}",
         "types.vision.retry.backoff: must be <= 30d"),
        ("types: {vision: {memory_per_job: 2000TiB}}",
         "types.vision.memory_per_job: must be <= 1PiB"),
        ("types: {vision: {memory_limit: 99999999TiB}}", "types.vision.memory_limit: must be <= 1PiB"),
        ("types: {vision: {gpu_memory_per_job: 9PiB}}",
         "types.vision.gpu_memory_per_job: must be <= 1PiB (got 9PiB)"),
        ("supervisor: {reserve: {memory: 5PB}}", "supervisor.reserve.memory: must be <= 1PiB"),
        ("supervisor: {replan: 2d}", "supervisor.replan: must be <= 1h"),
        ("supervisor: {grace: 99999d}", "supervisor.grace: must be <= 1d"),
        ("supervisor: {restart: {max_quick_failures: 1000000}}",
         "supervisor.restart.max_quick_failures: must be <= 1000"),
        ("supervisor: {restart: {max_backoff: 99d}}", "supervisor.restart.max_backoff: must be <= 1d"),
        ("supervisor: {child_heartbeat_timeout: 9d}",
         "supervisor.child_heartbeat_timeout: must be <= 1d"),
        ("queue: {lease: 99999d}", "queue.lease: must be <= 1d"),
        ("queue: {poll: 2d}", "queue.poll: must be <= 1h"),
        ("queue: {retention: {failed: 99999d}}", "queue.retention.failed: must be <= 3650d"),
        ("queue: {prune_every: 99d}", "queue.prune_every: must be <= 1d"),
        ("types: {vision: {timeout: '9999999999999999999999999999999999999999999999s'}}",
         "types.vision.timeout: must be <= 30d"),
    ],
)
def test_absurd_quotas_are_refused_naming_key_and_bound(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert error_for(tmp_path, text).startswith(expected)


def test_quotas_at_their_upper_bounds_are_accepted() -> None:
    cfg = parse_config({
        "supervisor": {"reserve": {"memory": "1PiB"}, "replan": "1h", "grace": "1d"},
        "queue": {"lease": "1d", "poll": "1h", "retention": {"completed": "3650d"}},
        "types": {"big": {"processes": {"min": 1024, "max": 1024}, "concurrency": 1024,
                          "prefetch": 1024, "priority": 2**31 - 1, "timeout": "30d",
                          "memory_per_job": "1PiB", "gpu_memory_per_job": "1PiB",
                          "retry": {"max_attempts": 1000, "backoff": "30d",
                                    "max_backoff": "30d"},
                          "global_concurrency": 100000}},
    })
    big = cfg.types["big"]
    assert big.processes.max == 1024 and big.memory_per_job == 1024**5
    assert cfg.queue.retention.completed == 3650 * 86400.0
    assert parse_config({"types": {"low": {"priority": -(2**31)}}}).types["low"].priority < 0


def test_readme_documents_each_upper_bound() -> None:
    from supervisor_app import config
    from supervisor_app.units import format_bytes, format_duration

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Configuration limits"):]
    table = table[:table.index("\n\n", table.index("| key |"))]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| `") or line.startswith("| every")}
    shown = {
        "`types.*.processes.min`, `types.*.processes.max`": str(config.MAX_PROCESSES),
        "`types.*.concurrency`, `types.*.prefetch`": str(config.MAX_CONCURRENCY),
        "`types.*.global_concurrency`": str(config.MAX_GLOBAL_CONCURRENCY),
        "`types.*.retry.max_attempts`, `supervisor.restart.max_quick_failures`":
            str(config.MAX_ATTEMPTS),
        "`types.*.timeout`, `types.*.retry.backoff`, `types.*.retry.max_backoff`":
            format_duration(config.MAX_JOB_TIME),
        "`supervisor.replan`, `queue.poll`": format_duration(config.MAX_INTERVAL),
        "`queue.retention.*`": format_duration(config.MAX_RETENTION),
    }
    for key, bound in shown.items():
        assert rows[key] == bound, key
    assert config.MAX_ATTEMPTS == config.MAX_QUICK_FAILURES
    assert any(v == format_bytes(config.MAX_BYTES) for v in rows.values())
    assert any(v == format_duration(config.MAX_DEADLINE) for v in rows.values())
    assert any(v.startswith(f"{config.PRIORITY_MIN} to {config.PRIORITY_MAX}")
               for v in rows.values())
