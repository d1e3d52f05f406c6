"""Which VGG-16 backbone the evaluation's LPIPS column uses, or why it is empty.

LPIPS needs ImageNet VGG-16 weights, which cannot ship with the project: a user makes
them once with ``scripts/convert_vgg_weights.py``. The evaluation looks, in order, at
the file given on the command line (``--lpips_weights``; missing: bad input), the run's
own perceptual-loss weights (``config.model.vgg16_weights``, when that file exists) and
``weights/vgg16.npz`` in the working folder (where the converter's usage puts it). With
none of them the column stays empty and the note says why; a random network's number is
never reported.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sct_jax.errors import DataError
from sct_jax.metrics.lpips import LpipsNet, load_lpips

DEFAULT_WEIGHTS = Path("weights") / "vgg16.npz"
MISSING_NOTE = ("LPIPS not computed: no VGG-16 ImageNet weights (give --lpips_weights "
                "PATH, an .npz made by scripts/convert_vgg_weights.py from torchvision's "
                "vgg16-397923af.pth)")


def check_weights(weights: str | None) -> None:
    """Start-up check of an explicit ``--lpips_weights``: the file must exist.

    Raises:
      DataError: ``error: <file>: ...`` before anything is predicted or written.
    """
    if weights and not Path(weights).is_file():
        raise DataError(f"{weights}: --lpips_weights: VGG-16 weights file not found (make "
                        "it with scripts/convert_vgg_weights.py --arch vgg16)")


def candidates(weights: str | None, config=None) -> list[Path]:
    """The backbone files to try, most explicit first (only existing ones)."""
    paths = [Path(weights)] if weights else []
    model = getattr(config, "model", None) if config is not None else None
    if model is not None and "vgg16_weights" in model and model.vgg16_weights:
        paths.append(Path(model.vgg16_weights))
    paths.append(DEFAULT_WEIGHTS)
    return [p for p in paths if p.is_file()]


@functools.lru_cache(maxsize=2)
def _load(path: str) -> LpipsNet:
    return load_lpips(path)


def lpips_for(weights: str | None = None, config=None) -> tuple[LpipsNet | None, str]:
    """The LPIPS network to score with, and a note for the report.

    Args:
      weights: an explicit backbone ``.npz`` (checked by :func:`check_weights`).
      config: the run's config (its perceptual-loss weights are a fallback).

    Returns:
      ``(net, "LPIPS: VGG-16 weights <file>, v0.1 linear heads")`` or
      ``(None, MISSING_NOTE)``.

    Raises:
      DataError: an explicit file missing, or a found file of the wrong layout.
    """
    check_weights(weights)
    found = candidates(weights, config)
    if not found:
        return None, MISSING_NOTE
    net = _load(str(found[0]))
    return net, (f"LPIPS (Zhang et al. 2018, v0.1 linear heads) on axial slices with the "
                 f"VGG-16 weights {found[0]}")
