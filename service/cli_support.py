"""Small helpers every command-line entry point shares (service, training, export).

Argument parsing errors and :class:`~service.errors.BeltsortError` become one
line on stderr and exit status 2, so a plant engineer sees what was wrong and
what is allowed, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from service.errors import BeltsortError, UsageError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main`` and map beltsort's errors to one stderr line and exit 2."""
    try:
        return main(argv)
    except BeltsortError as exc:
        print(f"{_program_name()}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _program_name() -> str:
    """``python -m training`` rather than ``__main__.py`` in error lines."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("beltsort")
    if script.name == "__main__.py":
        return f"python -m {script.parent.name}"
    return script.name


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once, from an entry point (never on import)."""
    name = level.upper()
    if name not in logging.getLevelNamesMapping():
        allowed = "DEBUG, INFO, WARNING, ERROR"
        raise UsageError(f"log level {level!r} is not one of {allowed}")
    logging.basicConfig(
        level=name,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---------------------------------------------------------------- argument types
# argparse turns a ValueError/TypeError from a type function into a one-line
# "argument --x: invalid ... value" message with exit 2; ArgumentTypeError keeps
# our own wording, which names what is allowed.


def frame_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` such as ``1280x720``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not WIDTHxHEIGHT with whole numbers, e.g. 1280x720"
        )
    width, height = int(parts[0]), int(parts[1])
    if not (160 <= width <= 3840 and 120 <= height <= 2160):
        raise argparse.ArgumentTypeError(f"size {text!r} is outside 160x120 .. 3840x2160")
    return width, height


def bounded_float(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """A type function for a float in ``[low, high]`` (or ``(low, high]``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        if too_low or value > high or value != value:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{text!r} is outside {bracket}{low}, {high}]")
        return value

    return parse


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A type function for an int in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is outside [{low}, {high}]")
        return value

    return parse


def output_dir(text: str) -> Path:
    """A folder to write into: created if missing, must end up writable."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot create output folder {text!r}: {exc.strerror}"
        ) from None
    probe = path / ".beltsort-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"output folder {text!r} is not writable: {exc.strerror}"
        ) from None
    return path


def output_file(text: str) -> Path:
    """A file to write: its folder must exist (or be creatable) and be writable."""
    path = Path(text)
    output_dir(str(path.parent) if str(path.parent) else ".")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist or is not a file")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist or is not a folder")
    return path


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message`` and exit 2.

    Plain argparse prints the whole usage block first; on a plant terminal the
    one line naming the bad value is what matters, and ``--help`` has the rest.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
