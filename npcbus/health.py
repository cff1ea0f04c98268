"""Readiness of a service, and the probe that container healthchecks (and ``npcbus run``) call.

A service calls :func:`mark_ready` once it has started and serves; its ``/metrics`` page then shows
``npcbus_service_ready{service="..."} 1``. The bus client keeps ``npcbus_bus_connected{client=...}``
at 1 while its connection is up. The probe::

    python -m npcbus.health http://127.0.0.1:9100/metrics      # a service's metrics page
    python -m npcbus.health http://127.0.0.1:8080/health       # the gateway's health route

passes (exit 0) when the page answers 200 and, for a metrics page, every service on it is ready
and every bus client connected; otherwise it prints why and exits 1. No third-party imports, so
it starts fast enough for a healthcheck.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def mark_ready(service: str, ready: bool = True) -> None:
    from npcbus.metrics import SERVICE_READY

    SERVICE_READY.labels(service).set(1 if ready else 0)


def _samples(text: str, name: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            try:
                out.append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return out


def check(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, reason) of the page at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read().decode(errors="replace")
            status = resp.status
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except OSError as e:
        return False, f"unreachable: {e}"
    if status != 200:
        return False, f"HTTP {status}"
    if url.rstrip("/").endswith("/metrics"):
        ready = _samples(body, "npcbus_service_ready")
        connected = _samples(body, "npcbus_bus_connected")
        if not ready or min(ready) < 1:
            return False, "not ready yet"
        if not connected or min(connected) < 1:
            return False, "not connected to the broker"
    return True, "ok"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m npcbus.health URL", file=sys.stderr)
        return 2
    ok, why = check(argv[0])
    if not ok:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
