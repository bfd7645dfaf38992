"""``python -m bench.soak [options]``: run the soak, exit with its code."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
