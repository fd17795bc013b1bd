"""``python -m infra.local.stack start|stop|status|env``: the CLI of :mod:`components.stack` (an installed package)."""

import sys

from components.stack import main

sys.exit(main(prog="python -m infra.local.stack"))
