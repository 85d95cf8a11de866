"""The supervisor's YAML configuration: models, validation, loading, and change detection.

Every size is stored as int bytes and every duration as float seconds; the YAML may use
the unit strings of :mod:`supervisor_app.units`. Unknown keys are errors, because a
misspelt quota silently falling back to its default is worse than refusing to start.

``load_config`` raises :class:`ConfigError`, whose ``str`` is one line naming the file,
the dotted key and the problem, e.g.
``config/jobvisor.yaml: types.vision.processes.max: must be >= min (2 < 3)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from supervisor_app.model_servers import DEFAULT_MEMORY_TTL_S, parse_server_url
from supervisor_app.units import format_bytes, format_duration, parse_bytes, parse_duration

ENV_CONFIG = "JOBVISOR_CONFIG"
CWD_CONFIG = Path("config/jobvisor.yaml")
ETC_CONFIG = Path("/etc/jobvisor/jobvisor.yaml")
PACKAGED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "jobvisor.yaml"

TYPE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_HANDLER_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Upper bounds (README, "Configuration limits"). Far above any real deployment, they catch
# typos (`max: 100000000`) before the planner sizes pools by them, and keep values within
# the database's columns (priority and max_attempts are int4).
MAX_PROCESSES = 1024  # per type and host
MAX_CONCURRENCY = 1024  # jobs in flight per process; also prefetch
MAX_GLOBAL_CONCURRENCY = 100_000
MAX_ATTEMPTS = 1000
MAX_QUICK_FAILURES = 1000
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
MAX_BYTES = 1024**5  # 1PiB, for every memory size
MAX_INTERVAL = 3600.0  # 1h: how often the supervisor re-plans, how long a poll waits
MAX_DEADLINE = 86400.0  # 1d: leases, grace, restart backoff, duty periods
MAX_JOB_TIME = 30 * 86400.0  # 30d: a job's timeout and its retry backoff
MAX_RETENTION = 3650 * 86400.0  # 10 years of finished jobs
MAX_FAIR_WEIGHTS = 1000  # keys with their own weight per type (read per enqueued row)
MAX_FAIR_WEIGHT = 1e6
_FAIR_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
MAX_MODEL_SERVERS = 8  # all of them are read within one second per replan


def _at_most(bound: float, shown: Any) -> Any:
    def check(v: Any) -> Any:
        if v is not None and v > bound:
            raise ValueError(f"must be <= {shown(bound)} (got {shown(v)})")
        return v
    return AfterValidator(check)


Bytes = Annotated[int, BeforeValidator(parse_bytes), _at_most(MAX_BYTES, format_bytes)]


def _seconds_at_most(bound: float) -> Any:
    """A duration field at most `bound` seconds; the error shows both with units."""
    return Annotated[float, BeforeValidator(parse_duration), _at_most(bound, format_duration)]


Seconds = _seconds_at_most(MAX_DEADLINE)
IntervalSeconds = _seconds_at_most(MAX_INTERVAL)
JobSeconds = _seconds_at_most(MAX_JOB_TIME)
RetentionSeconds = _seconds_at_most(MAX_RETENTION)


class ConfigError(Exception):
    """A configuration that cannot be used. ``str(err)`` is a single line."""

    def __init__(self, file: str | os.PathLike[str], key: str | None, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        prefix = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(prefix + " ".join(problem.split()))  # collapse newlines: one line


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _none_means_defaults(cls, data: Any) -> Any:
        # `reserve:` or `vision:` with nothing under it parses as None: "all defaults".
        return {} if data is None else data


class HttpConfig(_Model):
    host: str = "0.0.0.0"
    port: int = Field(9464, ge=0, le=65535)  # 0 = any free port (tests)


class ReserveConfig(_Model):
    memory: Bytes = Field(parse_bytes("512MiB"), ge=0)
    gpu_memory: Bytes = Field(parse_bytes("1GiB"), ge=0)


class RestartConfig(_Model):
    backoff: Seconds = Field(1.0, gt=0)
    max_backoff: Seconds = Field(60.0, gt=0)
    healthy_after: Seconds = Field(10.0, gt=0)
    max_quick_failures: int = Field(5, ge=1, le=MAX_QUICK_FAILURES)

    @field_validator("max_backoff")
    @classmethod
    def _max_backoff_not_below_backoff(cls, v: float, info: ValidationInfo) -> float:
        return _not_below(v, info, "backoff", "max_backoff", duration=True)


class SupervisorConfig(_Model):
    http: HttpConfig = HttpConfig()
    replan: IntervalSeconds = Field(5.0, gt=0)
    grace: Seconds = Field(30.0, ge=0)
    reserve: ReserveConfig = ReserveConfig()
    restart: RestartConfig = RestartConfig()
    child_heartbeat_timeout: Seconds = Field(30.0, gt=0)
    health_token_env: str = "JOBVISOR_HEALTH_TOKEN"
    # Model servers (Ollama) on this machine's GPUs whose /api/ps the planner reads
    # (docs/planning.md, "Model server memory"). None: $OLLAMA_BASE_URL when it names
    # this machine; []: none.
    model_servers: tuple[Annotated[str, BeforeValidator(parse_server_url)], ...] | None = None
    model_servers_memory_ttl: Seconds = Field(DEFAULT_MEMORY_TTL_S, gt=0)

    @field_validator("model_servers", mode="before")
    @classmethod
    def _server_list(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, list | tuple):
            raise ValueError(f"must be a list of URLs, e.g. [http://localhost:11434] "
                             f"(got {type(v).__name__})")
        if len(v) > MAX_MODEL_SERVERS:
            raise ValueError(f"at most {MAX_MODEL_SERVERS} servers (got {len(v)})")
        return v

    @field_validator("model_servers")
    @classmethod
    def _servers_once(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for i, url in enumerate(v or ()):
            if url in v[:i]:
                raise ValueError(f"{url!r} is listed twice (entries {v.index(url)} and {i})")
        return v

    @field_validator("health_token_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME_RE.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v


class RetentionConfig(_Model):
    completed: RetentionSeconds = Field(7 * 86400.0, ge=0)
    failed: RetentionSeconds = Field(30 * 86400.0, ge=0)
    cancelled: RetentionSeconds = Field(7 * 86400.0, ge=0)


class QueueConfig(_Model):
    lease: Seconds = Field(60.0, gt=0)
    heartbeat: Seconds = Field(15.0, gt=0)
    poll: IntervalSeconds = Field(2.0, gt=0)
    listen: bool = True  # false = poll only, for PgBouncer in transaction pooling mode
    retention: RetentionConfig = RetentionConfig()
    rescue_every: Seconds = Field(5.0, gt=0)
    prune_every: Seconds = Field(600.0, gt=0)

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat_below_lease(cls, v: float, info: ValidationInfo) -> float:
        # A heartbeat at or after expiry lets another worker lease the job meanwhile.
        lease = info.data.get("lease")
        if lease is not None and v >= lease:
            raise ValueError(f"must be < lease ({format_duration(v)} >= {format_duration(lease)})")
        return v


class ProcessesConfig(_Model):
    min: int = Field(1, ge=0, le=MAX_PROCESSES)
    max: int = Field(1, ge=1, le=MAX_PROCESSES)

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, v: int, info: ValidationInfo) -> int:
        return _not_below(v, info, "min", "max")


class RetryConfig(_Model):
    max_attempts: int = Field(5, ge=1, le=MAX_ATTEMPTS)
    backoff: JobSeconds = Field(5.0, ge=0)
    max_backoff: JobSeconds = Field(600.0, ge=0)

    @field_validator("max_backoff")
    @classmethod
    def _max_backoff_not_below_backoff(cls, v: float, info: ValidationInfo) -> float:
        return _not_below(v, info, "backoff", "max_backoff", duration=True)


class TypeConfig(_Model):
    handler: str | None = None  # "package.module:function"; built-ins resolve by type name
    processes: ProcessesConfig = ProcessesConfig()
    concurrency: int = Field(1, ge=1, le=MAX_CONCURRENCY)
    prefetch: int = Field(0, ge=0, le=MAX_CONCURRENCY)
    memory_per_job: Bytes = Field(parse_bytes("256MiB"), ge=0)
    memory_limit: Bytes | None = Field(None, gt=0)
    gpu_memory_per_job: Bytes = Field(0, ge=0)
    # CPUs one process keeps busy (a renderer holding the GIL: 1). 0: it mostly waits
    # (HTTP, a model, the database) and needs no share of the CPU budget.
    cpus_per_process: float = Field(0.0, ge=0, le=MAX_PROCESSES)
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    timeout: JobSeconds = Field(300.0, gt=0)
    lease: Seconds | None = Field(None, gt=0)
    retry: RetryConfig = RetryConfig()
    global_concurrency: int | None = Field(None, ge=1, le=MAX_GLOBAL_CONCURRENCY)
    # Fair share between the values of a payload field (docs/fair_share.md): the keys take
    # turns for this type's slots, in proportion to their weights (default 1).
    fair_by: str | None = None
    fair_weights: dict[str, Annotated[float, Field(gt=0, le=MAX_FAIR_WEIGHT,
                                                   allow_inf_nan=False)]] = \
        Field(default_factory=dict)
    max_running_per_key: int | None = Field(None, ge=1, le=MAX_GLOBAL_CONCURRENCY)
    # false: a completed job is deleted as it completes (no result kept, not counted),
    # unless it belongs to a batch, has a callback or a sticky key (README, "History").
    keep_completed: bool = True
    schedule: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options", mode="before")
    @classmethod
    def _options_none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("handler")
    @classmethod
    def _handler_ref(cls, v: str | None) -> str | None:
        if v is not None and not _HANDLER_RE.match(v):
            raise ValueError(f"{v!r} is not of the form 'package.module:function'")
        return v

    @field_validator("fair_by")
    @classmethod
    def _fair_field(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 200 or not _FAIR_FIELD_RE.match(v)):
            raise ValueError(f"{v!r} is not a payload field name (letters, digits, _ and -, "
                             f"not starting with a digit; dots between nested fields)")
        return v

    @field_validator("fair_weights", mode="before")
    @classmethod
    def _fair_weight_keys(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            return v  # "must be a mapping"
        if len(v) > MAX_FAIR_WEIGHTS:
            raise ValueError(f"at most {MAX_FAIR_WEIGHTS} keys (got {len(v)})")
        # YAML reads `42: 2` with an int key; the key is the field's value as text, as
        # the queue reads it from the payload (true/false/'' for booleans and null).
        return {("" if k is None else str(k).lower() if isinstance(k, bool) else str(k)): w
                for k, w in v.items()}

    @field_validator("fair_weights", "max_running_per_key")
    @classmethod
    def _needs_fair_by(cls, v: Any, info: ValidationInfo) -> Any:
        # (Absent from info.data when fair_by itself was refused: that error is enough.)
        if v and "fair_by" in info.data and info.data["fair_by"] is None:
            raise ValueError("needs fair_by (the payload field whose values share the slots)")
        return v

    @field_validator("memory_limit")
    @classmethod
    def _limit_holds_one_job(cls, v: int | None, info: ValidationInfo) -> int | None:
        # A limit below one job's need would recycle the child after every job.
        per_job = info.data.get("memory_per_job")
        if v is not None and per_job is not None and v < per_job:
            raise ValueError(
                f"must be >= memory_per_job ({format_bytes(v)} < {format_bytes(per_job)})"
            )
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a valid cron expression")
        return v

    @property
    def fair_share(self) -> Any:
        """The queue's view of `fair_by` (workers.core.queue.FairShare), or None."""
        if self.fair_by is None:
            return None
        from workers.core.queue import FairShare

        return FairShare(self.fair_by, dict(self.fair_weights), self.max_running_per_key)

    @property
    def gpu_per_process(self) -> int:
        return self.gpu_memory_per_job * self.concurrency

    @property
    def memory_per_process(self) -> int:
        return self.memory_per_job * self.concurrency


