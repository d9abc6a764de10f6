"""Per-clip and per-batch augmentations for the tf.data pipeline.

Every random choice uses stateless TF random ops with an explicit `seed` (an int64 tensor of
shape [2]), so a clip's augmentation is a pure function of the seed the pipeline derives from
(run seed, example counter). This is what makes the input pipeline deterministic and resumable.

Spatial crops are expressed as windows `[y, x, height, width]` in the coordinates of the stored
frames, so the caller can decode only the window (`tf.io.decode_and_crop_jpeg`) and resize it once.

Contents:
  derive_seed         fold integers into a seed.
  train_crop_window   random resized crop, or a random square crop at a fixed scale.
  eval_crop_windows   centre crop, or left/centre/right crops along the long side.
  flip                random horizontal flip of a clip.
  adjust_color        brightness/contrast/saturation by given factors.
  color_jitter        random brightness/contrast/saturation of a clip.
  spec_augment        frequency and time masks on a spectrogram.
  spectrogram_stretch random speed (time) and vocal-tract-length (frequency) stretch of a spectrogram.
  filter_augment      a random smooth gain curve over the mel axis (an unseen microphone, room or
                      instrument maker).
  mixup               batch-level mixup of video, audio and labels with one lambda.
"""

import math
from typing import Mapping, Sequence

import tensorflow as tf

# ITU-R BT.601 luma weights (sum to 1), used for the contrast mean and the saturation blend.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def derive_seed(seed: tf.Tensor, *data: int | tf.Tensor) -> tf.Tensor:
  """Folds each of `data` (ints or int64 scalars) into `seed` ([2] int64); returns a new seed."""
  seed = tf.cast(seed, tf.int64)
  for value in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
  return seed


def _uniform_int(seed: tf.Tensor, max_inclusive: tf.Tensor) -> tf.Tensor:
  """Uniform int32 in [0, max_inclusive]."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=max_inclusive + 1, dtype=tf.int32)


def train_crop_window(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, *, image_size: int,
                      min_resize: int, area_range: Sequence[float],
                      aspect_ratio_range: Sequence[float]) -> tf.Tensor:
  """Samples one training crop window for a whole clip.

  With `area_range == (1, 1)` the random resized crop is off and the window is the square that a
  `image_size` crop covers after resizing the short side to `min_resize`, at a random position
  (the classic resize-then-random-crop). Otherwise it is an Inception-style random resized crop:
  area fraction uniform in `area_range`, aspect ratio (width / height) log-uniform in
  `aspect_ratio_range`, sides clamped to the frame, position uniform. One draw, no retries.

  Args:
    seed: [2] int64.
    height: stored frame height (int32 scalar).
    width: stored frame width (int32 scalar).
    image_size: output side in pixels.
    min_resize: short side the frame is resized to before a fixed-scale crop.
    area_range: (min, max) fraction of the frame area.
    aspect_ratio_range: (min, max) width / height of the crop.

  Returns:
    [4] int32 window `[y, x, crop_height, crop_width]`.
  """
  seed_size, seed_y, seed_x = (derive_seed(seed, i) for i in range(3))
  if tuple(area_range) == (1.0, 1.0):
    side = _fixed_scale_side(height, width, image_size, min_resize)
    crop_h, crop_w = side, side
  else:
    area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
        [], seed_size, minval=area_range[0], maxval=area_range[1])
    log_ratio = tf.random.stateless_uniform(
        [], derive_seed(seed_size, 1), minval=math.log(aspect_ratio_range[0]),
        maxval=math.log(aspect_ratio_range[1]))
    ratio = tf.exp(log_ratio)
    crop_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, width)
    crop_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, height)
  y = _uniform_int(seed_y, height - crop_h)
  x = _uniform_int(seed_x, width - crop_w)
  return tf.stack([y, x, crop_h, crop_w])


def _fixed_scale_side(height: tf.Tensor, width: tf.Tensor, image_size: int,
                      min_resize: int) -> tf.Tensor:
  """Stored-pixel side of an `image_size` crop after resizing the short side to `min_resize`."""
  short = tf.minimum(height, width)
  side = tf.cast(tf.round(tf.cast(short, tf.float32) * (image_size / min_resize)), tf.int32)
  return tf.clip_by_value(side, 1, short)


def eval_crop_windows(height: tf.Tensor, width: tf.Tensor, *, image_size: int, min_resize: int,
                      num_crops: int) -> tf.Tensor:
  """Deterministic evaluation crops at the fixed scale of `train_crop_window` without jitter.

  Args:
    height: stored frame height (int32 scalar).
    width: stored frame width (int32 scalar).
    image_size: output side in pixels.
    min_resize: short side the frame is resized to before cropping.
    num_crops: 1 (centre) or 3 (start/centre/end along the long side, i.e. left/centre/right for
      landscape frames, top/centre/bottom for portrait ones; centred on the short side).

  Returns:
    [num_crops, 4] int32 windows `[y, x, crop_height, crop_width]`.
  """
  if num_crops not in (1, 3):
    raise ValueError(f'config.input.eval_crops must be 1 or 3, got {num_crops}.')
  side = _fixed_scale_side(height, width, image_size, min_resize)
  long_is_width = width >= height
  long_free = tf.where(long_is_width, width, height) - side
  short_offset = (tf.where(long_is_width, height, width) - side) // 2
  if num_crops == 1:
    long_offsets = [long_free // 2]
  else:
    long_offsets = [tf.zeros_like(long_free), long_free // 2, long_free]
  windows = []
  for long_offset in long_offsets:
    y = tf.where(long_is_width, short_offset, long_offset)
    x = tf.where(long_is_width, long_offset, short_offset)
    windows.append(tf.stack([y, x, side, side]))
  return tf.stack(windows)


def flip(frames: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Flips every frame of `frames` [T, H, W, C] horizontally with probability 1/2."""
  do_flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(do_flip, lambda: tf.reverse(frames, axis=[-2]), lambda: frames)


