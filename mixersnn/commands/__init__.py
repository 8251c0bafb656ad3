"""Subcommands of the ``mixersnn`` CLI that need only the model library."""
