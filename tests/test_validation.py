"""Validation while training, the best checkpoint, image summaries and report.html, on
one tiny pix2pix run on the phantom (compilations shared).

The run validates every step. Its validation MAE is shifted per pass by a scripted
offset (+300 HU except on the 2nd pass) so that the best checkpoint (step 2) is not the
latest: what is tested is that the loop logs what the validator measured, that orbax
keeps the best beside the latest N, and that evaluation picks the best by default.
"""

import html.parser
import json
import struct

import numpy as np
import pytest

from sct_jax.evaluation import report_html
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.config_utils import load_config_file
from sct_jax.data import synthrad
from sct_jax.errors import ConfigError, SctError
from sct_jax.inference import predict as predict_lib
from sct_jax import runs
from sct_jax.runs import checkpoint
from sct_jax.training import loop, validation
from sct_jax.data import datasets as train_data

OFFSET_HU = 300.0
BEST_PASS = 2  # 1-based: the pass whose MAE is not shifted


def tiny_config(steps):
    c = load_config_file("configs/pix2pix_pelvis.py:tiny")
    c.train.steps = steps
    c.train.eval_every = 1
    c.train.image_every = 4
    c.train.ckpt_every = 100  # only validated steps (every step here) are saved
    c.train.keep_checkpoints = 1
    c.train.tensorboard = True
    c.train.progress = False
    return c


@pytest.fixture(scope="module")
def scripted_offsets():
    """Shifts the logged validation MAE: pass k gets +300 HU unless k == BEST_PASS."""
    real = validation.Validator.evaluate
    passes = []

    def evaluate(self, state):
        values, sct = real(self, state)
        passes.append(values["val/mae"])
        if len(passes) != BEST_PASS:
            values = {**values, "val/mae": values["val/mae"] + OFFSET_HU}
        return values, sct

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation.Validator, "evaluate", evaluate)
        yield passes


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scripted_offsets):
    workdir = tmp_path_factory.mktemp("validated_run")
    config = tiny_config(steps=4)
    result = loop.train(config, workdir)
    return config, workdir, result, list(scripted_offsets)


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_validation_metrics_logged_every_step(trained):
    config, workdir, _, real_mae = trained
    val = [r for r in records(workdir) if "val/mae" in r]
    assert [r["step"] for r in val] == [1, 2, 3, 4]
    for r in val:
        for key in ("val/psnr", "val/ssim", "val/dice_bone", "val/mae_bone", "val/seconds"):
            assert np.isfinite(r[key]), (key, r)
        assert r["val/seconds"] > 0
    logged = [r["val/mae"] for r in val]
    expected = [m + (0.0 if i + 1 == BEST_PASS else OFFSET_HU) for i, m in enumerate(real_mae)]
    np.testing.assert_allclose(logged, expected, rtol=1e-12)


def test_logged_mae_is_that_of_the_checkpoint_of_that_step(trained):
    """Recomputes the step-4 validation MAE (float64 numpy) from checkpoint 4."""
    config, workdir, _, real_mae = trained
    step, state = runs.load_state(config, workdir, step="latest")
    assert step == 4
    (case,) = train_data.case_splits(config)["val"]
    data = synthrad.load_case(case)
    sct = predict_lib.predict_case(predict_lib.make_volume_predictor(config, state), config,
                                   data)
    mask = data.mask
    mae = np.abs(data.ct.data.astype(np.float64) - sct.astype(np.float64))[mask].mean()
    assert real_mae[3] == pytest.approx(mae, abs=1e-3)
    # The state moved between passes: a validator fed a stale state would repeat itself.
    assert len(set(np.round(real_mae, 6))) == 4


def test_best_checkpoint_kept_beside_latest(trained):
    config, workdir, _, _ = trained
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        assert sorted(ckpt.manager.all_steps()) == [BEST_PASS, 4]  # keep 1 latest + best
        assert ckpt.best_step() == BEST_PASS
        assert ckpt.resolve("best") == BEST_PASS
        assert ckpt.resolve("latest") == ckpt.resolve("4") == 4
        with pytest.raises(SctError, match="no checkpoint at step 3 .there are 2, 4"):
            ckpt.resolve(3)
    finally:
        ckpt.close()


def test_checkpoint_choice_parsing():
    assert checkpoint.parse_choice("best") == "best"
    assert checkpoint.parse_choice(" Latest ") == "latest"
    assert checkpoint.parse_choice("12") == 12
    for bad in ("newest", "-1", "1.5", ""):
        with pytest.raises(ConfigError, match="expected best, latest or a step number"):
            checkpoint.parse_choice(bad)


