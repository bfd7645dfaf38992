"""Kept so ``python bench/soak.py [options]`` still works: the soak is the package ``bench/soak/``.

Prefer ``python -m bench.soak [options]`` (``just bench-soak``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak.app import main  # noqa: E402 - needs ROOT on sys.path first

if __name__ == "__main__":
    sys.exit(main())
