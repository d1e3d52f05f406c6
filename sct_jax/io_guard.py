"""Outputs never overwrite inputs: the check every writer makes before it writes.

Call :func:`refuse_overwrite` for each output path (file or folder) as soon as the
command line is parsed, with the inputs the command reads and, when there is one, the
data root its cases come from::

    from sct_jax.io_guard import refuse_overwrite
    refuse_overwrite(args.out, inputs=[args.mr, args.sct], data_root=args.data)

It raises :class:`sct_jax.errors.DataError` (one line, exit status 2) when the output
resolves (after symlinks) to an input, into a case folder of ``data_root`` (or, with
``case_folder=True``, into any SynthRAD case folder: one holding an MR and its CT or
mask), into a protected folder (a run's checkpoints, an exported model), onto an
existing folder where a file is meant, or into a folder that cannot be written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from sct_jax.errors import DataError

_CASE_ROLES = ("mr", "ct", "mask")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")


def case_images(folder: Path) -> dict[str, Path]:
    """The case volumes ``folder`` holds: role (``mr``/``ct``/``mask``) -> file."""
    found = {}
    for role in _CASE_ROLES:
        for suffix in _VOLUME_SUFFIXES:
            if (folder / f"{role}{suffix}").exists():
                found.setdefault(role, folder / f"{role}{suffix}")
    return found


def is_case_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a case's volumes (``mr``/``ct``/``mask`` files)."""
    return bool(case_images(folder))


def is_synthrad_case(folder: Path) -> bool:
    """Whether ``folder`` is a SynthRAD case: an MR with its CT or body mask.

    Stricter than :func:`is_case_folder`: a folder with an MR alone is where a user
    keeps one patient's MR and may well want the sCT beside it.
    """
    images = case_images(folder)
    return "mr" in images and ("ct" in images or "mask" in images)


def refuse_overwrite(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                     data_root: str | os.PathLike | None = None, *, folder: bool = False,
                     what: str = "output", case_folder: bool = False,
                     protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Checks that writing ``out_path`` destroys no input; returns it resolved.

    Args:
      out_path: the file (or, with ``folder=True``, the folder) about to be written.
      inputs: files and folders the command reads (``None`` entries are ignored). The
        output may not resolve to any of them, nor (for a folder output) contain one.
      data_root: the data root the cases come from, or ``None``. The output may not
        resolve into a case folder under it (one holding ``mr``/``ct``/``mask``).
      folder: ``out_path`` is a folder that will receive files.
      what: how the message names the output (``"--out"``, ``"--report"``).
      case_folder: also refuse a file whose folder is a SynthRAD case folder
        (:func:`is_synthrad_case`), with no ``data_root`` needed: a case's CT and mask
        are inputs of every later evaluation.
      protect: folders nothing may be written into (a run's checkpoints, an exported
        model directory).

    Returns:
      ``out_path`` resolved (symlinks followed).

    Raises:
      DataError: one line naming ``out_path`` and the input it would destroy.
    """
    out = Path(out_path)
    target = out.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if target == src:
            raise DataError(f"{out}: {what} is the input {item}; refusing to overwrite it")
        if folder and out.exists() and src.is_relative_to(target):
            raise DataError(f"{out}: {what} folder holds the input {item}; choose a new folder")
    for item in protect:
        guarded = Path(item).resolve()
        if target == guarded or target.is_relative_to(guarded):
            raise DataError(f"{out}: {what} would land in {item}, which is an input "
                            "(a run's checkpoints or an exported model); write elsewhere")
    if case_folder and not folder and is_synthrad_case(target.parent):
        roles = "/".join(case_images(target.parent))
        raise DataError(f"{out}: {what} is inside the case folder {target.parent} (it holds "
                        f"{roles}: inputs of every evaluation); write outside it")
    if data_root is not None:
        root = Path(data_root).resolve()
        probe = target if folder else target.parent
        if target == root or (folder and root.is_relative_to(target)):
            raise DataError(f"{out}: {what} is (or holds) the data root {data_root}; "
                            "choose a folder outside it")
        if probe.is_relative_to(root):
            for parent in [probe, *probe.parents]:
                if is_case_folder(parent):
                    raise DataError(f"{out}: {what} is inside the case folder {parent} of "
                                    f"the data root {data_root}; write outside it")
                if parent == root:
                    break
    if not folder and target.is_dir():
        raise DataError(f"{out}: {what} is an existing folder; give a file name")
    existing = next(p for p in [target if folder else target.parent, *target.parents]
                    if p.exists())
    if not existing.is_dir():
        raise DataError(f"{out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{out}: {existing} is not writable")
    return target
