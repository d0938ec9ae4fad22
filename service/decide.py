"""Decide each object's bin: fuse its views, wait for stragglers, choose, time the ejector.

Every view (crop) of a tracked object is classified on its own; the decider
keeps a running fusion per track and decides once the track has crossed the
decision line.

Fusion: the mean of the views' probabilities. Views of one screw under one
light are strongly correlated, so multiplying them as if independent (a sum of
log-probabilities) would grow more confident with every extra frame, making
``confidence`` depend on belt speed and frame rate rather than on the evidence.
Between the two means that stay on the scale of one view, the arithmetic mean
beats the mean of log-probabilities (a geometric mean) on the views that go
wrong here: a crop clipped at the frame edge, blurred, or with a neighbour in
it can be confidently wrong, and under the geometric mean one such view that
gives the true class ~0 outvotes several good views; under the arithmetic mean
its weight is 1/n. The price: uninformative views pull the confidence towards
1/C, which errs towards the reject bin, the safe side for a sorter. The
calibrated per-view probabilities (the model's temperature) keep
``min_confidence`` meaning the same for one view or twenty.

Timing: crops of frames before the crossing may still be queued or in
inference when the crossing frame is seen. At ``crossed`` the decider notes how
many of the track's views are in flight and waits for those (at most
``view_wait_ms``), then decides with what it has. Results come back first in,
first out (one batcher, one inference thread), so the first ``n`` results or
in-flight failures after the crossing are the ones being waited for; views
submitted after the crossing are fused if they arrive in time but never
waited for. A crossed object always gets a decision: ``no_views`` when none of
its views could be classified.

NOTE: with more than one inference thread on one batcher, results could come
back out of order; a crossed track would then sometimes stop waiting one view
early or wait for a post-crossing view (never past ``view_wait_ms``). The
daemon runs one inference thread; per-view tickets would lift this.

Call order for a view (the pipeline)::

    decider.view_submitted(source, track_id)      # before batcher.put
    if not batcher.put(job):
        decider.view_dropped(source, track_id)    # never queued
    ...                                            # inference thread:
    decider.view_result(source, track_id, probs)  # or view_dropped(..., in_flight=True)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import ConfigError

logger = logging.getLogger(__name__)

# Tracks remembered at once. Far above any real belt (tens of objects in view
# per camera); reached only when the pipeline forgets to end tracks, and then
# the oldest un-crossed track is forgotten rather than growing without bound.
MAX_TRACKS = 10_000
# Decided tracks remembered so that a late result or a second crossing for one
# of them is ignored instead of starting a new track.
MAX_DECIDED_MEMORY = 10_000

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000

REASONS = ("ok", "low_confidence", "no_views", "late")  # every reason but "ok" means the reject bin


@dataclass
class DecisionConfig:
    """Thresholds, bins and belt geometry.

    ``reject_bin``: None (or -1) means the number of classes, the bin after the
    last class. ``class_to_bin``: class name -> bin; classes not listed keep
    their class index. Belt geometry is optional: with ``belt_speed_mm_s`` and
    ``ejector_distance_mm`` (per bin, a list indexed by bin or a dict bin ->
    mm, measured from the decision line) set, each decision carries
    ``eject_at_ns`` and one that can no longer reach its ejector
    ``actuator_lead_ms`` ahead is sent to the reject bin as ``late``.
    ``px_per_mm`` corrects for how far past the line the object already was in
    the crossing frame (needs ``line_x`` in :meth:`Decider.crossed`).
    ``direction``: +1 when the belt runs towards larger x, -1 otherwise.
    ``decide_margin_ms``: with geometry, a track still waiting for views is
    decided this long before waiting would make it ``late`` (room for the
    publishing loop's poll and the send); a few publish-loop periods.
    0 or None for speed, px_per_mm or distances means "not configured".
    """

    min_confidence: float = 0.6
    min_margin: float = 0.2
    reject_bin: int | None = None
    class_to_bin: dict[str, int] = field(default_factory=dict)
    belt_speed_mm_s: float | None = None
    px_per_mm: float | None = None
    ejector_distance_mm: Mapping[int, float] | Sequence[float] | None = None
    actuator_lead_ms: float = 0.0
    view_wait_ms: float = 150.0
    direction: int = 1
    decide_margin_ms: float = 10.0


@dataclass
class _Track:
    prob_sum: np.ndarray | None = None  # sum over the fused views of their probabilities
    views: int = 0  # results fused
    pending: int = 0  # submitted, not yet back (result or drop)
    awaiting: int = 0  # of the pending ones, those queued before the crossing
    crossing: dict | None = None  # frame facts of the crossing, once crossed
    deadline_mono_ns: int = 0  # decide by then even if views are still out
    crossed_seen_mono_ns: int = 0


class Decider:
    """Fuses each track's view probabilities; decides when a crossed track's views are all back
    or waited out.

    Thread-safe: the pipeline threads call ``view_submitted``/``crossed``/
    ``track_ended``, the inference thread ``view_result``/``view_dropped``, and
    whoever publishes calls :meth:`ready` (or waits in :meth:`wait`).
    ``metrics`` (a :class:`service.metrics.Metrics`, optional) receives
    ``beltsort_decisions_total{bin,reason}`` and ``beltsort_stage_seconds{stage="decide"}``
    (crossing seen -> decision made, i.e. mostly the wait for in-flight views).
    """

    def __init__(
        self, labels: Sequence[str], config: DecisionConfig, model_id: str, *, metrics=None
    ) -> None:
        self.labels = list(labels)
        self.model_id = model_id
        self.config = config
        self._metrics = metrics
        n = len(self.labels)
        if n < 2:
            raise ConfigError(f"the model has {n} labels; a sorter needs at least two classes")

        # Bins
        reject = config.reject_bin
        self.reject_bin = n if reject is None or reject == -1 else reject
        if not isinstance(self.reject_bin, int) or self.reject_bin < 0:
            raise ConfigError(
                f"reject_bin is {reject!r}; it must be a bin number >= 0, or -1 for "
                f"the number of classes ({n})"
            )
        unknown = sorted(set(config.class_to_bin) - set(self.labels))
        if unknown:
            raise ConfigError(
                f"class_to_bin names {', '.join(map(repr, unknown))}, not classes of this model; "
                f"its classes are {', '.join(self.labels)}"
            )
        self.bins = [config.class_to_bin.get(label, i) for i, label in enumerate(self.labels)]
        for label, b in zip(self.labels, self.bins, strict=True):
            if not isinstance(b, int) or isinstance(b, bool) or b < 0:
                raise ConfigError(f"class_to_bin[{label!r}] is {b!r}; a bin is a whole number >= 0")
            if b == self.reject_bin:
                raise ConfigError(
                    f"class {label!r} goes to bin {b}, which is the reject bin; give the class "
                    "another bin or set reject_bin to a bin no class uses"
                )

        # Thresholds and timing
        for name, value, high in (
            ("min_confidence", config.min_confidence, 1.0),
            ("min_margin", config.min_margin, 1.0),
            ("view_wait_ms", config.view_wait_ms, math.inf),
            ("actuator_lead_ms", config.actuator_lead_ms, math.inf),
            ("decide_margin_ms", config.decide_margin_ms, math.inf),
        ):
            if not isinstance(value, int | float) or not 0.0 <= value <= high:
                allowed = "0..1" if high == 1.0 else ">= 0"
                raise ConfigError(f"{name} is {value!r}; allowed: {allowed}")
        if config.direction not in (1, -1):
            raise ConfigError(f"direction is {config.direction!r}; allowed: 1 or -1")
        self.view_wait_ns = int(config.view_wait_ms * NS_PER_MS)
        self.lead_ns = int(config.actuator_lead_ms * NS_PER_MS)
        self.margin_ns = int(config.decide_margin_ms * NS_PER_MS)
        self.ejector_mm = self._ejector_distances(config)

        if metrics is not None:
            # Every series a decision can land in exists at 0 from the first
            # scrape, so rate() and alerts see the first reject.
            for b in sorted(set(self.bins)):
                metrics.decisions.labels(bin=str(b), reason="ok")
            for reason in REASONS[1:]:
                metrics.decisions.labels(bin=str(self.reject_bin), reason=reason)

        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        self._tracks: dict[tuple[str, int], _Track] = {}
        self._decided: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.ignored_views = 0  # results for tracks already decided or forgotten
        self.evicted_tracks = 0  # un-crossed tracks forgotten because MAX_TRACKS was reached

    def _ejector_distances(self, config: DecisionConfig) -> dict[int, float] | None:
        """bin -> mm from the line, or None when belt geometry is not configured."""
        speed, dist = config.belt_speed_mm_s, config.ejector_distance_mm
        if not speed and not dist:
            return None
        if not speed or not dist or speed < 0:
            raise ConfigError(
                f"belt geometry is half set (belt_speed_mm_s={speed!r}, ejector_distance_mm="
                f"{dist!r}); set both (speed > 0, a distance per bin) or neither"
            )
        if config.px_per_mm is not None and config.px_per_mm < 0:
            raise ConfigError(f"px_per_mm is {config.px_per_mm!r}; allowed: > 0 (or 0 = not set)")
        table = dict(dist) if isinstance(dist, Mapping) else dict(enumerate(dist))
        needed = sorted({*self.bins, self.reject_bin})
        missing = [b for b in needed if b not in table]
        if missing:
            raise ConfigError(
                f"ejector_distance_mm has no distance for bins {missing} (it has "
                f"{len(table)} entries); give one per bin 0..{max(needed)}, the reject bin included"
            )
        bad = {b: table[b] for b in needed if not 0 <= float(table[b]) < math.inf}
        if bad:
            raise ConfigError(f"ejector_distance_mm has negative or infinite distances {bad}")
        return {b: float(table[b]) for b in needed}

    @property
    def geometry(self) -> bool:
        return self.ejector_mm is not None

    # ------------------------------------------------------------ events

    def view_submitted(self, source: str, track_id: int) -> None:
        """A crop of this track was handed to the batcher (call before ``put``)."""
        key = (source, track_id)
        with self._lock:
            if key in self._decided:
                return
            track = self._tracks.get(key)
            if track is None:
                track = self._new_track(key)
            track.pending += 1

    def view_dropped(self, source: str, track_id: int, *, in_flight: bool = False) -> None:
        """A submitted crop will never come back.

        ``in_flight=False``: ``put`` refused it (it never entered the queue).
        ``in_flight=True``: it was queued and then lost (inference failed); it
        counts against the views a crossed track waits for, like a result.
        """
        with self._lock:
            track = self._tracks.get((source, track_id))
            if track is None:
                return
            track.pending = max(0, track.pending - 1)
            if in_flight:
                track.awaiting = max(0, track.awaiting - 1)
            # A refused crop was the most recent submission, never one awaited
            # from before the crossing; awaiting can only shrink to what is out.
            track.awaiting = min(track.awaiting, track.pending)
            self._notify_if_due(track)

    def view_result(self, source: str, track_id: int, probs: np.ndarray) -> None:
        """One view's class probabilities ``(C,)`` came back from inference."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (len(self.labels),):
            raise ValueError(
                f"view_result got probabilities of shape {probs.shape}; this decider has "
                f"{len(self.labels)} classes ({self.model_id})"
            )
        with self._lock:
            track = self._tracks.get((source, track_id))
            if track is None:
                # Decided already, ended, or evicted: the view is too late to matter.
                self.ignored_views += 1
                return
            track.prob_sum = probs if track.prob_sum is None else track.prob_sum + probs
            track.views += 1
            track.pending = max(0, track.pending - 1)
            track.awaiting = max(0, track.awaiting - 1)
            self._notify_if_due(track)

    def crossed(
        self,
        source: str,
        track_id: int,
        *,
        frame: int,
        pts_ms: float,
        bbox,
        t_capture_ns: int,
        t_capture_mono_ns: int,
        line_x: float | None = None,
        now_mono_ns: int | None = None,
    ) -> None:
        """The track's centre crossed the decision line in this frame; decide it soon.

        ``bbox`` is ``(x, y, w, h)`` in the crossing frame; ``line_x`` the line's
        x in that frame's pixels (for the eject-time correction, optional).
        ``now_mono_ns`` defaults to ``time.monotonic_ns()``: the view wait starts then.
        """
        key = (source, track_id)
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        with self._lock:
            if key in self._decided:
                logger.debug("track %s/%s crossed twice; the second crossing is ignored", *key)
                return
            track = self._tracks.get(key)
            if track is None:
                track = self._new_track(key)
            if track.crossing is not None:
                return
            x, y, w, h = (int(v) for v in bbox)
            track.crossing = {
                "frame": int(frame),
                "pts_ms": float(pts_ms),
                "bbox": [x, y, w, h],
                "t_capture_ns": int(t_capture_ns),
                "t_capture_mono_ns": int(t_capture_mono_ns),
                "centre_x": x + w / 2.0,
                "line_x": line_x,
            }
            track.awaiting = track.pending
            track.crossed_seen_mono_ns = now
            track.deadline_mono_ns = now + self.view_wait_ns
            self._notify_if_due(track)

    def track_ended(self, source: str, track_id: int) -> None:
        """The track left the frame or was lost without crossing: forget it, no decision."""
        with self._lock:
            track = self._tracks.get((source, track_id))
            # A crossed track is decided even if it ends before its views are back.
            if track is not None and track.crossing is None:
                del self._tracks[(source, track_id)]

    # ------------------------------------------------------------ decisions

    def ready(self, now_mono_ns: int | None = None, flush: bool = False) -> list[dict]:
        """Decisions due now, in crossing order; ``flush`` decides every crossed track now.

        A crossed track is due when the views it waits for are back, when its
        ``view_wait_ms`` is up, or (with belt geometry) when waiting longer would
        miss the ejector of the bin its views so far point to, less
        ``decide_margin_ms``. Each decision dict has every field of the
        ``decision`` message except ``seq``, ``run_id`` and ``t_publish_ns``.
        """
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        with self._lock:
            due = [
                (key, t)
                for key, t in self._tracks.items()
                if t.crossing is not None and (flush or t.awaiting == 0 or now >= self._due_at(t))
            ]
            for key, _ in due:
                del self._tracks[key]
                self._decided[key] = None
            while len(self._decided) > MAX_DECIDED_MEMORY:
                self._decided.popitem(last=False)
        # Crossing order across sources, so the actuator side gets them in belt order.
        due.sort(key=lambda kt: kt[1].crossing["t_capture_mono_ns"])
        decisions = [self._decide(key, track, now) for key, track in due]
        if self._metrics is not None:
            stage = self._metrics.stage.labels(stage="decide")
            for d, (_, track) in zip(decisions, due, strict=True):
                self._metrics.decisions.labels(bin=str(d["bin"]), reason=d["reason"]).inc()
                stage.observe(max(0, now - track.crossed_seen_mono_ns) / NS_PER_S)
        return decisions

    def wait(self, timeout_s: float) -> bool:
        """Block until some crossed track has all its awaited views back, or ``timeout_s``.

        True when woken by such a track. Tracks that become due only because
        their wait ran out do not wake it: poll :meth:`ready` at least every
        few milliseconds (or after :meth:`next_deadline_ns`).
        """
        with self._due:
            return self._due.wait(timeout_s)

    def next_deadline_ns(self) -> int | None:
        """The earliest monotonic time a crossed, still-waiting track must be decided."""
        with self._lock:
            deadlines = [self._due_at(t) for t in self._tracks.values() if t.crossing]
        return min(deadlines, default=None)

    def pending_tracks(self) -> int:
        """Tracks known and not yet decided (crossed or not)."""
        with self._lock:
            return len(self._tracks)

    # ------------------------------------------------------------ internals

    def _new_track(self, key: tuple[str, int]) -> _Track:
        if len(self._tracks) >= MAX_TRACKS:
            victim = next((k for k, t in self._tracks.items() if t.crossing is None), None)
            if victim is not None:
                del self._tracks[victim]
                self.evicted_tracks += 1
                if self.evicted_tracks == 1 or self.evicted_tracks % 1000 == 0:
                    logger.warning(
                        "more than %d open tracks: forgot the oldest un-crossed one (%d so far); "
                        "the pipeline is not calling track_ended",
                        MAX_TRACKS,
                        self.evicted_tracks,
                    )
        track = _Track()
        self._tracks[key] = track
        return track

    def _due_at(self, track: _Track) -> int:
        """Monotonic ns by which a crossed track still waiting for views must be decided."""
        due = track.deadline_mono_ns
        if self.ejector_mm is not None and track.views:
            # Waiting past this would turn the answer the views give so far into `late`.
            best_bin = self.bins[int(np.argmax(track.prob_sum))]
            last_moment = (
                track.crossing["t_capture_mono_ns"]
                + self._travel_ns(track.crossing, best_bin)
                - self.lead_ns
                - self.margin_ns
            )
            due = min(due, last_moment)
        return due

    def _notify_if_due(self, track: _Track) -> None:
        if track.crossing is not None and track.awaiting == 0:
            self._due.notify_all()

    def _decide(self, key: tuple[str, int], track: _Track, now_mono_ns: int) -> dict:
        source, track_id = key
        c = track.crossing
        decision = {
            "source": source,
            "track_id": track_id,
            "label": None,
            "confidence": 0.0,
            "bin": self.reject_bin,
            "reason": "no_views",
            "views": track.views,
            "frame": c["frame"],
            "pts_ms": c["pts_ms"],
            "bbox": c["bbox"],
            "t_capture_ns": c["t_capture_ns"],
            "eject_at_ns": None,
            "model": self.model_id,
        }

        # Fuse and threshold
        if track.views:
            fused = track.prob_sum / track.views
            top2 = np.argsort(fused)[-2:]
            best, second = int(top2[1]), int(top2[0])
            confidence = float(fused[best])
            margin = confidence - float(fused[second])
            decision["label"] = self.labels[best]
            decision["confidence"] = round(confidence, 6)
            if confidence >= self.config.min_confidence and margin >= self.config.min_margin:
                decision["bin"] = self.bins[best]
                decision["reason"] = "ok"
            else:
                decision["reason"] = "low_confidence"

        # Eject time, and whether the chosen ejector can still be reached
        if self.ejector_mm is not None:
            travel_ns = self._travel_ns(c, decision["bin"])
            if decision["bin"] != self.reject_bin and (
                c["t_capture_mono_ns"] + travel_ns - self.lead_ns < now_mono_ns
            ):
                decision["bin"] = self.reject_bin
                decision["reason"] = "late"
                travel_ns = self._travel_ns(c, self.reject_bin)
            decision["eject_at_ns"] = c["t_capture_ns"] + travel_ns
        return decision

    def _travel_ns(self, crossing: dict, bin_: int) -> int:
        """Time from the crossing frame's capture until the object reaches ``bin_``'s ejector."""
        distance = self.ejector_mm[bin_]
        line_x, px_per_mm = crossing["line_x"], self.config.px_per_mm
        if line_x is not None and px_per_mm:
            # The object was already this far past the line when the frame was taken.
            distance -= (crossing["centre_x"] - line_x) * self.config.direction / px_per_mm
        return int(distance / self.config.belt_speed_mm_s * NS_PER_S)
