"""One call per experiment: train a config, export its model, evaluate it; the demo.

:func:`train_and_evaluate` is what ``sct-train`` (``train.py``), ``sct-ablate`` and the
seed tables run: the one training loop into a run directory (resuming it), then the
model exported to ``<workdir>/model`` and, when asked, the evaluation split predicted
and scored. A stage that predicts no sCT (the LDM's autoencoder) trains, says so,
exports nothing and returns normally, so chained stages run one after the other.
:func:`demo` is the README's no-argument CPU run.
"""

from __future__ import annotations

import time
from pathlib import Path

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.export.model import export_model
from sct_jax.training import loop

# The checkout holding configs/ (this file is sct_jax/experiment.py).
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "configs/pix2pix_pelvis.py:small"


def default_workdir(config) -> Path:
    return Path("runs") / (config.name or config.method)


def train_and_evaluate(config, workdir: str | Path | None, evaluate: bool = False,
                       make_dataset=None) -> loop.TrainResult:
    """Trains ``config`` into ``workdir`` (default ``runs/<name>``), exports the model to
    ``<workdir>/model`` and, with ``evaluate``, scores the evaluation split.

    Returns:
      The loop's :class:`~sct_jax.training.loop.TrainResult`.
    """
    workdir = Path(workdir) if workdir else default_workdir(config)
    result = loop.train(config, workdir, make_dataset=make_dataset)
    print(f"trained {config.name or config.method} to step {result.step} in {workdir} "
          f"(train_step compiled in {result.compile_s:.1f}s)")
    reason = methods.get_method(config.method).not_an_sct_model(config)
    if reason:
        print(f"{reason}: no model exported, nothing evaluated")
        return result
    model_dir = export_model(workdir, workdir / "model")
    print(f"exported the model to {model_dir} (sct-predict -m {model_dir})")
    if evaluate:
        evaluate_run(config, workdir)
    return result


def demo(workdir: str | Path | None = None) -> loop.TrainResult:
    """The README's first command: phantom data, pix2pix ``small``, then evaluation."""
    config = load_config_file(str(REPO / DEMO_CONFIG))
    workdir = Path(workdir) if workdir else default_workdir(config)
    print(f"sct_jax demo: {DEMO_CONFIG} on the built-in phantom pelvis data "
          f"(cached under {datasets.cache_root(config)}), run directory {workdir}")
    t0 = time.perf_counter()
    result = train_and_evaluate(config, workdir, evaluate=True)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min.\n"
          "Full configs (GPU/TPU recommended):\n"
          "  sct-train --config configs/pix2pix_pelvis.py --workdir runs/pix2pix_pelvis\n"
          "  sct-train --config configs/pix2pix3d_pelvis.py --workdir runs/pix2pix3d\n"
          "  sct-evaluate --workdir runs/pix2pix_pelvis\n"
          "Your own SynthRAD2023 data: add --config.data.root=/path/to/synthrad")
    return result
