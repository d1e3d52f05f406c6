"""Config helpers: the base config every experiment starts from, and variant parsing.

A config file is ``configs/<experiment>.py`` with ``get_config(arg)`` returning an
``ml_collections.ConfigDict``; ``arg`` is a comma-separated list of variant words
(``"tiny"``, ``"controlnet,tiny"``). Unknown words fail at start-up.

Every config also takes the accelerator words of :data:`SHARED_VARIANTS`: ``bf16``
computes convolutions and matmuls in bfloat16 (``config.model.dtype``; parameters,
optimizer state, norm statistics, softmax, losses and the diffusion scheduler stay
float32), e.g. ``configs/pix2pix_pelvis.py:bf16`` or ``configs/ldm_brain.py:controlnet,bf16``.
And ``cbct``: the same experiment on cone-beam CT input (SynthRAD Task 2,
``config.data.input="cbct"``, the phantom's Task 2 cases, paired training on the CTs
registered to their CBCTs; ``_cbct`` added to the name), e.g.
``configs/pix2pix_pelvis.py:small,cbct``. And ``atlas``: the phantom's anatomy
pulled towards a common one (``data.phantom.anatomy_variation`` = 0.2, as data registered
to an atlas; ``_atlas`` added to the name), where the mean training CT is a strong
baseline, e.g. ``configs/pix2pix_pelvis.py:small,atlas``.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import ml_collections

from sct_jax.errors import ConfigError


# Variant words every config accepts (applied by :func:`accelerator_settings`).
SHARED_VARIANTS = frozenset({"bf16", "cbct", "atlas"})
# The phantom's residual motion between planning CT and CBCT (mm) for the cbct word:
# a CT registered to the day's CBCT, as SynthRAD Task 2 ships it, is close but not exact.
CBCT_RESIDUAL_MOTION_MM = 1.0
# Pieces of the generators' learned CBCT intensity calibration for the cbct word
# (model.gen.calibration_bins; sct_jax/models/calibration.py): 128 over the CBCT's HU
# window is about 31 HU a piece, finer than the lookup baseline's 64 bins.
CBCT_CALIBRATION_BINS = 128
# Voxels of target misalignment the L1 forgives for the cbct word, where the method
# takes it (config.loss.shift_tolerance; losses/pixel.shift_tolerant_l1): the CT is
# registered to the CBCT up to a residual motion of about a millimetre.
CBCT_SHIFT_TOLERANCE = 1
# The phantom's anatomy variation for the atlas word: cases close to a common anatomy in
# a common space, as data registered to an atlas are (data.phantom.anatomy_variation).
ATLAS_ANATOMY_VARIATION = 0.2


def parse_variants(arg: str | None, allowed: set[str] | frozenset[str]) -> set[str]:
    """``"a,b"`` -> ``{"a", "b"}``; words outside ``allowed`` and :data:`SHARED_VARIANTS`
    raise ``ConfigError``."""
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    allowed = set(allowed) | SHARED_VARIANTS
    unknown = sorted(words - allowed)
    if unknown:
        raise ConfigError(f"unknown config variant(s) {unknown}; allowed: {sorted(allowed)}")
    return words


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every experiment; each config overrides what it needs."""
    c = ml_collections.ConfigDict()
    c.method = ""
    c.name = ""
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # empty: the built-in phantom dataset (generated and cached)
    c.data.region = "pelvis"
    c.data.cache_dir = ""  # empty: $SCT_JAX_CACHE or ~/.cache/sct_jax
    c.data.split = (0.8, 0.1, 0.1)  # train, val, test fractions of the cases
    c.data.split_seed = 0
    # K-fold cross-validation (0: off): the test split stays data.split's; the other cases
    # are cut into data.folds folds, fold data.fold validates and the rest trains.
    c.data.folds = 0
    c.data.fold = 0
    c.data.mode = "slices"  # slices | patches | unpaired_slices
    c.data.crop = (320, 192)
    c.data.context = 0  # 2.5D: number of MR neighbours on each side
    # "mean_ct": the mean training CT, placed on each case's body box, as one more input
    # channel (sct_jax/data/prior.py); "": none.
    c.data.prior = ""
    # CBCT input: move each training CT onto its CBCT's frame by a deformable
    # registration before training (sct_jax/data/register.py): the residual motion
    # between them would otherwise teach the model to blur every edge.
    c.data.register_target = False
    c.data.patch = (64, 64, 32)
    c.data.mr_percentiles = (0.5, 99.5)
    # The input modality (sct_jax/data/modality.py): "mr" (SynthRAD Task 1) or "cbct"
    # (Task 2: cbct volumes in HU, normalised by the fixed window below, not percentiles).
    c.data.input = "mr"
    c.data.cbct_window = (-1024.0, 3000.0)
    c.data.phantom = ml_collections.ConfigDict()
    c.data.phantom.cases = 20
    c.data.phantom.seed = 0
    c.data.phantom.misalign = 0.0
    c.data.phantom.anatomy_variation = 1.0  # 1: the full population; 0.2: atlas-like
    c.data.phantom.shape = ()  # empty: the generator's default for the region

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 1  # global batch, split over the mesh's data axis
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.keep_checkpoints = 3
    # Validation while training (sct_jax/training/validation.py): every eval_every
    # steps predict and score the validation split (whole volumes, as evaluate.py does)
    # and keep the best checkpoint by its MAE; 0: never. eval_cases: the first N
    # validation cases (0: all).
    c.train.eval_every = 0
    c.train.eval_cases = 0
    # Image summaries (TensorBoard and <workdir>/images/): a fixed validation slice
    # (MR, CT, sCT, |error|) and the method's own maps; 0: never.
    c.train.image_every = 0
    c.train.tensorboard = True
    c.train.progress = True

    # "data" shards the batch; "fsdp" shards the parameters and optimizer state (and the
    # batch too: it is split over data x fsdp). See sct_jax.sharding.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.batch_size = 8
    c.eval.overlap = 0.5  # inference windows (2D tiles, 3D patches) shared by neighbours
    # 2D inference window (h, w): () the training crop; 0 along an axis: the whole slice.
    # Slices larger than the window are covered by blended overlapping windows.
    c.eval.tile = ()
    c.eval.max_cases = 0  # 0: all
    c.eval.panels = True
    return c


