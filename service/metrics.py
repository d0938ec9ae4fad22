"""Every Prometheus metric the daemon exports, in one place.

The registry is passed in, so each test builds a fresh one and reads values
back with ``registry.get_sample_value(...)``; the daemon passes none and gets
its own registry with the process and platform collectors added (never the
module-global default registry, which would make a second ``Metrics`` in one
process fail with "Duplicated timeseries").

Labels are bounded: a source name, a stage, a queue, a bin, a reason. Never a
track id, a frame index or anything else that grows with time.

Usage::

    metrics = Metrics()
    metrics.init_source("cam0")
    metrics.frames.labels(source="cam0").inc()
    with metrics.stage.labels(stage="infer").time():
        ...
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

# Capture-to-publish on a healthy line sits between a few ms (GPU, small
# batches) and ~200 ms (CPU, full batches, max_wait_ms); finer steps at the
# low end, and two buckets past 200 ms so an overload shows as such rather than
# disappearing into +Inf.
CAPTURE_TO_PUBLISH_BUCKETS = (
    0.001, 0.002, 0.005, 0.0075, 0.010, 0.015, 0.020, 0.030, 0.050,
    0.075, 0.100, 0.150, 0.200, 0.300, 0.500,
)  # fmt: skip

# One pipeline stage (locate one frame, wait in the batch queue, one inference
# batch, one decision, one send) is 0.1 ms .. a few hundred ms.
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.010, 0.025,
    0.050, 0.100, 0.250, 0.500,
)  # fmt: skip

# One onnxruntime run of a batch: ~1 ms (GPU, batch 1) .. ~0.5 s (CPU, big batch).
INFERENCE_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.010, 0.020, 0.050, 0.100, 0.200, 0.500, 1.0,
)  # fmt: skip

# Batch sizes are small integers; powers of two and their midpoints up to 128.
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

# Reasons a frame is dropped at the source, pre-created per source so that the
# series exist (at 0) from the first scrape and rate() works from the start.
FRAME_DROP_REASONS = ("queue_full", "stale", "decode_error")


class Metrics:
    """Every ``beltsort_`` metric, registered on the given registry.

    ``registry=None`` creates a private registry with the process and platform
    collectors (CPU, memory, open files, Python version); tests pass a fresh
    ``CollectorRegistry()`` and get only beltsort's own metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        reg = {"registry": registry, "namespace": "beltsort"}

        # Sources
        self.frames = Counter("frames", "Frames read from a source.", ["source"], **reg)
        self.frames_dropped = Counter(
            "frames_dropped",
            "Frames dropped before processing, by source and reason.",
            ["source", "reason"],
            **reg,
        )
        self.source_up = Gauge(
            "source_up", "1 while the source delivers frames, else 0.", ["source"], **reg
        )
        self.source_reconnects = Counter(
            "source_reconnects",
            "Attempts to reopen a source after it failed, whether or not they succeeded.",
            ["source"],
            **reg,
        )

        # Objects and decisions
        self.objects = Counter(
            "objects", "New tracks (objects) seen, by source.", ["source"], **reg
        )
        self.decisions = Counter(
            "decisions", "Decisions made, by bin and reason.", ["bin", "reason"], **reg
        )
        self.crops_dropped = Counter(
            "crops_dropped", "Crops never classified, by reason.", ["reason"], **reg
        )

        # Latency
        self.capture_to_publish = Histogram(
            "capture_to_publish_seconds",
            "Wall-clock time from frame capture to the decision leaving the socket.",
            buckets=CAPTURE_TO_PUBLISH_BUCKETS,
            **reg,
        )
        self.stage = Histogram(
            "stage_seconds",
            "Time spent in one pipeline stage (locate, queue, infer, decide, publish).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            **reg,
        )
        self.inference = Histogram(
            "inference_seconds",
            "One onnxruntime run of one batch.",
            buckets=INFERENCE_BUCKETS,
            **reg,
        )
        self.batch_size = Histogram(
            "batch_size", "Crops per inference batch.", buckets=BATCH_SIZE_BUCKETS, **reg
        )
        self.queue_depth = Gauge(
            "queue_depth", "Items waiting in an internal queue.", ["queue"], **reg
        )

        # Publishing
        self.publish_dropped = Counter(
            "publish_dropped",
            "Messages dropped by the publisher (its queue was full or the message could not be "
            "encoded); ZeroMQ's own high-water-mark drops are not seen here, only as seq gaps.",
            **reg,
        )
        self.messages_published = Counter(
            "messages_published",
            "Messages handed to the ZeroMQ socket, by topic.",
            ["topic"],
            **reg,
        )

        # Model and readiness
        self.model_info = Info(
            "model", "The loaded model: id, execution provider, classes, input size.", **reg
        )
        self.ready = Gauge(
            "ready", "1 when the model is warm and at least one source is up.", **reg
        )

    def init_source(self, source: str) -> None:
        """Create a source's series at 0, so dashboards and rate() see them from the start."""
        self.frames.labels(source=source)
        for reason in FRAME_DROP_REASONS:
            self.frames_dropped.labels(source=source, reason=reason)
        self.objects.labels(source=source)
        self.source_up.labels(source=source).set(0)
        self.source_reconnects.labels(source=source)

    def set_model(
        self, *, model_id: str, provider: str, labels: int, input_size: int, precision: str
    ) -> None:
        """Publish the loaded model's facts as ``beltsort_model_info{...} 1``."""
        self.model_info.info(
            {
                "model_id": model_id,
                "provider": provider,
                "labels": str(labels),
                "input_size": str(input_size),
                "precision": precision,
            }
        )
