"""sct-export-model: a training run -> a self-contained model directory.

  sct-export-model --workdir runs/pix2pix_pelvis_small -o models/pix2pix_pelvis_small
  sct-predict -i mr.nii.gz -o sct.nii.gz -m models/pix2pix_pelvis_small

The directory holds the parameters of the best checkpoint (the lowest validation MAE;
the latest when the run was never validated), the resolved config, the
training geometry, a readable ``model.json`` (method, normalisation, orientation,
spacing, region, package version, content hash) and the network as a serialized JAX
function that takes any number of windows per call (see :mod:`sct_jax.export.model`). ``sct-train`` writes one to
``<workdir>/model`` at the end of training. Bad input: one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sct_jax import guard
from sct_jax.export import model as model_lib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sct-export-model", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("-o", "--output", required=True, help="model directory to write")
    parser.add_argument("--no-serialized", action="store_true",
                        help="leave out the serialized JAX function")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guard.quiet_libraries()
    return guard.run_main(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    out = model_lib.export_model(args.workdir, args.output, serialized=not args.no_serialized)
    description = model_lib.read_description(out)
    print(f"exported {description['method']} step {description['step']} -> {out} "
          f"(sha256 {description['content_sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
