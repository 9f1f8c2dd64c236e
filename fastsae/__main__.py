"""``python -m fastsae``: the same as the ``fastsae`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
