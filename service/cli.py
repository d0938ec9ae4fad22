"""``python -m service COMMAND``: run the sorting daemon, check a config, watch decisions.

    python -m service run --model model.onnx [--config beltsort.toml] [--source URI]...
                          [--publish ENDPOINT] [--http HOST:PORT] [--pace realtime|fast]
                          [--exit-at-end] [--log-level LEVEL]
    python -m service check-config beltsort.toml
    python -m service subscribe --connect tcp://127.0.0.1:5557

Command-line flags override the config file, which overrides the built-in
defaults (``deploy/beltsort.example.toml`` lists them all). A bad value
anywhere is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from service.cli_support import Parser, setup_logging
from service.config import DEFAULTS_NOTE, LOG_LEVELS, PACES, Config, load_config, validate
from service.errors import UsageError

log = logging.getLogger(__name__)

_DEFAULTS = Config()


# ---------------------------------------------------------------- run


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="ONNX model file from `python -m export` (default: [model] path of --config)",
    )
    parser.add_argument("--config", metavar="FILE", help=f"TOML config file ({DEFAULTS_NOTE})")
    parser.add_argument(
        "--source",
        metavar="URI",
        action="append",
        help="a video file, a camera (0, /dev/video0), rtsp://..., http(s)://..., or "
        "synthetic:?rate=3&fps=30&size=1280x720&seed=1; repeat for several sources; replaces "
        f"[sources] uris (default: {', '.join(_DEFAULTS.sources.uris)})",
    )
    parser.add_argument(
        "--publish",
        metavar="ENDPOINT",
        help=f"ZeroMQ PUB endpoint to bind (default: {_DEFAULTS.publish.endpoint}; "
        "tcp://127.0.0.1:* picks a free port, logged at start)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help=f"serve /metrics, /healthz, /readyz here (default: {_DEFAULTS.http.listen}; "
        'port 0 = any free port, logged at start; "off" = none)',
    )
    parser.add_argument(
        "--pace",
        choices=PACES,
        help="files and synthetic: realtime = at their own frame rate, dropping frames the "
        "machine cannot take; fast = as fast as the pipeline takes them, dropping none "
        f"(default: {_DEFAULTS.sources.pace})",
    )
    parser.add_argument(
        "--exit-at-end",
        action="store_true",
        help="exit once every source has ended and every object in flight is decided "
        "(default: keep running until SIGTERM/SIGINT)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.upper,
        help=f"log level (default: {_DEFAULTS.logging.level})",
    )


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file (or the defaults) with the command-line flags applied on top."""
    config = load_config(args.config)
    overrides = [
        ("model", "path", args.model),
        ("sources", "uris", tuple(args.source) if args.source else None),
        ("sources", "pace", args.pace),
        ("publish", "endpoint", args.publish),
        ("http", "listen", args.http),
        ("logging", "level", args.log_level),
    ]
    for section, key, value in overrides:
        if value is not None:
            config = config.replace(section, **{key: value})
    return validate(config, "command line")


def run_daemon(args: argparse.Namespace) -> int:
    # Heavy imports (onnxruntime, OpenCV) only for the command that needs them.
    import cv2

    from service.pipeline import Pipeline

    config = resolve_config(args)
    setup_logging(config.logging.level)
    # OpenCV's own WARN lines on a failed open duplicate our source-down log line.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

    pipeline = Pipeline(config, exit_at_end=args.exit_at_end)

    def on_signal(signum: int, _frame) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        pipeline.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pipeline.start()
        return pipeline.run()
    finally:
        pipeline.close()


# ---------------------------------------------------------------- check-config


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="TOML config file to check")


def check_config(args: argparse.Namespace) -> int:
    """Check the file and its sources; print the resolved config (JSON) on success."""
    from service.pipeline import parse_listen
    from service.sources import parse_source, source_names

    config = load_config(args.file)
    for uri, name in zip(config.sources.uris, source_names(config.sources.uris), strict=True):
        parse_source(uri, name)
    parse_listen(config.http.listen)
    json.dump(config.to_dict(), sys.stdout, indent=2)
    print()
    print(f"config {args.file}: ok", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- entry point


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m service",
        description="beltsort's sorting daemon: run it, check its config, watch its decisions",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the sorting daemon", description="run the daemon")
    add_run_arguments(run)
    run.set_defaults(run=run_daemon)

    check = sub.add_parser(
        "check-config",
        help="check a config file and print the resolved configuration",
        description="check a config file: unknown keys, types, ranges, sources",
    )
    add_check_arguments(check)
    check.set_defaults(run=check_config)

    from service import subscriber

    watch = sub.add_parser(
        "subscribe",
        help="connect to a daemon and print its decisions and heartbeats",
        description="reference subscriber: prints decisions, flags seq gaps and restarts",
    )
    subscriber.add_arguments(watch)
    watch.set_defaults(run=subscriber.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:  # pragma: no cover - argparse enforces required
        raise UsageError("give a command: run, check-config or subscribe")
    return args.run(args)
