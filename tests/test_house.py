"""The structure the package promises: the method contract, start-up checks of every
config value, readers that never write into a run, a stage without an sCT model that
trains and exports nothing, and the layers (import-linter)."""

from __future__ import annotations

import hashlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sct_jax import experiment, methods, runs
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.export.model import load_model
from sct_jax.training import loop

from test_training import synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def test_every_method_declares_the_contract():
    names = methods.available_methods()
    assert {"pix2pix", "pgan", "ctx_pgan", "reg_pgan", "meta_pgan", "cyclegan",
            "ldm_autoencoder", "ldm_diffusion", "ldm_controlnet"} <= set(names)
    for name in names:
        method = methods.get_method(name)
        assert isinstance(method, methods.Method) and method.name == name
        # ``samples`` is what inference asks; it must say what predict does.
        takes_rng = "rng" in inspect.signature(method.predict).parameters
        assert method.samples == takes_rng, name
    with pytest.raises(ConfigError, match="not a known method"):
        methods.get_method("unet_magic")


def test_2d_generators_tell_inference_their_input_rule():
    pix2pix = load_config_file("configs/pix2pix_pelvis.py:tiny")
    assert methods.get_method("pix2pix").input_rule(pix2pix) == (
        2 ** pix2pix.model.gen.num_downs,) * 2
    pgan = load_config_file("configs/pgan_pelvis.py:tiny")
    assert methods.get_method("pgan").input_rule(pgan) == (4, 8)


def _tiny(**overrides):
    c = load_config_file("configs/pix2pix_pelvis.py:tiny")
    c.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.mark.parametrize("key,value,message", [
    ("eval.tile", (30, 30), r"config\.eval\.tile=\(30, 30\)"),
    ("eval.overlap", 1.0, r"config\.eval\.overlap"),
])
def test_inference_settings_are_checked_before_anything_is_written(tmp_path, key, value,
                                                                    message):
    """A bad ``eval.*`` value used to fail at the first validation pass or at the export
    after a whole training."""
    with pytest.raises(ConfigError, match=message):
        loop.train(_tiny(**{key: value}), tmp_path / "run", make_dataset=synthetic_dataset)
    assert not (tmp_path / "run").exists()


def test_method_values_are_checked_at_start_up(tmp_path):
    ldm = load_config_file("configs/ldm_brain.py:diffusion,tiny")
    ldm.ldm.sampler = "euler_maruyama"
    with pytest.raises(ConfigError, match="sampler"):
        loop.train(ldm, tmp_path / "ldm", make_dataset=synthetic_dataset)
    meta = load_config_file("configs/meta_pgan_pelvis.py:tiny")
    assert meta.meta.granularity == "slice"  # one default, in the config
    meta.meta.granularity = "voxel"
    with pytest.raises(ConfigError, match="granularity"):
        methods.get_method("meta_pgan").validate(meta)
    # A config (an older config.json) without the key is refused, never given the
    # code's own fallback (which was "pixel" while the config says "slice").
    del meta.meta["granularity"]
    with pytest.raises(ConfigError, match=r"config\.meta\.granularity: missing"):
        methods.get_method("meta_pgan").validate(meta)
    assert not any(tmp_path.iterdir())


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_readers_never_write_into_a_run(tmp_path):
    workdir = tmp_path / "run"
    config = _tiny()
    loop.train(config, workdir, make_dataset=synthetic_dataset)
    (workdir / "batch_spec.json").touch()
    before = _tree_digest(workdir)
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    for path in (damaged / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"damaged")
    damaged_before = _tree_digest(damaged)
    assert runs.load_state(runs.read_config(workdir), workdir)[0] == 2
    assert runs.load_state(runs.read_config(damaged), damaged)[0] == 1  # fell back
    assert runs.resolve_checkpoint(workdir, "latest") == 2
    assert runs.config_for(workdir).method == "pix2pix"
    assert runs.read_batch_spec(workdir)["mr"].shape[1:3] == (32, 32)
    assert _tree_digest(workdir) == before
    assert _tree_digest(damaged) == damaged_before  # nothing set aside by a reader
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        p.name for p in damaged.iterdir())


def test_a_stage_without_an_sct_model_trains_and_exports_nothing(tmp_path, capsys):
    """The LDM autoencoder stage: ``sct-train`` used to end with exit 2 (the export after
    training refused the stage), stopping a chain of stages run with ``&&``."""
    config = load_config_file("configs/ldm_brain.py:autoencoder,tiny")
    config.train.progress = False
    result = experiment.train_and_evaluate(config, tmp_path / "ae")
    assert result.step == int(config.train.steps)
    out = capsys.readouterr().out
    assert "predicts no sCT" in out and "no model exported" in out
    assert not (tmp_path / "ae" / "model").exists()
    assert runs.latest_step(tmp_path / "ae") == int(config.train.steps)
    with pytest.raises(ConfigError, match="predicts no sCT"):
        from sct_jax.export.model import export_model
        export_model(tmp_path / "ae", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_an_exported_model_refuses_an_edited_model_json(tmp_path):
    workdir = tmp_path / "run"
    loop.train(_tiny(), workdir, make_dataset=synthetic_dataset)
    from sct_jax.export.model import export_model
    model_dir = export_model(workdir, tmp_path / "model", serialized=False)
    assert load_model(model_dir).config.method == "pix2pix"
    text = (model_dir / "model.json").read_text()
    (model_dir / "model.json").write_text(text.replace('"method": "pix2pix"',
                                                       '"method": "pgan"'))
    with pytest.raises(Exception, match="content hash"):
        load_model(model_dir)
    with pytest.raises(Exception, match="checkpoints"):
        export_model(workdir, workdir / "checkpoints" / "99")
    assert not (workdir / "checkpoints" / "99").exists()


def test_the_layers_hold():
    """``lint-imports`` with the contracts of pyproject.toml (CI runs it too)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail(f"{lint}: missing; install the test extra (pip install -e '.[test]')")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout
