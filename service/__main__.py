"""``python -m service``: see :mod:`service.cli`."""

import sys

from service.cli import main
from service.cli_support import run_main

sys.exit(run_main(main))
