"""End to end: the real daemon (`python -m service run`) as a subprocess, with a real SUB,
real HTTP scrapes, an ffmpeg-encoded belt video and an ffmpeg-served MJPEG stream."""

from __future__ import annotations

import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Builders shared with the in-process pipeline tests (cached per test session).
from test_pipeline import (
    Collector,
    free_port,
    make_model,
    make_video,
    match,
    shared_dir,
    truth_crossings,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg"),
]

REPO = Path(__file__).resolve().parent.parent
SHUTDOWN_BOUND_S = 5.0  # [pipeline] shutdown_timeout_s default


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_model(shared_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def belt_video(tmp_path_factory) -> tuple[Path, list[dict]]:
    return make_video(shared_dir(tmp_path_factory))


class Daemon:
    """``python -m service run ...`` with its stderr read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http_port: int | None = None

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match:
        """The first log line (seen so far or coming) that matches ``pattern``."""
        regex = re.compile(pattern)
        for line in list(self.lines):
            if found := regex.search(line):
                return found
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._new.empty():
                    break
                continue
            if found := regex.search(line):
                return found
        raise AssertionError(f"no log line matching {pattern!r}; log:\n" + self.log)

    def wait_http(self) -> int:
        self.http_port = int(self.wait_for(r"serving .* on http://127\.0\.0\.1:(\d+)").group(1))
        return self.http_port

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=5
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from a real scrape of /metrics."""
        _, text = self.get("/metrics")
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == (f"{name}{{{wanted}}}" if labels else name):
                return float(value)
        return None

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(5)
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        daemon = Daemon(*args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def run_args(model: Path, endpoint: str, *sources: str) -> list[str]:
    args = ["--model", str(model), "--publish", endpoint, "--http", "127.0.0.1:0"]
    for source in sources:
        args += ["--source", source]
    return args


# ---------------------------------------------------------------- runs


def test_a_file_is_sorted_and_the_daemon_exits_at_its_end(daemons, model_path, belt_video):
    video, objects = belt_video
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    collector = Collector(endpoint)
    try:
        daemon = daemons(*run_args(model_path, endpoint, str(video)), "--exit-at-end")
        daemon.wait_http()
        daemon.wait_for(r"ready: model \w+ warm")
        assert daemon.get("/readyz")[0] == 200
        assert daemon.metric("beltsort_source_up", source="src0") == 1
        assert daemon.wait(60) == 0, daemon.log
        time.sleep(0.2)
    finally:
        collector.close()

    assert re.search(r"model \w{12} loaded from .* provider CPUExecutionProvider", daemon.log)
    assert "every source ended and every object in flight is decided" in daemon.log
    crossings = truth_crossings(objects, line_x=640)
    matched = match(collector.decisions(), crossings)
    counts = {tid: len(found) for tid, found in matched.items()}
    stopped = next(line for line in daemon.lines if "stopped:" in line)
    assert all(n == 1 for n in counts.values()), (counts, stopped, collector.decisions())


def test_sigterm_exits_0_within_the_bound_with_everything_decided(daemons, model_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    collector = Collector(endpoint)
    source = "synthetic:?fps=30&size=640x360&rate=6&seed=2"
    try:
        daemon = daemons(*run_args(model_path, endpoint, source))
        daemon.wait_http()
        daemon.wait_for(r"ready: ")
        deadline = time.monotonic() + 60
        while not collector.decisions() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert collector.decisions(), "no decision within 60 s"

        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.wait(SHUTDOWN_BOUND_S + 5)
        elapsed = time.monotonic() - t0
        time.sleep(0.2)
    finally:
        collector.close()
    assert code == 0, daemon.log
    assert elapsed < SHUTDOWN_BOUND_S + 1.0  # + interpreter exit
    assert "SIGTERM received: stopping" in daemon.log
    stopped = re.search(
        r"stopped: \d+ frames located, .*, (\d+) crossings, (\d+) decisions", daemon.log
    )
    assert stopped and stopped.group(1) == stopped.group(2), daemon.log
    assert len(collector.decisions()) == int(stopped.group(2))


def test_a_missing_file_is_one_line_and_exit_2(daemons, model_path, tmp_path):
    daemon = daemons("--model", str(model_path), "--source", str(tmp_path / "nope.mp4"))
    assert daemon.wait(60) == 2
    assert len(daemon.lines) == 1, daemon.log
    assert "nope.mp4" in daemon.lines[0] and "video file does not exist" in daemon.lines[0]


def test_an_unknown_synthetic_option_is_one_line_and_exit_2(daemons, model_path):
    daemon = daemons("--model", str(model_path), "--source", "synthetic:?fps=30&colour=red")
    assert daemon.wait(60) == 2
    assert len(daemon.lines) == 1, daemon.log
    assert daemon.lines[0].endswith(
        "error: source 'synthetic:?fps=30&colour=red': unknown option 'colour'; "
        "allowed: rate, fps, seed, size, frames, compress"
    )


def test_a_dead_stream_is_logged_and_retried_and_not_ready(daemons, model_path):
    url = f"http://127.0.0.1:{free_port()}/feed.mjpg"  # a closed loopback port
    daemon = daemons(*run_args(model_path, f"tcp://127.0.0.1:{free_port()}", url))
    daemon.wait_http()
    daemon.wait_for(rf"source src0 down: .*{re.escape(url)}")
    deadline = time.monotonic() + 30
    while (daemon.metric("beltsort_source_reconnects_total", source="src0") or 0) < 2:
        assert time.monotonic() < deadline, daemon.log
        time.sleep(0.2)
    assert daemon.metric("beltsort_source_up", source="src0") == 0
    assert daemon.get("/healthz")[0] == 200  # the daemon itself is fine
    code, body = daemon.get("/readyz")
    assert code == 503 and '"src0": "down"' in body
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.wait(SHUTDOWN_BOUND_S + 5) == 0, daemon.log
    assert daemon.log.count("source src0 down") == 1  # one line per change, not per attempt


def test_an_mjpeg_stream_is_read_and_its_end_detected(daemons, model_path, belt_video):
    video, _ = belt_video
    port = free_port()
    url = f"http://127.0.0.1:{port}/feed.mjpg"
    camera = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-re", "-i", str(video), "-f", "mpjpeg",
         "-q:v", "5", "-listen", "1", url],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        daemon = daemons(*run_args(model_path, f"tcp://127.0.0.1:{free_port()}", url))
        daemon.wait_http()
        daemon.wait_for(rf"source src0 (back )?up: {re.escape(url)}, 1280x720")
        deadline = time.monotonic() + 30
        while (daemon.metric("beltsort_frames_total", source="src0") or 0) < 10:
            assert time.monotonic() < deadline, daemon.log
            time.sleep(0.2)
        assert camera.wait(30) == 0  # the clip is over: the camera goes away
        daemon.wait_for(r"source src0 down: ", timeout_s=30)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(SHUTDOWN_BOUND_S + 5) == 0, daemon.log
    finally:
        if camera.poll() is None:
            camera.kill()
            camera.wait(10)


def test_subscribe_is_delegated():
    result = subprocess.run(
        [sys.executable, "-m", "service", "subscribe", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0 and "--connect" in result.stdout
