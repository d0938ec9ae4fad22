"""One small HTTP port for operators: ``/metrics``, ``/healthz``, ``/readyz``.

``/metrics``  Prometheus text exposition of the given registry (prometheus_client's own
              ``generate_latest``, so the format is the library's, not ours).
``/healthz``  liveness: the pipeline loop is alive. 200 or 503, JSON body.
``/readyz``   readiness: the model is loaded and warm and at least one source is up.
              200 or 503, JSON body.

Health and readiness are decided by the daemon through two callbacks that
return ``(ok, details)``; ``details`` goes into the JSON body beside
``"status": "ok"`` or ``"status": "fail"``. A callback that raises counts as
not OK (503), with the error in the body: a probe must never hang or 500.

Usage::

    server = HealthServer("127.0.0.1", 0, metrics.registry, health=pipeline.health,
                          ready=pipeline.ready)
    server.start()
    print(server.port)          # the ephemeral port, when 0 was asked for
    ...
    server.stop()
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.errors import ConfigError

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict]]

# How long stop() waits for the serving thread after shutdown(); serve_forever
# notices shutdown within its poll interval.
_POLL_INTERVAL_S = 0.2
_STOP_JOIN_S = 5.0


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a daemon thread.

    ``port=0`` picks a free port; read it back from ``port`` after ``start()``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Probe,
        ready: Probe,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"HTTP port {port} is outside 0..65535 (0 picks a free port)")
        self.host = host
        self.port = port
        self._registry = registry
        self._probes = {"/healthz": health, "/readyz": ready}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Listen and serve in a daemon thread. ConfigError when the port cannot be had."""
        if self._server is not None or self._stopped:
            raise RuntimeError("HealthServer.start() called twice; create a new one")
        try:
            server = ThreadingHTTPServer((self.host, self.port), self._handler_class())
        except OSError as exc:
            hint = (
                "another beltsort or exporter uses it? choose another HTTP port"
                if exc.errno == errno.EADDRINUSE
                else "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
            )
            raise ConfigError(
                f"cannot serve HTTP on {self.host}:{self.port}: {exc.strerror}; {hint}"
            ) from exc
        server.daemon_threads = True  # a stuck client never holds up shutdown
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"http :{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and close the port; joins the thread with a bound. Safe to call twice."""
        self._stopped = True
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=_STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("HTTP thread did not end within %.1f s", _STOP_JOIN_S)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ handling

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        registry, probes = self._registry, self._probes

        class Handler(BaseHTTPRequestHandler):
            server_version = "beltsort"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    code, body = _probe(probes[path], path)
                    self._send_json(code, body)
                elif path == "/":
                    self._send_json(200, {"endpoints": ["/metrics", "/healthz", "/readyz"]})
                else:
                    self._send_json(404, {"error": f"no such path {path!r}"})

            def _send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body, default=str).encode() + b"\n"
                self._send(code, data, "application/json")

            def _send(self, code: int, data: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                # One line per scrape every few seconds is noise, not an event.
                log.debug("%s %s", self.address_string(), format % args)

        return Handler


def _probe(probe: Probe, path: str) -> tuple[int, dict]:
    """Run a health or readiness callback; anything but a clean True is a 503."""
    try:
        ok, details = probe()
    except Exception as exc:
        log.warning("%s check raised %s: %s", path, type(exc).__name__, exc)
        return 503, {"status": "fail", "error": f"{type(exc).__name__}: {exc}"}
    body = {"status": "ok" if ok else "fail", **(details or {})}
    return (200 if ok else 503), body
