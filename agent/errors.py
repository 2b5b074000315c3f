"""Exceptions shared by the command-line modules.

`UsageError` lives here rather than in agent/cli.py: `python -m agent.cli` runs that file
as `__main__` while the subcommand modules import `agent.cli`, so a class defined there
would exist twice and `main()` would not catch the one the commands raise.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage or bad input: printed as one line on stderr, exit status 2."""
