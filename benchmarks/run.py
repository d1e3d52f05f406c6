"""``python benchmarks/run.py --suite quick|cpu|accel [--out FILE]``: the same as
``sct-bench`` (:mod:`sct_jax.cli.bench`), for a checkout without the console script."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sct_jax.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
