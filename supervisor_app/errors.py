"""Errors the CLI turns into exit codes."""


class BadInput(Exception):
    """Invalid arguments or input, or an unreachable database: exit 2, one line."""


class Failed(Exception):
    """The operation ran but failed (a job failed, a wait timed out): exit 1."""
