"""The monitoring report of a period (`stationctl report`, docs/mrv.md).

- tables.py   the report's tables as pure functions of what was read (stdlib + agent.ledger
              only: `stationctl verify --bundle` rebuilds them on a clean machine)
- collect.py  what the report reads from the store besides the records: signatures of
              the period's raw messages, quarantine by reason, the meter register
- render.py   CSV, HTML (self-contained: inline CSS and SVG) and PDF (reportlab), charts
              with matplotlib; imported only when rendering
"""

from agent.report.tables import (
    NOT_VALIDATED,
    RECORD_TABLES,
    Inputs,
    QuarantineCount,
    Report,
    SigCount,
    Table,
    build,
    record_tables_csv,
    validated,
)

__all__ = [
    "NOT_VALIDATED",
    "RECORD_TABLES",
    "Inputs",
    "QuarantineCount",
    "Report",
    "SigCount",
    "Table",
    "build",
    "record_tables_csv",
    "validated",
]