class Config(_Model):
    supervisor: SupervisorConfig = SupervisorConfig()
    queue: QueueConfig = QueueConfig()
    types: dict[str, TypeConfig] = Field(default_factory=dict)

    @field_validator("types", mode="before")
    @classmethod
    def _type_names(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            for name in v:
                if not isinstance(name, str) or not TYPE_NAME_RE.match(name):
                    raise ValueError(
                        f"invalid type name {name!r}: must match {TYPE_NAME_RE.pattern}"
                    )
        return {} if v is None else v

    @model_validator(mode="after")
    def _type_lease_above_heartbeat(self) -> Config:
        # Cross-section rule, so the message carries its own key (pydantic's loc is empty here).
        for name, t in self.types.items():
            if t.lease is not None and t.lease <= self.queue.heartbeat:
                raise ValueError(
                    f"types.{name}.lease: must be > queue.heartbeat "
                    f"({format_duration(t.lease)} <= {format_duration(self.queue.heartbeat)})"
                )
        return self

    def lease_for(self, type_name: str) -> float:
        """The lease a job of this type gets: its own, else the queue's."""
        lease = self.types[type_name].lease
        return self.queue.lease if lease is None else lease

    def worker_fingerprint(self, type_name: str) -> str:
        """A hashable digest of everything a child of this type is started with, except the
        process count. Equal digests mean "only the number of processes may differ", so the
        supervisor can resize a pool instead of replacing its children."""
        t = self.types[type_name]
        settings = {
            "type": type_name,
            # Weights are read by the queue at enqueue (sql/009), not by a child.
            **t.model_dump(mode="json", exclude={"processes", "fair_weights"}),
            "effective_lease": self.lease_for(type_name),
            # Queue and supervisor settings a child also runs with.
            "queue": self.queue.model_dump(mode="json", include=_CHILD_QUEUE_FIELDS),
            "grace": self.supervisor.grace,
            "child_heartbeat_timeout": self.supervisor.child_heartbeat_timeout,
        }
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def worker_fingerprints(self) -> dict[str, str]:
        return {name: self.worker_fingerprint(name) for name in self.types}


_CHILD_QUEUE_FIELDS = {"lease", "heartbeat", "poll", "listen"}


@dataclass(frozen=True)
class TypesDiff:
    """How the job types of two configurations differ, for a SIGHUP reload."""

    added: frozenset[str]
    removed: frozenset[str]
    settings_changed: frozenset[str]  # children must be replaced
    processes_changed: frozenset[str]  # only min/max differ: resize the pool

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.settings_changed or self.processes_changed)


