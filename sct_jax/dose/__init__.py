"""Scoring an sCT the way a treatment plan sees it.

:mod:`sct_jax.dose.wepl` (numpy/scipy only, in every evaluation): the water-equivalent
path length along beam rays through the CT and the sCT, the proxy of a proton range
error.
"""
