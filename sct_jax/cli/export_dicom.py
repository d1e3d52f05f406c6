"""Export a synthetic CT (NIfTI/MetaImage) as a DICOM CT series for a planning system.

    python -m sct_jax.cli.export_dicom --sct sct.nii.gz --out dicom/1PA001_sct \\
        [--like mr_dicom_dir] [--source "MR (pix2pix)"] [--series-number 901]

Writes ``CT0001.dcm`` ... (one file per axial slice) into ``--out``, which must not
exist or be empty; the series is marked SYNTHETIC CT. With ``--like`` the patient,
study and frame-of-reference tags are copied from that MR series (a folder of one series
of one patient; any other is refused). The format decisions
are documented in :mod:`sct_jax.export.dicom`. Bad input: one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from sct_jax import guard
from sct_jax.data.hu import check_hu
from sct_jax.data.io import load_volume
from sct_jax.export.dicom import (export_dicom_series, series_number_problem,
                                  source_problem)
from sct_jax.io_guard import refuse_overwrite


def _series_number(text: str) -> int:
    """``--series-number``: a whole number a DICOM IS holds (refused at parsing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if series_number_problem(value):
        raise argparse.ArgumentTypeError(series_number_problem(value))
    return value


def _source(text: str) -> str:
    """``--source``: text SeriesDescription (a DICOM LO) holds whole."""
    if source_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {source_problem(text)}")
    return text


def _parse_args(argv):
    parser = guard.ArgumentParser(prog="python -m sct_jax.cli.export_dicom",
                                  description=__doc__.split("\n")[0],
                                  epilog=guard.EXIT_STATUS_HELP)
    parser.add_argument("--sct", required=True, help="synthetic CT volume in HU")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--like", metavar="MR_DICOM_DIR",
                        help="MR series to copy patient/study/frame-of-reference tags from")
    parser.add_argument("--source", default="MR", type=_source,
                        help="what the sCT was made from, for the series description "
                             "(printable ASCII, at most 46 characters)")
    parser.add_argument("--series-number", type=_series_number, default=901,
                        help="SeriesNumber, 0 to 2147483647 (default: 901)")
    return parser.parse_args(argv)


def _main(args) -> int:
    refuse_overwrite(args.out, [args.sct, args.like], folder=True, what="--out")
    sct = load_volume(args.sct)
    check_hu(sct.data, args.sct, what="sCT", scale_only=True)
    files = export_dicom_series(sct, args.out, like_dir=args.like, source=args.source,
                                source_file=Path(args.sct).name,
                                series_number=args.series_number)
    print(f"wrote {len(files)} CT slices to {args.out}")
    return guard.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 bad input, 3 bug)."""
    args = _parse_args(argv)
    return guard.run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
