"""Per-track fusion and decisions: thresholds, bins, view waits, belt timing, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.decide import Decider, DecisionConfig
from service.errors import ConfigError
from service.metrics import Metrics

LABELS = ["red", "green", "blue", "yellow"]
MS = 1_000_000  # ns
WALL0 = 1_700_000_000_000_000_000  # wall clock of the crossing frame, ns
MONO0 = 5_000 * MS  # monotonic clock of the crossing frame, ns

# The decision message fields (DESIGN.md) less those the publisher adds.
FIELDS = {
    "source", "track_id", "label", "confidence", "bin", "reason", "views", "frame", "pts_ms",
    "bbox", "t_capture_ns", "eject_at_ns", "model",
}  # fmt: skip


def probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def make(config: DecisionConfig | None = None, **kwargs) -> Decider:
    return Decider(LABELS, config or DecisionConfig(), "abc123def456", **kwargs)


def cross(decider: Decider, track_id: int = 1, *, source: str = "cam0", now: int = MONO0, **kw):
    facts = {
        "frame": 42,
        "pts_ms": 1400.0,
        "bbox": (300, 100, 60, 20),
        "t_capture_ns": WALL0,
        "t_capture_mono_ns": MONO0,
        "now_mono_ns": now,
        **kw,
    }
    decider.crossed(source, track_id, **facts)


def view(decider: Decider, p: np.ndarray, track_id: int = 1, source: str = "cam0") -> None:
    decider.view_submitted(source, track_id)
    decider.view_result(source, track_id, p)


def only(decisions: list[dict]) -> dict:
    assert len(decisions) == 1, decisions
    return decisions[0]


# ---------------------------------------------------------------- fusion and thresholds


def test_confident_views_give_label_bin_and_every_field():
    d = make()
    view(d, probs(0.9, 0.05, 0.03, 0.02))
    view(d, probs(0.8, 0.1, 0.05, 0.05))
    cross(d)
    dec = only(d.ready(MONO0))
    assert set(dec) == FIELDS
    assert (dec["label"], dec["bin"], dec["reason"], dec["views"]) == ("red", 0, "ok", 2)
    assert (dec["source"], dec["track_id"], dec["frame"], dec["pts_ms"]) == ("cam0", 1, 42, 1400.0)
    assert dec["bbox"] == [300, 100, 60, 20]
    assert dec["t_capture_ns"] == WALL0
    assert dec["eject_at_ns"] is None  # no belt geometry configured
    assert dec["model"] == "abc123def456"
    # the mean of the two views' probabilities
    assert dec["confidence"] == pytest.approx((0.9 + 0.8) / 2, abs=1e-6)


def test_one_confidently_wrong_view_does_not_outvote_the_others():
    # Why the arithmetic mean: two good views say red, one bad crop (clipped at the
    # frame edge, say) says green with red ~0. Mean of probabilities: red 0.62,
    # green 0.343. A mean of log-probabilities (red floored at 1e-4) would let the
    # bad view win: red (2 log 0.93 + log 1e-4) / 3 = -3.12 < green
    # (2 log 0.03 + log 0.97) / 3 = -2.35.
    d = make()
    view(d, probs(0.93, 0.03, 0.02, 0.02))
    view(d, probs(0.93, 0.03, 0.02, 0.02))
    view(d, probs(0.0, 0.97, 0.02, 0.01))
    cross(d)
    dec = only(d.ready(MONO0))
    assert (dec["label"], dec["bin"], dec["reason"], dec["views"]) == ("red", 0, "ok", 3)
    assert dec["confidence"] == pytest.approx(0.62, abs=1e-6)


def test_confidence_does_not_grow_with_the_number_of_views():
    # Correlated views are not multiplied: ten views of 0.7 are as sure as one.
    d = make(DecisionConfig(min_confidence=0.75))
    for _ in range(10):
        view(d, probs(0.7, 0.1, 0.1, 0.1))
    cross(d)
    dec = only(d.ready(MONO0))
    assert dec["confidence"] == pytest.approx(0.7, abs=1e-6)
    assert dec["reason"] == "low_confidence"


def test_low_confidence_goes_to_reject_bin_with_best_guess():
    d = make(DecisionConfig(min_confidence=0.6, min_margin=0.0))
    view(d, probs(0.5, 0.3, 0.1, 0.1))
    cross(d)
    dec = only(d.ready(MONO0))
    assert (dec["label"], dec["bin"], dec["reason"]) == ("red", 4, "low_confidence")
    assert dec["confidence"] == pytest.approx(0.5, abs=1e-5)


def test_small_top2_margin_goes_to_reject_bin():
    d = make(DecisionConfig(min_confidence=0.4, min_margin=0.2))
    view(d, probs(0.5, 0.4, 0.05, 0.05))  # confident enough, margin 0.1 too small
    cross(d)
    dec = only(d.ready(MONO0))
    assert (dec["label"], dec["bin"], dec["reason"]) == ("red", 4, "low_confidence")


def test_class_to_bin_and_custom_reject_bin():
    d = make(DecisionConfig(class_to_bin={"blue": 7, "red": 2}, reject_bin=9, min_margin=0.0))
    assert d.bins == [2, 1, 7, 3]  # unlisted classes keep their index
    view(d, probs(0.05, 0.05, 0.85, 0.05), track_id=1)
    view(d, probs(0.3, 0.3, 0.2, 0.2), track_id=2)
    cross(d, 1)
    cross(d, 2)
    got = {x["track_id"]: (x["bin"], x["reason"]) for x in d.ready(MONO0)}
    assert got == {1: (7, "ok"), 2: (9, "low_confidence")}


def test_reject_bin_minus_one_means_number_of_classes():
    assert make(DecisionConfig(reject_bin=-1)).reject_bin == len(LABELS)
    assert make().reject_bin == len(LABELS)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (DecisionConfig(class_to_bin={"purple": 3}), "'purple'.*its classes are red, green"),
        (DecisionConfig(class_to_bin={"red": 4}), "class 'red' goes to bin 4, which is the reject"),
        (DecisionConfig(class_to_bin={"red": -2}), r"class_to_bin\['red'\] is -2"),
        (DecisionConfig(min_confidence=1.5), "min_confidence is 1.5; allowed: 0..1"),
        (DecisionConfig(view_wait_ms=-1), "view_wait_ms is -1"),
        (DecisionConfig(belt_speed_mm_s=500.0), "belt geometry is half set"),
        (
            DecisionConfig(belt_speed_mm_s=500.0, ejector_distance_mm=[100, 200]),
            r"no distance for bins \[2, 3, 4\]",
        ),
        (DecisionConfig(direction=2), "direction is 2"),
    ],
)
def test_bad_config_is_refused_with_the_value(config, words):
    with pytest.raises(ConfigError, match=words):
        make(config)


def test_wrong_probability_length_is_refused():
    d = make()
    d.view_submitted("cam0", 1)
    with pytest.raises(ValueError, match=r"shape \(3,\).*4 classes"):
        d.view_result("cam0", 1, probs(0.5, 0.3, 0.2))


# ---------------------------------------------------------------- waiting for views


def test_crossed_track_waits_for_views_still_in_inference():
    d = make(DecisionConfig(view_wait_ms=100))
    view(d, probs(0.9, 0.05, 0.03, 0.02))
    d.view_submitted("cam0", 1)  # a crop of an earlier frame, still in inference
    cross(d)
    assert d.ready(MONO0 + 10 * MS) == []
    d.view_result("cam0", 1, probs(0.8, 0.1, 0.05, 0.05))
    dec = only(d.ready(MONO0 + 11 * MS))
    assert (dec["reason"], dec["views"]) == ("ok", 2)


def test_no_views_after_view_wait_ms():
    d = make(DecisionConfig(view_wait_ms=100))
    d.view_submitted("cam0", 1)  # never comes back
    cross(d)
    assert d.ready(MONO0 + 99 * MS) == []
    dec = only(d.ready(MONO0 + 100 * MS))
    assert (dec["label"], dec["bin"], dec["reason"], dec["views"]) == (None, 4, "no_views", 0)
    assert dec["confidence"] == 0.0


def test_waited_out_track_is_decided_with_the_views_it_has():
    d = make(DecisionConfig(view_wait_ms=50))
    view(d, probs(0.1, 0.1, 0.75, 0.05))
    d.view_submitted("cam0", 1)
    cross(d)
    dec = only(d.ready(MONO0 + 50 * MS))
    assert (dec["label"], dec["reason"], dec["views"]) == ("blue", "ok", 1)


def test_dropped_view_is_not_waited_for():
    d = make(DecisionConfig(view_wait_ms=10_000))
    d.view_submitted("cam0", 1)
    d.view_dropped("cam0", 1)  # the batcher refused it
    cross(d)
    assert only(d.ready(MONO0))["reason"] == "no_views"


def test_failed_inference_counts_against_the_wait():
    d = make(DecisionConfig(view_wait_ms=10_000))
    d.view_submitted("cam0", 1)
    cross(d)
    d.view_submitted("cam0", 1)  # after the crossing: fused if in time, never awaited
    assert d.ready(MONO0) == []
    d.view_dropped("cam0", 1, in_flight=True)  # the pre-crossing crop's batch failed
    assert only(d.ready(MONO0))["reason"] == "no_views"


def test_views_after_crossing_are_not_waited_for_but_late_results_are_ignored():
    d = make(DecisionConfig(view_wait_ms=10_000))
    view(d, probs(0.9, 0.05, 0.03, 0.02))
    cross(d)
    d.view_submitted("cam0", 1)
    dec = only(d.ready(MONO0))
    assert dec["views"] == 1
    d.view_result("cam0", 1, probs(0.1, 0.8, 0.05, 0.05))  # arrives after the decision
    cross(d)  # and a repeated crossing report
    assert d.ready(MONO0, flush=True) == []
    assert d.ignored_views == 1
    assert d.pending_tracks() == 0


def test_flush_decides_every_crossed_track_now():
    d = make(DecisionConfig(view_wait_ms=10_000))
    view(d, probs(0.9, 0.05, 0.03, 0.02), track_id=1)
    d.view_submitted("cam0", 1)
    cross(d, 1)
    d.view_submitted("cam0", 2)
    cross(d, 2)
    view(d, probs(0.9, 0.05, 0.03, 0.02), track_id=3)  # not crossed: no decision
    assert d.ready(MONO0) == []
    got = {x["track_id"]: x["reason"] for x in d.ready(MONO0, flush=True)}
    assert got == {1: "ok", 2: "no_views"}
    assert d.pending_tracks() == 1


def test_ended_track_is_forgotten_unless_it_crossed():
    d = make(DecisionConfig(view_wait_ms=100))
    view(d, probs(0.9, 0.05, 0.03, 0.02), track_id=1)
    d.track_ended("cam0", 1)
    assert d.pending_tracks() == 0
    d.view_submitted("cam0", 2)
    cross(d, 2)
    d.track_ended("cam0", 2)  # crossed: still owed a decision
    assert only(d.ready(MONO0 + 100 * MS))["reason"] == "no_views"


def test_same_track_id_on_two_sources_are_two_objects():
    d = make()
    view(d, probs(0.9, 0.05, 0.03, 0.02), source="cam0")
    view(d, probs(0.05, 0.9, 0.03, 0.02), source="cam1")
    cross(d, source="cam0")
    cross(d, source="cam1")
    got = {x["source"]: x["label"] for x in d.ready(MONO0)}
    assert got == {"cam0": "red", "cam1": "green"}


def test_decisions_come_in_crossing_order():
    d = make()
    for tid, t in ((1, 30), (2, 10), (3, 20)):
        cross(d, tid, t_capture_mono_ns=MONO0 + t * MS)
    assert [x["track_id"] for x in d.ready(MONO0 + 40 * MS)] == [2, 3, 1]


def test_wait_wakes_when_awaited_views_are_back():
    d = make(DecisionConfig(view_wait_ms=10_000))
    d.view_submitted("cam0", 1)
    cross(d)
    timer = threading.Timer(0.05, d.view_result, ("cam0", 1, probs(0.9, 0.05, 0.03, 0.02)))
    timer.start()
    try:
        assert d.wait(timeout_s=5.0)
    finally:
        timer.join(timeout=5.0)
    assert only(d.ready())["reason"] == "ok"
    assert d.wait(timeout_s=0.01) is False


# ---------------------------------------------------------------- belt geometry


def geometry(**kw) -> DecisionConfig:
    # 500 mm/s; bin b's ejector is 100 + 50*b mm past the line; reject bin (4) at the belt end
    base = {
        "belt_speed_mm_s": 500.0,
        "px_per_mm": 2.0,
        "ejector_distance_mm": [100.0, 150.0, 200.0, 250.0, 400.0],
        "actuator_lead_ms": 50.0,
        "min_margin": 0.0,
    }
    return DecisionConfig(**{**base, **kw})


def test_eject_time_from_belt_geometry():
    d = make(geometry())
    view(d, probs(0.05, 0.05, 0.85, 0.05))  # blue, bin 2, 200 mm -> 400 ms
    cross(d)
    dec = only(d.ready(MONO0 + 20 * MS))
    assert (dec["bin"], dec["reason"]) == (2, "ok")
    assert dec["eject_at_ns"] == WALL0 + 400 * MS


def test_eject_time_corrects_for_overshoot_past_the_line():
    d = make(geometry())
    view(d, probs(0.85, 0.05, 0.05, 0.05))  # red, bin 0, 100 mm -> 200 ms
    # bbox centre x = 300 + 60/2 = 330, line at 310: 20 px = 10 mm past -> 90 mm -> 180 ms
    cross(d, line_x=310.0)
    assert only(d.ready(MONO0))["eject_at_ns"] == WALL0 + 180 * MS

    d = make(geometry(direction=-1))  # belt runs to smaller x: 20 px short of the line
    view(d, probs(0.85, 0.05, 0.05, 0.05))
    cross(d, line_x=310.0)
    assert only(d.ready(MONO0))["eject_at_ns"] == WALL0 + 220 * MS


def test_decision_that_would_miss_its_ejector_goes_to_reject_as_late():
    # red: ejector at 100 mm = 200 ms after capture; the actuator needs 50 ms lead,
    # so a decision made after capture + 150 ms is late.
    d = make(geometry())
    for tid in (1, 2):
        view(d, probs(0.85, 0.05, 0.05, 0.05), track_id=tid)
        cross(d, tid)
    on_time = d.ready(MONO0 + 150 * MS)
    assert [(x["bin"], x["reason"]) for x in on_time] == [(0, "ok"), (0, "ok")]

    d = make(geometry())
    view(d, probs(0.85, 0.05, 0.05, 0.05))
    cross(d)
    dec = only(d.ready(MONO0 + 151 * MS))
    assert (dec["label"], dec["bin"], dec["reason"]) == ("red", 4, "late")
    assert dec["eject_at_ns"] == WALL0 + 800 * MS  # the reject bin's 400 mm


def test_without_geometry_nothing_is_ever_late():
    d = make()
    view(d, probs(0.85, 0.05, 0.05, 0.05))
    cross(d)
    dec = only(d.ready(MONO0 + 3_600_000 * MS))
    assert (dec["reason"], dec["eject_at_ns"]) == ("ok", None)


def test_ejector_distances_as_a_dict_per_bin():
    d = make(geometry(ejector_distance_mm={0: 100.0, 1: 150.0, 2: 200.0, 3: 250.0, 4: 400.0}))
    assert d.geometry and d.ejector_mm[4] == 400.0


# ---------------------------------------------------------------- metrics and threads


def test_decisions_are_counted_by_bin_and_reason():
    metrics = Metrics(CollectorRegistry())
    d = make(DecisionConfig(view_wait_ms=0), metrics=metrics)
    view(d, probs(0.85, 0.05, 0.05, 0.05), track_id=1)
    cross(d, 1)
    cross(d, 2)
    d.ready(MONO0)
    get = metrics.registry.get_sample_value
    assert get("beltsort_decisions_total", {"bin": "0", "reason": "ok"}) == 1
    assert get("beltsort_decisions_total", {"bin": "4", "reason": "no_views"}) == 1
    assert get("beltsort_stage_seconds_count", {"stage": "decide"}) == 2
    # series a decision could have landed in exist at 0
    assert get("beltsort_decisions_total", {"bin": "3", "reason": "ok"}) == 0
    assert get("beltsort_decisions_total", {"bin": "4", "reason": "late"}) == 0


def test_concurrent_producers_inference_and_reader_decide_every_track_once():
    d = make(DecisionConfig(view_wait_ms=10_000, min_margin=0.0))
    tracks, views_per_track = 300, 4
    inflight: list[tuple[str, int]] = []
    lock = threading.Lock()
    decided: list[dict] = []
    done = threading.Event()

    def pipeline(source: str) -> None:
        for tid in range(tracks):
            for _ in range(views_per_track):
                d.view_submitted(source, tid)
                with lock:
                    inflight.append((source, tid))
            d.crossed(
                source, tid, frame=tid, pts_ms=0.0, bbox=(0, 0, 1, 1),
                t_capture_ns=WALL0, t_capture_mono_ns=MONO0 + tid,
            )  # fmt: skip

    def inference() -> None:
        while not done.is_set() or inflight:
            with lock:
                batch, inflight[:] = inflight[:8], inflight[8:]
            if not batch:
                done.wait(0.001)
            for source, tid in batch:
                d.view_result(source, tid, probs(0.85, 0.05, 0.05, 0.05))

    def reader() -> None:
        while not done.is_set():
            d.wait(0.01)
            decided.extend(d.ready())

    threads = [threading.Thread(target=pipeline, args=(s,)) for s in ("cam0", "cam1")]
    workers = [threading.Thread(target=inference), threading.Thread(target=reader)]
    for t in threads + workers:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # let the last results arrive, then stop the helpers
    for _ in range(500):
        with lock:
            if not inflight:
                break
        threading.Event().wait(0.01)
    done.set()
    for t in workers:
        t.join(timeout=10)
    decided.extend(d.ready(flush=True))

    assert not any(t.is_alive() for t in threads + workers)
    keys = [(x["source"], x["track_id"]) for x in decided]
    assert len(keys) == len(set(keys)) == 2 * tracks
    # every track waited for all its views: nothing was decided on a partial set
    assert {x["views"] for x in decided} == {views_per_track}
    assert {x["reason"] for x in decided} == {"ok"}


def test_waiting_track_is_decided_before_it_would_miss_its_ejector():
    # red: ejector 200 ms after capture, lead 50 ms, margin 10 ms -> decide by 140 ms,
    # long before the 10 s view wait, with the views it has.
    d = make(geometry(view_wait_ms=10_000, decide_margin_ms=10.0))
    view(d, probs(0.85, 0.05, 0.05, 0.05))
    d.view_submitted("cam0", 1)  # still in inference
    cross(d)
    assert d.next_deadline_ns() == MONO0 + 140 * MS
    assert d.ready(MONO0 + 139 * MS) == []
    dec = only(d.ready(MONO0 + 140 * MS))
    assert (dec["label"], dec["bin"], dec["reason"], dec["views"]) == ("red", 0, "ok", 1)

    # with no view back yet there is no bin to aim for: the view wait applies
    d = make(geometry(view_wait_ms=300))
    d.view_submitted("cam0", 1)
    cross(d)
    assert d.next_deadline_ns() == MONO0 + 300 * MS