def adjust_color(frames: tf.Tensor, brightness: tf.Tensor, contrast: tf.Tensor,
                 saturation: tf.Tensor) -> tf.Tensor:
  """Brightness, then contrast, then saturation adjustment (torchvision `ColorJitter` semantics).

  Brightness scales the pixels; contrast blends each frame with its mean luma; saturation blends
  each pixel with its luma; the result is clipped to [0, 1] once at the end. The three steps are
  linear, so they are computed in one fused expression (with luma weights summing to 1):
  `out = b * (s * c * x + (1 - s) * c * luma(x) + (1 - c) * mean_luma(x))`.

  Args:
    frames: [T, H, W, 3] float32 in [0, 1].
    brightness: scalar factor b (1 = unchanged).
    contrast: scalar factor c (1 = unchanged, 0 = flat gray).
    saturation: scalar factor s (1 = unchanged, 0 = grayscale).

  Returns:
    [T, H, W, 3] float32 in [0, 1].
  """
  weights = tf.constant(_LUMA_WEIGHTS, frames.dtype)[:, None]  # [3, 1]
  luma = tf.tensordot(frames, weights, [[-1], [0]])  # [T, H, W, 1]
  mean_luma = tf.reduce_mean(luma, axis=[-3, -2, -1], keepdims=True)  # [T, 1, 1, 1]
  per_pixel = (brightness * (1.0 - saturation) * contrast) * luma + (
      brightness * (1.0 - contrast)) * mean_luma  # [T, H, W, 1]
  return tf.clip_by_value((brightness * saturation * contrast) * frames + per_pixel, 0.0, 1.0)


