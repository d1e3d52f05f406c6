"""Converts torchvision VGG weights (.pth) into the .npz that sct_jax loads.

Usage::

  python scripts/convert_vgg_weights.py --arch vgg16 --pth vgg16-397923af.pth \
      --out weights/vgg16.npz

The ``.pth`` files are torchvision's ImageNet weights (``vgg16-397923af.pth``,
``vgg19-dcbb9e9d.pth``, from ``torchvision.models.vgg16(weights="IMAGENET1K_V1")``'s
download cache). Only ``features.*`` is kept, with torchvision's key names and layouts
(``features.0.weight`` ``(O, I, 3, 3)``), so the file can be checked against PyTorch.
torch is needed only to read the ``.pth``: it is imported inside :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

import numpy as np

from sct_jax.models.vgg import VGG_STAGES, params_from_state_dict, save_npz_atomic


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       source: str = "<state dict>") -> dict[str, np.ndarray]:
    """Keeps the ``features.*`` arrays of a VGG state dict, checked and as float32.

    Args:
      state_dict: torchvision key -> numpy array (e.g. ``tensor.numpy()`` of each).
      arch: ``"vgg16"`` or ``"vgg19"``.
      source: the file it came from, for error messages.

    Returns:
      ``{"features.0.weight": (64, 3, 3, 3) float32, "features.0.bias": (64,), ...}``.

    Raises:
      DataError: missing keys, wrong shapes or another architecture's layers.
    """
    # Validates every key and shape the loader will need, with the loader's own check.
    params_from_state_dict(state_dict, arch, source=source)
    return {key: np.asarray(value, np.float32) for key, value in state_dict.items()
            if key.startswith("features.")}


def _read_pth(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 - optional, needed only here.
    except ImportError:
        raise SystemExit("convert_vgg_weights.py needs PyTorch to read a .pth file: "
                         "pip install torch (CPU build is enough), then rerun") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: file not found") from None
    if hasattr(state, "state_dict"):  # a pickled full model instead of a state dict
        state = state.state_dict()
    return {key: value.detach().cpu().numpy() for key, value in state.items()
            if hasattr(value, "detach")}


def main(argv: Sequence[str] | None = None) -> int:
    from sct_jax import guard
    from sct_jax.errors import DataError
    from sct_jax.io_guard import refuse_overwrite

    parser = guard.ArgumentParser(description=__doc__.splitlines()[0],
                                  epilog=guard.EXIT_STATUS_HELP)
    parser.add_argument("--pth", required=True, help="torchvision VGG .pth file")
    parser.add_argument("--arch", required=True, choices=sorted(VGG_STAGES))
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)

    def run() -> int:
        refuse_overwrite(args.out, [args.pth], what="--out")
        try:
            state = _read_pth(args.pth)
        except SystemExit as e:  # _read_pth's own one-line reasons are bad input
            raise DataError(str(e.code)) from None
        arrays = convert_state_dict(state, args.arch, source=args.pth)
        save_npz_atomic(args.out, arrays)
        print(f"wrote {args.out}: {len(arrays)} arrays ({args.arch} features)")
        return guard.EXIT_OK

    return guard.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
