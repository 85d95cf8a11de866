"""What every `jobvisor` command group shares: connecting by role, argument types, the
configured types, and the command kit handed to plug-ins (workers.core.commands)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import psycopg

from supervisor_app import database
from workers.core.commands import EXIT_BAD_INPUT, BadInput, CommandKit
from workers.core.dsn import Role

TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def dsn(role: Role = "owner") -> str:
    """A reachable DSN for `role` (workers.core.dsn), the embedded server if none is set."""
    found = database.resolve_dsn(role)
    database.check(found)
    return found


def connect(role: Role = "owner") -> psycopg.Connection:
    return psycopg.connect(dsn(role), autocommit=True)


def duration(value: str) -> float:
    from supervisor_app.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def json_payload(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def known_types() -> dict[str, Any]:
    """Types the configuration declares, with their settings (empty if no config)."""
    from supervisor_app.config import ConfigError, load_config, resolve_config_path

    try:
        return dict(load_config(resolve_config_path(None)).types)
    except (ConfigError, FileNotFoundError):
        return {}


def max_attempts(job_type: str, default: int = 5) -> int:
    settings = known_types().get(job_type)
    return settings.retry.max_attempts if settings else default


def check_type(job_type: str) -> None:
    from workers.core.registry import HandlerError, handler_spec

    if not TYPE_NAME.match(job_type):
        raise BadInput(f"job type {job_type!r}: use lowercase letters, digits and _ "
                       "(starting with a letter)")
    types = known_types()
    try:
        handler_spec(job_type, getattr(types.get(job_type), "handler", None))
    except HandlerError as exc:
        raise BadInput(f"{exc.code}: {exc}") from exc


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem, as scripts expect; --help shows the usage.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")


def make_kit(top: Any) -> CommandKit:
    """The kit for command groups adding to `top` (the parser's sub-parsers object)."""
    from supervisor_app.cli.batches import wait_for_batch

    def add(name: str, func: Any, help: str, parent: Any = top) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func, kit=kit)
        return sp

    kit = CommandKit(add=add, duration=duration, dsn=dsn, max_attempts=max_attempts,
                     wait_for_batch=wait_for_batch)
    return kit