def diff_types(old: Config, new: Config) -> TypesDiff:
    old_fp, new_fp = old.worker_fingerprints(), new.worker_fingerprints()
    common = old_fp.keys() & new_fp.keys()
    settings = {n for n in common if old_fp[n] != new_fp[n]}
    processes = {n for n in common - settings if old.types[n].processes != new.types[n].processes}
    return TypesDiff(
        added=frozenset(new_fp.keys() - old_fp.keys()),
        removed=frozenset(old_fp.keys() - new_fp.keys()),
        settings_changed=frozenset(settings),
        processes_changed=frozenset(processes),
    )


# --- helpers -----------------------------------------------------------------------------


def _not_below(v: Any, info: ValidationInfo, low_key: str, key: str, duration: bool = False) -> Any:
    low = info.data.get(low_key)  # absent when that field itself failed validation
    if low is not None and v < low:
        shown = (format_duration(v), format_duration(low)) if duration else (v, low)
        raise ValueError(f"must be >= {low_key} ({shown[0]} < {shown[1]})")
    return v


def _format_validation_error(err: ValidationError) -> tuple[str | None, str]:
    """First error as (dotted key, problem); further errors are counted, not listed, so
    the message stays one readable line."""
    errors = err.errors(include_url=False)
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"]) or None
    problem = _problem_text(first)
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return key, problem


