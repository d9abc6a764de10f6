"""Light Transformer decoders that reconstruct masked patches (MAE-style) from encoder tokens."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avt_jax.models.options import EncoderOptions
from avt_jax.models.tokenizers import PositionEmbedding
from avt_jax.models.transformer import EncoderBlock


class MaskedDecoder(nn.Module):
  """Predicts the pixels / spectrogram values of every patch from (visible) encoder tokens.

  With `ids_restore`, the input holds only the visible tokens: learned mask tokens fill the masked
  positions and the original order is restored (MAE). Without it, the input is already the full
  token sequence (the masked audio segment decoder, whose masked positions went through the fused
  encoder as mask tokens).

  Attributes:
    width: decoder width.
    depth: number of decoder blocks.
    num_heads: attention heads.
    mlp_dim: MLP width.
    patch_dim: values per patch to predict (prod(patch) * channels).
    posemb_grid: token grid the decoder position embedding is created for.
    posemb_init_std: its initialisation's standard deviation (at 0.02 the mask tokens of all
      positions start nearly equal, and the decoder predicts the same for every masked patch).
    dtype: computation dtype.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_dim: int
  posemb_grid: Sequence[int]
  dtype: jnp.dtype = jnp.float32
  posemb_init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens: jax.Array, grid: Sequence[int], ids_restore: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Decodes tokens.

    Args:
      tokens: [batch, visible or all tokens, D_encoder], without CLS.
      grid: the input's token grid (prod(grid) = all tokens).
      ids_restore: [batch, all tokens] from `masking.random_masking`, or None.
      deterministic: disables dropout.

    Returns:
      [batch, prod(grid), patch_dim] float32 predictions in the original token order.
    """
    x = nn.Dense(self.width, dtype=self.dtype, name='decoder_embed')(tokens)
    batch = x.shape[0]
    if ids_restore is not None:
      mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02), (1, 1, self.width))
      missing = ids_restore.shape[1] - x.shape[1]
      fill = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, missing, self.width))
      x = jnp.concatenate([x, fill], axis=1)
      x = jnp.take_along_axis(x, ids_restore[..., None], axis=1)
    x = PositionEmbedding(self.posemb_grid, self.posemb_init_std, name='decoder_posembed')(x.reshape(batch, *grid, self.width))
    options = EncoderOptions(dtype=self.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, options=options,
                       name=f'decoderblock_{i}')(x, deterministic)
    x = nn.LayerNorm(dtype=self.dtype, name='decoder_norm')(x)
    # Zero-initialised (our design): the first predictions are the patch-mean baseline (0 for
    # normalised targets) instead of random values twice as far off that training first had to unlearn.
    return nn.Dense(self.patch_dim, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                    name='decoder_pred')(x).astype(jnp.float32)
