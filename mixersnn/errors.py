"""The error type for problems with what the user asked for."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with what the user asked for (a value, a path, a server), stated in one line
    that names the value, the allowed range and the fix. The ``mixersnn`` command prints it on
    stderr and exits 2 (``mixersnn --debug`` shows the traceback)."""
