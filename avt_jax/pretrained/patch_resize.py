"""Resampling a patch-embedding kernel to another patch size: FlexiViT's pseudo-inverse resize.

Source: Beyer et al., "FlexiViT: One Model for All Patch Sizes", CVPR 2023, section 3.4. Let a patch
x of p = (p_h, p_w) pixels be resized (bilinearly, per channel) to B x of q = (q_h, q_w) pixels, B a
[q_h q_w, p_h p_w] matrix. The kernel w_hat = pinv(B^T) w makes the new tokens equal the old ones on
resized patches, <B x, w_hat> = <x, w> for every x, whenever B has full column rank: any upsampling
(q >= p on both axes), e.g. a DINOv2 14x14 kernel for 16x16 patches. For downsampling it is the
least-squares solution (the exact one does not exist). Constant patches map to constant patches, so
a folded input normalisation (see `mapping.fold_pixel_normalization`) stays exact as well.
"""

import functools
import math

import jax
import numpy as np


@functools.lru_cache(maxsize=16)
def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  """B [prod(new), prod(old)] float64: column i is basis patch i resized with jax.image.resize
  ('bilinear', as applied to images), both patches flattened row-major."""
  n = math.prod(old)
  basis = np.eye(n, dtype=np.float32).reshape(n, *old)
  resized = jax.image.resize(basis, (n, *new), method='bilinear')
  return np.asarray(resized, np.float64).reshape(n, -1).T


def resample_kernel(kernel: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
  """A patch kernel [..., h, w, C, D] (2D [h, w, C, D], tubelet [t, h, w, C, D]) -> [..., *patch, C, D].

  Each leading (time) step, input channel and output feature is resampled alike, in float64.
  """
  old = tuple(kernel.shape[-4:-2])
  patch = tuple(patch)
  if old == patch:
    return kernel
  pinv = np.linalg.pinv(resize_matrix(old, patch).T)  # [prod(patch), prod(old)]
  lead, tail = kernel.shape[:-4], kernel.shape[-2:]
  flat = np.moveaxis(kernel.astype(np.float64).reshape(*lead, math.prod(old), *tail), -3, 0)
  out = np.tensordot(pinv, flat, axes=1)  # [prod(patch), *lead, C, D]
  return np.moveaxis(out, 0, -3).reshape(*lead, *patch, *tail).astype(kernel.dtype)


def describe(old: tuple[int, int], new: tuple[int, int]) -> str:
  """The report's note for a resampled kernel."""
  exact = all(n >= o for o, n in zip(old, new))
  return (f'patch {old[0]}x{old[1]} -> {new[0]}x{new[1]} (FlexiViT pseudo-inverse resize, '
          + ('exact on bilinearly resized patches)' if exact else 'least squares: downsampling)'))
