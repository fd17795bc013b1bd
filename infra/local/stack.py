"""``python -m infra.local.stack start|stop|status|env [--state-dir DIR]`` from the repository root.

A thin entry point: the logic is :mod:`components.stack`, importable from anywhere in the venv
(tests, pipelines, the demo), which ``infra/`` is not since it is no installed package.
"""

import sys

from components.stack import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m infra.local.stack"))
