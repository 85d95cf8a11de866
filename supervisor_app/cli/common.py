"""What every `jobvisor` command group shares: connecting by role, argument types, the
configured types, and the command kit handed to plug-ins (workers.core.commands)."""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

import psycopg

from supervisor_app import database
from workers.core import queue
from workers.core.commands import EXIT_BAD_INPUT, BadInput, CommandKit
from workers.core.dsn import Role

TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

# The DSNs this command has checked, so main() can name the database in its errors
# (e.g. "not migrated") without the password.
used_dsns: list[str] = []


def dsn(role: Role = "owner") -> str:
    """A reachable DSN for `role` (workers.core.dsn), the embedded server if none is set."""
    found = database.resolve_dsn(role)
    database.check(found)
    used_dsns.append(found)
    return found


def connect(role: Role = "owner") -> psycopg.Connection:
    return psycopg.connect(dsn(role), autocommit=True)


def duration(value: str) -> float:
    from supervisor_app.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class _NotJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJson("NaN and Infinity are not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson("number out of range (beyond a double, about 1.8e308)")
    return value


def json_payload(text: str, where: str) -> Any:
    """Parse one payload; BadInput naming `where` and the problem unless PostgreSQL's jsonb
    can store it and a worker decode it (workers.core.queue.check_payload). Messages never
    quote the payload: it may be personal data."""
    try:
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except _NotJson as exc:
        raise BadInput(f"{where}: {exc}") from None
    except RecursionError:
        raise BadInput(f"{where}: nesting deeper than {queue.MAX_PAYLOAD_DEPTH} levels") from None
    except ValueError:  # an integer past Python's digit limit
        raise BadInput(f"{where}: a number has too many digits") from None
    try:
        queue.check_payload(value)
    except queue.PayloadError as exc:
        raise BadInput(f"{where}: {str(exc).removeprefix('payload ')}") from None
    return value


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


# "-5s" and "-1h30m" are values (refused by `duration` with a reason), not options: an
# option is never a minus, a digit, then letters.
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-(\d+(\.\d*)?|\.\d+)[a-zA-Z][\w.]*$")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_VALUE

    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem, as scripts expect; --help shows the usage.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")


def add_verbose(parser: argparse.ArgumentParser, default: Any = 0) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="log to stderr as well (-vv: debug); JOBVISOR_LOG_FORMAT=json|text "
                             "picks the format (default: text on a terminal, else JSON lines)")


def make_kit(top: Any) -> CommandKit:
    """The kit for command groups adding to `top` (the parser's sub-parsers object)."""
    from supervisor_app.cli.batches import wait_for_batch

    def add(name: str, func: Any, help: str, parent: Any = top) -> argparse.ArgumentParser:
        # "resolve": a plug-in's own -v replaces the global one on its command.
        sp = parent.add_parser(name, help=help, description=help, conflict_handler="resolve")
        sp.set_defaults(func=func, kit=kit)
        add_verbose(sp, default=argparse.SUPPRESS)  # `jobvisor status -v` as well
        return sp

    kit = CommandKit(add=add, duration=duration, dsn=dsn, max_attempts=max_attempts,
                     wait_for_batch=wait_for_batch)
    return kit
