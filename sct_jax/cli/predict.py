"""sct-predict: one patient's MR (or a folder of them) -> sCT in HU on the MR's grid.

  sct-predict -i mr.nii.gz -o sct.nii.gz -m runs/pix2pix_pelvis_small
  sct-predict -i mr_dicom/ -o out/ -m model_dir/          # -> out/mr_dicom_sct.nii.gz
  sct-predict -i mrs/ -o scts/ -m model_dir/ --samples 8  # -> scts/<name>_sct.nii.gz,
                                                          #    scts/<name>_sct_std.nii.gz

INPUT: an MR file (``.nii``, ``.nii.gz``, ``.mha``), a DICOM MR series folder, or a
folder of MR files. MODEL: a training run directory or an exported model
(``sct-export-model``). Each MR is reoriented (lossless) and, when its voxel size
differs from the training data's, resampled onto the model's training grid, predicted
over the whole field of view, and the sCT mapped back onto the MR's exact grid (shape,
affine, qform/sform codes). Bad input: one ``error: ...`` line, exit status 2, nothing
written. Also ``python -m sct_jax.predict``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from sct_jax import guard, methods
from sct_jax.data.io import load_volume, save_like
from sct_jax.errors import ConfigError, SctError
from sct_jax.export.model import load_model
from sct_jax.inference import inputs
from sct_jax.inference import predict as predict_lib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sct-predict", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("-i", "--input", required=True,
                        help="MR file, DICOM MR series folder, or folder of MR files")
    parser.add_argument("-o", "--output", required=True,
                        help="sCT file (.nii.gz, single input) or output folder")
    parser.add_argument("-m", "--model", required=True,
                        help="training run directory or exported model directory")
    parser.add_argument("--samples", type=int, default=1,
                        help="sCT samples per MR (sampling methods; GANs: test-time "
                             "dropout): the mean is written, and the per-voxel std as "
                             "<name>_std.nii.gz")
    parser.add_argument("--mask", default=None,
                        help="body mask on the MR's grid (single input; default: made "
                             "from the MR); it sets the MR intensity normalisation")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per network call (default: the model's "
                             "eval.batch_size)")
    return parser


def run(args: argparse.Namespace) -> list:
    """Predicts every input; returns the written paths."""
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    jobs = inputs.plan(args.input, args.output)
    if args.mask and len(jobs) > 1:
        raise ConfigError("--mask: only with a single input MR")
    # Every input is read and checked before the model loads or anything is written
    # (each is read again when its turn comes: memory holds one MR at a time).
    mask = None
    for job in jobs:
        mr = inputs.load_job(job)
        if args.mask:
            mask_volume = load_volume(args.mask)
            if mask_volume.shape != mr.shape or not np.allclose(mask_volume.affine,
                                                                mr.affine, atol=1e-3):
                raise SctError(f"{args.mask}: the mask's grid {mask_volume.shape} differs "
                               f"from the MR's {mr.shape} (shape or affine)")
            mask = mask_volume.data > 0
            if not mask.any():
                raise SctError(f"{args.mask}: empty mask (no voxel > 0)")
    model = load_model(args.model)
    config = model.config
    if args.batch_size is not None:
        config.eval.batch_size = int(args.batch_size)
    predict_lib.check_samples(config, args.samples)
    print(f"model: {config.method} ({config.name or 'unnamed'}), step {model.step}, "
          f"trained on {model.geometry.region or 'unknown region'} "
          f"{''.join(model.geometry.axcodes)} "
          f"{'x'.join(f'{s:g}' for s in model.geometry.spacing)} mm", file=sys.stderr)
    jitted = jax.jit(functools.partial(methods.get_method(config.method).predict, config))
    written = []
    for job in tqdm(jobs, desc="sct-predict", unit="MR", disable=None):
        t0 = time.perf_counter()
        mr = inputs.load_job(job)
        sct, std = predict_lib.predict_draws(config, model.state, mr, mask, model.geometry,
                                             args.samples, jitted_predict=jitted)
        if std is not None:
            written.append(save_like(job.std_output, std, mr))
        written.append(save_like(job.output, sct, mr))
        tqdm.write(f"{job.source} -> {job.output} ({time.perf_counter() - t0:.1f}s)",
                   file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guard.quiet_libraries()
    return guard.run_main(lambda: run(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
