"""Tests for avt_jax.models.masking: random patch masking and spectrogram time-segment masking."""

import jax
import numpy as np
import pytest

from avt_jax.models import masking

# Jitted once per shape (much cheaper on CPU than op-by-op execution).
random_masking = jax.jit(masking.random_masking, static_argnums=(1, 2, 3))
segment_mask = jax.jit(masking.segment_mask, static_argnums=(1, 2, 3, 4))


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
  """(start, length) of the maximal runs of ones in a 1D 0/1 array."""
  padded = np.concatenate([[0], row.astype(int), [0]])
  edges = np.flatnonzero(np.diff(padded))
  return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize('num_tokens,ratio,expected_keep', [
    (16, 0.75, 4), (8, 0.0, 8), (5, 0.99, 1)])
def test_random_masking_keeps_the_requested_number_of_tokens(num_tokens, ratio, expected_keep):
  keep, restore, mask = (np.asarray(a) for a in random_masking(
      jax.random.key(0), 6, num_tokens, ratio))
  assert keep.shape == (6, expected_keep)
  assert restore.shape == mask.shape == (6, num_tokens)
  np.testing.assert_array_equal(mask.sum(axis=1), num_tokens - expected_keep)
  for b in range(6):
    assert len(set(keep[b])) == expected_keep
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(keep[b]))
    np.testing.assert_array_equal(np.sort(restore[b]), np.arange(num_tokens))


def test_ids_restore_puts_visible_tokens_back_in_their_original_place():
  batch, num_tokens, width = 6, 16, 3
  keep, restore, mask = (np.asarray(a) for a in random_masking(
      jax.random.key(1), batch, num_tokens, 0.75))
  x = np.random.default_rng(0).normal(size=(batch, num_tokens, width))
  visible = np.take_along_axis(x, keep[..., None], axis=1)
  filler = np.full((batch, num_tokens - keep.shape[1], width), np.nan)  # e.g. mask tokens
  restored = np.take_along_axis(np.concatenate([visible, filler], axis=1), restore[..., None], axis=1)
  np.testing.assert_array_equal(restored[mask == 0], x[mask == 0])
  assert np.all(np.isnan(restored[mask == 1]))


def test_random_masks_differ_per_example_and_repeat_with_the_same_key():
  first = np.asarray(random_masking(jax.random.key(2), 6, 16, 0.75)[2])
  again = np.asarray(random_masking(jax.random.key(2), 6, 16, 0.75)[2])
  other = np.asarray(random_masking(jax.random.key(3), 6, 16, 0.75)[2])
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert len({row.tobytes() for row in first}) == 6


def test_every_position_is_masked_equally_often():
  mask = np.asarray(random_masking(jax.random.key(4), 2000, 8, 0.75)[2])
  np.testing.assert_allclose(mask.mean(axis=0), 0.75, atol=0.04)


def test_segment_mask_covers_every_frequency_of_one_segment():
  time_patches, freq_patches, length = 10, 3, 4
  mask = np.asarray(segment_mask(jax.random.key(5), 500, (time_patches, freq_patches),
                                         length, 1))
  assert mask.shape == (500, time_patches * freq_patches)
  grid = mask.reshape(500, time_patches, freq_patches)
  np.testing.assert_array_equal(grid, np.repeat(grid[..., :1], freq_patches, axis=-1))
  starts = []
  for row in grid[..., 0]:
    runs = _runs(row)
    assert len(runs) == 1 and runs[0][1] == length
    starts.append(runs[0][0])
  np.testing.assert_array_equal(np.unique(starts), np.arange(time_patches - length + 1))


def test_several_segments_are_a_union_of_segments_of_the_configured_length():
  time_patches, length, count = 20, 3, 3
  mask = np.asarray(segment_mask(jax.random.key(6), 200, (time_patches, 2), length, count))
  time_mask = mask.reshape(200, time_patches, 2)[..., 0]
  for row in time_mask:
    runs = _runs(row)
    assert 1 <= len(runs) <= count
    assert all(run_length >= length for _, run_length in runs)
    assert length <= row.sum() <= count * length
  assert np.any(time_mask.sum(axis=1) == count * length)  # disjoint segments happen


def test_segment_as_long_as_the_clip_masks_everything():
  mask = np.asarray(segment_mask(jax.random.key(7), 3, (4, 2), 4, 2))
  np.testing.assert_array_equal(mask, np.ones((3, 8)))
