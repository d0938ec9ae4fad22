"""``python -m training cut``: crops from a real H.264 recording of one colour.

The recording is rendered by ``synth video --only`` (the simulator's truth
says which screws cross the line) and encoded by ffmpeg; the cut runs the
service's locator and tracker on the decoded file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

SUBPROCESS_TIMEOUT_S = 120
WIDTH, HEIGHT = 640, 360


def _training(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def blue_run(tmp_path_factory) -> Path:
    """6 s of blue screws on line 4321 (its belt, light and camera), seed 3."""
    video = tmp_path_factory.mktemp("rec") / "blue.mp4"
    result = _training(
        "synth", "video", "--out", str(video), "--seconds", "6", "--size", f"{WIDTH}x{HEIGHT}",
        "--only", "blue", "--line", "4321", "--seed", "3", "--rate", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return video


def _crossing_truth(video: Path) -> list[dict]:
    """Truth screws whose centre passes the middle of the frame while fully in view."""
    crossing = []
    for line in video.with_name(video.stem + ".truth.jsonl").read_text().splitlines():
        screw = json.loads(line)
        xs = [p["cx"] for p in screw["trajectory"] if p["fully_visible"]]
        if len(xs) >= 3 and min(xs) < WIDTH / 2 <= max(xs):
            crossing.append(screw)
    return crossing


def test_only_paints_the_chosen_colour(blue_run):
    labels = {
        json.loads(line)["label"]
        for line in blue_run.with_name("blue.truth.jsonl").read_text().splitlines()
    }
    assert labels == {"blue"}


def test_cut_keeps_each_crossing_screw_with_its_crops(blue_run, tmp_path):
    result = _training(
        "cut", "--video", str(blue_run), "--label", "blue", "--out", str(tmp_path),
        "--size", "48", "--per-screw", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r"cut (\d+) crops of (\d+) screws \(blue\)", result.stdout)
    assert found, result.stdout
    crops, screws = int(found[1]), int(found[2])
    crossing = len(_crossing_truth(blue_run))
    assert crossing >= 8
    # every screw that crosses is kept (one may cross before the tracker has
    # seen it twice, in the first frames), and nothing else is
    assert crossing - 1 <= screws <= crossing, (screws, crossing)
    files = sorted((tmp_path / "blue").glob("*.png"))
    assert len(files) == crops and screws <= crops <= 2 * screws
    assert all(cv2.imread(str(f)).shape == (48, 48, 3) for f in files)

    # Cutting the same recording again replaces its crops; --max stops early
    again = _training("cut", "--video", str(blue_run), "--label", "blue", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert len(list((tmp_path / "blue").glob("*.png"))) == crops
    capped = _training(
        "cut", "--video", str(blue_run), "--label", "blue", "--out", str(tmp_path / "m"),
        "--max", "3",
    )  # fmt: skip
    assert capped.returncode == 0, capped.stderr
    assert len(list((tmp_path / "m" / "blue").glob("*.png"))) == 3


def test_a_recording_without_screws_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"color=c=0x303030:s={WIDTH}x{HEIGHT}:d=2:r=30", "-pix_fmt", "yuv420p", str(empty)],
        check=True, timeout=SUBPROCESS_TIMEOUT_S,
    )  # fmt: skip
    result = _training("cut", "--video", str(empty), "--label", "red", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no screw reached the decision line in 60 frames" in result.stderr


def test_a_file_that_is_not_a_video_is_a_clear_error(tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video")
    result = _training("cut", "--video", str(bogus), "--label", "red", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "notes.mp4" in result.stderr and "Traceback" not in result.stderr


def test_a_label_that_is_a_path_is_refused(blue_run, tmp_path):
    result = _training("cut", "--video", str(blue_run), "--label", "../red", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "not usable as a folder name" in result.stderr
