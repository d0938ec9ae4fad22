"""The daemon's pipeline: sources -> locate+track -> batch -> infer -> decide -> publish.

Threads, and what each one owns::

    capture-srcN    one per source   read, stamp, queue frames (service.sources.Capture)
    locate-srcN     one per source   locate, track, cut crops, report crossings (_Lane)
    beltsort-infer  one              batches -> onnxruntime -> results (InferenceWorker)
    main thread     one              decisions due -> publisher; watchdog, readiness, exit
    publish, http   one each         DecisionPublisher's sender, HealthServer

Queues are bounded: a source's frame queue (``[sources] queue_size`` frames),
the crop batcher (``[pipeline] batch_queue``) and the publisher's queue. Load
is shed at the source, whole frames at a time, never by letting a queue grow:
a frame is dropped when its queue is full (the oldest goes, ``queue_full``),
when it is older than ``max_frame_age_ms`` by the time the locator gets to it
(``stale``), or when more crops are in flight than ``max_inflight_views``
(``overload``). With ``pace = "fast"`` files and the simulator are never
dropped from: the capture thread and the locator wait instead.

Every object that crossed the decision line gets exactly one decision: the
decider waits for its views up to ``view_wait_ms``; on shutdown (SIGTERM, end
of files) whatever is still in flight is decided or sent to the reject bin.
"""

from __future__ import annotations

import logging
import threading
import time

from service.batcher import Batcher, CropJob
from service.config import Config
from service.decide import Decider, DecisionConfig
from service.errors import ConfigError, UsageError
from service.infer import InferenceEngine, InferenceWorker
from service.locate import Locator, cut_crop
from service.metrics import Metrics
from service.publish import DecisionPublisher
from service.sources import (
    Capture,
    CaptureOptions,
    FrameQueue,
    SourceSpec,
    describe,
    parse_source,
    source_names,
)
from service.track import Tracker

log = logging.getLogger(__name__)

