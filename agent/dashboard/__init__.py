"""Operator dashboard: live fleet view, station pages, alarms, charts and a read-only JSON
API over the agent's database (docs/dashboard.md)."""

from .app import DashboardServer, make_app
from .live import Live
from .state import FleetState, ViewConfig

__all__ = ["DashboardServer", "FleetState", "Live", "ViewConfig", "make_app"]
