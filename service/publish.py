"""Decisions and heartbeats out on a ZeroMQ PUB socket, never blocking the pipeline.

Wire format (DESIGN.md, "Decisions on ZeroMQ"): multipart ``[topic, payload]``,
topic ``decision`` or ``heartbeat``, payload one UTF-8 JSON object carrying
``seq`` and ``run_id``.

Where ``seq`` is assigned, and why
----------------------------------
``seq`` is taken from one counter, under one lock, at the moment a message is
*offered* to the publisher (``publish_decision``, or the heartbeat timer), and
the message enters the bounded queue under that same lock, so queue order is
seq order. A message that is then lost anywhere downstream has already used
its number:

* our queue is full -> the message is dropped and counted
  (``beltsort_publish_dropped_total``); its seq is never sent;
* ZeroMQ drops it at a slow subscriber's high-water mark (PUB never blocks,
  it drops per subscriber, silently) -> only that subscriber misses it.

Either way the subscriber sees the next seq jump: every loss is a visible gap.
Had seq been assigned in the sender thread, our own queue drops would have
been invisible on the wire.

Threads
-------
ZeroMQ sockets are not thread-safe, so one sender thread owns the socket: it
binds it, sends, and closes it. Callers only touch a ``queue.Queue``. The same
thread times the heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from service.errors import PublishError
from service.metrics import Metrics

log = logging.getLogger(__name__)

TOPIC_DECISION = "decision"
TOPIC_HEARTBEAT = "heartbeat"

# Fields the publisher owns in every payload; a caller's dict cannot override them.
_OWN_FIELDS = ("seq", "run_id")

# How long start() waits for the sender thread to report the bind result. A bind
# is a syscall; seconds mean the machine is stuck, not that the port is slow.
_BIND_WAIT_S = 10.0

# While closing, how often the sender checks whether the queue has run empty.
_CLOSING_POLL_S = 0.05

_STOP = object()  # queue sentinel: everything before it is sent, then the thread ends


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays through ``json.dumps`` (``.item()`` / ``.tolist()``)."""
    for method in ("item", "tolist"):
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                return convert()
            except (TypeError, ValueError):
                continue
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class DecisionPublisher:
    """ZeroMQ PUB on one endpoint; never blocks the caller; every message carries seq and run_id.

    Usage::

        with DecisionPublisher("tcp://127.0.0.1:5560", metrics) as pub:   # binds here
            pub.publish_decision({"source": "cam0", "track_id": 7, ...})  # False = dropped

    ``queue_size`` bounds the messages waiting for the sender thread; a full
    queue drops the *new* message (its seq becomes a gap) and returns False.
    ``sndhwm`` is ZeroMQ's per-subscriber queue; past it ZeroMQ drops for that
    subscriber alone. ``linger_ms`` bounds how long closing waits for ZeroMQ to
    flush to connected subscribers. ``heartbeat_fields()`` is called from the
    sender thread once per heartbeat and its dict (status and running counts of
    the pipeline) is merged into the heartbeat; it must be quick and thread-safe.
    """

    def __init__(
        self,
        endpoint: str,
        metrics: Metrics,
        *,
        queue_size: int = 10000,
        sndhwm: int = 10000,
        linger_ms: int = 1000,
        heartbeat_s: float = 1.0,
        heartbeat_fields: Callable[[], dict] | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size {queue_size} must be at least 1")
        if sndhwm < 0:
            raise ValueError(f"sndhwm {sndhwm} must be 0 (no limit) or more")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s {heartbeat_s} must be above 0")
        self.endpoint = endpoint  # replaced by the resolved one after bind
        self.run_id = uuid.uuid4().hex
        self._requested = endpoint
        self._metrics = metrics
        self._sndhwm = sndhwm
        self._linger_ms = max(0, int(linger_ms))
        self._heartbeat_s = heartbeat_s
        self._heartbeat_fields = heartbeat_fields
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)

        self._lock = threading.Lock()  # guards _seq, _state and queue order
        self._seq = 0
        self._state = "new"  # new -> starting -> running -> closed
        self._published = 0  # decisions handed to the socket (sender thread only)
        self._dropped = 0  # messages dropped by us, any reason (under _lock)
        self._t_start = time.monotonic()

        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._deadline: float | None = None  # monotonic; set by close()
        self._heartbeat_broken = False

        for topic in (TOPIC_DECISION, TOPIC_HEARTBEAT):
            metrics.messages_published.labels(topic=topic)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket and start the sender thread (which also sends heartbeats).

        Raises PublishError naming the endpoint when it cannot be bound.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(
                    f"publisher on {self.endpoint} is {self._state}; start() works once, "
                    "create a new DecisionPublisher"
                )
            self._state = "starting"
        self._thread = threading.Thread(
            target=self._run, name=f"publish {self._requested}", daemon=True
        )
        self._thread.start()
        if not self._bound.wait(_BIND_WAIT_S):
            with self._lock:
                self._state = "closed"
            self._deadline = time.monotonic()  # the thread ends if the bind ever returns
            raise PublishError(f"binding {self._requested} took over {_BIND_WAIT_S:g} s; giving up")
        if self._bind_error is not None:
            self._thread.join(timeout=_BIND_WAIT_S)
            with self._lock:
                self._state = "closed"
            raise self._bind_error
        log.info("publishing on %s (run_id %s)", self.endpoint, self.run_id)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop taking messages, send what is queued plus a last ``stopping`` heartbeat.

        Sending and ZeroMQ's linger both end by ``timeout_s``; whatever is still
        queued then is dropped and counted. Returns within ``timeout_s`` plus at
        most 1 s of grace for the thread to finish. Closing twice is harmless.
        """
        with self._lock:
            if self._state == "closed":
                return
            was_running = self._state == "running"
            self._state = "closed"  # from here publish_decision refuses
        deadline = time.monotonic() + timeout_s
        if self._thread is None:
            return
        if was_running:
            self._offer(TOPIC_HEARTBEAT, self._heartbeat("stopping"), closing=True)
        # A full queue has no room for the sentinel: the sender then drains until
        # the queue is empty or the deadline passes, see _send_loop.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        # Set last: once the sender sees a deadline it may end on an empty queue,
        # so the stopping heartbeat and the sentinel must already be in it.
        self._deadline = deadline
        self._thread.join(timeout=timeout_s + 1.0)
        if self._thread.is_alive():
            log.warning(
                "publisher thread on %s did not end within %.1f s", self.endpoint, timeout_s
            )
        else:
            log.info("publisher on %s closed (%d dropped in all)", self.endpoint, self._dropped)

    def __enter__(self) -> DecisionPublisher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------- callers

    def publish_decision(self, decision: dict) -> bool:
        """Queue one decision; adds ``seq`` and ``run_id`` (``t_publish_ns`` at send).

        Never blocks. Returns False when the queue is full: the decision is
        dropped, counted, and its seq shows as a gap to subscribers. The dict
        is copied, but shallowly: do not change nested values (``bbox``) after.
        """
        return self._offer(TOPIC_DECISION, decision, strict=True)

    @property
    def dropped(self) -> int:
        """Messages this publisher dropped itself (not ZeroMQ's HWM drops)."""
        return self._dropped

    # -------------------------------------------------------------------- internals

    def _offer(
        self, topic: str, body: dict, *, strict: bool = False, closing: bool = False
    ) -> bool:
        """Give the message its seq and queue it, atomically; drop (counted) when full.

        ``body`` is copied (the caller may reuse its dict); seq and run_id in it
        are replaced. Unless running (or ``closing``), the message is refused:
        with ``strict`` as a RuntimeError (a caller's mistake), else quietly.
        """
        with self._lock:
            if self._state != "running" and not closing:
                if strict:
                    raise RuntimeError(
                        f"publisher on {self.endpoint} is {self._state}, not running: "
                        "call start() first, and stop publishing before close()"
                    )
                return False
            self._seq += 1
            # seq and run_id first: a person reading the JSON sees them first.
            message = {"seq": self._seq, "run_id": self.run_id}
            message.update((k, v) for k, v in body.items() if k not in _OWN_FIELDS)
            try:
                self._queue.put_nowait((topic, message, time.perf_counter()))
                return True
            except queue.Full:
                self._dropped += 1
        self._metrics.publish_dropped.inc()
        return False

    def _heartbeat(self, status: str = "ok") -> dict:
        body: dict[str, Any] = {
            "t_ns": time.time_ns(),
            "status": status,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "interval_s": self._heartbeat_s,
            "decisions_published": self._published,
            "publish_dropped": self._dropped,
        }
        # The last (stopping) heartbeat is built by close() in the caller's thread
        # and must not hang on a stuck callback: it carries our own counts only.
        if self._heartbeat_fields is not None and status != "stopping":
            try:
                extra = self._heartbeat_fields()
            except Exception:
                # A broken callback must not stop heartbeats: subscribers would
                # read that as a dead daemon. Say so once, mark the heartbeats.
                if not self._heartbeat_broken:
                    log.exception("heartbeat_fields() failed; heartbeats carry status 'error'")
                    self._heartbeat_broken = True
                body["status"] = "error"
            else:
                body.update((k, v) for k, v in extra.items() if k not in (*_OWN_FIELDS, "t_ns"))
        return body

    def _run(self) -> None:
        """The sender thread: bind, then send queued messages and heartbeats until closed."""
        context = zmq.Context()
        socket = context.socket(zmq.PUB)
        try:
            socket.setsockopt(zmq.SNDHWM, self._sndhwm)
            socket.setsockopt(zmq.LINGER, self._linger_ms)
            socket.bind(self._requested)
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._bind_error = PublishError(_bind_message(self._requested, exc))
            self._bind_error.__cause__ = exc
            socket.close(linger=0)
            context.term()
            self._bound.set()
            return
        with self._lock:
            if self._state == "starting":
                self._state = "running"
        self._bound.set()
        try:
            self._send_loop(socket)
        finally:
            self._shutdown(socket, context)

    def _send_loop(self, socket: zmq.Socket) -> None:
        depth = self._metrics.queue_depth.labels(queue="publish")
        next_heartbeat = time.monotonic()  # one at once: subscribers learn the run_id early
        while True:
            now = time.monotonic()
            if now >= next_heartbeat and self._state == "running":
                self._offer(TOPIC_HEARTBEAT, self._heartbeat())
                next_heartbeat = now + self._heartbeat_s
                now = time.monotonic()  # heartbeat_fields() may have taken a while
            if self._deadline is not None and now >= self._deadline:
                break
            wait = max(0.0, next_heartbeat - now)
            if self._deadline is not None:
                # Closing: the _STOP sentinel may not have fitted in a full queue,
                # so look at the queue often and end once it is empty.
                wait = min(wait, _CLOSING_POLL_S, max(0.0, self._deadline - now))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                if self._deadline is not None and self._queue.empty():
                    break
                continue
            if item is _STOP:
                break
            self._send(socket, *item)
            depth.set(self._queue.qsize())
        depth.set(0)

    def _send(self, socket: zmq.Socket, topic: str, body: dict, t_offered: float) -> None:
        t_publish_ns = time.time_ns()
        if topic == TOPIC_DECISION:
            body["t_publish_ns"] = t_publish_ns
        try:
            payload = json.dumps(body, default=_json_default, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            # A programming error upstream (a field JSON cannot hold); drop the
            # message rather than kill the sender, and say which field kind.
            log.error("cannot encode %s seq %s: %s; dropped", topic, body.get("seq"), exc)
            self._count_drop()
            return
        try:
            # PUB never blocks on a slow subscriber (it drops at SNDHWM); NOBLOCK
            # makes sure a future socket option cannot change that.
            socket.send_multipart([topic.encode(), payload.encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("send of %s seq %s failed: %s; dropped", topic, body.get("seq"), exc)
            self._count_drop()
            return

        self._metrics.messages_published.labels(topic=topic).inc()
        self._metrics.stage.labels(stage="publish").observe(time.perf_counter() - t_offered)
        if topic == TOPIC_DECISION:
            self._published += 1
            t_capture_ns = body.get("t_capture_ns")
            if isinstance(t_capture_ns, int) and t_capture_ns > 0:
                # NOTE: wall clock on both ends (as the contract's fields are); a
                # clock step between capture and publish skews this one sample.
                self._metrics.capture_to_publish.observe(
                    max(0.0, (t_publish_ns - t_capture_ns) / 1e9)
                )

    def _count_drop(self, n: int = 1) -> None:
        with self._lock:
            self._dropped += n
        self._metrics.publish_dropped.inc(n)

    def _shutdown(self, socket: zmq.Socket, context: zmq.Context) -> None:
        # Whatever is still queued missed the deadline: drop and count it.
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left += 1
        if left:
            log.warning("publisher closing: %d queued message(s) not sent in time", left)
            self._count_drop(left)
        remaining_ms = self._linger_ms
        if self._deadline is not None:
            remaining_ms = min(remaining_ms, max(0, int((self._deadline - time.monotonic()) * 1e3)))
        socket.close(linger=remaining_ms)
        context.term()


def _bind_message(endpoint: str, exc: zmq.ZMQError) -> str:
    """One line that names the endpoint, what went wrong and what to do."""
    if exc.errno == zmq.EADDRINUSE:
        return (
            f"cannot bind ZeroMQ publisher to {endpoint}: address in use: another beltsort? "
            "choose another --publish"
        )
    if exc.errno == zmq.EADDRNOTAVAIL:
        return (
            f"cannot bind ZeroMQ publisher to {endpoint}: no such local address; "
            "use an address of this machine, e.g. tcp://127.0.0.1:5560 or tcp://0.0.0.0:5560"
        )
    return (
        f"cannot bind ZeroMQ publisher to {endpoint}: {exc.strerror}; "
        "expected an endpoint such as tcp://127.0.0.1:5560, tcp://*:5560 or ipc:///run/beltsort.sock"
    )
