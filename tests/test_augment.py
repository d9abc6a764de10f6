"""Tests for avt_jax.input.augment: crop windows, flip, colour jitter, SpecAugment, FilterAugment,
mixup."""

import numpy as np
import pytest
import tensorflow as tf

from avt_jax.input import augment


def _seed(i: int) -> tf.Tensor:
  return augment.derive_seed(tf.constant([7, 0], tf.int64), i)


def test_derive_seed_is_deterministic_and_separates_streams():
  base = tf.constant([1, 2], tf.int64)
  np.testing.assert_array_equal(augment.derive_seed(base, 3, 4), augment.derive_seed(base, 3, 4))
  seeds = {tuple(augment.derive_seed(base, *data).numpy()) for data in [(3,), (4,), (3, 4), (4, 3)]}
  assert len(seeds) == 4


def test_fixed_scale_train_crop_is_a_square_at_random_positions():
  # Short side 24 resized to min_resize 12 -> an 8-pixel crop covers 16 stored pixels.
  windows = np.stack([
      augment.train_crop_window(_seed(i), 24, 40, image_size=8, min_resize=12,
                                area_range=(1.0, 1.0), aspect_ratio_range=(0.75, 4 / 3)).numpy()
      for i in range(40)])
  np.testing.assert_array_equal(windows[:, 2:], np.full([40, 2], 16))
  assert windows[:, 0].min() >= 0 and windows[:, 0].max() <= 24 - 16
  assert windows[:, 1].min() >= 0 and windows[:, 1].max() <= 40 - 16
  assert len(set(windows[:, 1])) > 5  # the position is random


def test_random_resized_crop_stays_inside_the_frame_with_the_requested_area():
  height, width = 60, 80
  windows = np.stack([
      augment.train_crop_window(_seed(i), height, width, image_size=8, min_resize=12,
                                area_range=(0.3, 0.6), aspect_ratio_range=(0.75, 4 / 3)).numpy()
      for i in range(60)])
  y, x, crop_h, crop_w = windows.T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + crop_h <= height).all() and (x + crop_w <= width).all()
  area = crop_h * crop_w / (height * width)
  # Sides are rounded to whole pixels; no clamping happens for these ranges.
  assert area.min() > 0.3 * 0.95 and area.max() < 0.6 * 1.05
  assert area.max() - area.min() > 0.15
  ratio = crop_w / crop_h
  assert ratio.min() > 0.75 * 0.95 and ratio.max() < 4 / 3 * 1.05


def test_eval_crop_windows_by_hand():
  # side = round(24 * 8 / 12) = 16; landscape 24x40: free width 24 -> x in {0, 12, 24};
  # y = (24 - 16) // 2.
  np.testing.assert_array_equal(
      augment.eval_crop_windows(24, 40, image_size=8, min_resize=12, num_crops=3).numpy(),
      [[4, 0, 16, 16], [4, 12, 16, 16], [4, 24, 16, 16]])
  # Portrait frames are cropped top / centre / bottom.
  np.testing.assert_array_equal(
      augment.eval_crop_windows(40, 24, image_size=8, min_resize=12, num_crops=3).numpy(),
      [[0, 4, 16, 16], [12, 4, 16, 16], [24, 4, 16, 16]])
  np.testing.assert_array_equal(
      augment.eval_crop_windows(24, 40, image_size=8, min_resize=12, num_crops=1).numpy(),
      [[4, 12, 16, 16]])
  with pytest.raises(ValueError, match='eval_crops'):
    augment.eval_crop_windows(24, 40, image_size=8, min_resize=12, num_crops=2)