def load_sibling(config_file: str, name: str) -> types.ModuleType:
    """Imports ``<name>.py`` from the folder of ``config_file``: settings that several
    configs share live in ``configs/`` beside them (``configs/_pelvis_gan.py``), not in
    the library. Config files are loaded by path, so ``configs/`` is not a package."""
    path = Path(config_file).resolve().with_name(f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"sct_jax_configs.{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:variants]`` the way ``--config`` does."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def accelerator_settings(c: ml_collections.ConfigDict,
                         variants: set[str]) -> ml_collections.ConfigDict:
    """Sets ``c.model.dtype`` and ``c.model.remat`` (every config calls it last), the
    CBCT input for the ``cbct`` word and the atlas-like phantom for ``atlas``.

    ``model.dtype``: ``"float32"``, or ``"bfloat16"`` with the ``bf16`` variant word.
    ``model.remat``: ``"none"``; ``"blocks"`` or a ``jax.checkpoint_policies`` name
    (``--config.model.remat=dots_saveable``) rematerialises the residual / U-Net blocks,
    see :data:`sct_jax.models.layers.REMAT_CHOICES`.
    """
    c.model.dtype = "bfloat16" if "bf16" in variants else "float32"
    c.model.remat = "none"
    if "cbct" in variants:
        c.data.input = "cbct"
        c.data.phantom.misalign = CBCT_RESIDUAL_MOTION_MM
        c.name = f"{c.name}_cbct"
        if "gen" in c.model:
            # The CBCT in the CT's HU window is already a CT estimate: the generator
            # learns its correction (models/layers.generator_output), of the CBCT after
            # a learned voxel-wise HU calibration (models/calibration.py).
            c.model.gen.residual = True
            c.model.gen.calibration_bins = CBCT_CALIBRATION_BINS
        if "shift_tolerance" in c.get("loss", {}):
            c.loss.shift_tolerance = CBCT_SHIFT_TOLERANCE
        # Paired training on the CTs moved onto their CBCT's frame (data/register.py):
        # the residual motion otherwise teaches the model to blur every edge.
        if c.data.mode != "unpaired_slices":
            c.data.register_target = True
    if "atlas" in variants:
        c.data.phantom.anatomy_variation = ATLAS_ANATOMY_VARIATION
        c.name = f"{c.name}_atlas"
    return c


def tiny_run_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run settings every ``tiny`` variant shares: 4 phantom cases, 2 steps logged
    and checkpointed each step, no TensorBoard, no validation or images (tests switch
    them on), one evaluation case."""
    c.data.phantom.cases = 4
    c.train.steps = 2
    c.train.log_every = 1
    c.train.ckpt_every = 1
    c.train.tensorboard = False
    c.train.eval_every = 0
    c.train.image_every = 0
    c.eval.max_cases = 1
    return c


# Run settings that must be whole numbers >= 1 (``train.image_every`` may be 0: never).
_POSITIVE_INTS = ("train.steps", "train.batch_size", "train.log_every", "train.ckpt_every",
                  "train.keep_checkpoints", "eval.batch_size")
_NON_NEGATIVE_INTS = ("train.image_every", "eval.max_cases", "seed", "data.split_seed",
                      "data.folds", "data.fold")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def require(config, *keys: str) -> None:
    """Raises :class:`ConfigError` naming the first dotted key ``config`` lacks.

    Every key has one default, in the config that defines it: the code reads a key
    directly and never substitutes a fallback of its own (a fallback that disagrees
    with the config's default silently changes the method).
    """
    for key in keys:
        if _get(config, key) is None and not _has(config, key):
            raise ConfigError(f"config.{key}: missing; the experiment's config defines it "
                              "(a config.json from an older version may lack it)")


def _has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "__contains__") or part not in node:
            return False
        node = node[part]
    return True


def check_run_config(config, where: str = "config") -> None:
    """Checks the run settings every method shares, before anything is written.

    Args:
      config: the experiment's ``ConfigDict``.
      where: how the message names the config (its file, or ``"config"``).

    Raises:
      ConfigError: one line naming the key, its value and what it must be.
    """
    for key, low in [(k, 1) for k in _POSITIVE_INTS] + [(k, 0) for k in _NON_NEGATIVE_INTS]:
        value = _get(config, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}={value!r} must be a whole number "
                              f"(got {type(value).__name__})")
        if value < low:
            raise ConfigError(f"{where}: {key}={value} must be >= {low}")
    folds, fold = _get(config, "data.folds") or 0, _get(config, "data.fold") or 0
    if folds == 1:
        raise ConfigError(f"{where}: data.folds=1: K-fold needs at least 2 folds (0: off)")
    if fold and fold >= max(folds, 1):
        raise ConfigError(f"{where}: data.fold={fold} must be below data.folds={folds}"
                          + (" (K-fold is off: set data.folds)" if not folds else ""))
    if not isinstance(config.get("method", ""), str) or not config.get("method"):
        raise ConfigError(f"{where}: method is empty; set it to one of the methods in "
                          "sct_jax/methods")
