"""The PatchGAN discriminator (pix2pix ``basic`` / ``n_layers``), 2D or 3D.

As the reference ``NLayerDiscriminator`` (junyanz/pytorch-CycleGAN-and-pix2pix), all
kernels 4, padding 1, LeakyReLU(0.2)::

  Conv ndf s2 (bias, no norm) -> LReLU
  n = 1..n_layers-1:  Conv ndf*min(2**n, 8) s2 -> norm -> LReLU
  Conv ndf*min(2**n_layers, 8) s1 -> norm -> LReLU
  Conv 1 s1 (bias)                               -> logits

``n_layers=3`` gives C64-C128-C256-C512-C1 and a 70 x 70 receptive field. Conditional
use: the caller concatenates (MR, CT) on the channel axis. Convs before a norm get a
bias only when the norm is not a batch norm (as the reference).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sct_jax.models.layers import Conv, conv_bias_before_norm, make_norm


def patchgan_receptive_field(n_layers: int) -> int:
    """Receptive field (pixels per axis) of one logit of :class:`PatchDiscriminator`.

    Walks back from the last layer: a k4 conv adds ``3 * jump`` where ``jump`` is the
    product of the strides of the layers before it.
    """
    strides = [2] * n_layers + [1, 1]
    field, jump = 1, 1
    for s in strides:
        field += 3 * jump
        jump *= s
    return field


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per overlapping input patch.

    Attributes:
      ndf: channels of the first conv.
      n_layers: stride-2 convs (3: the 70 x 70 PatchGAN).
      norm: ``"instance"``, ``"batch"`` or ``"none"``.
      conv_impl: convolution lowering, see :mod:`sct_jax.models.conv_lowering`.
      dtype: computation dtype (``None``: from the input and parameters).
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "instance"
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Scores ``x``.

        Args:
          x: ``(B, *spatial, C)`` with 1-3 spatial axes, e.g. concat(MR, CT).

        Returns:
          Logits ``(B, *patch_grid, 1)``; for 256^2 input and ``n_layers=3``, 30^2.
        """
        conv_bias = conv_bias_before_norm(self.norm)
        conv_kw = dict(kernel_size=4, padding=1, conv_impl=self.conv_impl,
                       dtype=self.dtype)
        h = Conv(self.ndf, strides=2, use_bias=True, name="conv_0", **conv_kw)(x)
        h = nn.leaky_relu(h, negative_slope=0.2)
        for n in range(1, self.n_layers + 1):
            # The last of these keeps the resolution (stride 1), as the reference.
            stride = 2 if n < self.n_layers else 1
            h = Conv(self.ndf * min(2 ** n, 8), strides=stride, use_bias=conv_bias,
                     name=f"conv_{n}", **conv_kw)(h)
            h = make_norm(self.norm, name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, negative_slope=0.2)
        # float32 logits: the GAN losses are computed in float32 whatever the dtype.
        return Conv(1, strides=1, use_bias=True, name="logits", **conv_kw)(h).astype(
            jnp.float32)
