"""Typed keys of the aiohttp application and requests."""

from __future__ import annotations

from aiohttp import web

from .core import Gateway
from .settings import GatewaySettings

GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", GatewaySettings)
CLIENT_KEY = web.RequestKey("client_key", str)  # who is asking: a token's fingerprint, or the client address
