"""Prometheus helpers shared by every service.

Metrics live in the default registry under the ``npcbus_`` prefix. Workers and the aggregator
expose them with :func:`start_metrics_server` (``METRICS_PORT``); the gateway serves them on
``GET /metrics``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

_cache: dict[str, object] = {}


def _get(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
    full = f"npcbus_{name}"
    m = _cache.get(full)
    if m is None:
        m = kind(full, doc, labels, **kw)
        _cache[full] = m
    return m


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return _get(Counter, name, doc, labels)


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return _get(Gauge, name, doc, labels)


def histogram(name: str, doc: str, labels: tuple[str, ...] = (), buckets=None) -> Histogram:
    kw = {"buckets": buckets} if buckets else {}
    return _get(Histogram, name, doc, labels, **kw)


def start_metrics_server(port: int, addr: str | None = None) -> None:
    """Serve /metrics on ``port`` (no-op for port 0), on ``addr`` (default: ``METRICS_HOST``)."""
    if port:
        if addr is None:
            from npcbus.settings import BusSettings

            addr = BusSettings.from_env().metrics_host
        start_http_server(port, addr=addr)


def render() -> tuple[bytes, str]:
    """The metrics page and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# bus-level metrics, used by npcbus.bus
PUBLISHED = counter("bus_published_total", "Messages published, by message type.", ("type",))
CONSUMED = counter("bus_consumed_total", "Messages consumed, by message type and outcome.", ("type", "outcome"))
DEAD_LETTERED = counter("bus_dead_lettered_total", "Messages rejected to the dead-letter exchange, by reason code.",
                        ("queue", "reason"))
HANDLER_SECONDS = histogram("bus_handler_seconds", "Time spent in message handlers.", ("queue",))
BUS_CONNECTED = gauge("bus_connected", "1 while the bus client's broker connection is up, by client name.", ("client",))
SERVICE_READY = gauge("service_ready", "1 once a service has started and is serving (see npcbus.health).", ("service",))
