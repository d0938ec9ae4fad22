"""Frame sources: real ffmpeg-encoded files, the simulator, a real HTTP MJPEG stream."""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.errors import SourceError
from service.metrics import Metrics
from service.sources import (
    Capture,
    CaptureOptions,
    FrameQueue,
    SourceKind,
    SourceState,
    SyntheticOptions,
    parse_source,
)

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

FPS = 30


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """One second of 320x240 test pattern at 30 fps, H.264 in MP4, as a camera file would be."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc=size=320x240:rate={FPS}", "-t", "1", "-pix_fmt", "yuv420p", str(path)],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def drain(queue: FrameQueue, *, timeout_s: float, per_frame_s: float = 0.0) -> list:
    """Every frame until the queue is closed and empty (bounded by ``timeout_s``)."""
    frames, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = queue.get(0.1)
        if frame is None:
            if queue.closed and len(queue) == 0:
                return frames
            continue
        frames.append(frame)
        time.sleep(per_frame_s)
    raise AssertionError(f"source did not end within {timeout_s} s ({len(frames)} frames)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- URIs


def test_uris_are_classified(clip):
    assert parse_source(str(clip), "s").kind is SourceKind.FILE
    assert parse_source(f"file://{clip}", "s").kind is SourceKind.FILE
    assert parse_source("0", "s").target == 0
    assert parse_source("/dev/video2", "s").kind is SourceKind.CAMERA
    assert parse_source("rtsp://cam/stream", "s").kind is SourceKind.STREAM
    assert parse_source("http://127.0.0.1:1/feed.mjpg", "s").live
    spec = parse_source("synthetic:?rate=2.5&fps=15&seed=7&size=640x360&frames=9&compress=0", "s")
    assert spec.synthetic == SyntheticOptions(
        rate=2.5, fps=15.0, seed=7, size=(640, 360), frames=9, compress=False
    )
    assert parse_source("synthetic:", "s").synthetic == SyntheticOptions()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("missing.mp4", "video file does not exist"),
        ("ftp://host/x", "scheme 'ftp' is not supported"),
        ("synthetic:?speed=3", "unknown option 'speed'; allowed: rate, fps, seed, size, frames, "),
        ("synthetic:?compress=yes", "compress='yes' is not allowed; allowed: 0 or 1"),
        ("synthetic:?fps=0", "fps='0' is not allowed; allowed: a number in [1, 240]"),
        ("synthetic:?size=12x", "size='12x' is not allowed"),
        ("synthetic:rate=3", "options follow '?'"),
        ("", "is empty"),
    ],
)
def test_bad_uris_are_clear_errors(uri, expected):
    with pytest.raises(SourceError, match=None) as info:
        parse_source(uri, "src0")
    assert expected in str(info.value)


def test_a_file_that_is_not_a_video_fails_at_start(tmp_path, metrics):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video")
    capture = Capture(parse_source(str(bogus), "src0"), FrameQueue(2), metrics, CaptureOptions())
    with pytest.raises(SourceError, match="not a readable video"):
        capture.start()


# ---------------------------------------------------------------- files


def test_a_file_replays_in_real_time_with_stamps_and_ends(clip, metrics):
    queue = FrameQueue(4)
    capture = Capture(parse_source(str(clip), "src0"), queue, metrics, CaptureOptions())
    t0 = time.monotonic()
    capture.start()
    frames = drain(queue, timeout_s=10)
    elapsed = time.monotonic() - t0
    assert capture.join(2.0)

    assert [f.index for f in frames] == list(range(FPS))
    assert frames[0].image.shape == (240, 320, 3)
    # paced like a camera: 30 frames at 30 fps take about a second, not a burst
    assert 0.85 <= elapsed < 3.0
    gaps_ms = [(b.t_mono_ns - a.t_mono_ns) / 1e6 for a, b in itertools.pairwise(frames)]
    assert 20 < sum(gaps_ms) / len(gaps_ms) < 50
    pts = [f.pts_ms for f in frames]
    assert pts[0] == pytest.approx(0.0) and pts[-1] == pytest.approx(29 * 1000 / FPS, abs=1)
    wall = [f.t_wall_ns for f in frames]
    assert wall == sorted(wall) and abs(wall[0] - time.time_ns()) < 30e9
    assert capture.state is SourceState.ENDED
    assert sample(metrics, "beltsort_frames_total", source="src0") == FPS
    assert sample(metrics, "beltsort_source_up", source="src0") == 0


def test_realtime_drops_the_oldest_frames_when_the_consumer_is_slow(clip, metrics):
    queue = FrameQueue(1)
    capture = Capture(parse_source(str(clip), "src0"), queue, metrics, CaptureOptions())
    capture.start()
    frames = drain(queue, timeout_s=10, per_frame_s=0.1)  # 10 fps consumer, 30 fps source
    dropped = sample(metrics, "beltsort_frames_dropped_total", source="src0", reason="queue_full")
    assert dropped > 10
    assert len(frames) + dropped == FPS
    assert frames[-1].index == FPS - 1  # the newest frame is kept, the oldest go


def test_fast_pace_never_drops(clip, metrics):
    queue = FrameQueue(1)
    options = CaptureOptions(pace="fast")
    capture = Capture(parse_source(str(clip), "src0"), queue, metrics, options)
    capture.start()
    frames = drain(queue, timeout_s=20, per_frame_s=0.02)
    assert [f.index for f in frames] == list(range(FPS))
    assert sample(metrics, "beltsort_frames_dropped_total", source="src0", reason="queue_full") == 0


def test_stop_ends_a_paced_file_promptly(clip, metrics):
    queue = FrameQueue(2)
    capture = Capture(parse_source(str(clip), "src0"), queue, metrics, CaptureOptions())
    capture.start()
    assert queue.get(2.0) is not None
    capture.stop()
    assert capture.join(1.0)
    assert capture.ended.is_set() and queue.closed


# ---------------------------------------------------------------- synthetic


def test_synthetic_source_renders_the_requested_frames(metrics):
    spec = parse_source("synthetic:?fps=60&size=320x240&frames=12&seed=3&rate=5&compress=1", "sim")
    queue = FrameQueue(2)
    capture = Capture(spec, queue, metrics, CaptureOptions(pace="fast"))
    capture.start()
    frames = drain(queue, timeout_s=30)
    assert len(frames) == 12
    assert frames[0].image.shape == (240, 320, 3) and frames[0].image.dtype.name == "uint8"
    assert frames[5].pts_ms == pytest.approx(5 * 1000 / 60)


# ---------------------------------------------------------------- streams


def test_a_dead_stream_is_logged_once_and_retried_with_backoff(metrics, caplog):
    url = f"http://127.0.0.1:{free_port()}/feed.mjpg"  # nothing listens there
    options = CaptureOptions(open_timeout_ms=500, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    capture = Capture(parse_source(url, "cam"), FrameQueue(2), metrics, options)
    with caplog.at_level(logging.INFO, logger="service.sources"):
        capture.start()
        deadline = time.monotonic() + 10
        while capture.reconnects < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        capture.stop()
        assert capture.join(3.0)
    assert capture.reconnects >= 4
    assert sample(metrics, "beltsort_source_reconnects_total", source="cam") == capture.reconnects
    assert sample(metrics, "beltsort_source_up", source="cam") == 0
    downs = [r for r in caplog.records if "source cam down" in r.getMessage()]
    assert len(downs) == 1 and url in downs[0].getMessage()  # a line per change, not per try


@pytest.fixture
def mjpeg_server(clip):
    """``ffmpeg -re ... -f mpjpeg -listen 1``: an HTTP MJPEG camera serving the clip once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/feed.mjpg"
    proc = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "1", "-i", str(clip),
         "-f", "mpjpeg", "-q:v", "5", "-listen", "1", url],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.3)  # let it listen
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=10)


