"""Gather crops from every source into batches for one inference session.

Producers (one pipeline thread per source) call :meth:`Batcher.put`, which by
default never blocks: when the queue is full the crop is dropped and counted,
and ``put`` returns False so the caller can tell the decider that this view will
never come back. The one consumer (the inference thread) calls :meth:`Batcher.next_batch`,
which returns as soon as ``max_batch`` crops are waiting, or when the oldest
waiting crop has waited ``max_wait_ms``, whichever comes first. The batch wait
is counted from the oldest crop's arrival, not from the call, so a crop never
sits in the queue for batching longer than ``max_wait_ms`` while the consumer is
idle.

Order is first in, first out across all sources: the decider relies on a
track's results coming back in the order its crops were queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.errors import ConfigError

logger = logging.getLogger(__name__)

QUEUE_NAME = "crops"  # label value of beltsort_queue_depth{queue}
DROP_REASONS = ("queue_full", "closed")  # beltsort_crops_dropped_total{reason} counted here


@dataclass
class CropJob:
    """One view of one tracked object, waiting for inference."""

    source: str
    track_id: int
    frame_index: int
    crop: np.ndarray  # (S, S, 3) uint8 BGR, as cut by service.locate.cut_crop
    t_enqueued: float = field(default_factory=time.monotonic)  # time.monotonic() seconds


class Batcher:
    """Bounded, thread-safe: gathers crops from all sources up to max_batch or max_wait_ms.

    ``capacity`` is the most crops waiting at once; it should be a few batches'
    worth, since a crop that waits longer than a few batches is stale anyway.
    ``metrics`` (a :class:`service.metrics.Metrics`) may be None in tools and
    tests that do not export metrics.

    Usage::

        batcher = Batcher(max_batch=8, max_wait_ms=5, capacity=256, metrics=metrics)
        if not batcher.put(job):        # producer threads
            decider.view_dropped(job.source, job.track_id)
        jobs = batcher.next_batch(0.1)  # the inference thread; [] on timeout
        batcher.close()                 # wakes the consumer; later puts are refused
    """

    def __init__(self, max_batch: int, max_wait_ms: float, capacity: int, metrics=None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch is {max_batch!r}; it must be a whole number >= 1")
        if not max_wait_ms >= 0:  # also rejects NaN
            raise ConfigError(f"max_wait_ms is {max_wait_ms!r}; it must be >= 0 milliseconds")
        if not isinstance(capacity, int) or capacity < max_batch:
            raise ConfigError(
                f"batch queue capacity is {capacity!r}; it must be a whole number >= max_batch "
                f"({max_batch}), a few batches' worth is typical"
            )
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = capacity
        self._metrics = metrics
        self._jobs: deque[CropJob] = deque()
        # Arrival times on our own clock, parallel to _jobs: the batch deadline must
        # not depend on a t_enqueued that a caller may have stamped differently.
        self._arrived: deque[float] = deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the consumer waits here for crops
        self._room = threading.Condition(lock)  # producers with a put timeout wait for room
        self._closed = False
        self.dropped = 0  # crops refused since start (also in beltsort_crops_dropped_total)
        if metrics is not None:
            # Series exist at 0 from the first scrape, so rate() sees the first drop.
            for reason in DROP_REASONS:
                metrics.crops_dropped.labels(reason=reason)
            metrics.queue_depth.labels(queue=QUEUE_NAME).set(0)

    def put(self, job: CropJob, timeout_s: float = 0.0) -> bool:
        """Queue ``job``; False when it was dropped (queue full, or closed), and counted.

        ``timeout_s=0`` (the default, for live sources) never blocks. A positive
        ``timeout_s`` waits that long for room first (back-pressure for sources
        that can be paused, such as files read as fast as possible); only a put
        that finally fails counts as a drop.
        """
        with self._cond:
            if timeout_s > 0 and not self._closed and len(self._jobs) >= self.capacity:
                give_up = time.monotonic() + timeout_s
                while not self._closed and len(self._jobs) >= self.capacity:
                    remaining = give_up - time.monotonic()
                    if remaining <= 0:
                        break
                    self._room.wait(remaining)
            if self._closed or len(self._jobs) >= self.capacity:
                reason = "closed" if self._closed else "queue_full"
                self.dropped += 1
            else:
                reason = None
                self._jobs.append(job)
                self._arrived.append(time.monotonic())
                # A full batch is what the consumer waits for; an earlier wake-up
                # only makes it re-check and sleep again.
                if len(self._jobs) == 1 or len(self._jobs) >= self.max_batch:
                    self._cond.notify()
            # Under the lock, so the last depth written is the latest one.
            self._set_depth(len(self._jobs))
        if reason is not None and self._metrics is not None:
            self._metrics.crops_dropped.labels(reason=reason).inc()
        return reason is None

    def next_batch(self, timeout_s: float) -> list[CropJob]:
        """Up to ``max_batch`` jobs, oldest first; ``[]`` when none came within ``timeout_s``.

        Once a first crop is waiting, returns when ``max_batch`` are waiting or
        the oldest has waited ``max_wait_ms``. After :meth:`close` it returns
        what is still queued without waiting, then ``[]``.
        """
        give_up = time.monotonic() + timeout_s
        with self._cond:
            # Wait for a first crop
            while not self._jobs and not self._closed:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

            # Fill the batch until full or the oldest crop's wait is up
            while len(self._jobs) < self.max_batch and not self._closed:
                remaining = self._arrived[0] + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)

            n = min(len(self._jobs), self.max_batch)
            batch = [self._jobs.popleft() for _ in range(n)]
            arrived = [self._arrived.popleft() for _ in range(n)]
            if n:
                self._room.notify_all()
            self._set_depth(len(self._jobs))

        if self._metrics is not None:
            now = time.monotonic()
            stage = self._metrics.stage.labels(stage="queue")
            for t in arrived:
                stage.observe(now - t)
        return batch

    def _set_depth(self, depth: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(queue=QUEUE_NAME).set(depth)

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse further crops (counted as dropped, reason ``closed``) and wake the consumer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._room.notify_all()
