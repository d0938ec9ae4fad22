import sys

from export.cli import main
from service.cli_support import run_main

# run_main names the program after argv[0], which is "__main__.py" under -m.
sys.argv[0] = "python -m export"
sys.exit(run_main(main))