def _problem_text(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = f" (got {error['input']!r})" if "input" in error else ""
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping (got {type(error.get('input')).__name__})"
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind.startswith(("greater_than", "less_than")):
            return f"must be {op} {ctx[bound]}{got}"
    plain = {
        "int_parsing": "must be an integer",
        "int_type": "must be an integer",
        "int_from_float": "must be a whole number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
    }
    return plain.get(kind, str(error["msg"])) + got


# --- loading -----------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: two `vision:` blocks must not silently merge."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_config(data: Any, source: str | os.PathLike[str] = "<config>") -> Config:
    """Validate already-parsed YAML data; ``source`` names it in error messages."""
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else type(data).__name__
        raise ConfigError(source, None, f"top level must be a mapping, got {got}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as err:
        key, problem = _format_validation_error(err)
        raise ConfigError(source, key, problem) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file. Raises ConfigError (one line) on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(path, None, f"cannot read: {reason}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(path, None, _yaml_problem(err)) from None
    return parse_config(data, path)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


def resolve_config_path(
    cli_value: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    etc_path: Path = ETC_CONFIG,
    packaged_path: Path = PACKAGED_CONFIG,
) -> Path:
    """--config, else $JOBVISOR_CONFIG, else ./config/jobvisor.yaml if it exists, else
    /etc/jobvisor/jobvisor.yaml if it exists, else the default shipped with jobvisor.

    An explicit choice (flag or env) is returned even if missing, so loading it fails
    loudly instead of silently falling through to another file."""
    env = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    local = (cwd / CWD_CONFIG) if cwd is not None else CWD_CONFIG
    if local.is_file():
        return local
    if etc_path.is_file():
        return etc_path
    return packaged_path
