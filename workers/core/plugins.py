"""How a package plugs job types into jobvisor: one `Plugin` declared under the entry-point
group `jobvisor.plugins`.

A plug-in can bring, each optional:

* `handlers`: job type -> `module:function` (the handler contract of `workers`);
* `migrations`: a folder of `NNN_name.sql` files, applied by `jobvisor migrate` after the
  core's, in order, recorded per plug-in (`jobvisor.schema_migrations.component`);
* `commands`: `module:function(subparsers, kit)` adding `jobvisor` sub-commands
  (`kit` is a `workers.core.commands.CommandKit`);
* `metrics`: `module:function(view) -> Iterable[Metric]`, called at each scrape with a
  `MetricsView` of the supervisor's per-type counts;
* `job_settings`: `module:function(job) -> {name: value}`, `set_config(name, value, true)`
  at the start of every transaction of one of the plug-in's jobs (row-level security);
* `outcomes`: `module:function(conn, events)`, called with the plug-in's `JobEvent`s
  inside the very transaction that changes those jobs' status (failed, cancelled, put
  back for a retry, queued again by an operator), whoever writes it: a worker, the
  supervisor's rescue, the CLI;
* `probes`: HTTP path -> `module:function(dsn) -> (role, checks)`, served on the
  supervisor's port behind the operator token.

Everything is named by string and imported on first use, so declaring a plug-in costs
its users nothing: the supervisor loads a probe or a metrics module, never a handler.
jobvisor's own learning pipeline and backups are plug-ins of exactly this kind.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

log = logging.getLogger("jobvisor.plugins")

ENTRY_POINT_GROUP = "jobvisor.plugins"
CORE = "core"  # the component name of the core's own migrations


class PluginError(Exception):
    """A plug-in can't be loaded or declares something wrong; the message names it."""


@dataclass(frozen=True)
class Plugin:
    name: str
    handlers: Mapping[str, str] = field(default_factory=dict)
    migrations: str | Path | None = None  # a folder, or "package:folder" inside a package
    # Migrations recorded under the core's name by an older jobvisor that this plug-in now
    # owns: {"NNN_name": own version}. `jobvisor migrate` re-records them, applies nothing.
    adopts: Mapping[str, int] = field(default_factory=dict)
    commands: str | None = None
    metrics: str | None = None
    job_settings: str | None = None
    outcomes: str | None = None
    probes: Mapping[str, str] = field(default_factory=dict)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def migrations_dir(self) -> Path | None:
        if self.migrations is None:
            return None
        if isinstance(self.migrations, Path):
            return self.migrations
        package, sep, folder = self.migrations.partition(":")
        if not sep:
            return Path(package)
        module = importlib.import_module(package)
        return Path(module.__file__ or "").resolve().parent / folder


@dataclass(frozen=True)
class JobEvent:
    """One job's status change, as an `outcomes` hook sees it. `was` is the status it
    left (`leased`, `queued`, `failed`, `cancelled`), `status` the one it entered."""

    id: int
    job_type: str
    was: str
    status: str
    error_code: str | None


@dataclass(frozen=True)
class MetricsView:
    """What a plug-in's metrics see of the supervisor at a scrape: jobs in flight per
    type, and finished attempts as {(type, outcome, error_code): count}."""

    inflight: Mapping[str, int]
    outcomes: Mapping[tuple[str, str, str | None], float]


def resolve(spec: str, *, what: str) -> Any:
    """Import `module:attribute`; PluginError names `what` and the spec on failure."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what}: {spec!r} is not 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        raise PluginError(f"{what}: cannot import {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{what}: {module_name!r} has no {attr!r}") from None


@cache
def installed() -> tuple[Plugin, ...]:
    """Every plug-in registered under `jobvisor.plugins`, sorted by name. A type claimed
    by two plug-ins is an error naming both."""
    found: list[Plugin] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = resolve(ep.value, what=f"plug-in {ep.name!r}")
        if not isinstance(plugin, Plugin):
            raise PluginError(f"plug-in {ep.name!r}: {ep.value!r} is not a "
                              "workers.core.plugins.Plugin")
        if plugin.name == CORE:
            raise PluginError(f"plug-in {ep.name!r}: the name {CORE!r} is the core's")
        found.append(plugin)
    found.sort(key=lambda p: p.name)
    claimed: dict[str, str] = {}
    for plugin in found:
        for job_type in plugin.handlers:
            if job_type in claimed:
                raise PluginError(f"job type {job_type!r} is declared by plug-ins "
                                  f"{claimed[job_type]!r} and {plugin.name!r}")
            claimed[job_type] = plugin.name
    return tuple(found)


def for_type(job_type: str) -> Plugin | None:
    """The plug-in that declares `job_type`, if any."""
    for plugin in installed():
        if job_type in plugin.handlers:
            return plugin
    return None


def handler_spec(job_type: str) -> str | None:
    plugin = for_type(job_type)
    return plugin.handlers[job_type] if plugin else None


@cache
def _hook(spec: str, what: str) -> Callable[..., Any]:
    return resolve(spec, what=what)


def job_settings(job_type: str) -> Callable[[Any], Mapping[str, str]] | None:
    """The settings hook for jobs of `job_type` (None: the type's jobs set nothing)."""
    plugin = for_type(job_type)
    if plugin is None or plugin.job_settings is None:
        return None
    return _hook(plugin.job_settings, f"plug-in {plugin.name!r} job_settings")


def dispatch_outcomes(conn: Any, events: Sequence[JobEvent]) -> None:
    """Hand each plug-in the events of its own types, in the caller's transaction. A
    hook that raises makes the caller's statement fail with it: the status change and
    what the plug-in writes for it commit together or not at all."""
    if not events:
        return
    by_plugin: dict[str, list[JobEvent]] = {}
    hooks: dict[str, Callable[..., Any]] = {}
    for event in events:
        plugin = for_type(event.job_type)
        if plugin is None or plugin.outcomes is None:
            continue
        if plugin.name not in hooks:
            hooks[plugin.name] = _hook(plugin.outcomes, f"plug-in {plugin.name!r} outcomes")
        by_plugin.setdefault(plugin.name, []).append(event)
    for name, batch in by_plugin.items():
        hooks[name](conn, batch)


def probes() -> dict[str, tuple[Plugin, str]]:
    """HTTP path -> (plug-in, probe spec), over every plug-in."""
    out: dict[str, tuple[Plugin, str]] = {}
    for plugin in installed():
        for path, spec in plugin.probes.items():
            if path in out:
                raise PluginError(f"probe path {path!r} is declared by plug-ins "
                                  f"{out[path][0].name!r} and {plugin.name!r}")
            out[path] = (plugin, spec)
    return out
