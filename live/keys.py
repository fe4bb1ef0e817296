"""Typed keys of the application's state, each set once by `create_app` or a cleanup context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from protocol.trickle import TrickleServer
from runtime.runtime import Runtime

from .settings import Settings

if TYPE_CHECKING:
    from .metrics import ServiceMetrics
    from .sessions import SessionManager

SETTINGS = web.AppKey("settings", Settings)
TRICKLE = web.AppKey("trickle", TrickleServer)
SESSIONS: web.AppKey[SessionManager] = web.AppKey("sessions")
RUNTIME = web.AppKey("runtime", Runtime)
METRICS: web.AppKey[ServiceMetrics] = web.AppKey("metrics")
