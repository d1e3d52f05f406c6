"""Dimension-generic building blocks: convolutions, padding and normalisation.

Every layer reads its dimensionality from the input rank: ``x`` is ``(B, *spatial, C)``
with one, two or three spatial axes, so the same model code builds a 2D slice network
and a 3D patch network. Convolutions go through :mod:`sct_jax.models.conv_lowering`
(the one place that talks to ``lax``), so a faster lowering can be swapped in per backend
without touching a model.

Conventions follow PyTorch where the reference implementations are PyTorch: symmetric
integer padding, ``ConvTransposeNd`` output sizes, biased variance in the norms,
``eps = 1e-5``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.models import conv_lowering

IntOrSeq = Union[int, Sequence[int]]
# An int, one int per axis (symmetric), one (low, high) pair per axis, "SAME" or "VALID".
PaddingLike = Union[int, str, Sequence[int], Sequence[tuple[int, int]]]
Initializer = Callable[..., jax.Array]

NORM_KINDS = ("instance", "batch", "none")

# config.model.dtype -> the compute dtype of convolutions and matmuls. Parameters and
# optimizer state stay float32 whatever it is; norm statistics, softmax, model outputs
# (hence the losses) and the diffusion scheduler run in float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# config.model.remat: "none", "blocks" (nn.remat of every residual / U-Net block, saving
# only its inputs) or one of these jax.checkpoint_policies, which choose what a block
# saves for the backward pass instead of recomputing it.
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")
REMAT_CHOICES = ("none", "blocks") + REMAT_POLICIES


def normal_init(stddev: float, mean: float = 0.0) -> Initializer:
    """Initialiser drawing i.i.d. N(mean, stddev**2), sampled flat and then reshaped.

    Same distribution as ``nn.initializers.normal``; flat because XLA:CPU compiles the
    threefry sampler for a rank-4/5 shape several times slower than for a 1D one
    (seconds per kernel shape with jax 0.10), which dominated model init in tests.
    """
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        size = math.prod(shape)
        return mean + stddev * jax.random.normal(key, (size,), dtype).reshape(shape)
    return init


# pix2pix/pGAN initialise every conv weight from N(0, 0.02) and every bias to 0.
DEFAULT_KERNEL_INIT = normal_init(0.02)


def _spatial_dims(x: jax.Array) -> int:
    nd = x.ndim - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"expected input (B, *spatial, C) with 1-3 spatial axes, "
                         f"got shape {x.shape}")
    return nd


def _per_axis(value: IntOrSeq, nd: int, what: str) -> tuple[int, ...]:
    """Expands an int to one value per spatial axis and checks a sequence's length."""
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(int(v) for v in value)
    if len(value) != nd:
        raise ValueError(f"{what} {value} has {len(value)} entries for {nd} spatial axes")
    return value


def conv_padding(padding: PaddingLike, kernel_size: Sequence[int]) -> list[tuple[int, int]]:
    """Explicit ``(low, high)`` zero padding per spatial axis.

    Args:
      padding: an int (the same symmetric padding on every axis, as PyTorch's
        ``padding=p``), one int per axis, one ``(low, high)`` pair per axis, ``"VALID"``
        (no padding) or ``"SAME"`` (``k - 1`` in total, the extra one on the high side as
        PyTorch's ``padding="same"``; symmetric for odd kernels).
      kernel_size: one kernel size per spatial axis.

    Returns:
      One ``(low, high)`` pair per spatial axis.
    """
    nd = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return [(0, 0)] * nd
        if mode == "SAME":
            return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size]
        raise ValueError(f"unknown padding {padding!r}; expected an int, 'SAME' or 'VALID'")
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    padding = list(padding)
    if len(padding) != nd:
        raise ValueError(f"padding {padding} has {len(padding)} entries for {nd} axes")
    return [(int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))
            for p in padding]


