"""``python -m bench.faults`` is ``python -m bench faults``."""

import sys

from bench.faults.cli import main
from local.procs import run_command

sys.exit(run_command(main, what="python -m bench.faults"))
