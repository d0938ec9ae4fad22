"""The cross-source crop batcher: batch size, batch wait, bounds, drops, threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.batcher import Batcher, CropJob
from service.errors import ConfigError
from service.metrics import Metrics

CROP = np.zeros((8, 8, 3), dtype=np.uint8)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def job(i: int, source: str = "cam0") -> CropJob:
    return CropJob(source=source, track_id=i, frame_index=i, crop=CROP)


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_gathers_up_to_max_batch_in_order(metrics):
    batcher = Batcher(max_batch=8, max_wait_ms=20, capacity=64, metrics=metrics)
    for i in range(20):
        assert batcher.put(job(i))

    sizes, ids = [], []
    for _ in range(3):
        batch = batcher.next_batch(timeout_s=1.0)
        sizes.append(len(batch))
        ids += [j.track_id for j in batch]
    assert sizes == [8, 8, 4]
    assert ids == list(range(20))
    assert sample(metrics, "beltsort_queue_depth", queue="crops") == 0
    assert sample(metrics, "beltsort_stage_seconds_count", stage="queue") == 20


def test_full_batch_returns_without_waiting():
    batcher = Batcher(max_batch=4, max_wait_ms=2000, capacity=16)
    for i in range(4):
        batcher.put(job(i))
    t0 = time.monotonic()
    assert len(batcher.next_batch(timeout_s=5.0)) == 4
    assert time.monotonic() - t0 < 0.5  # far below max_wait_ms


def test_partial_batch_returns_after_max_wait():
    batcher = Batcher(max_batch=8, max_wait_ms=100, capacity=16)
    for i in range(3):
        batcher.put(job(i))
    t0 = time.monotonic()
    batch = batcher.next_batch(timeout_s=5.0)
    waited = time.monotonic() - t0
    assert len(batch) == 3
    assert 0.08 <= waited < 1.0  # ~max_wait_ms, nowhere near timeout_s


def test_batch_wait_counts_from_the_oldest_crop():
    # A crop that already waited max_wait_ms while the consumer was busy goes at once.
    batcher = Batcher(max_batch=8, max_wait_ms=50, capacity=16)
    batcher.put(job(0))
    time.sleep(0.08)
    t0 = time.monotonic()
    assert len(batcher.next_batch(timeout_s=5.0)) == 1
    assert time.monotonic() - t0 < 0.04


def test_empty_queue_times_out_with_empty_list():
    batcher = Batcher(max_batch=8, max_wait_ms=10, capacity=16)
    t0 = time.monotonic()
    assert batcher.next_batch(timeout_s=0.1) == []
    assert 0.09 <= time.monotonic() - t0 < 1.0


def test_full_queue_drops_and_counts(metrics):
    batcher = Batcher(max_batch=4, max_wait_ms=10, capacity=8, metrics=metrics)
    accepted = [batcher.put(job(i)) for i in range(11)]
    assert accepted == [True] * 8 + [False] * 3
    assert len(batcher) == 8
    assert batcher.dropped == 3
    assert sample(metrics, "beltsort_crops_dropped_total", reason="queue_full") == 3
    assert sample(metrics, "beltsort_queue_depth", queue="crops") == 8
    # the queue keeps the oldest crops; the refused ones were the newest
    assert [j.track_id for j in batcher.next_batch(1.0)] == [0, 1, 2, 3]
    assert batcher.put(job(99))


def test_close_wakes_consumer_refuses_and_drains(metrics):
    batcher = Batcher(max_batch=8, max_wait_ms=5000, capacity=16, metrics=metrics)
    batcher.put(job(1))
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(batcher.next_batch(timeout_s=10.0)))
    consumer.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    batcher.close()
    consumer.join(timeout=2.0)
    assert not consumer.is_alive()
    assert time.monotonic() - t0 < 1.0  # woken by close, not by max_wait_ms
    assert [j.track_id for j in got[0]] == [1]
    assert not batcher.put(job(2))
    assert sample(metrics, "beltsort_crops_dropped_total", reason="closed") == 1
    assert batcher.next_batch(timeout_s=5.0) == []


@pytest.mark.parametrize("consumer_delay_s", [0.0, 0.02])
def test_two_producers_one_consumer_lose_nothing_silently(metrics, consumer_delay_s):
    # delay 0.02 s per batch: a consumer far slower than the producers, so crops drop
    per_producer = 2000
    batcher = Batcher(max_batch=16, max_wait_ms=2, capacity=64, metrics=metrics)
    refused = {"a": 0, "b": 0}
    received: list[CropJob] = []
    sizes: list[int] = []

    def produce(source: str) -> None:
        for i in range(per_producer):
            if not batcher.put(job(i, source)):
                refused[source] += 1
            if i % 20 == 0:
                time.sleep(0.001)  # let the consumer in, so most crops get through

    def consume() -> None:
        while True:
            batch = batcher.next_batch(timeout_s=0.2)
            if not batch and batcher.closed:
                return
            sizes.append(len(batch))
            received.extend(batch)
            time.sleep(consumer_delay_s)

    consumer = threading.Thread(target=consume)
    producers = [threading.Thread(target=produce, args=(s,)) for s in refused]
    consumer.start()
    for p in producers:
        p.start()
    for p in producers:
        p.join(timeout=30)
    batcher.close()
    consumer.join(timeout=5)
    assert not consumer.is_alive() and not any(p.is_alive() for p in producers)

    # every crop either arrived exactly once or was counted as dropped
    assert len(received) + sum(refused.values()) == 2 * per_producer
    assert batcher.dropped == sum(refused.values())
    assert sample(metrics, "beltsort_crops_dropped_total", reason="queue_full") == batcher.dropped
    assert max(sizes) <= 16
    for source in refused:
        ids = [j.track_id for j in received if j.source == source]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # FIFO per source, no duplicate
        # both sources got through; how many depends on the machine's load
        assert len(ids) >= 32
    if consumer_delay_s:
        assert batcher.dropped > 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_batch": 0}, "max_batch is 0"),
        ({"max_wait_ms": -1.0}, "max_wait_ms is -1.0"),
        ({"capacity": 2}, "capacity is 2"),
    ],
)
def test_bad_settings_are_refused_with_the_value(kwargs, words):
    settings = {"max_batch": 4, "max_wait_ms": 5.0, "capacity": 16, **kwargs}
    with pytest.raises(ConfigError, match=words):
        Batcher(**settings)


def test_put_with_timeout_waits_for_room_and_counts_only_final_failures(metrics):
    batcher = Batcher(max_batch=2, max_wait_ms=0, capacity=2, metrics=metrics)
    assert batcher.put(job(0)) and batcher.put(job(1))

    # no room within the timeout: one drop, not one per retry
    t0 = time.monotonic()
    assert not batcher.put(job(2), timeout_s=0.1)
    assert 0.09 <= time.monotonic() - t0 < 1.0
    assert sample(metrics, "beltsort_crops_dropped_total", reason="queue_full") == 1

    # room made by the consumer wakes the waiting producer
    timer = threading.Timer(0.05, batcher.next_batch, (1.0,))
    timer.start()
    try:
        t0 = time.monotonic()
        assert batcher.put(job(3), timeout_s=5.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        timer.join(timeout=5.0)
    assert [j.track_id for j in batcher.next_batch(1.0)] == [3]
    assert sample(metrics, "beltsort_crops_dropped_total", reason="queue_full") == 1