class Conv(nn.Module):
    """N-d convolution (cross-correlation), channels last, like ``torch.nn.ConvNd``.

    Attributes:
      features: output channels ``C_out``.
      kernel_size: an int or one size per spatial axis.
      strides: an int or one stride per spatial axis.
      padding: see :func:`conv_padding`; default 0 as PyTorch.
      use_bias: add a learned bias (drop it before a batch norm, which removes it).
      kernel_init: initialiser of ``kernel`` ``(*k, C_in, C_out)``; N(0, 0.02).
      bias_init: initialiser of ``bias`` ``(C_out,)``; zeros.
      conv_impl: lowering, see :data:`conv_lowering.IMPLS`.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
        ``None`` infers it from the input and parameters.
    """

    features: int
    kernel_size: IntOrSeq
    strides: IntOrSeq = 1
    padding: PaddingLike = 0
    use_bias: bool = True
    kernel_init: Initializer = DEFAULT_KERNEL_INIT
    bias_init: Initializer = nn.initializers.zeros
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves ``x``.

        Args:
          x: ``(B, *spatial, C_in)``.

        Returns:
          ``(B, *spatial_out, C_out)``, ``out = (in + low + high - k) // stride + 1``.
        """
        nd = _spatial_dims(x)
        ks = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        pads = conv_padding(self.padding, ks)
        kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.features))
        bias = (self.param("bias", self.bias_init, (self.features,))
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_lowering.conv(x, kernel, strides, pads, impl=self.conv_impl)
        if bias is not None:
            y = y + bias
        return y


class ConvTranspose(nn.Module):
    """N-d transposed convolution with PyTorch's ``ConvTransposeNd`` output size.

    Attributes:
      features: output channels ``C_out``.
      kernel_size: an int or one size per spatial axis.
      strides: an int or one stride per spatial axis.
      padding: PyTorch ``padding``: an int or one int per spatial axis.
      output_padding: PyTorch ``output_padding``: an int or one int per spatial axis.
      use_bias: add a learned bias.
      kernel_init: initialiser of ``kernel`` ``(*k, C_in, C_out)``; N(0, 0.02).
      bias_init: initialiser of ``bias`` ``(C_out,)``; zeros.
      conv_impl: lowering, see :data:`conv_lowering.IMPLS`.
      dtype: computation dtype; parameters stay float32.
    """

    features: int
    kernel_size: IntOrSeq
    strides: IntOrSeq = 1
    padding: IntOrSeq = 0
    output_padding: IntOrSeq = 0
    use_bias: bool = True
    kernel_init: Initializer = DEFAULT_KERNEL_INIT
    bias_init: Initializer = nn.initializers.zeros
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the transposed convolution.

        Args:
          x: ``(B, *spatial, C_in)``.

        Returns:
          ``(B, *spatial_out, C_out)`` with
          ``out = (in - 1) * stride - 2 * padding + k + output_padding``.
        """
        nd = _spatial_dims(x)
        ks = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        padding = _per_axis(self.padding, nd, "padding")
        output_padding = _per_axis(self.output_padding, nd, "output_padding")
        kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.features))
        bias = (self.param("bias", self.bias_init, (self.features,))
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_lowering.conv_transpose(x, kernel, strides, padding, output_padding,
                                         impl=self.conv_impl)
        if bias is not None:
            y = y + bias
        return y


# config.model.gen.upsample: how a generator's decoder doubles the resolution.
# "transpose": a stride-2 transposed convolution (the reference pix2pix / ResNet decoders);
# its kernel overlaps unevenly between output voxels, which leaves a checkerboard.
# "resize": nearest-neighbour x2 then a 3^d convolution (Odena et al. 2016, "Deconvolution
# and checkerboard artifacts"): every output voxel sees the same number of taps.
UPSAMPLE_KINDS = ("transpose", "resize")


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of every spatial axis: ``(B, *s, C) -> (B, *(f s), C)``."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, factor, axis=axis)
    return x


def check_upsample(kind: str) -> str:
    """``kind`` if it is one of :data:`UPSAMPLE_KINDS`, else ConfigError."""
    if kind not in UPSAMPLE_KINDS:
        raise ConfigError(f"model.gen.upsample={kind!r}: expected one of {UPSAMPLE_KINDS}")
    return kind


def upsample2x(h: jax.Array, features: int, *, kind: str, name: str, kernel_size: int,
               padding: int, output_padding: int = 0, **conv_kwargs) -> jax.Array:
    """A decoder's x2 upsampling to ``features`` channels, by :data:`UPSAMPLE_KINDS`.

    Call it inside a module's ``nn.compact`` method: it creates one layer named ``name``
    there (so a transposed-convolution model keeps the parameter names it always had).

    Args:
      h: ``(B, *s, C_in)``.
      features: output channels.
      kind: ``"transpose"``: the transposed convolution with PyTorch's ``kernel_size``,
        ``padding`` and ``output_padding``; ``"resize"``: nearest x2, then a 3^d
        convolution with padding 1 (the three arguments are unused).
      name: the layer's name.
      **conv_kwargs: ``use_bias``, ``conv_impl``, ``dtype`` of :class:`Conv`.

    Returns:
      ``(B, *2s, features)``.
    """
    if check_upsample(kind) == "resize":
        return Conv(features, kernel_size=3, padding=1, name=name,
                    **conv_kwargs)(upsample_nearest(h))
    return ConvTranspose(features, kernel_size=kernel_size, strides=2, padding=padding,
                         output_padding=output_padding, name=name, **conv_kwargs)(h)


def reflect_pad(x: jax.Array, pad: IntOrSeq) -> jax.Array:
    """Reflection padding of the spatial axes, as ``torch.nn.ReflectionPadNd``.

    Args:
      x: ``(B, *spatial, C)``.
      pad: an int or one int per spatial axis, added on both sides; must be smaller
        than the axis size (the edge value is not repeated).

    Returns:
      ``(B, *(spatial + 2 * pad), C)``.
    """
    nd = _spatial_dims(x)
    pads = _per_axis(pad, nd, "pad")
    for size, p in zip(x.shape[1:-1], pads):
        if p >= size:
            raise ValueError(f"reflect pad {p} needs a spatial size > {p}, got {x.shape}")
    widths = [(0, 0)] + [(p, p) for p in pads] + [(0, 0)]
    return jnp.pad(x, widths, mode="reflect")


class ReflectPad(nn.Module):
    """Module form of :func:`reflect_pad` (no parameters)."""

    pad: IntOrSeq

    def __call__(self, x: jax.Array) -> jax.Array:
        return reflect_pad(x, self.pad)


class Dropout(nn.Module):
    """Inverted dropout (``torch.nn.Dropout``): zero with probability ``rate``, scale the
    rest by ``1 / (1 - rate)``; the identity when ``deterministic``.

    Same semantics as ``nn.Dropout`` (the ``"dropout"`` rng collection), but the keep
    mask is drawn flat and reshaped: XLA:CPU compiles the sampler for a 5D activation
    several seconds slower than for a 1D one (measured 6.3 s vs 0.9 s, jax 0.10).

    Attributes:
      rate: drop probability in ``[0, 1)``.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        """Applies dropout to ``x`` (any shape) -> same shape and dtype."""
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        keep_prob = 1.0 - self.rate
        key = self.make_rng("dropout")
        keep = jax.random.bernoulli(key, keep_prob, (x.size,)).reshape(x.shape)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def _normalise(x: jax.Array, axes: tuple[int, ...], epsilon: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over ``axes`` with the biased variance.

    Statistics in float32 even for bfloat16 activations (a bf16 mean of a large patch
    loses too many bits); two-pass variance, which cannot go negative.
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class InstanceNorm(nn.Module):
    """Instance normalisation, as ``torch.nn.InstanceNormNd`` without running stats.

    Per sample and per channel over the spatial axes, biased variance.

    Attributes:
      use_affine: learn a per-channel ``scale`` (ones) and ``bias`` (zeros); off, as
        pix2pix/pGAN use it.
      epsilon: added to the variance.
    """

    use_affine: bool = False
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x``: ``(B, *spatial, C)`` -> same shape."""
        nd = _spatial_dims(x)
        y = _normalise(x, tuple(range(1, nd + 1)), self.epsilon)
        if self.use_affine:
            c = x.shape[-1]
            y = (y * self.param("scale", nn.initializers.ones, (c,)).astype(y.dtype)
                 + self.param("bias", nn.initializers.zeros, (c,)).astype(y.dtype))
        return y


class BatchStatsNorm(nn.Module):
    """Batch normalisation that always uses the current batch's statistics.

    The pix2pix reference tests without ``--eval``, so its BatchNorm normalises with
    batch statistics at test time as well; running averages would never be read. Not
    keeping them also keeps the model state a pure ``params`` pytree (no mutable
    ``batch_stats`` collection to thread through the steps and the meta-gradient).

    Statistics are per channel over the batch and spatial axes. Under ``jax.jit`` with a
    batch-sharded input the mean over the batch axis is global (all devices), which is
    what a synchronised batch norm would compute: results do not depend on the number
    of devices.

    Attributes:
      epsilon: added to the variance (PyTorch's 1e-5).
      scale_init: ``scale`` ``(C,)`` initialiser; N(1, 0.02) as the reference's
        ``init_weights``.
    """

    epsilon: float = 1e-5
    scale_init: Initializer = normal_init(0.02, mean=1.0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x``: ``(B, *spatial, C)`` -> same shape."""
        nd = _spatial_dims(x)
        y = _normalise(x, tuple(range(0, nd + 1)), self.epsilon)
        c = x.shape[-1]
        return (y * self.param("scale", self.scale_init, (c,)).astype(y.dtype)
                + self.param("bias", nn.initializers.zeros, (c,)).astype(y.dtype))


def split_extra_channels(x: jax.Array, extra_channels: int) -> tuple[jax.Array, jax.Array | None]:
    """``(image, extras)``: the input's image channels (the MR or CBCT slices) and its
    last ``extra_channels`` (inputs that are no image of the input modality, e.g. the
    mean-CT prior of ``config.data.prior``; ``None`` when there are none). Calibration
    and the residual act on the image channels only.

    Raises:
      ValueError: no image channel would be left.
    """
    extra = int(extra_channels)
    if extra <= 0:
        return x, None
    if extra >= x.shape[-1]:
        raise ValueError(f"{extra} extra input channels leave no image channel in an input "
                         f"of shape {x.shape}")
    return x[..., :-extra], x[..., -extra:]


def last_layer_init(residual: bool, prior: jax.Array | None) -> dict:
    """The generator's last layer's ``kernel_init``: zeros when the output corrects
    the mean-CT prior (:func:`generator_output`), so an untrained model predicts the
    prior exactly (the evaluation's mean training CT) and the correction grows from it,
    as ControlNet's zero convolutions do; ``{}`` (the default init) otherwise."""
    if residual or prior is None:
        return {}
    return {"kernel_init": nn.initializers.zeros}


def generator_output(h: jax.Array, x: jax.Array, residual: bool,
                     prior: jax.Array | None = None) -> jax.Array:
    """A generator's last activation ``h`` -> its output in ``[-1, 1]`` (float32).

    Args:
      h: ``(B, *spatial, C_out)`` pre-activation.
      x: ``(B, *spatial, C_in)`` the generator's image input (model units).
      residual: ``False``: ``tanh(h)``. ``True``: the input's centre channel (the slice
        itself when neighbours are stacked as channels) plus ``tanh(h)``, clipped to
        ``[-1, 1]``: the network learns a correction of an input that is already an
        image of the output's kind in the output's units (a CBCT in the CT's HU
        window), and starts as the identity instead of having to learn it.
      prior: ``(B, *spatial, 1)`` the mean training CT in CT units
        (``config.data.prior``), or ``None``. Without ``residual`` the output is the
        prior plus ``tanh(h)``, clipped: the network corrects the average anatomy by
        what the MR shows, instead of having to learn to copy it through.
    """
    out = jnp.tanh(h.astype(jnp.float32))
    if residual:
        base = x[..., x.shape[-1] // 2:x.shape[-1] // 2 + 1]
    elif prior is not None:
        base = prior[..., :1]
    else:
        return out
    return jnp.clip(base.astype(jnp.float32) + out, -1.0, 1.0)


def compute_dtype(name: str | None, config_key: str = "model.dtype") -> Any:
    """The ``jnp`` dtype for a config's ``model.dtype`` string (``None``: float32).

    Raises:
      ConfigError: an unknown name.
    """
    name = "float32" if name is None else str(name)
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"{config_key}: unknown compute dtype {name!r}; expected one of "
                          f"{tuple(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def check_remat(remat: str | None, config_key: str = "model.remat") -> str:
    """Returns ``remat`` (``None``: ``"none"``) or raises :class:`ConfigError`."""
    remat = "none" if remat is None else str(remat)
    if remat not in REMAT_CHOICES:
        raise ConfigError(f"{config_key}: unknown rematerialisation {remat!r}; expected one "
                          f"of {REMAT_CHOICES}")
    return remat


def remat_block(module_cls: type, remat: str, static_argnums: tuple[int, ...] = ()) -> type:
    """``module_cls`` wrapped in ``nn.remat`` as ``remat`` asks (unchanged for ``"none"``).

    The wrapped class has the same attributes and parameter tree, so a checkpoint trained
    with one setting restores with another.

    Args:
      module_cls: a block class (a residual block, an attention block).
      remat: see :data:`REMAT_CHOICES`.
      static_argnums: ``__call__`` arguments that are Python values (``self`` is 0),
        e.g. a ``train`` flag passed positionally.

    Returns:
      A module class.
    """
    remat = check_remat(remat)
    if remat == "none":
        return module_cls
    policy = None if remat == "blocks" else getattr(jax.checkpoint_policies, remat)
    return nn.remat(module_cls, policy=policy, static_argnums=static_argnums)


def precision_kwargs(config) -> dict[str, Any]:
    """A model's ``dtype`` and ``remat`` attributes from ``config.model``.

    Missing keys (a run directory's config from before they existed) mean float32 and no
    rematerialisation.

    Raises:
      ConfigError: an unknown ``model.dtype`` or ``model.remat``.
    """
    m = config.model
    return dict(dtype=compute_dtype(m.get("dtype")), remat=check_remat(m.get("remat")))


def check_norm_kind(kind: str, config_key: str = "model.norm") -> str:
    """Returns ``kind`` or raises :class:`ConfigError` naming ``config_key``."""
    if kind not in NORM_KINDS:
        raise ConfigError(f"{config_key}: unknown normalisation {kind!r}; "
                          f"expected one of {NORM_KINDS}")
    return kind


def make_norm(kind: str, name: str | None = None) -> Callable[[jax.Array], jax.Array]:
    """The normalisation layer for a config's ``norm`` string.

    Args:
      kind: ``"instance"`` (:class:`InstanceNorm`, no affine), ``"batch"``
        (:class:`BatchStatsNorm`) or ``"none"`` (identity).
      name: the module name (inside a compact method; ``None`` lets flax number it).

    Returns:
      A callable ``(B, *spatial, C) -> (B, *spatial, C)``.

    Raises:
      ConfigError: unknown ``kind``.
    """
    check_norm_kind(kind)
    if kind == "instance":
        return InstanceNorm(name=name)
    if kind == "batch":
        return BatchStatsNorm(name=name)
    return lambda x: x


def conv_bias_before_norm(kind: str) -> bool:
    """Whether a conv followed by a ``kind`` norm gets a bias.

    As the reference: no bias before a batch norm (its own bias replaces it), a bias
    before an instance norm. With no norm we keep the bias (the reference drops it there,
    an accident of its ``use_bias = norm_layer == InstanceNorm2d`` test; nothing would
    absorb the missing bias).
    """
    return check_norm_kind(kind) != "batch"
