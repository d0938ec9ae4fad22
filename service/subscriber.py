"""The reference subscriber: what an actuator driver builds on.

``DecisionSubscriber`` connects a ZeroMQ SUB socket to the daemon's publisher
and turns the wire into a stream of :class:`SubscriberEvent`: every message,
plus what a driver must react to, as events of their own:

``joined``             first message seen: the run_id and seq this subscriber starts from
``gap``                seq jumped: ``missed`` messages were lost (our queue or ZeroMQ's HWM)
``out_of_order``       seq went back within one run (should never happen on one PUB socket)
``restart``            a new run_id: the daemon restarted; seq starts over
``heartbeat_lost``     no heartbeat for ``heartbeat_timeout_s`` (also right after connect)
``heartbeat_resumed``  heartbeats are back after a loss
``stopping``           the daemon said it is shutting down cleanly (last heartbeat)
``bad_message``        a message that breaks the contract (not JSON, no seq, unknown topic)

It always subscribes to both topics on the wire, even when asked for
decisions only: seq is one counter across both topics (so heartbeats are
needed to tell a gap from a heartbeat), and heartbeat loss needs heartbeats.
``topics`` only filters which ``message`` events are returned.

Usage (a driver that fails safe)::

    from service.subscriber import DecisionSubscriber

    with DecisionSubscriber(heartbeat_timeout_s=3.0) as sub:
        sub.connect("tcp://127.0.0.1:5560")
        while running:
            event = sub.receive(timeout_s=0.1)
            if event is None:
                continue
            if event.kind in ("gap", "restart", "heartbeat_lost"):
                actuator.fail_safe(event.detail)        # e.g. open every gate to the reject bin
            elif event.kind == "message" and event.topic == "decision":
                actuator.schedule(event.message["bin"], event.message["eject_at_ns"])

One subscriber belongs to one thread (ZeroMQ sockets are not thread-safe).

``python -m service subscribe --connect ENDPOINT`` (``run`` below) prints
every message to stdout as one JSON line, ``{"topic": ..., <payload fields>}``,
and every other event to stderr as one JSON line, ``{"event": KIND, ...}``,
so both streams stay machine-readable (``jq`` works on either).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from service.cli_support import bounded_float, bounded_int
from service.errors import PublishError

log = logging.getLogger(__name__)

TOPICS = ("decision", "heartbeat")


@dataclass(frozen=True)
class SubscriberEvent:
    """One thing the subscriber saw; ``kind`` is one of the kinds in the module docstring.

    ``message`` is the decoded payload for ``message`` events (and the message
    that revealed a ``gap``/``restart``/``joined``); ``detail`` holds the facts
    of the event (``expected``, ``received``, ``missed``, ``silent_s`` ...).
    """

    kind: str
    topic: str | None = None
    message: dict | None = None
    detail: dict = field(default_factory=dict)

    def as_report(self) -> dict:
        """The event as the JSON object the CLI writes to stderr."""
        return {"event": self.kind, **self.detail}


class DecisionSubscriber:
    """SUB socket plus the bookkeeping a driver needs: seq gaps, restarts, heartbeat loss.

    ``rcvhwm`` bounds ZeroMQ's receive queue (messages beyond it are dropped
    by ZeroMQ and then show as a ``gap``). Counters ``messages``, ``gaps``,
    ``missed``, ``restarts`` and ``heartbeat_losses`` add up over the life of
    the object.
    """

    def __init__(
        self,
        topics: tuple[str, ...] | list[str] = TOPICS,
        *,
        heartbeat_timeout_s: float = 3.0,
        rcvhwm: int = 1000,
    ) -> None:
        unknown = [t for t in topics if t not in TOPICS]
        if unknown or not topics:
            raise ValueError(f"topics {list(topics)!r}: allowed are {', '.join(TOPICS)}")
        if not heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s {heartbeat_timeout_s} must be above 0")
        self.topics = tuple(topics)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in TOPICS:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._closed = False
        self._pending: deque[SubscriberEvent] = deque()

        # What we know of the publisher.
        self.run_id: str | None = None
        self.last_seq: int | None = None
        self._last_heartbeat = time.monotonic()
        self._heartbeat_lost = False

        # Running totals.
        self.messages = 0
        self.gaps = 0
        self.missed = 0
        self.restarts = 0
        self.heartbeat_losses = 0

    # ------------------------------------------------------------------ lifecycle

    def connect(self, endpoint: str) -> None:
        """Connect to a publisher (ZeroMQ reconnects by itself if the daemon restarts)."""
        self._check_open()
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            raise PublishError(
                f"cannot connect to {endpoint!r}: {exc.strerror}; "
                "expected an endpoint such as tcp://127.0.0.1:5560 or ipc:///run/beltsort.sock"
            ) from exc
        self._last_heartbeat = time.monotonic()  # the heartbeat clock starts now
        log.info("subscribed to %s (topics: %s)", endpoint, ", ".join(self.topics))

    def close(self) -> None:
        """Close the socket (linger 0). Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()

    def __enter__(self) -> DecisionSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------- receive

    def receive(self, timeout_s: float) -> SubscriberEvent | None:
        """The next event, waiting at most ``timeout_s`` (0: only what is there); None if none.

        A heartbeat loss is reported when it happens, even in the middle of a wait.
        """
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._pending:
                return self._pending.popleft()
            now = time.monotonic()
            lost = self._check_heartbeat(now)
            if lost is not None:
                return lost
            wait = max(0.0, deadline - now)
            if not self._heartbeat_lost:
                # Wake up when the heartbeat is due, to report its loss on time.
                due = self._last_heartbeat + self.heartbeat_timeout_s
                wait = min(wait, max(0.0, due - now))
            if self._socket.poll(math.ceil(wait * 1000)):
                self._handle(self._socket.recv_multipart(zmq.NOBLOCK))
            elif time.monotonic() >= deadline:
                return None

    def _check_heartbeat(self, now: float) -> SubscriberEvent | None:
        silent_s = now - self._last_heartbeat
        if self._heartbeat_lost or silent_s < self.heartbeat_timeout_s:
            return None
        self._heartbeat_lost = True
        self.heartbeat_losses += 1
        return SubscriberEvent(
            "heartbeat_lost",
            detail={
                "run_id": self.run_id,
                "last_seq": self.last_seq,
                "silent_s": round(silent_s, 3),
                "timeout_s": self.heartbeat_timeout_s,
            },
        )

    def _handle(self, frames: list[bytes]) -> None:
        """Decode one multipart message and queue the events it causes, in order."""
        message, problem = _decode(frames)
        if message is None:
            self._pending.append(SubscriberEvent("bad_message", detail={"error": problem}))
            return
        topic = frames[0].decode()
        seq, run_id = message["seq"], message["run_id"]

        # Sequence and run
        if self.run_id is None:
            self._pending.append(
                SubscriberEvent("joined", topic, message, {"run_id": run_id, "seq": seq})
            )
        elif run_id != self.run_id:
            self.restarts += 1
            self._pending.append(
                SubscriberEvent(
                    "restart",
                    topic,
                    message,
                    {
                        "previous_run_id": self.run_id,
                        "previous_seq": self.last_seq,
                        "run_id": run_id,
                        "seq": seq,
                    },
                )
            )
        elif seq > self.last_seq + 1:
            missed = seq - self.last_seq - 1
            self.gaps += 1
            self.missed += missed
            detail = {"run_id": run_id, "expected": self.last_seq + 1, "received": seq}
            self._pending.append(
                SubscriberEvent("gap", topic, message, {**detail, "missed": missed})
            )
        elif seq <= self.last_seq:
            detail = {"run_id": run_id, "expected": self.last_seq + 1, "received": seq}
            self._pending.append(SubscriberEvent("out_of_order", topic, message, detail))
        if self.run_id != run_id or self.last_seq is None or seq > self.last_seq:
            self.run_id, self.last_seq = run_id, seq

        # Heartbeat
        if topic == "heartbeat":
            self._last_heartbeat = time.monotonic()
            if self._heartbeat_lost:
                self._heartbeat_lost = False
                self._pending.append(
                    SubscriberEvent("heartbeat_resumed", topic, message, {"run_id": run_id})
                )
            if message.get("status") == "stopping":
                self._pending.append(
                    SubscriberEvent("stopping", topic, message, {"run_id": run_id, "seq": seq})
                )

        # The message itself
        self.messages += 1
        if topic in self.topics:
            self._pending.append(SubscriberEvent("message", topic, message))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DecisionSubscriber is closed; create a new one")


