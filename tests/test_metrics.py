"""The metric set: names, bounded labels, buckets, and promtool's lint of the exposition."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import CAPTURE_TO_PUBLISH_BUCKETS, FRAME_DROP_REASONS, Metrics

# Every label any beltsort_ metric may carry: each has a small, fixed set of values.
BOUNDED_LABELS = {"source", "reason", "bin", "stage", "queue", "topic"}

EXPECTED = {
    "beltsort_frames_total",
    "beltsort_frames_dropped_total",
    "beltsort_objects_total",
    "beltsort_decisions_total",
    "beltsort_crops_dropped_total",
    "beltsort_capture_to_publish_seconds",
    "beltsort_stage_seconds",
    "beltsort_inference_seconds",
    "beltsort_batch_size",
    "beltsort_queue_depth",
    "beltsort_source_up",
    "beltsort_source_reconnects_total",
    "beltsort_publish_dropped_total",
    "beltsort_messages_published_total",
    "beltsort_model_info",
    "beltsort_ready",
}


def exercised() -> Metrics:
    """A fresh Metrics with every metric given a value, as a running daemon would."""
    m = Metrics(CollectorRegistry())
    m.init_source("cam0")
    m.frames.labels(source="cam0").inc(30)
    m.frames_dropped.labels(source="cam0", reason="queue_full").inc()
    m.objects.labels(source="cam0").inc(2)
    m.decisions.labels(bin="3", reason="ok").inc()
    m.crops_dropped.labels(reason="queue_full").inc()
    m.capture_to_publish.observe(0.042)
    for stage in ("locate", "queue", "infer", "decide", "publish"):
        m.stage.labels(stage=stage).observe(0.002)
    m.inference.observe(0.011)
    m.batch_size.observe(8)
    m.queue_depth.labels(queue="crops").set(5)
    m.source_up.labels(source="cam0").set(1)
    m.source_reconnects.labels(source="cam0").inc()
    m.publish_dropped.inc()
    m.messages_published.labels(topic="decision").inc()
    m.set_model(model_id="0123456789ab", provider="CPUExecutionProvider", labels=20,
                input_size=96, precision="fp32")  # fmt: skip
    m.ready.set(1)
    return m


def test_every_metric_is_exposed_with_its_value():
    m = exercised()
    value = m.registry.get_sample_value
    names = {metric.name for metric in m.registry.collect()}
    # collect() names counters without _total and Info without _info; compare by prefix.
    for name in EXPECTED:
        assert any(name.startswith(n) for n in names), name
    assert value("beltsort_frames_total", {"source": "cam0"}) == 30
    assert value("beltsort_frames_dropped_total", {"source": "cam0", "reason": "stale"}) == 0
    assert value("beltsort_capture_to_publish_seconds_bucket", {"le": "0.05"}) == 1
    assert value("beltsort_capture_to_publish_seconds_bucket", {"le": "0.03"}) == 0
    assert value("beltsort_batch_size_sum") == 8
    assert value("beltsort_source_up", {"source": "cam0"}) == 1
    assert value("beltsort_ready") == 1
    info = {"model_id": "0123456789ab", "provider": "CPUExecutionProvider", "labels": "20",
            "input_size": "96", "precision": "fp32"}  # fmt: skip
    assert value("beltsort_model_info", info) == 1


def test_labels_are_bounded():
    m = exercised()
    for metric in m.registry.collect():
        for sample in metric.samples:
            if metric.name == "beltsort_model":
                continue  # Info: one series, facts of the loaded model
            extra = set(sample.labels) - BOUNDED_LABELS - {"le"}
            assert not extra, f"{sample.name} has unbounded labels {extra}"


def test_init_source_creates_the_series_at_zero():
    m = Metrics(CollectorRegistry())
    m.init_source("cam1")
    value = m.registry.get_sample_value
    assert value("beltsort_frames_total", {"source": "cam1"}) == 0
    for reason in FRAME_DROP_REASONS:
        assert value("beltsort_frames_dropped_total", {"source": "cam1", "reason": reason}) == 0
    assert value("beltsort_source_up", {"source": "cam1"}) == 0


def test_capture_to_publish_buckets_span_1_to_200_ms():
    assert CAPTURE_TO_PUBLISH_BUCKETS[0] == 0.001
    assert 0.200 in CAPTURE_TO_PUBLISH_BUCKETS
    assert list(CAPTURE_TO_PUBLISH_BUCKETS) == sorted(CAPTURE_TO_PUBLISH_BUCKETS)
    # at least 10 buckets inside the range the operator cares about
    assert sum(0.001 <= b <= 0.200 for b in CAPTURE_TO_PUBLISH_BUCKETS) >= 10


def test_default_registry_is_private_and_has_process_metrics():
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries": not the global registry
    assert first.registry is not second.registry
    text = generate_latest(first.registry).decode()
    assert "process_cpu_seconds_total" in text or "python_info" in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (Prometheus)")
def test_promtool_accepts_the_exposition():
    text = generate_latest(exercised().registry)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
