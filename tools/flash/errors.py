"""Errors of the flashing tool: each is one line for the technician, with an exit status."""

from __future__ import annotations


class FlashError(Exception):
    """A failure (exit status 1): the board, the port, the agent, the self-test.
    `stage` names the step it happened in (the report and the summary show it)."""

    code = 1

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


class BadInput(FlashError):
    """Bad usage or bad input (exit status 2): arguments, the site file, the batch CSV."""

    code = 2
