"""Token masking: random patch masking (MAE) and contiguous time-segment masking of spectrograms."""

import jax
import jax.numpy as jnp


def random_masking(rng: jax.Array, batch: int, num_tokens: int, ratio: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws an independent random mask per example (one key per example).

  Args:
    rng: PRNG key.
    batch: batch size B.
    num_tokens: tokens per example N.
    ratio: fraction of tokens to mask; at least one token is always kept.

  Returns:
    keep_ids: [B, n_keep] indices of the visible tokens, in the order they are fed to the encoder.
    ids_restore: [B, N] permutation such that concatenating (visible, masked) tokens and gathering
      with ids_restore recovers the original order.
    mask: [B, N] float32, 1 where the token is masked, in the original order.
  """
  n_keep = max(1, int(round(num_tokens * (1.0 - ratio))))
  keys = jax.random.split(rng, batch)
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,)))(keys)  # [B, N]
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones((batch, num_tokens), jnp.float32).at[:, :n_keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return ids_shuffle[:, :n_keep], ids_restore, mask


def segment_mask(rng: jax.Array, batch: int, grid: tuple[int, int], segment_patches: int,
                 num_segments: int) -> jax.Array:
  """Masks whole time segments (all frequency patches) of a spectrogram token grid.

  Each example gets `num_segments` segments of `segment_patches` consecutive time patches with
  uniformly drawn starts; segments may overlap.

  Args:
    rng: PRNG key.
    batch: batch size B.
    grid: (time_patches, freq_patches) of the audio tokens.
    segment_patches: segment length in time patches.
    num_segments: segments per example.

  Returns:
    [B, time_patches * freq_patches] float32, 1 where masked (row-major over (time, freq)).
  """
  time_patches, freq_patches = grid
  starts = jax.random.randint(rng, (batch, num_segments), 0, time_patches - segment_patches + 1)
  t = jnp.arange(time_patches)
  inside = (t[None, None] >= starts[..., None]) & (t[None, None] < starts[..., None] + segment_patches)
  time_mask = jnp.any(inside, axis=1).astype(jnp.float32)  # [B, time_patches]
  return jnp.repeat(time_mask, freq_patches, axis=1)
