"""``python -m bench.training [options]``: run the training benchmark, exit with its code."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
