"""``python benchmarks/conv.py [options]``: ``sct-bench conv`` (:mod:`sct_jax.bench.conv`),
the convolution lowerings compared on whatever backend JAX has."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sct_jax.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["conv", *sys.argv[1:]]))
