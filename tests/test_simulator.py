"""The belt simulator: reproducible, honest truth, a belt that moves, the knobs it promises."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from service.errors import UsageError
from service.palette import default_palette
from service.simulator import BeltSimulator, SceneOptions, jpeg_round_trip
from service.simulator import screw as screw_mod
from service.simulator.options import MAX_SCREW_LENGTH, MIN_SCREW_LENGTH

# A scene with no random look: flat light, no noise, no drift, no blur
CALM = SceneOptions(
    light_gradient=0.0,
    vignetting=0.0,
    exposure_drift=0.0,
    white_balance_drift=0.0,
    flicker=0.0,
    read_noise=0.0,
    shot_noise=0.0,
    shutter_fraction=0.0,
)


def _frames(sim: BeltSimulator, n: int):
    return [sim.next_frame() for _ in range(n)]


def test_same_seed_gives_the_same_frames_and_another_seed_does_not():
    a = _frames(BeltSimulator(320, 240, fps=30, rate=4, seed=7), 3)
    b = _frames(BeltSimulator(320, 240, fps=30, rate=4, seed=7), 3)
    c = _frames(BeltSimulator(320, 240, fps=30, rate=4, seed=8), 3)
    for fa, fb in zip(a, b, strict=True):
        assert fa.index == fb.index
        assert np.array_equal(fa.image, fb.image)
        assert fa.objects == fb.objects
    assert not np.array_equal(a[0].image, c[0].image)


def test_a_line_is_one_scene_with_new_screws_on_it():
    line = dict(options=SceneOptions.randomised(4321), camera_seed=4321)
    scene = BeltSimulator(640, 360, seed=4321).next_frame().image
    # the line's own seed is its footage, frame for frame
    same = BeltSimulator(640, 360, seed=4321, **line).next_frame().image
    assert np.array_equal(scene, same)
    # another seed on the line: other screws and noise, the same belt and camera
    other = BeltSimulator(640, 360, seed=9, **line)
    assert not np.array_equal(scene, other.next_frame().image)
    assert np.array_equal(other._colour_matrix, BeltSimulator(640, 360, seed=4321)._colour_matrix)
    assert not np.array_equal(other._colour_matrix, BeltSimulator(640, 360, seed=9)._colour_matrix)


def test_frames_have_the_promised_shape_and_indices():
    sim = BeltSimulator(320, 240, fps=20, rate=2, seed=1)
    frames = _frames(sim, 3)
    assert [f.index for f in frames] == [0, 1, 2]
    for f in frames:
        assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8
    assert frames[1].time_s == pytest.approx(frames[0].time_s + 1 / 20)


def _box(obj, grow: float):
    return ((obj.cx, obj.cy), (obj.length + grow, obj.width + grow), obj.angle_deg)


@pytest.mark.parametrize("seed", [3, 11])
def test_truth_is_sane(seed):
    width, height = 640, 360
    sim = BeltSimulator(width, height, fps=30, rate=8, seed=seed)
    seen = 0
    for frame in _frames(sim, 25):
        image = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
        belt_level = float(np.median(image))
        for obj in frame.objects:
            seen += 1
            assert MIN_SCREW_LENGTH <= obj.length <= MAX_SCREW_LENGTH
            assert 0 < obj.width < obj.length
            assert 0 <= obj.angle_deg < 180
            x, y, w, h = obj.bbox
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= width and y + h <= height
            on_edge = x == 0 or y == 0 or x + w == width or y + h == height
            if obj.fully_visible:
                # the box holds the screw's centre and is no bigger than the screw
                assert x <= obj.cx <= x + w and y <= obj.cy <= y + h
                assert max(w, h) <= obj.length + 2
                # and the screw is drawn there: zinc is brighter than the belt
                assert image[y : y + h, x : x + w].max() > belt_level + 20
            else:
                assert on_edge
        # no two screws touch: their oriented boxes, grown by 1 px each, stay apart
        for a, b in itertools.combinations(frame.objects, 2):
            kind, _ = cv2.rotatedRectangleIntersection(_box(a, 2.0), _box(b, 2.0))
            assert kind == cv2.INTERSECT_NONE, (a, b)
    assert seen > 20


def test_screws_ride_the_belt_and_stay_in_view_for_several_frames():
    sim = BeltSimulator(480, 270, fps=30, rate=4, seed=5)
    tracks: dict[int, list] = {}
    for frame in _frames(sim, 40):
        for obj in frame.objects:
            tracks.setdefault(obj.id, []).append((frame.index, obj))
    steps = [
        b.cx - a.cx for track in tracks.values() for (_, a), (_, b) in itertools.pairwise(track)
    ]
    assert steps and np.allclose(steps, sim.speed_px_per_frame)
    # a screw that entered and left during the clip was fully visible for >= 3 frames
    for track in tracks.values():
        if track[0][0] > 0 and track[-1][0] < 39:
            assert sum(o.fully_visible for _, o in track) >= 3


def test_belt_runs_right_to_left_with_direction_minus_one():
    sim = BeltSimulator(480, 270, fps=30, rate=4, seed=5, options=CALM.replace(direction=-1))
    first, second = _frames(sim, 2)
    common = {o.id: o for o in first.objects}
    moved = [o.cx - common[o.id].cx for o in second.objects if o.id in common]
    assert moved and all(m < 0 for m in moved)


@pytest.mark.parametrize("direction", [1, -1])
def test_belt_texture_moves_with_the_belt(direction):
    sim = BeltSimulator(480, 270, fps=30, rate=0, seed=2, options=CALM.replace(direction=direction))
    a, b = (f.image.astype(np.float32) for f in _frames(sim, 2))
    step = sim.speed_px_per_frame
    assert step >= 3

    def mismatch(shift: int) -> float:  # b shifted back by `shift` px against a
        if shift == 0:
            return float(np.abs(b - a).mean())
        if shift > 0:
            return float(np.abs(b[:, shift:] - a[:, :-shift]).mean())
        return float(np.abs(b[:, :shift] - a[:, -shift:]).mean())

    shifts = range(-int(2 * step) - 2, int(2 * step) + 3)
    best = min(shifts, key=mismatch)
    assert abs(best - direction * step) <= 1
    assert mismatch(best) < 0.3 * mismatch(0)


@pytest.mark.parametrize("rate", [0.5, 3.0])
def test_arrivals_follow_the_rate(rate):
    sim = BeltSimulator(640, 360, fps=30, rate=rate, seed=4, options=CALM)
    sim.advance(0)  # warm-up: the belt fills as in steady state
    before = sim.screws_placed
    sim.advance(30 * 100)  # 100 s
    expected = 100 * rate  # Poisson: std is its square root
    assert abs(sim.screws_placed - before - expected) < 4 * expected**0.5 + 2
    assert sim.dropped_arrivals == 0


def test_label_weights_steer_the_arrivals():
    sim = BeltSimulator(320, 240, fps=15, rate=4, seed=4, options=CALM)
    names = [c.name for c in default_palette()]
    sim.label_weights = [1.0 if n == "navy" else 0.0 for n in names]
    labels = {o.label for f in _frames(sim, 20) for o in f.objects}
    assert labels == {"navy"}
    with pytest.raises(UsageError, match="label_weights"):
        sim.label_weights = [1.0, 2.0]


def test_randomised_options_vary_widely_and_stay_in_the_envelope():
    scenes = [SceneOptions.randomised(seed) for seed in range(40)]
    tones = [np.mean(o.belt_bgr) for o in scenes]
    assert max(tones) - min(tones) > 50
    assert len({o.head_types for o in scenes}) > 5
    for o in scenes:
        lo, hi = o.length_range
        assert MIN_SCREW_LENGTH <= lo <= hi <= MAX_SCREW_LENGTH
        assert np.mean(o.zinc_bgr) > np.mean(o.belt_bgr) + 40  # belt darker than the zinc
        assert o.direction == 1
    assert SceneOptions.randomised(3) == SceneOptions.randomised(3)
    assert SceneOptions.randomised(3, direction=-1).direction == -1


def test_bad_knobs_and_arguments_say_what_is_allowed():
    with pytest.raises(UsageError, match=r"direction 0"):
        SceneOptions(direction=0)
    with pytest.raises(UsageError, match=r"length_range"):
        SceneOptions(length_range=(20.0, 100.0))
    with pytest.raises(UsageError, match=r"rate -1"):
        BeltSimulator(320, 240, rate=-1)
    with pytest.raises(UsageError, match=r"too small"):
        BeltSimulator(64, 64)


def test_jpeg_round_trip_adds_artefacts_but_keeps_the_picture():
    frame = BeltSimulator(320, 240, rate=4, seed=9).next_frame()
    low = jpeg_round_trip(frame.image, 30)
    high = jpeg_round_trip(frame.image, 95)
    assert low.shape == frame.image.shape and low.dtype == np.uint8
    err_low = np.abs(low.astype(int) - frame.image).mean()
    err_high = np.abs(high.astype(int) - frame.image).mean()
    assert 0 < err_high < err_low < 10
    with pytest.raises(ValueError, match="uint8"):
        jpeg_round_trip(frame.image.astype(np.float32), 80)


def test_a_band_lit_from_above_shows_its_palette_colour():
    red = next(c for c in default_palette() if c.name == "red")
    options = CALM.replace(paint_gloss=0.0, metal_specular=0.0, shadow_strength=0.0)
    shape = screw_mod.ScrewShape(
        length=120.0, shaft_r=8.0, head_r=14.0, head_len=10.0, head_type="hex",
        pointed=False, tip_len=2.4, thread_start=119.0, pitch=6.0, thread_depth=0.15,
        band=(40.0, 70.0), paint_bgr=tuple(float(x) for x in red.bgr),
        zinc_bgr=(200.0, 200.0, 200.0),
    )  # fmt: skip
    overhead = np.array([0.0, 0.0, 1.0])
    sprite = screw_mod.render(shape, 100.0, 50.0, 0.0, overhead, options)
    # axis along +x at y = 50; the band's middle (s = 55) faces the light
    x, y = round(100.0 - 60.0 + 55.0) - sprite.x0, 50 - sprite.y0
    assert sprite.alpha[y, x] == pytest.approx(1.0)
    assert np.allclose(sprite.colour[y, x], red.bgr, atol=3)
    # zinc beside it is brighter than the red paint and grey
    zinc = sprite.colour[y, x + 25]
    assert zinc.mean() > sprite.colour[y, x].mean() and np.ptp(zinc) < 5