def test_flip_reverses_width_of_every_frame_or_nothing():
  frames = tf.random.stateless_uniform([3, 4, 5, 3], [0, 1])
  flipped = 0
  for i in range(20):
    out = augment.flip(frames, _seed(i)).numpy()
    if np.array_equal(out, frames.numpy()[:, :, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, frames.numpy())
  assert 0 < flipped < 20


def test_color_jitter_off_is_identity():
  frames = tf.random.stateless_uniform([2, 4, 4, 3], [0, 1])
  assert augment.color_jitter(frames, _seed(0), 0.0) is frames


def _adjust_color_reference(frames: np.ndarray, brightness: float, contrast: float,
                            saturation: float) -> np.ndarray:
  """Step-by-step blends as in torchvision's ColorJitter (clipping only at the end)."""
  luma_weights = np.array([0.299, 0.587, 0.114])
  out = frames * brightness
  mean = (out @ luma_weights).mean(axis=(1, 2))[:, None, None, None]
  out = contrast * out + (1 - contrast) * mean
  luma = (out @ luma_weights)[..., None]
  out = saturation * out + (1 - saturation) * luma
  return np.clip(out, 0.0, 1.0)


@pytest.mark.parametrize('factors', [(1.0, 1.0, 1.0), (1.3, 0.7, 0.5), (0.8, 1.4, 1.2),
                                     (1.0, 0.0, 0.0)])
def test_adjust_color_matches_sequential_blends(factors):
  frames = tf.random.stateless_uniform([2, 5, 6, 3], [8, 9])
  np.testing.assert_allclose(augment.adjust_color(frames, *factors).numpy(),
                             _adjust_color_reference(frames.numpy().astype(np.float64), *factors),
                             atol=1e-5)


def test_color_jitter_on_gray_frames_is_one_brightness_factor_per_clip():
  # Contrast and saturation leave uniform gray frames unchanged, so only brightness remains.
  levels = tf.constant([0.2, 0.4, 0.6], tf.float32)
  frames = tf.tile(levels[:, None, None, None], [1, 4, 4, 3])  # [3, 4, 4, 3]
  factors = []
  for i in range(20):
    out = augment.color_jitter(frames, _seed(i), 0.4).numpy()
    ratio = out / frames.numpy()
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    factors.append(ratio.flat[0])
  assert min(factors) >= 0.6 - 1e-6 and max(factors) <= 1.4 + 1e-6
  assert max(factors) - min(factors) > 0.2


def test_color_jitter_is_deterministic_and_clipped():
  frames = tf.random.stateless_uniform([2, 6, 6, 3], [3, 4])
  first = augment.color_jitter(frames, _seed(5), 0.8).numpy()
  np.testing.assert_array_equal(first, augment.color_jitter(frames, _seed(5), 0.8).numpy())
  assert first.min() >= 0.0 and first.max() <= 1.0
  assert not np.allclose(first, frames.numpy())


def _bands(masked: np.ndarray) -> list[int]:
  """Widths of the runs of True in a 1-D bool array."""
  widths, run = [], 0
  for value in list(masked) + [False]:
    if value:
      run += 1
    elif run:
      widths.append(run)
      run = 0
  return widths


def test_spec_augment_masks_at_most_the_stated_bands():
  spectrogram = tf.ones([50, 16])
  for i in range(30):
    out = augment.spec_augment(spectrogram, _seed(i), freq_masks=2, freq_width=3, time_masks=1,
                               time_width=5).numpy()
    zero = out == 0
    freq_masked = zero.all(axis=0)  # [16]
    time_masked = zero.all(axis=1)  # [50]
    # Every zero lies in a fully masked frequency column or time row, nothing else changes.
    np.testing.assert_array_equal(zero, freq_masked[None, :] | time_masked[:, None])
    np.testing.assert_array_equal(out[~zero], 1.0)
    freq_bands, time_bands = _bands(freq_masked), _bands(time_masked)
    assert len(freq_bands) <= 2 and sum(freq_bands) <= 2 * 3
    assert len(time_bands) <= 1 and sum(time_bands) <= 5


def test_spec_augment_single_mask_widths_cover_zero_to_max():
  spectrogram = tf.ones([8, 16])
  widths = set()
  for i in range(40):
    out = augment.spec_augment(spectrogram, _seed(i), freq_masks=1, freq_width=3, time_masks=0,
                               time_width=0).numpy()
    widths.add(int((out == 0).all(axis=0).sum()))
  assert widths == {0, 1, 2, 3}


def test_spec_augment_without_masks_is_identity():
  spectrogram = tf.random.stateless_normal([10, 4], [1, 2])
  out = augment.spec_augment(spectrogram, _seed(0), freq_masks=0, freq_width=5, time_masks=0,
                             time_width=5)
  np.testing.assert_array_equal(out.numpy(), spectrogram.numpy())


def _filter_curves(bands, seeds=range(30), max_gain=2.0):
  """[seeds, n_mels] gain curves filter_augment added, and the per-frame spread of each."""
  spectrogram = tf.random.stateless_normal([6, 40], [1, 2])
  outs = [augment.filter_augment(spectrogram, _seed(i), max_gain=max_gain, bands=bands).numpy()
          - spectrogram.numpy() for i in seeds]
  return (np.stack([o[0] for o in outs]),
          max(float(np.abs(o - o[0]).max()) for o in outs))


def test_filter_augment_adds_one_bounded_piecewise_linear_curve_to_every_frame():
  curves, frame_spread = _filter_curves(bands=(3, 5))
  assert frame_spread < 1e-6  # the same filter for every frame
  assert np.abs(curves).max() <= 2.0 + 1e-6
  assert np.abs(curves).max() > 1.5  # the gains span the range
  # At most 3 inner edges; each bends the curve at most at its two neighbouring bins.
  kinks = (np.abs(np.diff(curves, 2, axis=1)) > 1e-4).sum(axis=1)
  assert kinks.max() <= 6 and kinks.max() >= 2


def test_filter_augment_with_two_edges_is_a_tilt_and_zero_gain_is_identity():
  curves, _ = _filter_curves(bands=(2, 2))
  np.testing.assert_allclose(np.diff(curves, 2, axis=1), 0.0, atol=1e-5)  # a straight line
  curves, _ = _filter_curves(bands=(3, 6), max_gain=0.0)
  np.testing.assert_array_equal(curves, 0.0)


def test_filter_augment_rejects_bad_bands():
  with pytest.raises(ValueError, match='bands'):
    augment.filter_augment(tf.zeros([4, 8]), _seed(0), max_gain=1.0, bands=(1, 3))


def test_spectrogram_stretch_off_is_identity():
  spectrogram = tf.random.stateless_normal([20, 8], [1, 2])
  out = augment.spectrogram_stretch(spectrogram, _seed(0), max_time=0.0, max_freq=0.0)
  np.testing.assert_array_equal(out.numpy(), spectrogram.numpy())


def test_spectrogram_stretch_moves_a_tone_in_proportion_and_pads_with_silence():
  # A tone in mel bins 18-22 from frame 40 to 59 on silence (-5): a stretch by factors (s_t, s_f)
  # centres it near bin 20 * s_f, lasting ~20 * s_t frames, with silence everywhere else.
  spectrogram = np.full([100, 40], -5.0, np.float32)
  spectrogram[40:60, 18:23] = 5.0
  bins, lengths = set(), set()
  for i in range(40):
    out = augment.spectrogram_stretch(tf.constant(spectrogram), _seed(i), max_time=0.3,
                                      max_freq=0.3).numpy()
    assert out.shape == (100, 40) and out.min() >= -5.0 and out.max() <= 5.0
    loud = out > 0
    peak_bins = np.unique(np.nonzero(loud)[1])
    frames = np.nonzero(loud.any(axis=1))[0]
    assert 18 * 0.7 - 1 <= peak_bins.min() and peak_bins.max() <= 22 * 1.3 + 1, peak_bins
    assert 20 * 0.7 - 2 <= len(frames) <= 20 * 1.3 + 2, frames
    assert frames.max() - frames.min() + 1 == len(frames)  # still one contiguous tone
    far = np.abs(np.arange(100)[:, None] - frames[None, :]).min(axis=1) > 1  # beyond the blur
    np.testing.assert_allclose(out[far], -5.0, atol=1e-5)  # silence around it
    bins.add(int(np.round(np.average(np.nonzero(loud)[1]))))
    lengths.add(len(frames))
  assert len(bins) >= 5 and len(lengths) >= 5  # the factors really vary


def test_spectrogram_stretch_rejects_factors_outside_zero_one():
  with pytest.raises(ValueError, match='must be in \\[0, 1\\)'):
    augment.spectrogram_stretch(tf.zeros([10, 4]), _seed(0), max_time=1.0, max_freq=0.0)


def test_mixup_mixes_inputs_and_labels_with_one_lambda():
  batch = {
      'video': tf.constant(np.arange(3 * 2, dtype=np.float32).reshape(3, 2)),
      'audio': tf.constant([[10.0], [20.0], [40.0]]),
      'labels/class': tf.constant(np.eye(3, dtype=np.float32)),
      'mask': tf.ones([3]),
  }
  out, lam = augment.mixup(batch, _seed(0), 0.5, ['video', 'audio', 'labels/class'])
  lam = float(lam)
  assert 0.0 < lam < 1.0
  # Example i is mixed with example i - 1 (cyclic).
  np.testing.assert_allclose(out['audio'].numpy()[:, 0],
                             [lam * 10 + (1 - lam) * 40, lam * 20 + (1 - lam) * 10,
                              lam * 40 + (1 - lam) * 20], rtol=1e-6)
  np.testing.assert_allclose(out['video'].numpy()[1],
                             lam * np.array([2, 3]) + (1 - lam) * np.array([0, 1]), rtol=1e-6)
  np.testing.assert_allclose(out['labels/class'].numpy()[0], [lam, 0, 1 - lam], rtol=1e-6)
  np.testing.assert_array_equal(out['mask'].numpy(), batch['mask'].numpy())


def test_mixup_lambda_follows_the_beta_distribution():
  batch = {'x': tf.zeros([2, 1])}
  lams = np.array([float(augment.mixup(batch, _seed(i), 1.0, ['x'])[1]) for i in range(200)])
  # Beta(1, 1) is uniform on [0, 1]: mean 1/2, variance 1/12.
  assert abs(lams.mean() - 0.5) < 0.06
  assert abs(lams.var() - 1 / 12) < 0.02
