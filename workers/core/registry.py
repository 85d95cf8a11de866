"""Find the handler for a job type: YAML `handler:`, a `jobvisor.handlers` entry point, a
plug-in's declaration (workers.core.plugins), or one of the core's built-in types.

Handlers are imported only in the child that serves their type, so a `noop` child never
pays for PyMuPDF or DSPy.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from workers.core import plugins

ENTRY_POINT_GROUP = "jobvisor.handlers"

# The core's own types. The learning pipeline's and backups' come from their plug-ins.
BUILTINS: dict[str, str] = {
    "noop": "workers.core.builtin:noop",
    "sleep": "workers.core.builtin:sleep",
    "fail": "workers.core.builtin:fail",
    "webhook": "workers.core.webhook_handler:handle",
}

Handler = Callable[[Any, Any], Any]


class HandlerError(Exception):
    """A handler can't be found or doesn't fit the contract; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def entry_point_spec(job_type: str) -> str | None:
    """The `jobvisor.handlers` entry point registered for `job_type`, if any."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == job_type:
            return ep.value
    return None


def handler_spec(job_type: str, configured: str | None = None) -> str:
    """The `module:function` serving a type, or HandlerError UNKNOWN_JOB_TYPE."""
    try:
        declared = None if configured else plugins.handler_spec(job_type)
    except plugins.PluginError as exc:  # a broken plug-in: named, like a broken handler
        raise HandlerError("PLUGIN_INVALID", str(exc)) from exc
    spec = configured or entry_point_spec(job_type) or declared or BUILTINS.get(job_type)
    if not spec:
        raise HandlerError(
            "UNKNOWN_JOB_TYPE",
            f"job type {job_type!r}: no handler (set `handler:` in the YAML, register the "
            f"entry point group {ENTRY_POINT_GROUP!r}, or use a built-in type)",
        )
    return spec


def load(job_type: str, configured: str | None = None) -> Handler:
    """Import and check the handler; errors name the type and what is wrong."""
    spec = handler_spec(job_type, configured)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HandlerError(
            "HANDLER_INVALID", f"job type {job_type!r}: handler {spec!r} is not 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        raise HandlerError(
            "HANDLER_IMPORT_FAILED",
            f"job type {job_type!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}",
        ) from exc
    func = getattr(module, attr, None)
    if func is None:
        raise HandlerError(
            "HANDLER_INVALID", f"job type {job_type!r}: {module_name!r} has no {attr!r}"
        )
    check_contract(job_type, func)
    return func


def check_contract(job_type: str, func: Any) -> None:
    if not callable(func):
        raise HandlerError("HANDLER_INVALID", f"job type {job_type!r}: handler is not callable")
    if inspect.iscoroutinefunction(func):
        # Handlers run in threads; an async one would return an un-awaited coroutine.
        raise HandlerError("HANDLER_INVALID",
                           f"job type {job_type!r}: handler must be a plain function, "
                           "not `async def`")
    try:
        sig = inspect.signature(func)
        sig.bind(object(), object())
    except TypeError as exc:
        raise HandlerError(
            "HANDLER_INVALID",
            f"job type {job_type!r}: handler must accept (job, ctx): {exc}",
        ) from exc
    except ValueError:  # builtins without signatures: trust them
        return
