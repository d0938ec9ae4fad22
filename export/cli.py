"""``python -m export``: export a checkpoint, or ``inspect`` / ``bench`` model files.

    python -m export --checkpoint RUN/best.pt --out model.onnx [--fp16 | --int8 ...]
    python -m export inspect model.onnx
    python -m export bench model.onnx [more.onnx ...] [--checkpoint RUN/best.pt]

The export itself has no sub-command name, so the first argument decides:
``inspect`` or ``bench`` select those commands, anything else is an export.
Each command module has ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import importlib
import logging
import sys

from service.cli_support import Parser, setup_logging

# name -> (module, one-line help); None is the export, reached without a name.
COMMANDS = {
    None: ("export.export_cmd", "export a checkpoint to a checked ONNX model file"),
    "inspect": ("export.inspect_cmd", "print a model file's contract, or what breaks it"),
    "bench": ("export.bench", "crops/s and latency of model files vs PyTorch eager"),
}

NOISY_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


def build_parser(command: str | None) -> Parser:
    module_name, help_text = COMMANDS[command]
    prog = "python -m export" + (f" {command}" if command else "")
    epilog = None
    if command is None:
        epilog = "other commands: " + "; ".join(
            f"`python -m export {name} --help`: {text}"
            for name, (_, text) in COMMANDS.items()
            if name
        )
    parser = Parser(prog=prog, description=help_text, epilog=epilog)
    parser.add_argument(
        "--log-level",
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    importlib.import_module(module_name).add_arguments(parser)
    parser.set_defaults(run=importlib.import_module(module_name).run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv[1:] if command else argv)
    setup_logging(args.log_level)
    if logging.getLogger().level > logging.DEBUG:
        # The exporter and its IR passes log every step at INFO; keep them for DEBUG.
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    return args.run(args)
