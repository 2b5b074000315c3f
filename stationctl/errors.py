"""Exceptions shared by the command-line modules."""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage or bad input: printed as one line on stderr, exit status 2."""