def _tensorboard_tags(workdir):
    """Every (kind, tag) in the run's TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in (workdir / "tb").glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                tags.add(("image" if value.HasField("image") else "scalar", value.tag))
    return tags


def test_image_summaries_and_tensorboard(trained):
    config, workdir, _, _ = trained
    images = sorted(p.name for p in (workdir / "images").iterdir())
    assert images == [f"val_{n}_step4.png" for n in ("abs_error_hu", "ct", "mr", "sct")]
    tags = _tensorboard_tags(workdir)
    assert {("scalar", "val/mae"), ("scalar", "val/ssim"), ("scalar", "val/seconds"),
            ("image", "val/sct"), ("image", "val/abs_error_hu")} <= tags


def test_validation_slice_images(trained):
    config, workdir, result, _ = trained
    (case,) = train_data.case_splits(config)["val"]
    validator = validation.Validator(config, [case])
    data = validator.data[0]
    body_slices = np.flatnonzero(data.mask.any(axis=(0, 1)))
    z = body_slices[len(body_slices) // 2]
    assert validator.slice_index == z
    sct = validator.predict(result.state, 0)
    images, ranges = validator.images(result.state, sct)
    # Rows along Y, bottom row Y = 0 (the orientation of the evaluation panels).
    np.testing.assert_array_equal(images["val/ct"], data.ct.data[:, :, z].T[::-1])
    error = np.abs(sct[:, :, z] - data.ct.data[:, :, z]) * data.mask[:, :, z]
    np.testing.assert_allclose(images["val/abs_error_hu"], error.T[::-1], rtol=1e-6)
    assert ranges["val/sct"] == validation.CT_WINDOW_HU


class _Table(html.parser.HTMLParser):
    """``{row data-case: {data-metric: text}}`` of report.html's metrics table, and the
    data-case of every section that holds an embedded image."""

    def __init__(self):
        super().__init__()
        self.rows, self.images = {}, set()
        self._row = self._metric = self._section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-case" in attrs:
            self._row = self.rows.setdefault(attrs["data-case"], {})
        elif tag == "td" and self._row is not None:
            self._metric = attrs.get("data-metric")
        elif tag == "section":
            self._section = attrs.get("data-case")
        elif tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images.add(self._section)

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._metric = None

    def handle_data(self, data):
        if self._row is not None and self._metric and data.strip():
            self._row[self._metric] = data.strip()


def _check_number(text, value):
    """``text`` shows ``value`` to its printed decimals."""
    if value is None:
        assert text == "n/a"
        return
    if value in ("inf", "-inf"):  # strict JSON's infinity (an HD95 with no structure)
        assert text == value
        return
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert abs(float(text) - value) <= 0.5 * 10.0**-decimals + 1e-12, (text, value)


def test_evaluation_uses_best_checkpoint_and_writes_report(trained, capsys):
    config, workdir, _, _ = trained
    capsys.readouterr()
    evaluate_run(config, workdir, qa=True)
    out = capsys.readouterr().out
    assert f"with the step-{BEST_PASS} checkpoint (best)" in out, out
    assert f"bone renderings: {workdir / 'predictions'}/<id>/bone3d.png (" in out, out
    pred = workdir / "predictions"
    summary = json.loads((pred / "metrics.json").read_text())
    page = _Table()
    page.feed((pred / "report.html").read_text())
    assert summary["cases"], summary
    for case in summary["cases"]:
        row = page.rows[case["id"]]
        for name, value in case.items():
            if name in ("id", "region", "prediction"):
                continue
            _check_number(row[name], value)
        qa = json.loads((pred / case["id"] / "qa.json").read_text())
        assert row["qa"] == qa["status"]
        assert case["id"] in page.images  # the panel is embedded
        # The bone renderings: written beside the panel and embedded in the case's section.
        bone_png = (pred / case["id"] / "bone3d.png").read_bytes()
        assert bone_png.startswith(b"\x89PNG")
        assert report_html.png_data_uri(bone_png) in (pred / "report.html").read_text()
    assert set(summary["baselines"]) == {"constant", "lookup", "mean_ct", "perfect"}
    for base_name, base in summary["baselines"].items():
        for name, value in base["mean"].items():
            _check_number(page.rows[f"baseline:{base_name}"][name], value)
    for name, stats in summary["metrics"].items():
        _check_number(page.rows["mean"][name], stats["mean"])
    # No external resource: the page reads offline.
    text = (pred / "report.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text

    capsys.readouterr()
    evaluate_run(config, workdir, checkpoint="latest", panels=False)
    assert "with the step-4 checkpoint (latest)" in capsys.readouterr().out


def test_report_std_maps_and_non_finite_values(tmp_path):
    """With --samples the std map is embedded per case; NaN shows n/a, inf shows inf."""
    import math
    from sct_jax.evaluation import report_html, scoring
    values = dict.fromkeys(scoring.SCORED_METRICS, 1.0) | {"psnr": math.inf, "mae_air": math.nan}
    report = scoring.ScoreReport(
        cases=(scoring.CaseScore("1PA001", "pelvis", tmp_path / "p.nii.gz", values),),
        unscored=(), skipped=(), pred_dir=tmp_path, data_root=tmp_path, region=None)
    std = np.random.default_rng(0).uniform(0, 50, (12, 10, 8)).astype(np.float32)
    mask = np.zeros(std.shape, bool)
    mask[2:10, 2:8, 3:6] = True
    png = report_html.std_map_png(std, mask)
    assert png.startswith(b"\x89PNG")
    path = report_html.write(report_html.path_for(tmp_path / "metrics.json"), report,
                             title="run", std_maps={"1PA001": png})
    assert path.name == "report.html"
    page = _Table()
    page.feed(path.read_text())
    assert page.rows["1PA001"]["psnr"] == "inf" and page.rows["1PA001"]["mae_air"] == "n/a"
    assert page.images == {"1PA001"} and "baseline" not in page.rows
    assert report_html.path_for(tmp_path / "p2p.json").name == "p2p.html"


def test_report_bone3d_figure(tmp_path):
    """The bone renderings are one more figure in their case's section; none without."""
    from sct_jax.evaluation import scoring
    values = dict.fromkeys(scoring.SCORED_METRICS, 1.0)
    report = scoring.ScoreReport(
        cases=tuple(scoring.CaseScore(i, "pelvis", tmp_path / "p.nii.gz", values)
                    for i in ("1PA001", "1PA002")),
        unscored=(), skipped=(), pred_dir=tmp_path, data_root=tmp_path, region=None)
    png = b"\x89PNG\r\n\x1a\nbone"
    caption = "bone surface (&gt; 250 HU), CT left, sCT right"
    text = report_html.render(report, title="run", panels={"1PA001": b"\x89PNGpanel"},
                              bone3d={"1PA002": png})
    page = _Table()
    page.feed(text)
    assert page.images == {"1PA001", "1PA002"}
    section = text[text.index('<section data-case="1PA002">'):]
    section = section[:section.index("</section>")]
    assert caption in section and report_html.png_data_uri(png) in section
    assert text.count('data-figure="bone3d"') == 1
    text = report_html.render(report, title="run", panels={"1PA001": b"\x89PNGpanel"})
    assert 'data-figure="bone3d"' not in text and "bone surface" not in text


