"""``python -m infra.local.torchserve start|stop|status``: the CLI of :mod:`components.serving.server`."""

import sys

from components.serving.server import main

sys.exit(main(prog="python -m infra.local.torchserve"))
