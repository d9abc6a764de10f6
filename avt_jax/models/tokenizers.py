"""Tokenizers: video tubelets and spectrogram patches, with resizable learned position embeddings."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TubeletEmbedding(nn.Module):
  """Embeds non-overlapping spatio-temporal tubelets with a 3D convolution.

  Attributes:
    width: token width D.
    patch: tubelet size (time, height, width); default 2x16x16.
    dtype: computation dtype (parameters stay float32).
  """
  width: int
  patch: Sequence[int] = (2, 16, 16)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    """[batch, frames, height, width, 3] -> [batch, frames/t, height/h, width/w, D]."""
    patch = tuple(self.patch)
    return nn.Conv(self.width, patch, strides=patch, padding='VALID', dtype=self.dtype,
                   name='embedding')(video.astype(self.dtype))


class SpectrogramPatchEmbedding(nn.Module):
  """Embeds (possibly overlapping) patches of a 1-channel log-mel spectrogram.

  Attributes:
    width: token width D.
    patch: patch size (time frames, mel bins); default 16x16.
    stride: patch stride; defaults to `patch` (non-overlapping).
    dtype: computation dtype.
  """
  width: int
  patch: Sequence[int] = (16, 16)
  stride: Sequence[int] | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array) -> jax.Array:
    """[batch, time, mels] -> [batch, time_patches, mel_patches, D]."""
    stride = tuple(self.stride or self.patch)
    x = spectrogram[..., None].astype(self.dtype)  # [batch, time, mels, 1]
    return nn.Conv(self.width, tuple(self.patch), strides=stride, padding='VALID',
                   dtype=self.dtype, name='embedding')(x)


def token_grid(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int] | None = None
               ) -> tuple[int, ...]:
  """Patches along each axis when an input of `shape` (e.g. (frames, height, width) or (time, mels))
  is cut into `patch`-sized patches every `stride` (default: `patch`, non-overlapping), as the
  tokenizers' VALID convolutions do: (size - patch) // stride + 1 per axis."""
  stride = tuple(stride or patch)
  return tuple((s - p) // st + 1 for s, p, st in zip(shape, patch, stride))


def resize_posemb(posemb: jax.Array, grid: Sequence[int]) -> jax.Array:
  """Linearly interpolates position embeddings [1, *old_grid, D] to [1, *grid, D]."""
  grid = tuple(grid)
  if tuple(posemb.shape[1:-1]) == grid:
    return posemb
  return jax.image.resize(posemb, (1, *grid, posemb.shape[-1]), method='linear')


class PositionEmbedding(nn.Module):
  """Learned position embedding over a token grid, resized when the input grid differs.

  The parameter `posembed_input` has shape [1, *grid, D] for the grid the model was configured
  with; inputs on another grid (other clip lengths, eval resolution) use a linear interpolation.

  Attributes:
    grid: token grid the embedding is created for, e.g. (frames/t, height/h, width/w).
    init_std: standard deviation of the normal initialisation (ViT: 0.02).
  """
  grid: Sequence[int]
  init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[batch, *input_grid, D] -> [batch, prod(input_grid), D] with position embedding added."""
    width = tokens.shape[-1]
    posemb = self.param('posembed_input', nn.initializers.normal(stddev=self.init_std),
                        (1, *self.grid, width))
    posemb = resize_posemb(posemb, tokens.shape[1:-1]).astype(tokens.dtype)
    tokens = tokens + posemb
    return tokens.reshape(tokens.shape[0], -1, width)


def inflate_2d_kernel(kernel: np.ndarray, frames: int, method: str = 'central_frame') -> np.ndarray:
  """Turns a 2D patch-embedding kernel [h, w, C, D] into a tubelet kernel [t, h, w, C, D].

  Args:
    kernel: ViT image patch embedding kernel.
    frames: tubelet length t.
    method: `central_frame` puts the 2D kernel at the central time step and zeros elsewhere (the
      video model initially equals the image model applied to central frames); `average` repeats
      it divided by t.
  """
  if method == 'central_frame':
    out = np.zeros((frames, *kernel.shape), kernel.dtype)
    out[frames // 2] = kernel
    return out
  if method == 'average':
    return np.repeat(kernel[None] / frames, frames, axis=0)
  raise ValueError(f"inflate_2d_kernel: method must be 'central_frame' or 'average', got {method!r}.")


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """Cuts [batch, *spatial, C] into non-overlapping patches, in token order.

  The order matches the tokens of `TubeletEmbedding` / `SpectrogramPatchEmbedding` (non-overlapping)
  flattened row-major, so patch n is the target of token n.

  Returns:
    [batch, num_patches, prod(patch) * C]
  """
  patch = tuple(patch)
  batch, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
  grid = [s // p for s, p in zip(spatial, patch)]
  shape = [batch]
  for g, p in zip(grid, patch):
    shape += [g, p]
  x = x.reshape(*shape, channels)
  n = len(patch)
  order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
  x = x.transpose(order)
  return x.reshape(batch, int(np.prod(grid)), int(np.prod(patch)) * channels)