# The main loop wakes on every inference result and crossing, and when a crossed
# object's view wait runs out; besides, it runs the watchdog, readiness and exit
# checks this often.
HOUSEKEEPING_S = 0.1
# A frame-drop summary is logged at most this often (never a line per frame).
DROP_LOG_INTERVAL_S = 10.0
# A crossed track that is no longer seen is forgotten after this many frames
# beyond the tracker's own max_missed (its ids are never reused).
FORGET_AFTER_FRAMES = 5
# How long a fast-paced locator waits for room in a full batcher before the crop
# is dropped (counted): only a stalled inference thread makes it run out.
BACKPRESSURE_WAIT_S = 30.0


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` -> (host, port); ``""`` or ``off`` -> None (no HTTP server)."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(
            f"http listen address {text!r} is not HOST:PORT with a port 0..65535, "
            'e.g. 127.0.0.1:9108 (0 = any free port); "off" disables it'
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def decision_config(config: Config, num_classes: int) -> DecisionConfig:
    """The decider's settings from ``[decide]`` and ``[belt]``."""
    d, belt = config.decide, config.belt
    if d.reject_bin != -1 and d.reject_bin < num_classes:
        log.warning(
            "[decide] reject_bin = %d is also a class's bin (there are %d classes)",
            d.reject_bin,
            num_classes,
        )
    kwargs = {
        "min_confidence": d.min_confidence,
        "min_margin": d.min_margin,
        "class_to_bin": dict(d.class_to_bin),
        "view_wait_ms": d.view_wait_ms,
        "actuator_lead_ms": belt.actuator_lead_ms,
        "direction": 1 if config.pipeline.direction == "left_to_right" else -1,
    }
    if d.reject_bin != -1:
        kwargs["reject_bin"] = d.reject_bin
    if belt.configured:
        kwargs.update(
            belt_speed_mm_s=belt.speed_mm_s,
            px_per_mm=belt.px_per_mm,
            ejector_distance_mm=list(belt.ejector_distance_mm),
        )
    return DecisionConfig(**kwargs)


class _Lane:
    """One source's locate thread: frames -> locate -> track -> crops and crossings."""

    def __init__(self, pipeline: Pipeline, spec: SourceSpec, capture: Capture, queue: FrameQueue):
        self.p = pipeline
        self.spec = spec
        self.name = spec.name
        self.capture = capture
        self.queue = queue
        cfg = pipeline.config
        # NOTE: the locator's and tracker's own knobs (LocatorConfig, gate_px, ...) keep
        # their defaults: the config file has no [locate] section yet.
        self.locator = Locator()
        self.tracker: Tracker | None = None
        self.line_x = 0.0  # set from the first frame's width
        self.may_drop = spec.live or cfg.sources.pace == "realtime"
        self.max_age_ns = int(cfg.sources.max_frame_age_ms * 1e6)
        self.done = threading.Event()
        self.last_progress = time.monotonic()  # for /healthz: the thread is not stuck
        self.drops = {"stale": 0, "overload": 0}
        self.frames_located = 0  # each counter has one writer: this lane's thread
        self.crossings = 0
        self._last_track_id = -1
        self._crossed: dict[int, int] = {}  # track id -> frame index last seen (no more views)
        self._views: dict[int, tuple[int, int]] = {}  # track id -> (crops sent, frame of last)
        self.max_views = cfg.pipeline.max_views
        self.view_stride = cfg.pipeline.view_stride
        self._thread = threading.Thread(target=self._run, name=f"locate-{self.name}", daemon=True)
        m = pipeline.metrics
        self._m_locate = m.stage.labels(stage="locate")
        self._m_depth = m.queue_depth.labels(queue=f"frames_{self.name}")
        self._m_objects = m.objects.labels(source=self.name)
        self._m_dropped = {
            r: m.frames_dropped.labels(source=self.name, reason=r) for r in self.drops
        }

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                frame = self.queue.get(0.1)
                self.last_progress = time.monotonic()
                self._m_depth.set(len(self.queue))
                if frame is None:
                    finished = self.queue.closed or self.p.stopping.is_set()
                    if finished and len(self.queue) == 0:
                        return
                    continue
                if self.may_drop and self._should_drop(frame):
                    continue
                self._process(frame)
        except Exception:
            log.exception("locate thread of source %s failed; the source is lost", self.name)
        finally:
            self.done.set()
            self.p.wake.set()

    def _submit(self, frame, track_id: int, det) -> None:
        """Cut one crop of the object and queue it for inference."""
        crop = cut_crop(frame.image, det, self.p.input_size)
        count, _ = self._views.get(track_id, (0, 0))
        self._views[track_id] = (count + 1, frame.index)
        self.p.submit(
            CropJob(self.name, track_id, frame.index, crop, time.monotonic()),
            wait=not self.may_drop,
        )

    def _should_drop(self, frame) -> bool:
        reason = None
        if time.monotonic_ns() - frame.t_mono_ns > self.max_age_ns:
            reason = "stale"
        elif self.p.inflight_views > self.p.config.pipeline.max_inflight_views:
            reason = "overload"
        if reason is None:
            return False
        self.drops[reason] += 1
        self._m_dropped[reason].inc()
        return True

    def _process(self, frame) -> None:
        p = self.p
        t0 = time.perf_counter()

        # Locate and track
        detections = self.locator.detect(frame.image)
        if self.tracker is None:
            width = frame.image.shape[1]
            line_x = p.config.pipeline.decision_line * width
            direction = 1 if p.config.pipeline.direction == "left_to_right" else -1
            self.tracker = Tracker(
                line_x, direction, p.config.pipeline.max_missed, frame_width=width
            )
            self.line_x = line_x
            log.info("source %s: decision line at x = %.0f px of %d", self.name, line_x, width)
        # The frame index tells the tracker how many frames were dropped since the last.
        step = self.tracker.update(detections, frame_index=frame.index)
        self.frames_located += 1

        views = dict(step.views)
        for track_id in views:
            if track_id > self._last_track_id:
                self._m_objects.inc()
                self._last_track_id = track_id

        # Crossings first: they are what the latency is measured on. One that has
        # no view yet (first seen at the line) sends this frame's crop before it.
        for track_id in step.crossed:
            det = views.get(track_id)
            if det is None:
                # Missed in this frame, crossing on its prediction: the last box seen.
                # NOTE: that box lags the object by the frames it was missed.
                det = self.tracker.last_detection(track_id)
            elif track_id not in self._views:
                self._submit(frame, track_id, det)
            self._crossed[track_id] = frame.index
            self._views.pop(track_id, None)
            bbox = det.bbox if det is not None else (0, 0, 0, 0)
            self.crossings += 1
            p.crossed(self.name, track_id, frame, bbox, self.line_x)

        # Views: up to max_views crops per object, view_stride frames apart, taken
        # early so that they are back from inference by the time it crosses
        for track_id, det in views.items():
            if track_id in self._crossed:
                self._crossed[track_id] = frame.index
                continue
            count, last = self._views.get(track_id, (0, -self.view_stride))
            if count < self.max_views and frame.index - last >= self.view_stride:
                self._submit(frame, track_id, det)
        self._m_locate.observe(time.perf_counter() - t0)

        for track_id in step.ended:
            self._views.pop(track_id, None)
            p.decider.track_ended(self.name, track_id)
        horizon = frame.index - p.config.pipeline.max_missed - FORGET_AFTER_FRAMES
        for track_id in [t for t, seen in self._crossed.items() if seen < horizon]:
            del self._crossed[track_id]


class Pipeline:
    """Builds every stage from a :class:`Config` and runs the decision loop.

    Lifecycle: ``start()`` (loads and warms the model, binds the publisher and
    the HTTP server, opens the sources; any failure is a BeltsortError and
    everything already started is stopped), ``run()`` (blocks until
    :meth:`request_stop` or, with ``exit_at_end``, until every source ended and
    every object is decided), ``close()`` (always; bounded by
    ``[pipeline] shutdown_timeout_s``). ``registry`` is for tests.
    """

    def __init__(self, config: Config, *, exit_at_end: bool = False, registry=None) -> None:
        if not config.model.path:
            raise ConfigError(
                "no model: give --model PATH or [model] path in the config file "
                "(an ONNX file from `python -m export`)"
            )
        self.config = config
        self.exit_at_end = exit_at_end
        self.metrics = Metrics(registry)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.decisions = 0  # published by the main thread
        self.specs = [
            parse_source(uri, name)
            for uri, name in zip(
                config.sources.uris, source_names(config.sources.uris), strict=True
            )
        ]
        self.listen = parse_listen(config.http.listen)

        self.engine: InferenceEngine | None = None
        self.decider: Decider | None = None
        self.batcher: Batcher | None = None
        self.worker: InferenceWorker | None = None
        self.publisher: DecisionPublisher | None = None
        self.http = None
        self.captures: list[Capture] = []
        self.lanes: list[_Lane] = []
        self.input_size = 0
        self.ready_logged = False
        self.last_progress = time.monotonic()

        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.config
        for spec in self.specs:
            log.info("source %s", describe(spec))

        # Model
        self.engine = InferenceEngine(
            cfg.model.path,
            providers=list(cfg.model.providers) or None,
            metrics=self.metrics,
            intra_op_threads=cfg.model.intra_op_threads or None,
            max_batch=cfg.pipeline.max_batch,
        )
        self.engine.warm_up()
        self.input_size = self.engine.input_size
        labels = self.engine.labels
        self.decider = Decider(
            labels,
            decision_config(cfg, len(labels)),
            self.engine.info.model_id,
            metrics=self.metrics,
        )

        # Batch and infer
        self.batcher = Batcher(
            cfg.pipeline.max_batch,
            cfg.pipeline.max_wait_ms,
            max(cfg.pipeline.batch_queue, cfg.pipeline.max_batch),
            self.metrics,
        )
        self.worker = InferenceWorker(
            self.engine, self.batcher, self._on_result, self.metrics, on_failed=self._on_failed
        )
        self.worker.start()

        # Publish and HTTP
        self.publisher = DecisionPublisher(
            cfg.publish.endpoint,
            self.metrics,
            queue_size=cfg.publish.queue_size,
            sndhwm=cfg.publish.hwm,
            heartbeat_s=cfg.publish.heartbeat_s,
            heartbeat_fields=self._heartbeat_fields,
        )
        self.publisher.start()
        if self.listen is not None:
            from service.http import HealthServer

            host, port = self.listen
            self.http = HealthServer(host, port, self.metrics.registry, self._health, self._ready)
            self.http.start()

        # Sources last: frames flow only once everything downstream is up
        options = CaptureOptions(
            pace=cfg.sources.pace,
            open_timeout_ms=cfg.sources.open_timeout_ms,
            read_timeout_ms=cfg.sources.read_timeout_ms,
            reconnect_initial_s=cfg.sources.reconnect_initial_s,
            reconnect_max_s=cfg.sources.reconnect_max_s,
            stall_timeout_s=cfg.sources.stall_timeout_s,
        )
        for spec in self.specs:
            queue = FrameQueue(cfg.sources.queue_size)
            capture = Capture(spec, queue, self.metrics, options)
            self.captures.append(capture)
            self.lanes.append(_Lane(self, spec, capture, queue))
        for lane in self.lanes:
            lane.start()
        for capture in self.captures:
            capture.start()

    # ------------------------------------------------------------------ callbacks

    @property
    def inflight_views(self) -> int:
        return self._inflight

    def submit(self, job: CropJob, *, wait: bool) -> None:
        """Queue one view for inference; with ``wait`` retry a full batcher (back-pressure)."""
        self.decider.view_submitted(job.source, job.track_id)
        with self._inflight_lock:
            self._inflight += 1
        # Back-pressure: a fast-paced file waits for room; close() wakes the wait.
        if not self.batcher.put(job, timeout_s=BACKPRESSURE_WAIT_S if wait else 0.0):
            self._view_gone(job, in_flight=False)

    @property
    def crossings(self) -> int:
        return sum(lane.crossings for lane in self.lanes)

    @property
    def frames_located(self) -> int:
        return sum(lane.frames_located for lane in self.lanes)

    def crossed(self, source: str, track_id: int, frame, bbox, line_x: float) -> None:
        self.decider.crossed(
            source,
            track_id,
            frame=frame.index,
            pts_ms=frame.pts_ms,
            bbox=[int(v) for v in bbox],
            t_capture_ns=frame.t_wall_ns,
            t_capture_mono_ns=frame.t_mono_ns,
            line_x=line_x,
        )
        self.wake.set()

    def _on_result(self, job: CropJob, probs) -> None:
        self.decider.view_result(job.source, job.track_id, probs)
        with self._inflight_lock:
            self._inflight -= 1
        self.wake.set()

    def _on_failed(self, job: CropJob) -> None:
        self._view_gone(job, in_flight=True)
        self.wake.set()

    def _view_gone(self, job: CropJob, *, in_flight: bool) -> None:
        self.decider.view_dropped(job.source, job.track_id, in_flight=in_flight)
        with self._inflight_lock:
            self._inflight -= 1

    # ------------------------------------------------------------------ the loop

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (signal-handler safe: sets two events)."""
        self.stopping.set()
        self.wake.set()

    def run(self) -> int:
        """Publish decisions as they come due until stopped; returns the exit status."""
        next_drop_log = time.monotonic() + DROP_LOG_INTERVAL_S
        next_housekeeping = 0.0
        logged_drops: dict[tuple[str, str], int] = {}
        while not self.stopping.is_set():
            timeout = HOUSEKEEPING_S
            deadline_ns = self.decider.next_deadline_ns()
            if deadline_ns is not None:
                timeout = min(timeout, max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))
            self.wake.wait(timeout)
            self.wake.clear()  # before ready(): an event from now on wakes the next wait
            self._publish_due(time.monotonic_ns())
            now = time.monotonic()
            self.last_progress = now
            if now < next_housekeeping:
                continue
            next_housekeeping = now + HOUSEKEEPING_S

            # Watchdog and readiness
            for capture in self.captures:
                capture.check_stall(now)
            self._update_ready()
            if now >= next_drop_log:
                next_drop_log = now + DROP_LOG_INTERVAL_S
                self._log_drops(logged_drops)
            if self.exit_at_end and self._all_done():
                log.info("every source ended and every object in flight is decided; exiting")
                break
        return 0

    def _all_done(self) -> bool:
        return (
            all(c.ended.is_set() for c in self.captures)
            and all(lane.done.is_set() for lane in self.lanes)
            and self._inflight == 0
            and len(self.batcher) == 0
        )

    def _publish_due(self, now_ns: int, *, flush: bool = False) -> int:
        decisions = self.decider.ready(now_ns, flush=flush)
        # The decider counts decisions{bin,reason} and stage{decide}; the publisher
        # stage{publish} and capture_to_publish.
        for decision in decisions:
            self.decisions += 1
            self.publisher.publish_decision(decision)
        return len(decisions)

    def _update_ready(self) -> None:
        ok, _ = self._ready()
        self.metrics.ready.set(1 if ok else 0)
        if ok and not self.ready_logged:
            self.ready_logged = True
            up = [c.name for c in self.captures if c.up]
            log.info("ready: model %s warm, sources up: %s", self.engine.info.model_id, up)

    def _log_drops(self, logged: dict[tuple[str, str], int]) -> None:
        """One WARNING per interval with the frames dropped since the last one."""
        parts = []
        for capture, lane in zip(self.captures, self.lanes, strict=True):
            totals = {**lane.drops, "queue_full": capture.dropped}
            for reason, total in totals.items():
                new = total - logged.get((capture.name, reason), 0)
                if new > 0:
                    parts.append(f"{capture.name} {reason} {new}")
                logged[(capture.name, reason)] = total
        if parts:
            log.warning(
                "frames dropped in the last %.0f s: %s (the machine is not keeping up)",
                DROP_LOG_INTERVAL_S,
                ", ".join(parts),
            )

    # ------------------------------------------------------------------ health

    def _sources_state(self) -> dict[str, str]:
        return {c.name: c.state.value for c in self.captures}

    def _health(self) -> tuple[bool, dict]:
        """Alive: the decision loop, the inference thread and every locate thread progress."""
        now = time.monotonic()
        stale = self.config.http.health_stale_s
        idle = now - self.last_progress
        worker_ok = (
            self.worker is not None
            and self.worker.is_alive()
            and now - self.worker.last_progress_mono <= stale
        )
        lanes = {
            lane.name: now - lane.last_progress <= stale or lane.capture.ended.is_set()
            for lane in self.lanes
        }
        ok = idle <= stale and worker_ok and all(lanes.values()) and not self._closed
        return ok, {
            "loop_idle_s": round(idle, 3),
            "inference_thread": worker_ok,
            "locate_threads": lanes,
            "sources": self._sources_state(),
        }

    def _ready(self) -> tuple[bool, dict]:
        warm = self.engine is not None and self.engine.warmed_up
        any_up = any(c.up for c in self.captures)
        return warm and any_up and not self.stopping.is_set(), {
            "model_warm": warm,
            "model_id": self.engine.info.model_id if self.engine else None,
            "sources": self._sources_state(),
        }

    def _heartbeat_fields(self) -> dict:
        up = sum(1 for c in self.captures if c.up)
        return {
            "status": "ok" if up else "no_source",
            "sources_up": up,
            "sources": len(self.captures),
            "frames": sum(c.frames for c in self.captures),
            "crossings": self.crossings,
            "decisions": self.decisions,
            "in_flight": self._inflight,
        }

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop sources, decide or reject everything in flight, flush, stop; bounded."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        deadline = time.monotonic() + self.config.pipeline.shutdown_timeout_s

        def budget(share: float) -> float:
            """``share`` seconds, or what is left of the bound (at least a moment)."""
            return max(0.05, min(share, deadline - time.monotonic()))

        # Sources: no new frames; the locators finish what is queued
        for capture in self.captures:
            capture.stop()
        for lane in self.lanes:
            if not lane.join(budget(1.0)):
                log.warning("locate thread of %s did not finish in time", lane.name)
        for capture in self.captures:
            if not capture.join(budget(0.5)):
                log.warning("capture thread of %s is stuck in a read; leaving it", capture.name)

        # In-flight views: let inference finish them, within the bound
        if self.batcher is not None:
            wait_until = min(
                deadline - 1.5, time.monotonic() + self.config.decide.view_wait_ms / 1000 + 1.0
            )
            while self._inflight > 0 and time.monotonic() < wait_until:
                time.sleep(0.005)
            self.batcher.close()
        if self.worker is not None:
            self.worker.stop(budget(1.0))
        # A fast-paced locator that waited on the full batcher is released by its
        # close(); let it finish that frame so its crossings are in the flush.
        for lane in self.lanes:
            lane.join(budget(0.5))

        # Decide every crossed object still waiting, then flush the publisher
        if self.decider is not None and self.publisher is not None:
            try:
                flushed = self._publish_due(time.monotonic_ns(), flush=True)
                if flushed:
                    log.info("shutdown: decided %d object(s) still in flight", flushed)
            except RuntimeError as exc:  # publisher never started
                log.warning("shutdown: could not publish the last decisions: %s", exc)
        if self.publisher is not None:
            self.publisher.close(timeout_s=budget(1.5))
        if self.http is not None:
            self.http.stop()
        self.metrics.ready.set(0)
        if not self.captures:
            return  # start() failed before any source: nothing to report
        drops = self.frame_drops()
        log.info(
            "stopped: %d frames located, %d dropped (%s), %d crossings, %d decisions",
            self.frames_located,
            sum(drops.values()),
            ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items())) or "none",
            self.crossings,
            self.decisions,
        )

    def frame_drops(self) -> dict[str, int]:
        """Frames dropped since start, all sources, by reason."""
        totals = {"queue_full": sum(c.dropped for c in self.captures)}
        for lane in self.lanes:
            for reason, n in lane.drops.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals
