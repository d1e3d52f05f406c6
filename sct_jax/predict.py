"""``python -m sct_jax.predict``: the same as ``sct-predict`` (see :mod:`sct_jax.cli.predict`)."""

import sys

from sct_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
