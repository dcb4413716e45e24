"""gpu-check entry point: ``python3 scripts/gpu_check.py OUT_DIR`` (see scripts/gpucheck/cli.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpucheck.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
