"""``python -m training COMMAND``: one sub-command per module.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``
and keeps heavy imports (torch) inside ``run``, so ``synth`` and ``--help``
start fast and work without the ``[train]`` extra.
"""

from __future__ import annotations

import importlib

from service.cli_support import Parser

# name -> (module, one-line help)
COMMANDS = {
    "synth": ("training.synth_cli", "render simulated belt video or a labelled crops dataset"),
    "cut": ("training.cut", "training crops from a recording of screws of one colour"),
    "weights": ("training.weights", "fetch ImageNet weights into torchvision's cache"),
    "fit": ("training.fit", "fine-tune a MobileNet on a folder of labelled crops"),
    "evaluate": ("training.evaluate", "metrics and plots of a model on a labelled folder"),
    "compare": ("training.compare", "pretrained vs scratch vs colour baseline, by shots"),
}


def build_parser() -> Parser:
    parser = Parser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
