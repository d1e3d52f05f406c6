"""Sampling speed of the brain LDM: the scanned ControlNet + UNet + sampler loop.

  sct-bench sampling --config configs/ldm_brain.py[:variant] --steps 50 \
      --batch 1 [--sampler ddim|ddpm|dpmpp_2m] [--models configured,reduced] [--decode] \
      [--dtype bfloat16]

(``sct-bench sampling`` is ``python -m sct_jax.bench.sampling``.) Every line names its
``sampler`` and ``steps``: DPM-Solver++(2M) reaches DDIM-50's accuracy in fewer steps
(``tests/test_samplers.py``), and a step costs the same network call.

Prints one JSON line per model: the *configured* one (the config's UNet, ControlNet and
latent size; for a config conditioned by concatenation, ``:small``, its UNet with the MR
on the latent grid and no ControlNet) and the *reduced* one, the size the CPU goals are set for: UNet and
ControlNet channels (32, 64, 64), 1 res block, attention only at the 12^3 level, a
3-channel 48^3 latent (a 192^3 MR). For each it reports

- ``call_s``: one UNet + ControlNet call (the MR embedded beforehand) jitted on its own,
  outside any loop (median of ``--call-repeats``), and its XLA FLOPs;
- ``loop_s``: the whole sampling loop (``--steps`` steps, one ``lax.scan``), and from it
  ``s_per_step``, ``s_per_volume``, ``volumes_per_s``, achieved ``gflops``;
- ``loop_overhead = loop_s / (steps * call_s)``: what the loop costs beyond its calls;
- ``embed_s``: the MR's conditioning embedding, computed once per volume;
- compile times, the machine's float32 matmul peak now, and the peak RSS.

Parameters are random with PyTorch-like scales (filled from numpy: no initialisation
program to compile); speed does not depend on their values. ``--decode`` also times the
autoencoder's decoder (heavy on a CPU at 192^3). The reduced model's line checks the
goals (fp32 CPU): step <= 1.1 s, 50 DDIM steps <= 55 s, loop overhead <= 1.02.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sct_jax.bench import timing
from sct_jax.config_utils import load_config_file
from sct_jax.diffusion.select import SAMPLER_CHOICES
from sct_jax.methods import _ldm_common as common
from sct_jax.models.controlnet import embed_conditioning

# The model the CPU goals are stated for, and the goals.
REDUCED = dict(unet_channels=(32, 64, 64), num_res_blocks=1,
               attention_levels=(False, False, True), num_head_channels=64,
               norm_num_groups=32, latent_channels=3, latent_size=48,
               ae_channels=(64, 128, 128), conditioning_channels=(16, 32, 96))
GOALS = {"s_per_step": 1.1, "loop_s_per_50_steps": 55.0, "loop_overhead": 1.02}


def reduced_config(config):
    """``config`` with the reduced model of :data:`REDUCED` (a copy)."""
    c = config.copy_and_resolve_references()
    r = REDUCED
    c.model.unet.update(channels=r["unet_channels"], num_res_blocks=r["num_res_blocks"],
                        attention_levels=r["attention_levels"],
                        num_head_channels=r["num_head_channels"],
                        norm_num_groups=r["norm_num_groups"])
    c.model.ae.update(channels=r["ae_channels"], latent_channels=r["latent_channels"],
                      attention_levels=(False,) * len(r["ae_channels"]),
                      norm_num_groups=32)
    c.model.controlnet.conditioning_embedding_num_channels = r["conditioning_channels"]
    c.ldm.conditioning = "none"  # the goals are stated for the ControlNet design
    factor = 2 ** (len(r["ae_channels"]) - 1)
    c.data.patch = (r["latent_size"] * factor,) * 3
    return c


def random_params(abstract: Any, seed: int) -> Any:
    """Parameters shaped like ``abstract``: kernels ``N(0, 1/fan_in)``, biases 0, norm
    scales 1 (numpy, so nothing is compiled)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key) if path else ""
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def bench_model(config, label: str, steps: int, batch: int, sampler: str,
                call_repeats: int = 5, loop_repeats: int = 1, loop_warmup: int = 0,
                decode: bool = False,
                matmul_peak: float = float("nan")) -> dict:
    """Measures one model size; returns (and prints) its JSON record."""
    concat = common.is_concat(config)
    unet = common.build_unet(config)
    mr_shape = (batch, *(int(s) for s in config.data.patch), 1)
    z_shape = common.latent_shape(config, mr_shape)
    key = jax.random.key(0)
    z_abs = jax.ShapeDtypeStruct(z_shape, jnp.float32)
    t_abs = jax.ShapeDtypeStruct((batch,), jnp.int32)
    mr_abs = jax.ShapeDtypeStruct(mr_shape, jnp.float32)
    rng = np.random.default_rng(2)
    mr = jnp.asarray(rng.uniform(-1, 1, mr_shape).astype(np.float32))
    x = jnp.asarray(rng.standard_normal(z_shape, np.float32))
    t = jnp.full((batch,), 500, jnp.int32)
    sample_rng = jax.random.key_data(jax.random.key(1))
    if concat:
        # The UNet sees the MR on the latent grid at every step: no ControlNet, nothing
        # to embed beforehand (``cn_params`` stays an empty tree).
        unet_params = random_params(
            jax.eval_shape(unet.init, key, z_abs, t_abs, mr_abs)["params"], 0)
        cn_params = {}
        embed_s, embed_compile, embedded = 0.0, 0.0, mr

        def make_denoiser(up, cp, emb):
            del cp
            return common.concat_denoiser(config, up, emb)
    else:
        controlnet = common.build_controlnet(config)
        unet_params = random_params(jax.eval_shape(unet.init, key, z_abs, t_abs)["params"], 0)
        cn_params = random_params(
            jax.eval_shape(controlnet.init, key, z_abs, t_abs, mr_abs)["params"], 1)
        embed = lambda p, m: embed_conditioning(controlnet, p, m)  # noqa: E731
        embed_c, embed_compile = timing.compile_timed(embed, cn_params, mr)
        embed_s, _ = timing.median_seconds(lambda: embed_c(cn_params, mr), 1, warmup=0)
        embedded = embed_c(cn_params, mr)

        def make_denoiser(up, cp, emb):
            return common.controlnet_denoiser(config, up, cp, emb)

    def call(up, cp, emb, x_t, t_):
        return make_denoiser(up, cp, emb)(x_t, t_)

    call_c, call_compile = timing.compile_timed(call, unet_params, cn_params, embedded, x, t)
    call_s, call_all, call_cpu = timing.median_wall_and_cpu(
        lambda: call_c(unet_params, cn_params, embedded, x, t), call_repeats, warmup=1)
    flops = timing.cost_analysis_flops(call_c)

    def loop(up, cp, emb, key_):
        return common.sample_latents(config, make_denoiser(up, cp, emb), z_shape, key_,
                                     num_steps=steps, sampler=sampler)

    loop_c, loop_compile = timing.compile_timed(loop, unet_params, cn_params, embedded,
                                                sample_rng)
    loop_s, loop_all, loop_cpu = timing.median_wall_and_cpu(
        lambda: loop_c(unet_params, cn_params, embedded, sample_rng), loop_repeats,
        warmup=loop_warmup)

    record = {
        "benchmark": "ldm_sampling", "model": label, "sampler": sampler, "steps": steps,
        "conditioning": "concat" if concat else "controlnet",
        "batch": batch, "latent_shape": list(z_shape[1:]), "mr_shape": list(mr_shape[1:-1]),
        "unet_channels": list(config.model.unet.channels),
        "num_res_blocks": config.model.unet.num_res_blocks,
        "attention_levels": list(config.model.unet.attention_levels),
        **timing.run_settings(config), "device": timing.device_info(),
        "backend": jax.default_backend(),
        "conv_impl": config.model.conv_impl,
        "flops_per_step": flops,
        "call_s": round(call_s, 4), "call_s_all": [round(v, 4) for v in call_all],
        "loop_s": round(loop_s, 3), "loop_s_all": [round(v, 3) for v in loop_all],
        "s_per_step": round(loop_s / steps, 4),
        "loop_overhead": round(loop_s / (steps * call_s), 4),
        "embed_s": round(embed_s, 3),
        # CPU seconds of this process: on a loaded machine cpu_s / cores estimates the
        # wall time on an idle one.
        "call_cpu_s": round(call_cpu, 4), "loop_cpu_s": round(loop_cpu, 3),
        "cores": os.cpu_count(),
        "s_per_volume": round((loop_s + embed_s) / batch, 3),
        "volumes_per_s": round(batch / (loop_s + embed_s), 5),
        "gflops": round(flops / (loop_s / steps) / 1e9, 2),
        "matmul_peak_gflops": round(matmul_peak, 1),
        "pct_of_peak": round(100.0 * flops / (loop_s / steps) / 1e9 / matmul_peak, 1),
        "compile_s": {"loop": round(loop_compile, 2), "call": round(call_compile, 2),
                      "embed": round(embed_compile, 2)},
    }
    if decode:
        ae = common.build_autoencoder(config)
        img_abs = jax.ShapeDtypeStruct(mr_shape, jnp.float32)
        ae_params = random_params(jax.eval_shape(ae.init, key, img_abs, key)["params"], 3)
        z0 = loop_c(unet_params, cn_params, embedded, sample_rng)
        dec = lambda p, z: common.decode_latent(config, p, z)  # noqa: E731
        dec_c, dec_compile = timing.compile_timed(dec, ae_params, z0)
        record["decode_s"], _ = timing.median_seconds(lambda: dec_c(ae_params, z0), 1, 0)
        record["compile_s"]["decode"] = round(dec_compile, 2)
        record["s_per_volume"] = round((loop_s + embed_s + record["decode_s"]) / batch, 3)
        record["volumes_per_s"] = round(1.0 / record["s_per_volume"], 5)
    if label == "reduced" and batch == 1:
        record["goals"] = {
            **GOALS,
            "meets_s_per_step": record["s_per_step"] <= GOALS["s_per_step"],
            "meets_loop_s": loop_s * 50.0 / steps <= GOALS["loop_s_per_50_steps"],
            "meets_loop_overhead": record["loop_overhead"] <= GOALS["loop_overhead"]}
    record["peak_rss_mb"] = round(timing.peak_rss_mb(), 1)
    record["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ldm_brain.py",
                        help="config file[:variants] (its model is the 'configured' one)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--batch", type=int, default=1, help="volumes sampled together")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddim")
    parser.add_argument("--dtype", help="config.model.dtype (default: the config's)")
    parser.add_argument("--models", default="configured,reduced",
                        help="comma-separated: configured, reduced")
    parser.add_argument("--call-repeats", type=int, default=5,
                        help="timed single calls (median)")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed sampling loops")
    parser.add_argument("--loop-warmup", type=int, default=0,
                        help="untimed loops first (the first call of a program costs "
                             "~0.2 s more on a CPU: negligible against a 50-step loop)")
    parser.add_argument("--decode", action="store_true", help="also time the AE decoder")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"configured", "reduced"})
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; use configured and/or reduced")
    config = load_config_file(args.config)
    if args.dtype is not None:
        if "dtype" not in config.model:
            parser.error(f"{args.config}: config.model has no 'dtype'")
        config.model.dtype = args.dtype
    peak = timing.matmul_peak_gflops()
    out = []
    for label in models:
        cfg = config if label == "configured" else reduced_config(config)
        out.append(bench_model(cfg, label, args.steps, args.batch, args.sampler,
                               call_repeats=args.call_repeats,
                               loop_repeats=args.loop_repeats,
                               loop_warmup=args.loop_warmup, decode=args.decode,
                               matmul_peak=peak))
    return out


if __name__ == "__main__":
    main()
