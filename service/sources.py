"""Frame sources: video files, cameras, network streams and the simulator.

Every source runs on its own capture thread (:class:`Capture`) that reads,
stamps and hands frames to a bounded :class:`FrameQueue`. Every frame carries
the wall-clock and monotonic time it was captured, its index and the source's
own timestamp (pts), so latency is measured from the moment a camera would
have delivered it.

Source URIs::

    belt.mp4, /data/belt.mkv         a video file; ends at its last frame
    0, /dev/video0                   a camera (V4L2)
    rtsp://..., http(s)://...        a stream that OpenCV's FFmpeg backend reads (MJPEG, H.264)
    synthetic:?rate=2&fps=30&size=1280x720&seed=0&frames=0&compress=1
                                     the belt simulator as a live camera (defaults shown)

Files and the simulator are paced: ``realtime`` replays them at their own
frame rate, as a camera would deliver them (when the consumer falls behind,
the oldest queued frame is dropped and counted); ``fast`` delivers frames as
fast as they are taken and never drops (the capture thread waits instead).
Cameras and streams deliver at their own rate; when one fails to open, stops
delivering or stalls, its capture thread reconnects with capped exponential
backoff and jitter, logging when it goes down and when it comes back.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.errors import SourceError

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
SOURCE_HELP = (
    "a video file path, a camera (0, /dev/video0), rtsp://..., http(s)://... "
    "or synthetic:?rate=3&fps=30&size=1280x720&seed=1"
)


class SourceKind(enum.Enum):
    FILE = "file"
    CAMERA = "camera"
    STREAM = "stream"
    SYNTHETIC = "synthetic"


class SourceState(enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    ENDED = "ended"


# ---------------------------------------------------------------- URIs


@dataclass(frozen=True)
class SyntheticOptions:
    """Options of a ``synthetic:?key=value&...`` URI.

    NOTE: frames are rendered in the capture thread. On a 2-core box with the
    daemon beside it, 1280x720 came at about 26 of the asked 30 fps: no frame
    is dropped and each is stamped when it is rendered, so the stream is only
    slower than asked. Real-time measurements use a rendered video file.
    """

    rate: float = 2.0  # screws entering per second (the simulator's default)
    fps: float = 30.0
    seed: int = 0
    size: tuple[int, int] = (1280, 720)
    frames: int = 0  # stop after this many frames; 0 = endless, like a camera
    compress: bool = True  # JPEG round trip, like a frame decoded from a camera's stream


_SYNTHETIC_RULES = {
    "rate": "a number in (0, 100]",
    "fps": "a number in [1, 240]",
    "seed": "a whole number >= 0",
    "size": "WIDTHxHEIGHT within 160x120 .. 3840x2160",
    "frames": "a whole number >= 0 (0 = endless)",
    "compress": "0 or 1 (JPEG round trip at the scene's quality)",
}


def parse_synthetic(uri: str) -> SyntheticOptions:
    """Parse ``synthetic:`` or ``synthetic:?rate=3&fps=30&seed=1&size=1280x720``."""
    rest = uri[len("synthetic:") :]
    if rest and not rest.startswith("?"):
        raise SourceError(f"source {uri!r}: options follow '?', e.g. synthetic:?rate=3&fps=30")
    values: dict[str, Any] = {}
    pairs = urllib.parse.parse_qsl(rest[1:], keep_blank_values=True) if rest else []
    for key, text in pairs:
        if key not in _SYNTHETIC_RULES:
            allowed = ", ".join(_SYNTHETIC_RULES)
            raise SourceError(f"source {uri!r}: unknown option {key!r}; allowed: {allowed}")
        try:
            if key in ("rate", "fps"):
                value = float(text)
                low, high = (0.0, 100.0) if key == "rate" else (1.0, 240.0)
                ok = (low < value <= high) if key == "rate" else (low <= value <= high)
            elif key in ("seed", "frames"):
                value = int(text)
                ok = value >= 0
            elif key == "compress":
                value = text == "1"
                ok = text in ("0", "1")
            else:
                width, height = (int(p) for p in text.lower().split("x"))
                value = (width, height)
                ok = 160 <= width <= 3840 and 120 <= height <= 2160
        except ValueError:
            ok = False
        if not ok:
            raise SourceError(
                f"source {uri!r}: option {key}={text!r} is not allowed; "
                f"allowed: {_SYNTHETIC_RULES[key]}"
            )
        values[key] = value
    return SyntheticOptions(**values)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source URI: ``name`` labels its metrics, log lines and decisions."""

    name: str
    uri: str
    kind: SourceKind
    target: str | int  # file path, camera index or device, stream URL
    synthetic: SyntheticOptions | None = None

    @property
    def live(self) -> bool:
        """Cameras and streams: reconnect on failure instead of ending."""
        return self.kind in (SourceKind.CAMERA, SourceKind.STREAM)


