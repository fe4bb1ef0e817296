"""The application factory: `create_app(settings)` composes the service from its parts."""

from __future__ import annotations

import logging

from aiohttp import web

from protocol.trickle import TrickleServer, create_trickle_app

from .errors import error_middleware
from .health import add_health_routes
from .keys import SETTINGS, TRICKLE
from .settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """Build the service. Nothing starts until the app runs (aiohttp startup)."""
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    trickle_config = settings.trickle()
    trickle = app[TRICKLE] = TrickleServer(trickle_config)
    add_health_routes(app)
    # The JSON error middleware leaves the trickle sub-app alone: it answers in go-livepeer's
    # plain-text dialect (404/400/470), which Livepeer clients depend on.
    app.add_subapp(trickle_config.base_path.rstrip("/"), create_trickle_app(trickle))
    return app
