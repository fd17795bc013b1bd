"""``python -m infra.local.torchserve start|stop|status [--state-dir DIR]`` from the repository root.

A thin entry point: the logic is :mod:`components.serving.server`, importable from anywhere in the
venv (tests, benchmarks, the demo, the deploy step), which ``infra/`` is not.
"""

import sys

from components.serving.server import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m infra.local.torchserve"))