def test_an_mjpeg_stream_is_read_and_its_disappearance_detected(mjpeg_server, metrics, caplog):
    url, proc = mjpeg_server
    options = CaptureOptions(
        open_timeout_ms=3000, read_timeout_ms=1000, reconnect_initial_s=0.1, reconnect_max_s=0.2
    )
    queue = FrameQueue(8)
    capture = Capture(parse_source(url, "cam"), queue, metrics, options)
    with caplog.at_level(logging.INFO, logger="service.sources"):
        capture.start()
        frames = []
        deadline = time.monotonic() + 15
        while len(frames) < 20 and time.monotonic() < deadline:
            frame = queue.get(0.2)
            if frame is not None:
                frames.append(frame)
        assert len(frames) >= 20, "no frames from the MJPEG stream"
        assert frames[0].image.shape == (240, 320, 3)
        assert capture.up and sample(metrics, "beltsort_source_up", source="cam") == 1

        # The camera goes away: the stream ends, the source goes down and retries
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while capture.reconnects < 2 and time.monotonic() < deadline:
            queue.get(0.1)
        capture.stop()
        assert capture.join(5.0)
    messages = [r.getMessage() for r in caplog.records]
    # "back up" when ffmpeg was not listening yet at the first try (a loaded machine)
    assert any(re.search(r"source cam (back )?up", m) for m in messages)
    assert any("source cam down" in m for m in messages)
    assert capture.reconnects >= 2
    assert sample(metrics, "beltsort_source_up", source="cam") == 0


def test_a_stalled_stream_is_marked_down_by_the_watchdog(mjpeg_server, metrics, caplog):
    url, proc = mjpeg_server
    options = CaptureOptions(open_timeout_ms=3000, read_timeout_ms=3000, stall_timeout_s=0.3)
    queue = FrameQueue(8)
    capture = Capture(parse_source(url, "cam"), queue, metrics, options)
    with caplog.at_level(logging.INFO, logger="service.sources"):
        capture.start()
        assert queue.get(10.0) is not None
        proc.send_signal(signal.SIGSTOP)  # the camera hangs: the connection stays open
        time.sleep(0.6)
        capture.check_stall(time.monotonic())
        assert capture.state is SourceState.DOWN
        assert sample(metrics, "beltsort_source_up", source="cam") == 0
        proc.send_signal(signal.SIGCONT)  # and recovers
        deadline = time.monotonic() + 10
        while not capture.up and time.monotonic() < deadline:
            queue.get(0.1)
        assert capture.up
        capture.stop()
        capture.join(5.0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stalled: no frame for" in m for m in messages)
    assert any("source cam back up" in m for m in messages)
