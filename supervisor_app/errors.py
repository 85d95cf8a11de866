"""Errors the CLI turns into exit codes (defined with the plug-in command kit, so a
plug-in's commands raise the very same ones)."""

from workers.core.commands import BadInput, Failed

__all__ = ["BadInput", "Failed"]
