"""Typed keys of the application's state, each set once by `create_app` or a cleanup context."""

from aiohttp import web

from protocol.trickle import TrickleServer

from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
TRICKLE = web.AppKey("trickle", TrickleServer)
