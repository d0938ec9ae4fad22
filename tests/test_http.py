"""HealthServer over real HTTP on an ephemeral loopback port (urllib, with timeouts)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from service.errors import ConfigError
from service.http import HealthServer
from service.metrics import Metrics

pytestmark = pytest.mark.timeout(60)


class Switch:
    """A health/readiness callback whose answer the test flips."""

    def __init__(self, ok: bool, **details) -> None:
        self.ok, self.details, self.error = ok, details, None

    def __call__(self) -> tuple[bool, dict]:
        if self.error is not None:
            raise self.error
        return self.ok, dict(self.details)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def served(metrics):
    health, ready = Switch(True, loop_age_s=0.01), Switch(False, model="loading", sources_up=0)
    server = HealthServer("127.0.0.1", 0, metrics.registry, health, ready)
    server.start()
    yield server, health, ready
    server.stop()


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of one GET; 4xx/5xx are answers, not errors."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_port_zero_gives_a_real_port(served):
    server, _, _ = served
    assert server.port > 0
    status, _, _ = get(server.port, "/")
    assert status == 200


def test_scrape_shows_metric_names_with_values(served, metrics):
    server, _, _ = served
    metrics.init_source("cam0")
    metrics.frames.labels(source="cam0").inc(12)
    metrics.capture_to_publish.observe(0.025)
    metrics.ready.set(1)
    status, content_type, text = get(server.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    lines = text.splitlines()
    assert 'beltsort_frames_total{source="cam0"} 12.0' in lines
    assert "beltsort_capture_to_publish_seconds_count 1.0" in lines
    assert 'beltsort_capture_to_publish_seconds_bucket{le="0.03"} 1.0' in lines
    assert "beltsort_ready 1.0" in lines
    assert "# TYPE beltsort_stage_seconds histogram" in lines


def test_healthz_and_readyz_follow_their_callbacks(served):
    server, health, ready = served
    status, content_type, body = get(server.port, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok", "loop_age_s": 0.01})
    assert content_type == "application/json"
    status, _, body = get(server.port, "/readyz")
    assert status == 503
    assert json.loads(body) == {"status": "fail", "model": "loading", "sources_up": 0}

    health.ok, ready.ok = False, True
    ready.details = {"model": "warm", "sources_up": 2}
    assert get(server.port, "/healthz")[0] == 503
    status, _, body = get(server.port, "/readyz?verbose=1")  # a query string is ignored
    assert (status, json.loads(body)["sources_up"]) == (200, 2)


def test_a_raising_callback_is_a_503_with_the_error(served):
    server, health, _ = served
    health.error = RuntimeError("pipeline thread gone")
    status, _, body = get(server.port, "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "fail", "error": "RuntimeError: pipeline thread gone"}


def test_unknown_path_is_a_json_404(served):
    server, _, _ = served
    status, content_type, body = get(server.port, "/nope")
    assert status == 404 and content_type == "application/json"
    assert "/nope" in json.loads(body)["error"]


def test_a_used_port_is_a_config_error_naming_it(served, metrics):
    server, _, _ = served
    other = HealthServer("127.0.0.1", server.port, metrics.registry, Switch(True), Switch(True))
    with pytest.raises(ConfigError, match=f"127.0.0.1:{server.port}.*choose another HTTP port"):
        other.start()


def test_a_bad_port_is_refused():
    with pytest.raises(ConfigError, match="70000"):
        HealthServer("127.0.0.1", 70000, CollectorRegistry(), Switch(True), Switch(True))


def test_stop_closes_the_port(metrics):
    server = HealthServer("127.0.0.1", 0, metrics.registry, Switch(True), Switch(True))
    server.start()
    port = server.port
    assert get(port, "/healthz")[0] == 200
    server.stop()
    server.stop()  # twice is harmless
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (Prometheus)")
def test_promtool_accepts_a_live_scrape(served, metrics):
    server, _, _ = served
    metrics.init_source("cam0")
    metrics.decisions.labels(bin="0", reason="ok").inc()
    _, _, text = get(server.port, "/metrics")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
