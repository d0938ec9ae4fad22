"""``python -m training synth``: a real H.264 file with matching truth, and clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from service.simulator import BeltSimulator

SUBPROCESS_TIMEOUT_S = 120


def _synth(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", "synth", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        cwd=cwd,
        env=env,
    )


def _locator_ready() -> bool:
    from service.locate import Locator

    try:
        Locator()
    except NotImplementedError:
        return False
    return True


@pytest.mark.slow
def test_video_is_a_real_h264_file_with_matching_truth(tmp_path):
    out = tmp_path / "clips" / "belt.mp4"  # the folder does not exist yet
    result = _synth(
        "video", "--out", str(out), "--seconds", "2", "--fps", "15",
        "--size", "320x240", "--rate", "3", "--seed", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "30 frames" in result.stdout and len(result.stdout.strip().splitlines()) == 1

    # OpenCV decodes every frame, at the right size, close to what the simulator rendered
    capture = cv2.VideoCapture(str(out))
    assert capture.isOpened()
    decoded = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        decoded.append(image)
    capture.release()
    assert len(decoded) == 30
    assert decoded[0].shape == (240, 320, 3)
    rendered = BeltSimulator(320, 240, fps=15, rate=3, seed=4).next_frame().image
    mse = np.mean((decoded[0].astype(float) - rendered) ** 2)
    assert 10 * np.log10(255**2 / mse) > 28  # PSNR in dB: the same picture, encoded

    # The truth: one screw a line, trajectories inside the clip
    lines = (tmp_path / "clips" / "belt.truth.jsonl").read_text().splitlines()
    tracks = [json.loads(line) for line in lines]
    assert tracks and len({t["id"] for t in tracks}) == len(tracks)
    for t in tracks:
        assert set(t) >= {"id", "label", "length", "width", "trajectory"}
        assert 40 <= t["length"] <= 200
        frames = [p["frame"] for p in t["trajectory"]]
        assert frames == sorted(frames) and frames[0] >= 0 and frames[-1] < 30
        full = [p["frame"] for p in t["trajectory"] if p["fully_visible"]]
        assert t["first_fully_visible"] == (full[0] if full else None)
        assert t["last_fully_visible"] == (full[-1] if full else None)
        for p in t["trajectory"]:
            x, y, w, h = p["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 240
            assert 0 <= p["angle"] < 180


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--size", "12x"], ["'12x'", "WIDTHxHEIGHT"]),
        (["--size", "321x240"], ["321x240", "even"]),
        (["--rate", "-1"], ["'-1'", "[0.0, 50.0]"]),
        (["--seconds", "0"], ["'0'", "(0.0, 86400.0]"]),
        (["--fps", "10"], ["'10'", "[15.0, 120.0]"]),
        (["--fps", "121"], ["'121'", "[15.0, 120.0]"]),
    ],
)
def test_bad_video_input_is_one_clear_line_and_exit_2(tmp_path, args, words):
    base = {"--out": str(tmp_path / "belt.mp4"), "--seconds": "1"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = _synth("video", *[x for pair in base.items() for x in pair])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "belt.mp4").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_unwritable_output_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = _synth("video", "--out", str(locked / "belt.mp4"), "--seconds", "1")
    assert result.returncode == 2 and "not writable" in result.stderr


def test_uncreatable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    video = _synth("video", "--out", str(blocker / "sub" / "belt.mp4"), "--seconds", "1")
    crops = _synth("crops", "--out", str(blocker / "crops"), "--per-class", "1")
    for result in (video, crops):
        assert result.returncode == 2
        assert "cannot create output folder" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_crops_input_is_refused(tmp_path):
    result = _synth("crops", "--out", str(tmp_path), "--per-class", "0")
    assert result.returncode == 2 and "'0' is outside [1, 100000]" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _locator_ready(), reason="service.locate.Locator is not implemented yet")
def test_crops_dataset_is_balanced_and_cut_by_the_locator(tmp_path):
    result = _synth(
        "crops", "--out", str(tmp_path), "--per-class", "2", "--size", "64",
        "--frame-size", "640x360", "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 20
    for folder in folders:
        files = sorted(folder.glob("*.png"))
        assert [f.name for f in files] == [f"{folder.name}_0000{i}.png" for i in (1, 2)]
        crop = cv2.imread(str(files[0]))
        assert crop.shape == (64, 64, 3)

    # Light, belt and camera vary across the set: no scene gives more than its share
    from training.synth_cli import MAX_CROPS_PER_SCENE

    scenes = int(re.search(r"of (\d+) scenes", result.stdout).group(1))
    assert scenes >= math.ceil(40 / MAX_CROPS_PER_SCENE)


@pytest.mark.slow
@pytest.mark.skipif(not _locator_ready(), reason="service.locate.Locator is not implemented yet")
def test_per_scene_caps_the_crops_taken_from_one_scene(tmp_path):
    result = _synth(
        "crops", "--out", str(tmp_path), "--per-class", "1", "--size", "32",
        "--frame-size", "640x360", "--seed", "2", "--per-scene", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*/*.png"))) == 20
    # 20 crops, at most 3 a scene; the default (1 a scene) would take 20 scenes
    assert 7 <= int(re.search(r"of (\d+) scenes", result.stdout).group(1)) < 20


def _belt_colours(folder) -> np.ndarray:
    """Each crop's top-left corner: the belt's colour (the crop fills its margin rows with it)."""
    return np.array(
        [cv2.imread(str(f))[:3, :3].reshape(-1, 3).mean(0) for f in folder.glob("*/*.png")]
    )


@pytest.mark.slow
@pytest.mark.skipif(not _locator_ready(), reason="service.locate.Locator is not implemented yet")
def test_line_keeps_one_belt_light_and_camera_across_scenes(tmp_path):
    common = ("--per-class", "1", "--size", "32", "--frame-size", "640x360", "--seed", "4")
    line = _synth("crops", "--out", str(tmp_path / "line"), "--line", "77", *common)
    wide = _synth("crops", "--out", str(tmp_path / "wide"), *common)
    assert line.returncode == 0, line.stderr
    assert wide.returncode == 0, wide.stderr
    # 20 scenes each; one line's belt varies only with its light across the frame
    line_spread = _belt_colours(tmp_path / "line").std(axis=0).mean()
    wide_spread = _belt_colours(tmp_path / "wide").std(axis=0).mean()
    assert line_spread < 0.5 * wide_spread, (line_spread, wide_spread)


@pytest.mark.slow
@pytest.mark.skipif(not _locator_ready(), reason="service.locate.Locator is not implemented yet")
def test_codec_changes_the_pixels_not_the_scenes(tmp_path):
    common = ("--per-class", "1", "--size", "32", "--frame-size", "640x360", "--seed", "6")
    runs = {
        c: _synth("crops", "--out", str(tmp_path / c), "--codec", c, *common)
        for c in ("h264", "jpeg")
    }
    for result in runs.values():
        assert result.returncode == 0, result.stderr
    assert re.search(r"\((\d+) through H\.264, 0 through JPEG\)", runs["h264"].stdout)
    assert re.search(r"\(0 through H\.264, (\d+) through JPEG\)", runs["jpeg"].stdout)
    # The first scenes are the same (later ones differ: each run steers arrivals
    # towards the classes it still lacks), so some crops show the same screw,
    # and no crop comes out the same through both codecs
    pairs = [
        (p, tmp_path / "jpeg" / p.relative_to(tmp_path / "h264"))
        for p in (tmp_path / "h264").glob("*/*.png")
    ]
    diffs = [
        np.abs(cv2.imread(str(a)).astype(int) - cv2.imread(str(b)).astype(int)).mean()
        for a, b in pairs
        if b.exists()
    ]
    assert len(diffs) >= 10
    assert min(diffs) > 0 and sorted(diffs)[1] < 6, diffs


@pytest.mark.slow
@pytest.mark.skipif(not _locator_ready(), reason="service.locate.Locator is not implemented yet")
def test_default_crops_fall_back_to_jpeg_without_ffmpeg(tmp_path):
    # A PATH with python on it and no ffmpeg: the default still makes a dataset
    no_ffmpeg = tmp_path / "bin"
    no_ffmpeg.mkdir()
    (no_ffmpeg / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(no_ffmpeg)}
    small = ("--per-class", "1", "--size", "32", "--frame-size", "640x360")
    result = _synth("crops", "--out", str(tmp_path / "d"), *small, env=env)
    assert result.returncode == 0, result.stderr
    assert "ffmpeg is not on PATH" in result.stderr
    assert re.search(r"\(0 through H\.264, (\d+) through JPEG\)", result.stdout)
    # asked for outright, H.264 without ffmpeg is an error that says what to install
    result = _synth("crops", "--out", str(tmp_path / "e"), *small, "--codec", "h264", env=env)
    assert result.returncode == 2
    assert "ffmpeg was not found on PATH" in result.stderr


def test_h264_crops_need_an_even_frame_size(tmp_path):
    result = _synth("crops", "--out", str(tmp_path), "--per-class", "1", "--frame-size", "641x360")
    assert result.returncode == 2
    assert "H.264 yuv420p needs even width and height" in result.stderr