def color_jitter(frames: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
  """Random brightness, contrast and saturation (`adjust_color`), the same for the whole clip.

  Each factor is uniform in [max(0, 1 - strength), 1 + strength].

  Args:
    frames: [T, H, W, 3] float32 in [0, 1].
    seed: [2] int64.
    strength: jitter strength; 0 returns `frames` unchanged.

  Returns:
    [T, H, W, 3] float32 in [0, 1].
  """
  if strength == 0:
    return frames
  brightness, contrast, saturation = tf.unstack(tf.random.stateless_uniform(
      [3], seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength))
  return adjust_color(frames, brightness, contrast, saturation)


def _band_mask(seed: tf.Tensor, size: int, num_masks: int, max_width: int) -> tf.Tensor:
  """[size] bool: True inside `num_masks` random bands of width uniform in [0, max_width]."""
  widths = tf.random.stateless_uniform([num_masks], derive_seed(seed, 0), minval=0,
                                       maxval=min(max_width, size) + 1, dtype=tf.int32)
  fractions = tf.random.stateless_uniform([num_masks], derive_seed(seed, 1))
  # Uniform in [0, size - width].
  starts = tf.cast(fractions * tf.cast(size - widths + 1, tf.float32), tf.int32)
  positions = tf.range(size)[:, None]  # [size, 1]
  inside = (positions >= starts) & (positions < starts + widths)  # [size, masks]
  return tf.reduce_any(inside, axis=1)


def spec_augment(spectrogram: tf.Tensor, seed: tf.Tensor, *, freq_masks: int, freq_width: int,
                 time_masks: int, time_width: int, mask_value: float = 0.0) -> tf.Tensor:
  """SpecAugment frequency and time masking (no time warping).

  Each mask covers a band of width uniform in [0, max width] (so up to `freq_masks` frequency
  bands and `time_masks` time bands; bands may overlap) and sets it to `mask_value`. The pipeline
  masks the normalised spectrogram with 0, i.e. the dataset mean.

  Args:
    spectrogram: [time, n_mels] float32.
    seed: [2] int64.
    freq_masks: number of frequency masks (0 = none).
    freq_width: maximum width of a frequency mask, in mel bins.
    time_masks: number of time masks (0 = none).
    time_width: maximum width of a time mask, in frames.
    mask_value: value written into masked cells.

  Returns:
    [time, n_mels] float32.
  """
  num_time, num_freq = spectrogram.shape
  if num_time is None or num_freq is None:
    raise ValueError(f'spec_augment needs a static spectrogram shape, got {spectrogram.shape}.')
  masked = tf.zeros([num_time, num_freq], tf.bool)
  if freq_masks > 0:
    masked |= _band_mask(derive_seed(seed, 0), num_freq, freq_masks, freq_width)[None, :]
  if time_masks > 0:
    masked |= _band_mask(derive_seed(seed, 1), num_time, time_masks, time_width)[:, None]
  return tf.where(masked, tf.constant(mask_value, spectrogram.dtype), spectrogram)


def spectrogram_stretch(spectrogram: tf.Tensor, seed: tf.Tensor, *, max_time: float,
                        max_freq: float) -> tf.Tensor:
  """Stretches a spectrogram by random factors along time and frequency, keeping its shape.

  The time axis is resized by a factor uniform in [1 - max_time, 1 + max_time] (speed perturbation,
  Ko et al. 2015) and placed at a random offset (cropped, or padded with the spectrogram's minimum,
  i.e. silence); the mel axis by a factor uniform in [1 - max_freq, 1 + max_freq] anchored at the
  lowest bin (a vocal tract length perturbation, Jaitly & Hinton 2013, applied on mel bins rather
  than Hz: our design), cropped or padded at the top. Both make a few speakers look like many.

  Args:
    spectrogram: [time, n_mels] float32 with a static shape.
    seed: [2] int64.
    max_time: maximum relative change of duration, in [0, 1).
    max_freq: maximum relative change of the mel axis, in [0, 1).

  Returns:
    [time, n_mels] float32.

  Raises:
    ValueError: a factor outside [0, 1) or a dynamic shape.
  """
  num_time, num_freq = spectrogram.shape
  if num_time is None or num_freq is None:
    raise ValueError(f'spectrogram_stretch needs a static shape, got {spectrogram.shape}.')
  if not (0 <= max_time < 1 and 0 <= max_freq < 1):
    raise ValueError(f'spectrogram_stretch factors must be in [0, 1), got time {max_time}, '
                     f'frequency {max_freq}.')
  factors = tf.random.stateless_uniform([2], derive_seed(seed, 0), minval=-1.0, maxval=1.0)
  factors = 1.0 + factors * tf.constant([max_time, max_freq])
  size = tf.cast(tf.round(factors * tf.constant([num_time, num_freq], tf.float32)), tf.int32)
  resized = tf.image.resize(spectrogram[..., None], size, method='bilinear')[..., 0]
  silence = tf.reduce_min(spectrogram)
  resized = tf.pad(resized[:, :num_freq], [[0, 0], [0, tf.maximum(num_freq - size[1], 0)]],
                   constant_values=silence)
  # Time: the shorter of (stretched, original) sits at a random offset inside the longer.
  slack = tf.abs(size[0] - num_time)
  offset = _uniform_int(derive_seed(seed, 1), slack)
  before = tf.where(size[0] < num_time, offset, 0)
  resized = tf.pad(resized, [[before, tf.maximum(num_time - size[0], 0) - before], [0, 0]],
                   constant_values=silence)
  start = tf.where(size[0] > num_time, offset, 0)
  return tf.ensure_shape(resized[start:start + num_time], [num_time, num_freq])


def filter_augment(log_spectrogram: tf.Tensor, seed: tf.Tensor, *, max_gain: float,
                   bands: tuple[int, int]) -> tf.Tensor:
  """Adds a random piecewise-linear gain curve over the mel axis of a log spectrogram.

  FilterAugment, linear type (Nam et al., ICASSP 2022): `n` band edges, `n` uniform in
  [bands[0], bands[1]], are the two ends of the mel axis plus `n - 2` random bins; each edge gets a
  gain uniform in [-max_gain, max_gain] and the gain between edges is interpolated linearly. Added
  to a log spectrogram this is a random smooth filter (what another microphone, room or instrument
  maker does to a sound's spectral envelope), the same for every frame.

  Args:
    log_spectrogram: [time, n_mels] float32 with a static shape, in the units of `max_gain`.
    seed: [2] int64.
    max_gain: largest gain at a band edge, in the spectrogram's units (0 = identity).
    bands: (min, max) number of band edges, 2 <= min <= max.

  Returns:
    [time, n_mels] float32.

  Raises:
    ValueError: a dynamic shape, a negative gain or bad `bands`.
  """
  num_freq = log_spectrogram.shape[-1]
  if num_freq is None or log_spectrogram.shape.rank != 2:
    raise ValueError(f'filter_augment needs a static [time, n_mels] shape, got '
                     f'{log_spectrogram.shape}.')
  low, high = bands
  if max_gain < 0 or not 2 <= low <= high:
    raise ValueError(f'filter_augment needs max_gain >= 0 and 2 <= bands[0] <= bands[1], got '
                     f'{max_gain} and {bands}.')
  num_edges = low + _uniform_int(derive_seed(seed, 0), tf.constant(high - low))
  inner = tf.random.stateless_uniform([high], derive_seed(seed, 1), maxval=num_freq - 1.0)
  # Unused inner edges sit on the top edge, where they change nothing.
  inner = tf.where(tf.range(high) < num_edges - 2, inner, float(num_freq - 1))
  edges = tf.sort(tf.concat([[0.0], inner, [float(num_freq - 1)]], 0))  # [high + 2]
  gains = tf.random.stateless_uniform([high + 2], derive_seed(seed, 2), minval=-max_gain,
                                      maxval=max_gain)
  # Every copy of the top edge carries the top edge's gain.
  gains = tf.where(tf.range(high + 2) < num_edges - 1, gains, tf.gather(gains, num_edges - 1))
  bins = tf.range(num_freq, dtype=tf.float32)
  right = tf.clip_by_value(tf.searchsorted(edges, bins, side='right'), 1, high + 1)  # [n_mels]
  left_edge, right_edge = tf.gather(edges, right - 1), tf.gather(edges, right)
  weight = (bins - left_edge) / tf.maximum(right_edge - left_edge, 1e-6)
  curve = (1.0 - weight) * tf.gather(gains, right - 1) + weight * tf.gather(gains, right)
  return log_spectrogram + curve[None, :]


def mixup(batch: Mapping[str, tf.Tensor], seed: tf.Tensor, alpha: float,
          keys: Sequence[str]) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
  """Mixes each example with its neighbour in the batch, one lambda for all `keys`.

  `out[k][i] = lam * batch[k][i] + (1 - lam) * batch[k][i - 1]` (cyclic) with
  `lam ~ Beta(alpha, alpha)`, so inputs and labels are mixed consistently and labels become soft.

  Args:
    batch: dict of tensors with a leading batch axis.
    seed: [2] int64.
    alpha: Beta distribution parameter (> 0).
    keys: the entries to mix (e.g. video, audio and every `labels/<head>`); others pass through.

  Returns:
    (mixed batch, lam as a float32 scalar).
  """
  gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
  lam = gammas[0] / (gammas[0] + gammas[1])
  out = dict(batch)
  for key in keys:
    value = batch[key]
    out[key] = lam * value + (1.0 - lam) * tf.roll(value, shift=1, axis=0)
  return out, lam
