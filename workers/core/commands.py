"""What a plug-in's `jobvisor` sub-commands get from the CLI (`Plugin.commands`).

The CLI calls the plug-in's `register(subparsers, kit)` while it builds its parser. The
plug-in adds its commands with `kit.add(name, func, help, parent)`; each `func(args)`
finds the same kit as `args.kit` and returns the exit code. Raising `BadInput` (exit 2)
or `Failed` (exit 1) prints one line naming the problem. jobvisor's own command groups
register the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Invalid arguments or input, or an unreachable database: exit 2, one line."""


class Failed(Exception):
    """The operation ran but failed (a job failed, a wait timed out): exit 1."""


Command = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class CommandKit:
    # add(name, func, help, parent) -> the new sub-parser; `parent` is the sub-parsers
    # object to add to (the top level, or a group's own add_subparsers()).
    add: Callable[..., argparse.ArgumentParser]
    # argparse `type=` for a duration ("30s", "10m", "1h", or seconds).
    duration: Callable[[str], float]
    # A reachable DSN for a database role ("owner", "worker", "backup"; see
    # workers.core.dsn), the embedded server when none is configured; BadInput if not.
    dsn: Callable[[str], str]
    # The configured max_attempts of a job type, else the given default.
    max_attempts: Callable[[str, int], int]
    # Follow a batch with a progress bar on stderr until it finished; its row, or Failed.
    wait_for_batch: Callable[..., dict[str, Any]]

    def group(self, name: str, help: str, parent: Any, dest: str) -> Any:
        """A command group (`jobvisor NAME ACTION`): returns its sub-parsers object."""
        group = self.add(name, lambda _a: EXIT_BAD_INPUT, help, parent)
        return group.add_subparsers(dest=dest, required=True, metavar="ACTION",
                                    parser_class=parent._parser_class)
