"""Cuts the small real-data test fixture out of the MRI-DIR porcine pair.

  python scripts/make_porcine_fixture.py [--src ../shared/data/mridir_porcine]
                                         [--out tests/fixtures/porcine/porcine01]

The fixture is a 64 x 64 x 12 voxel box (1 x 1 x 2.5 mm, so 64 x 64 x 30 mm) centred on
the centroid of the specimen mask, rounded to whole voxels; at that centre the box holds
cortical bone (> 300 HU) and fat (< -50 HU). The affine's origin moves to the world
position of the box's first voxel, so every voxel keeps its world coordinates. Written
as int16 CT (HU), int16 MR (the source's scanner units, unchanged) and uint8 mask.
"""

import argparse
from pathlib import Path

import numpy as np

from sct_jax.data.io import load_volume, save_volume

BOX = (64, 64, 12)
# (source file, fixture file, on-disk dtype)
FILES = (("mr_t2.nii.gz", "mr.nii.gz", np.int16),
         ("ct_rigid.nii.gz", "ct.nii.gz", np.int16),
         ("mask.nii.gz", "mask.nii.gz", np.uint8))


def box_start(mask: np.ndarray) -> tuple[int, int, int]:
    """First voxel of the box centred on the mask's centroid, kept inside the volume."""
    centre = np.rint(np.argwhere(mask > 0).mean(axis=0)).astype(int)
    return tuple(int(np.clip(c - b // 2, 0, s - b))
                 for c, b, s in zip(centre, BOX, mask.shape))


def cropped_affine(affine: np.ndarray, start) -> np.ndarray:
    """The affine of the sub-grid that starts at voxel ``start``: origin moved there."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
    return out


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=repo.parent / "shared" / "data" / "mridir_porcine")
    parser.add_argument("--out", default=repo / "tests" / "fixtures" / "porcine" / "porcine01")
    args = parser.parse_args()
    src, out = Path(args.src), Path(args.out)
    mask = load_volume(src / "mask.nii.gz").data
    start = box_start(mask)
    window = tuple(slice(s, s + b) for s, b in zip(start, BOX))
    for src_name, out_name, dtype in FILES:
        vol = load_volume(src / src_name)
        # The sources are integer-valued (int16 / uint8 on disk), so the cast is exact.
        data = vol.data[window]
        assert np.array_equal(data, np.rint(data)), src_name
        save_volume(out / out_name, data.astype(dtype), cropped_affine(vol.affine, start),
                    vol.header)
    print(f"box start (x, y, z) = {start}, size {BOX} -> {out}")


if __name__ == "__main__":
    main()
