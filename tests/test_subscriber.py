"""DecisionSubscriber against hand-made wire traffic, and the ``subscribe`` CLI as a real process.

Every socket is on an ephemeral loopback port with linger 0, every receive
has a timeout, every subprocess runs under a timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from prometheus_client import CollectorRegistry

from service.errors import PublishError
from service.metrics import Metrics
from service.publish import DecisionPublisher
from service.subscriber import DecisionSubscriber, SubscriberEvent

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


class RawPublisher:
    """A bare PUB socket that sends whatever a test wants, contract or not."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.run_id = "run-a"
        self.seq = 0

    def send(self, topic: str = "heartbeat", seq: int | None = None, **fields) -> None:
        self.seq = self.seq + 1 if seq is None else seq
        body = {"seq": self.seq, "run_id": self.run_id, **fields}
        self.socket.send_multipart([topic.encode(), json.dumps(body).encode()])

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def raw():
    publisher = RawPublisher()
    yield publisher
    publisher.close()


def join(raw: RawPublisher, sub: DecisionSubscriber) -> SubscriberEvent:
    """Send heartbeats until the subscription is through (slow joiner); the joined event."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        raw.send("heartbeat", status="ok")
        event = sub.receive(0.05)
        if event is not None and event.kind == "joined":
            assert sub.receive(1).kind == "message"  # the joined message itself
            while (extra := sub.receive(0.05)) is not None:  # heartbeats already in flight
                assert extra.kind == "message"
            return event
    pytest.fail("subscription did not go through in 5 s")


def events(sub: DecisionSubscriber, n: int, timeout_s: float = 5.0) -> list[SubscriberEvent]:
    got: list[SubscriberEvent] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and (left := deadline - time.monotonic()) > 0:
        event = sub.receive(left)
        if event is not None:
            got.append(event)
    assert len(got) == n, f"wanted {n} events, got {[e.kind for e in got]}"
    return got


# ------------------------------------------------------------------- the class


def test_gap_out_of_order_and_restart(raw, make_subscriber):
    sub = make_subscriber(raw.endpoint, heartbeat_timeout_s=30)
    join(raw, sub)
    start = raw.seq

    raw.send("decision", seq=start + 4, track_id=1)  # 3 lost
    gap, message = events(sub, 2)
    assert gap.kind == "gap" and message.kind == "message"
    assert gap.detail == {
        "run_id": "run-a",
        "expected": start + 1,
        "received": start + 4,
        "missed": 3,
    }
    assert gap.message["track_id"] == 1

    raw.send("decision", seq=start + 2, track_id=2)  # behind: should never happen on one PUB
    back, _ = events(sub, 2)
    assert back.kind == "out_of_order" and back.detail["received"] == start + 2
    raw.send("decision", seq=start + 5, track_id=3)  # counting continues from the highest seq
    assert [e.kind for e in events(sub, 1)] == ["message"]

    raw.run_id = "run-b"
    raw.send("heartbeat", seq=1)
    restart, _ = events(sub, 2)
    assert restart.kind == "restart"
    assert restart.detail == {
        "previous_run_id": "run-a",
        "previous_seq": start + 5,
        "run_id": "run-b",
        "seq": 1,
    }
    assert (sub.gaps, sub.missed, sub.restarts) == (1, 3, 1)


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        ([b"decision", b"not json"], "not UTF-8 JSON"),
        ([b"decision", b"\xff\xfe"], "not UTF-8 JSON"),
        ([b"decision", b"[1, 2]"], "not a JSON object"),
        ([b"decision", b'{"run_id": "run-a"}'], "integer seq"),
        ([b"decision", b'{"seq": true, "run_id": "run-a"}'], "integer seq"),
        ([b"decisionX", b'{"seq": 1, "run_id": "run-a"}'], "unknown topic"),
        ([b"decision"], "2 frames"),
    ],
)
def test_contract_breaking_messages_are_reported(raw, make_subscriber, frames, problem):
    sub = make_subscriber(raw.endpoint, heartbeat_timeout_s=30)
    join(raw, sub)
    before = raw.seq
    raw.socket.send_multipart(frames)
    (bad,) = events(sub, 1)
    assert bad.kind == "bad_message" and problem in bad.detail["error"]
    assert sub.last_seq == before  # a bad message does not move the count


def test_topics_filter_what_is_returned_not_what_is_tracked(raw, make_subscriber):
    sub = make_subscriber(raw.endpoint, topics=("decision",), heartbeat_timeout_s=30)
    deadline = time.monotonic() + 5
    while sub.run_id is None:  # join on heartbeats, which are never returned as messages
        assert time.monotonic() < deadline
        raw.send("heartbeat")
        event = sub.receive(0.05)
        assert event is None or event.kind == "joined"
    raw.send("heartbeat")
    raw.send("decision", track_id=5)
    raw.send("heartbeat")
    raw.send("decision", track_id=6)
    got = events(sub, 2)
    assert [(e.kind, e.message["track_id"]) for e in got] == [("message", 5), ("message", 6)]
    assert sub.gaps == 0  # the heartbeats between them were seen: no false gap


def test_stopping_heartbeat_is_reported(raw, make_subscriber):
    sub = make_subscriber(raw.endpoint, heartbeat_timeout_s=30)
    join(raw, sub)
    raw.send("heartbeat", status="stopping")
    stopping, message = events(sub, 2)
    assert stopping.kind == "stopping" and stopping.detail["seq"] == raw.seq
    assert message.message["status"] == "stopping"


def test_receive_waits_no_longer_than_asked(raw, make_subscriber):
    sub = make_subscriber(raw.endpoint, heartbeat_timeout_s=30)
    t0 = time.monotonic()
    assert sub.receive(0) is None
    assert sub.receive(0.2) is None
    assert 0.2 <= time.monotonic() - t0 < 1.0


def test_lifecycle_and_bad_arguments():
    with pytest.raises(ValueError, match="allowed are decision, heartbeat"):
        DecisionSubscriber(topics=("decisions",))
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        DecisionSubscriber(heartbeat_timeout_s=0)
    sub = DecisionSubscriber()
    with pytest.raises(PublishError, match="'tcpx://nowhere'"):
        sub.connect("tcpx://nowhere")
    sub.close()
    sub.close()
    with pytest.raises(RuntimeError, match="closed"):
        sub.receive(0)


# ---------------------------------------------------------------------- the CLI


def run_cli(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "subscribe", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture
def publisher():
    pub = DecisionPublisher(
        "tcp://127.0.0.1:*", Metrics(CollectorRegistry()), heartbeat_s=0.05, linger_ms=0
    )
    pub.start()
    yield pub
    pub.close(timeout_s=1.0)


def test_cli_prints_json_lines_and_exits_on_count(publisher):
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "subscribe", "--connect", publisher.endpoint,
         "--topics", "decision", "--count", "5", "--timeout", "20"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        # Publish until the process has had its five (it may join late: slow joiner).
        deadline, track_id = time.monotonic() + 25, 0
        while proc.poll() is None and time.monotonic() < deadline:
            publisher.publish_decision({"source": "cam0", "track_id": track_id, "bin": 1})
            track_id += 1
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err

    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5
    assert {m["topic"] for m in lines} == {"decision"}
    assert {m["run_id"] for m in lines} == {publisher.run_id}
    ids = [m["track_id"] for m in lines]
    assert ids == list(range(ids[0], ids[0] + 5))
    reports = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert reports and reports[0]["event"] == "joined"
    assert reports[0]["run_id"] == publisher.run_id


def test_cli_times_out_with_status_1_and_reports_heartbeat_loss(raw):
    result = run_cli("--connect", raw.endpoint, "--timeout", "0.6", "--heartbeat-timeout", "0.2")
    assert result.returncode == 1
    assert result.stdout == ""
    reports = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["event"] for r in reports] == ["heartbeat_lost", "timeout"]
    assert reports[0]["run_id"] is None and reports[1]["silent_s"] == 0.6


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--connect", "tcp://127.0.0.1:1", "--heartbeat-timeout", "-1"], "'-1'"),
        (["--connect", "tcp://127.0.0.1:1", "--count", "0"], "'0'"),
        (["--connect", "tcp://127.0.0.1:1", "--topics", "decisions"], "'decisions'"),
        (["--connect", "nonsense"], "'nonsense'"),
        ([], "--connect"),
    ],
)
def test_cli_bad_values_are_one_line_and_status_2(args, named):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
