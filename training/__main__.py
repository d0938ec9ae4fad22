import sys

from service.cli_support import run_main
from training.cli import main

sys.exit(run_main(main))