def _decode(frames: list[bytes]) -> tuple[dict | None, str]:
    """The payload if it keeps the contract, else None and why not."""
    if len(frames) != 2:
        return None, f"expected 2 frames [topic, payload], got {len(frames)}"
    topic = frames[0].decode("utf-8", "replace")
    if topic not in TOPICS:
        return None, f"unknown topic {topic!r}"
    try:
        message = json.loads(frames[1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{topic} payload is not UTF-8 JSON: {exc}"
    if not isinstance(message, dict):
        return None, f"{topic} payload is not a JSON object"
    seq, run_id = message.get("seq"), message.get("run_id")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(run_id, str):
        return None, f"{topic} payload lacks an integer seq and a string run_id"
    return message, ""


# ------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m service subscribe``."""
    parser.add_argument(
        "--connect",
        required=True,
        metavar="ENDPOINT",
        help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5560",
    )
    parser.add_argument(
        "--topics",
        nargs="+",
        choices=TOPICS,
        default=list(TOPICS),
        metavar="TOPIC",
        help="topics to print: decision, heartbeat (default: both); gaps and heartbeat "
        "loss are reported either way",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=bounded_float(0.0, 3600.0, low_open=True),
        default=3.0,
        metavar="S",
        help="report heartbeat loss after S seconds without one (default: 3)",
    )
    parser.add_argument(
        "--count",
        type=bounded_int(1, 2**31),
        default=None,
        metavar="N",
        help="exit 0 after printing N messages (default: run until interrupted)",
    )
    parser.add_argument(
        "--timeout",
        type=bounded_float(0.0, 86400.0, low_open=True),
        default=None,
        metavar="S",
        help="exit 1 when S seconds pass with no message printed (default: wait forever)",
    )


def run(args: argparse.Namespace) -> int:
    """Print messages to stdout and events to stderr as JSON lines; see the module docstring."""
    out, err = sys.stdout, sys.stderr
    printed = 0
    with DecisionSubscriber(args.topics, heartbeat_timeout_s=args.heartbeat_timeout) as sub:
        sub.connect(args.connect)
        last_printed = time.monotonic()
        try:
            while args.count is None or printed < args.count:
                wait = 1.0
                if args.timeout is not None:
                    wait = last_printed + args.timeout - time.monotonic()
                    if wait <= 0:
                        _report(err, {"event": "timeout", "silent_s": args.timeout})
                        return 1
                event = sub.receive(wait)
                if event is None:
                    continue
                if event.kind == "message":
                    out.write(json.dumps({"topic": event.topic, **event.message}) + "\n")
                    out.flush()
                    printed += 1
                    last_printed = time.monotonic()
                else:
                    _report(err, event.as_report())
        except BrokenPipeError:
            # stdout closed by the reader (``| head``): a normal way to stop. Point
            # stdout at /dev/null so the interpreter's final flush does not complain.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return 0
    return 0


def _report(stream: Any, report: dict) -> None:
    stream.write(json.dumps(report) + "\n")
    stream.flush()
