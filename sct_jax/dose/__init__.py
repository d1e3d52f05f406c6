"""Scoring an sCT the way a treatment plan sees it.

:mod:`sct_jax.dose.wepl` (numpy/scipy only, in every evaluation): the water-equivalent
path length along beam rays through the CT and the sCT, the proxy of a proton range
error. :mod:`sct_jax.dose.gamma` (the gamma index) and :mod:`sct_jax.dose.dvh` (D98,
D2, Dmean, dose MAE) need nothing optional either. :mod:`sct_jax.dose.engine` plans
photons and protons on the CT and recomputes them on the sCT with pyradplan, the
optional ``[dose]`` extra (imported only when used); :mod:`sct_jax.dose.plots` draws
the DVH and dose-difference figures; :mod:`sct_jax.dose.compare` plans one case and
scores each sCT against it, for ``sct-dose`` (:mod:`sct_jax.cli.dose`) and
``evaluate.py --dose`` (:mod:`sct_jax.evaluation.dose_eval`).
"""