def parse_source(uri: str, name: str) -> SourceSpec:
    """Classify a source URI; a missing file or a bad option raises SourceError."""
    text = uri.strip()
    if not text:
        raise SourceError(f"source {uri!r} is empty; give {SOURCE_HELP}")
    if text.startswith("synthetic:"):
        return SourceSpec(name, text, SourceKind.SYNTHETIC, text, parse_synthetic(text))
    if text.isdigit():
        return SourceSpec(name, text, SourceKind.CAMERA, int(text))
    if text.startswith("/dev/video"):
        return SourceSpec(name, text, SourceKind.CAMERA, text)
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in STREAM_SCHEMES:
        return SourceSpec(name, text, SourceKind.STREAM, text)
    if scheme == "file":
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    elif "://" in text:
        raise SourceError(
            f"source {uri!r}: scheme {scheme!r} is not supported; allowed: "
            f"{', '.join(STREAM_SCHEMES)}, file, synthetic"
        )
    path = Path(text)
    if not path.is_file():
        raise SourceError(f"source {uri!r}: video file does not exist; give {SOURCE_HELP}")
    return SourceSpec(name, uri, SourceKind.FILE, str(path))


# ---------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame with its stamps.

    ``t_wall_ns`` (``time.time_ns``) and ``t_mono_ns`` (``time.monotonic_ns``)
    are taken when the frame is delivered, as a camera driver would;
    ``pts_ms`` is the source's own timestamp (file position, stream pts).
    """

    source: str
    index: int
    image: np.ndarray
    t_wall_ns: int
    t_mono_ns: int
    pts_ms: float


class FrameQueue:
    """Bounded queue of frames between a capture thread and its consumer.

    ``put(block=False)`` never waits: when full, the OLDEST frame is dropped
    (the newest frame is the one worth locating) and returned so the caller
    counts it. ``close()`` lets the consumer drain what is left, then
    :meth:`get` returns ``None``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity {capacity} must be >= 1")
        self.capacity = capacity
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(
        self, frame: Frame, *, block: bool, stop: threading.Event | None = None
    ) -> Frame | None:
        """Queue ``frame``; return the frame dropped to make room (non-blocking mode) or None."""
        with self._cond:
            if block:
                while len(self._items) >= self.capacity and not self._closed:
                    if stop is not None and stop.is_set():
                        return frame
                    self._cond.wait(0.05)
            dropped = None
            if len(self._items) >= self.capacity:
                dropped = self._items.popleft()
            self._items.append(frame)
            self._cond.notify_all()
            return dropped

    def get(self, timeout_s: float) -> Frame | None:
        """The oldest frame, or None on timeout or when closed and drained."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def clear(self) -> int:
        """Drop everything queued; return how many frames that was."""
        with self._cond:
            count = len(self._items)
            self._items.clear()
            self._cond.notify_all()
            return count


# ---------------------------------------------------------------- readers


class _EndOfStream(Exception):
    """The reader has no more frames (end of file, stream closed)."""


class VideoReader:
    """OpenCV capture of a file, camera or stream; ``read`` returns (image, pts_ms)."""

    def __init__(self, spec: SourceSpec, *, open_timeout_ms: int, read_timeout_ms: int) -> None:
        self.spec = spec
        params = []
        if spec.kind is not SourceKind.FILE:
            # Open/read timeouts only take effect as constructor parameters, not when set
            # on an open capture (seen with OpenCV 5.1's FFmpeg backend, ENVIRONMENT.md).
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                open_timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                read_timeout_ms,
            ]
        backend = cv2.CAP_V4L2 if spec.kind is SourceKind.CAMERA else cv2.CAP_FFMPEG
        try:
            self._cap = cv2.VideoCapture(spec.target, backend, params)
        except cv2.error as exc:
            raise SourceError(f"source {spec.name} ({spec.uri}): cannot open: {exc}") from exc
        if not self._cap.isOpened():
            self._cap.release()
            what = "not a readable video" if spec.kind is SourceKind.FILE else "cannot be opened"
            raise SourceError(f"source {spec.name} ({spec.uri}): {what}")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        # Streams often report 0 or a nonsense rate; files carry a real one.
        self.fps = fps if 0.5 <= fps <= 1000 else 0.0
        self.size = (
            int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self._count = 0

    def read(self) -> tuple[np.ndarray, float]:
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise _EndOfStream(f"read failed: {exc}") from exc
        if not ok or image is None:
            raise _EndOfStream(
                "end of stream" if self.spec.kind is SourceKind.FILE else "read failed or timed out"
            )
        pts_ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        if pts_ms <= 0 and self._count > 0 and self.fps:
            pts_ms = self._count * 1000.0 / self.fps
        self._count += 1
        return image, float(pts_ms)

    def close(self) -> None:
        self._cap.release()


class SyntheticReader:
    """The belt simulator as a camera: one rendered frame per ``read``."""

    def __init__(self, spec: SourceSpec) -> None:
        from service.simulator import BeltSimulator

        opts = spec.synthetic or SyntheticOptions()
        width, height = opts.size
        self.spec = spec
        self.fps = opts.fps
        self.size = opts.size
        self._limit = opts.frames
        self._sim = BeltSimulator(width, height, opts.fps, opts.rate, opts.seed)
        self._compress = opts.compress
        self._count = 0

    def read(self) -> tuple[np.ndarray, float]:
        if self._limit and self._count >= self._limit:
            raise _EndOfStream("synthetic frame limit reached")
        sim_frame = self._sim.next_frame(compress=self._compress)
        pts_ms = self._count * 1000.0 / self.fps
        self._count += 1
        return sim_frame.image, pts_ms

    def close(self) -> None:
        pass


def open_reader(spec: SourceSpec, *, open_timeout_ms: int = 5000, read_timeout_ms: int = 5000):
    """Open the reader for ``spec`` (raises SourceError when it cannot be opened)."""
    if spec.kind is SourceKind.SYNTHETIC:
        return SyntheticReader(spec)
    return VideoReader(spec, open_timeout_ms=open_timeout_ms, read_timeout_ms=read_timeout_ms)


# ---------------------------------------------------------------- capture thread


@dataclass
class CaptureOptions:
    pace: str = "realtime"  # files and synthetic: realtime or fast
    open_timeout_ms: int = 5000
    read_timeout_ms: int = 5000
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    stall_timeout_s: float = 5.0
    jitter: float = 0.2  # +-20 % on each reconnect delay, so many cameras do not retry in step


class Capture:
    """One source's capture thread: open, read, stamp, queue; reconnect live sources.

    Lifecycle: ``start()`` (a file or synthetic source is opened right there, so
    a bad file fails the start with SourceError), ``stop()``, ``join(timeout)``.
    ``queue`` is closed when the thread ends; ``ended`` is set then.
    """

    def __init__(self, spec: SourceSpec, queue: FrameQueue, metrics, options: CaptureOptions):
        self.spec = spec
        self.name = spec.name
        self.queue = queue
        self.options = options
        self._metrics = metrics
        self._stop = threading.Event()
        self.ended = threading.Event()
        self.state = SourceState.STARTING
        self.error: str | None = None
        self.frames = 0
        self.reconnects = 0
        self.dropped = 0  # frames dropped because the queue was full (oldest first)
        self.last_frame_mono = time.monotonic()
        self._first_frame_mono = 0.0
        self._thread: threading.Thread | None = None
        self._reader = None
        self._state_lock = threading.Lock()
        self._paced = spec.kind in (SourceKind.FILE, SourceKind.SYNTHETIC) and (
            options.pace == "realtime"
        )
        self._block = options.pace == "fast" and not spec.live
        metrics.init_source(self.name)  # every series exported at 0 from the start

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"capture {self.name} already started")
        if not self.spec.live:
            self._reader = open_reader(self.spec)  # a bad file is a start-up error
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; False if it is still running (e.g. stuck in a read)."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def up(self) -> bool:
        return self.state is SourceState.UP

    def check_stall(self, now_mono: float) -> None:
        """Watchdog, called from the pipeline loop: a live source silent too long is down.

        NOTE: the capture thread may still be blocked inside OpenCV's read; the read
        timeout (a constructor parameter) bounds that, and the thread then reconnects.
        """
        if not (self.spec.live and self.state is SourceState.UP):
            return
        silent = now_mono - self.last_frame_mono
        if silent > self.options.stall_timeout_s:
            self._set_down(f"stalled: no frame for {silent:.1f} s")

    # -- state changes (logged once per change, never per frame)

    def _set_up(self, reader) -> None:
        with self._state_lock:
            was = self.state
            self.state = SourceState.UP
            self.last_frame_mono = time.monotonic()  # the stall clock starts now
        self._metrics.source_up.labels(source=self.name).set(1)
        width, height = reader.size
        fps = f"{reader.fps:.1f} fps" if reader.fps else "unknown fps"
        verb = "back up" if was is SourceState.DOWN else "up"
        log.info("source %s %s: %s, %dx%d, %s", self.name, verb, self.spec.uri, width, height, fps)

    def _set_down(self, why: str) -> None:
        with self._state_lock:
            was = self.state
            self.state = SourceState.DOWN
        self._metrics.source_up.labels(source=self.name).set(0)
        if was is not SourceState.DOWN:
            log.warning("source %s down: %s (%s); reconnecting", self.name, why, self.spec.uri)

    def _set_ended(self, why: str) -> None:
        with self._state_lock:
            self.state = SourceState.ENDED
        self._metrics.source_up.labels(source=self.name).set(0)
        # The delivered rate shows whether a paced file really ran in real time.
        elapsed = time.monotonic() - self._first_frame_mono if self._first_frame_mono else 0.0
        rate = self.frames / elapsed if elapsed > 0 else 0.0
        log.info(
            "source %s ended: %s after %d frames in %.1f s (%.1f fps)",
            self.name, why, self.frames, elapsed, rate,
        )  # fmt: skip

    # -- the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug must not kill the daemon silently
            self.error = f"source {self.name}: {exc!r}"
            log.exception("source %s failed", self.name)
            self._set_ended("error")
        finally:
            self.queue.close()
            self.ended.set()

    def _loop(self) -> None:
        delay = self.options.reconnect_initial_s
        attempts = 0
        while not self._stop.is_set():
            reader = self._reader
            self._reader = None
            if reader is None:
                try:
                    reader = open_reader(
                        self.spec,
                        open_timeout_ms=self.options.open_timeout_ms,
                        read_timeout_ms=self.options.read_timeout_ms,
                    )
                except SourceError as exc:
                    if not self.spec.live:
                        self.error = str(exc)
                        self._set_ended("cannot be opened")
                        return
                    self._set_down(str(exc).split(": ", 1)[-1])
                    attempts += 1
                    delay = self._backoff(delay, attempts)
                    continue
            self._set_up(reader)
            delay = self.options.reconnect_initial_s
            attempts = 0
            why = self._pump(reader)
            reader.close()
            if self._stop.is_set():
                self._set_ended("stopped")
                return
            if not self.spec.live:
                self._set_ended(why)
                return
            self._set_down(why)
            attempts += 1
            delay = self._backoff(delay, attempts)
        self._set_ended("stopped")

    def _backoff(self, delay: float, attempts: int) -> float:
        """Sleep ``delay`` +- jitter (interruptible), count the reconnect, return the next delay."""
        jittered = delay * (1.0 + random.uniform(-self.options.jitter, self.options.jitter))
        if attempts % 10 == 0:
            log.info("source %s still down after %d attempts", self.name, attempts)
        log.debug("source %s: reconnect attempt %d in %.2f s", self.name, attempts, jittered)
        if self._stop.wait(jittered):
            return delay
        self.reconnects += 1
        self._metrics.source_reconnects.labels(source=self.name).inc()
        return min(delay * 2.0, self.options.reconnect_max_s)

    def _pump(self, reader) -> str:
        """Read and queue frames until the reader ends or stop; return why it ended."""
        frame_s = 1.0 / reader.fps if reader.fps else 0.0
        anchor_mono = anchor_pts = None
        frames_counter = self._metrics.frames.labels(source=self.name)
        dropped_counter = self._metrics.frames_dropped.labels(source=self.name, reason="queue_full")
        while not self._stop.is_set():
            try:
                image, pts_ms = reader.read()
            except _EndOfStream as exc:
                return str(exc)

            # Pace: deliver at the frame's own time, as a camera would.
            if self._paced and frame_s:
                now = time.monotonic()
                if anchor_mono is None:
                    anchor_mono, anchor_pts = now, pts_ms
                due = anchor_mono + (pts_ms - anchor_pts) / 1000.0
                if due > now:
                    if self._stop.wait(due - now):
                        return "stopped"
                elif now - due > 2 * frame_s:
                    # Decoding fell behind (a busy machine): re-anchor rather than deliver
                    # a burst of frames no camera would send. NOTE: the replay then runs
                    # slower than real time without a drop being counted; the "ended"
                    # log line gives the delivered frame rate.
                    anchor_mono, anchor_pts = now, pts_ms

            frame = Frame(
                source=self.name,
                index=self.frames,
                image=image,
                t_wall_ns=time.time_ns(),
                t_mono_ns=time.monotonic_ns(),
                pts_ms=pts_ms,
            )
            self.frames += 1
            self.last_frame_mono = frame.t_mono_ns / 1e9
            if not self._first_frame_mono:
                self._first_frame_mono = self.last_frame_mono
            if self.state is not SourceState.UP:  # the watchdog marked it stalled
                self._set_up(reader)
            frames_counter.inc()
            dropped = self.queue.put(frame, block=self._block, stop=self._stop)
            if dropped is not None and dropped is not frame:
                self.dropped += 1
                dropped_counter.inc()
        return "stopped"


def source_names(uris: list[str] | tuple[str, ...]) -> list[str]:
    """Stable short names: ``src0``, ``src1``, ... in the order given."""
    return [f"src{i}" for i in range(len(uris))]


def describe(spec: SourceSpec) -> str:
    """One line for the start-up log."""
    if spec.kind is SourceKind.FILE:
        return f"{spec.name} = file {os.path.basename(str(spec.target))}"
    return f"{spec.name} = {spec.kind.value} {spec.uri}"