def test_report_dose_table_figures_and_failures(tmp_path):
    """--dose: one table row per modality and sCT (model first, baselines italic), the
    model's DVH and dose-difference figures in their case's section, failures named."""
    from sct_jax.evaluation import scoring
    values = dict.fromkeys(scoring.SCORED_METRICS, 1.0)
    report = scoring.ScoreReport(
        cases=(scoring.CaseScore("1PA001", "pelvis", tmp_path / "p.nii.gz", values),),
        unscored=(), skipped=(), pred_dir=tmp_path, data_root=tmp_path, region=None)
    dose_dir = tmp_path / "1PA001" / "dose"
    dose_dir.mkdir(parents=True)
    (dose_dir / "dvh_model_photon.png").write_bytes(b"\x89PNGdvh")
    (dose_dir / "dose_diff_model_photon.png").write_bytes(b"\x89PNGdiff")
    row = {"dose_mae_percent_rx": 0.7, "gamma_2_2": 99.5, "gamma_1_1": 97.25,
           "target_d98": -0.5}
    dose = {"rx_gy": 2.0, "target": "sphere of radius 25 mm", "errors":
            ["1PA001 proton: proton plan: the optimised plan gives the target no dose"],
            "summary": {"photon": {"model": row, "mean_ct": {**row, "gamma_2_2": 95.0}},
                        "proton": {}},
            "dvh_png": {"1PA001": {"photon": dose_dir / "dvh_model_photon.png"}}}
    text = report_html.render(report, title="run", dose=dose)
    table = text[text.index('<table id="dose">'):]
    table = table[:table.index("</table>")]
    assert table.index('data-case="dose:photon:model"') < table.index(
        'data-case="dose:photon:mean_ct"')
    assert '<tr class="baseline" data-case="dose:photon:mean_ct">' in table
    assert '<td data-metric="gamma_1_1">97.25</td>' in table
    assert "mean training CT" in table and "proton" not in table
    assert "dose failed: 1PA001 proton" in text
    section = text[text.index('<section data-case="1PA001">'):]
    assert report_html.png_data_uri(b"\x89PNGdvh") in section
    assert report_html.png_data_uri(b"\x89PNGdiff") in section
    assert 'id="dose"' not in report_html.render(report, title="run")
