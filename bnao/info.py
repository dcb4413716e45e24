"""``python -m bnao.info``: the same report as ``bnao info``."""

import sys

from .commands.info import main

if __name__ == "__main__":
    sys.exit(main())
