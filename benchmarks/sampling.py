"""LDM sampling speed (a wrapper of ``python -m sct_jax.bench.sampling``, for run.py).

  python benchmarks/sampling.py --config configs/ldm_brain.py --steps 50 --batch 1

All options and the JSON fields are documented in :mod:`sct_jax.bench.sampling`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sct_jax.bench.sampling import main  # noqa: E402

if __name__ == "__main__":
    # Relative config paths are relative to the repository root, as in the other tools.
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
