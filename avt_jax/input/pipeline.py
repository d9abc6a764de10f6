"""tf.data input pipeline: sharded clip records (see `avt_jax.records`) -> numpy batches.

Files are `{data_dir}/{split}-{i:05d}-of-{n:05d}.tfrecord`; `{data_dir}/stats.json` gives the
log-mel normalisation and the label space (both `avt_jax.data_format`). Processes yield per-host batches of
`batch_size // process_count` examples and divide a split in one of two ways (our design;
`config.input.shard_by`, default 'auto': by files when the split has at least one file per process,
else by examples):

- by files: process `p` of `P` reads the files `files[p::P]` (sorted by name), its own stream
  ("reader" `p` of `P` readers);
- by examples: every process reads all files as one stream (reader 0 of 1) and keeps its share:
  of each global batch of that stream, the `p`-th block of `batch_size // P` consecutive examples
  (records of other shares are skipped before decoding); in evaluation, the videos `p::P`. The
  global training batches are then those of a single process reading all files, whatever `P` is
  (mixup, which mixes neighbours within a host's batch, aside), so a run resumes exactly on another
  number of processes. The cost: every process reads every file.

Training (`make_train_iterator`) repeats epochs forever. Epoch `e` reads the reader's files in an
order drawn from (seed, reader, e), interleaves them record by record, and shuffles records within
consecutive blocks of `shuffle_buffer` records by permutations drawn from (seed, reader, e, block).
Records are numbered by a running counter over the reader's whole stream; each record's
augmentation comes from (seed, reader, counter) and mixup's lambda from (seed, reader, counter of
the first record of the reader's batch). Only stateless random ops are used (a `Dataset.shuffle`
buffer would also depend on TF's global seed, which other code may set) and parallel stages run
with `deterministic=True`, so the stream is a pure function of (files, seed, reader). The resume
position is a number of examples, not of steps: resuming at `start_example=n` (the global number of
examples consumed, `examples_seen` in a checkpoint) counts the reader's records once, jumps to the
epoch that holds the reader's example `n / readers`, skips the serialized records before it in that
epoch (no decoding) and continues with the same counters, so no example is skipped or repeated even
when the batch size changed in between; with an unchanged batch size it yields exactly the batches
an uninterrupted run yields. `stream_identity` lists what else fixes the order (seed, files, split,
shuffle buffer, interleave cycle, number of readers); `check_same_stream` refuses to resume when
one of them changed.

Temporal sampling (our design): the video window is `num_frames` stored frames `frame_stride` apart
from a start frame `s`; it reads `data_format.window_frames` = `(num_frames - 1) * frame_stride + 1`
stored frames. Training draws `s` uniformly from [0, max_start], max_start = max(0, stored frames -
window_frames); evaluation uses `eval_clips` starts `round(i * max_start / (eval_clips - 1))`
(halves up), one clip: `max_start // 2`. The audio window of `audio_frames` spectrogram frames is
centred on the video window, not aligned with its start: the video window stands for the stored
frames [s, s + num_frames * frame_stride) (`data_format.window_span`), whose centre is
`c = (s + num_frames * frame_stride / 2) / fps` seconds, and the audio window's first frame is `round(c * audio_fps - audio_frames / 2)`
(halves up), clipped to [0, max(0, spectrogram frames - audio_frames)], so a window longer than the
video one extends equally on both sides and is shifted to stay inside the clip where the clip is
long enough. Windows that run past the end of a clip repeat its last video frame and pad the raw
log-mel with the clip's minimum value (its quietest frame, i.e. silence; `logmel_mean` for a clip
without spectrogram frames) before normalisation `(x - logmel_mean) / logmel_std`. Only the
selected JPEGs are decoded (training decodes only the crop window).

Evaluation (`make_eval_iterator`) yields every video of this host's share once, as
`eval_clips x eval_crops` consecutive views (clip-major), with `index` = a number unique to the
video across all processes (position in the reader's stream x readers + reader). The last batch is
padded (mask 0, index -1); with several processes every
host is padded with whole empty batches to the same number of batches, so collective eval steps
stay in lockstep.

Config fields read besides the documented `config.data.*` / `config.input.*` ones (all optional):
  config.input.shard_by                 'auto'      'files', 'examples' or 'auto' (see above; in
                                                     the default config).
  config.input.aspect_ratio_range       (3/4, 4/3)  width/height range of the random resized crop.
  config.input.interleave_cycle_length  16          files read concurrently (fixed, so that the
                                                     record order does not depend on the machine).
"""

import functools
import math
import os
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from avt_jax import data_format
from avt_jax import record_files
from avt_jax import records
from avt_jax.input import augment

DEFAULT_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
DEFAULT_INTERLEAVE_CYCLE_LENGTH = 16
SHARD_BY = ('auto', 'files', 'examples')

# Independent random streams folded into the (seed, process) seed.
_FILE_ORDER_STREAM, _SHUFFLE_STREAM, _EXAMPLE_STREAM, _MIXUP_STREAM = range(4)
# Per-example streams folded into the example seed.
(_TIME_STREAM, _CROP_STREAM, _FLIP_STREAM, _COLOR_STREAM, _SPEC_STREAM, _STRETCH_STREAM,
 _FILTER_STREAM) = range(7)
_EPOCH_LIMIT = 2**62

Batch = dict[str, np.ndarray]


def list_split_files(data_dir: str, split: str) -> list[str]:
  """Sorted record files of `split`; raises FileNotFoundError naming the directory or glob."""
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f'Data directory {data_dir!r} does not exist.')
  pattern = data_format.split_pattern(data_dir, split)
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f'No record files for split {split!r}: nothing matches {pattern!r}.')
  return files


def load_stats(data_dir: str) -> dict[str, Any]:
  """Reads `{data_dir}/stats.json` (`data_format.read_stats`) and checks that `logmel_std` > 0.

  Raises:
    FileNotFoundError: no stats.json; data_format.StatsError: missing keys or `logmel_std` <= 0
      (naming the file).
  """
  stats = data_format.read_stats(data_dir)
  if not stats['logmel_std'] > 0:
    raise data_format.StatsError(f'{data_format.stats_path(data_dir)}: logmel_std must be > 0, '
                                 f'got {stats["logmel_std"]}.')
  return stats


def num_eval_videos(data_dir: str, split: str) -> int:
  """Number of clips in `split` over all processes, from stats.json `num_clips`."""
  stats = load_stats(data_dir)
  num_clips = stats.get('num_clips', {})
  if split not in num_clips:
    raise data_format.StatsError(f'{data_format.stats_path(data_dir)}: num_clips has no entry for '
                                 f'split {split!r} (has {sorted(num_clips)}).')
  return int(num_clips[split])


@functools.lru_cache(maxsize=32)
def count_records(files: tuple[str, ...]) -> tuple[int, ...]:
  """Number of records in each file (reads the files without parsing them; cached)."""
  def count(path: tf.Tensor) -> tf.Tensor:
    return tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)

  counts = tf.data.Dataset.from_tensor_slices(list(files)).map(
      count, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    return tuple(int(n) for n in counts.as_numpy_iterator())
  except tf.errors.DataLossError as error:
    raise _damaged(error, os.path.dirname(files[0]), files) from error


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index must be in [0, {count}), got {index}.')
  return index, count


def _per_host_batch(global_batch: int, process_count: int, field: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'config.input.{field}={global_batch} must be a positive multiple of the '
                     f'process count {process_count}.')
  return global_batch // process_count


class SplitSharding(NamedTuple):
  """How this process takes part in a split (see the module docstring; our design).

  files: the files this process reads (all of them when sharding by examples).
  reader, readers: index and number of independent record streams (processes by files; 0 of 1 by
    examples).
  share, shares: which block of each reader batch (videos `share::shares` in evaluation) this
    process keeps: 0 of 1 by files, the process index and count by examples.
  """
  files: tuple[str, ...]
  reader: int
  readers: int
  share: int
  shares: int


def plan_sharding(config: ml_collections.ConfigDict, files: Sequence[str], pattern: str,
                  process_index: int, process_count: int) -> SplitSharding:
  """Divides a split's sorted `files` among the processes by `config.input.shard_by`.

  Raises:
    ValueError: `shard_by` is not 'auto', 'files' or 'examples', or is 'files' with fewer files
      than processes (naming `pattern`).
  """
  mode = config.input.get('shard_by', 'auto')
  if mode not in SHARD_BY:
    raise ValueError(f'config.input.shard_by: expected one of {SHARD_BY}, got {mode!r}.')
  if mode == 'files' and len(files) < process_count:
    raise ValueError(f'{len(files)} files match {pattern!r} but there are {process_count} '
                     "processes; config.input.shard_by='files' needs at least one file per process "
                     "(write more shards, or use 'auto' or 'examples').")
  if mode == 'examples' or len(files) < process_count:
    return SplitSharding(tuple(files), 0, 1, process_index, process_count)
  return SplitSharding(tuple(files[process_index::process_count]), process_index, process_count,
                       0, 1)


def _cycle_length(config: ml_collections.ConfigDict, num_files: int) -> int:
  cycle = config.input.get('interleave_cycle_length', DEFAULT_INTERLEAVE_CYCLE_LENGTH)
  return min(int(cycle), num_files)


def _interleave(files: tf.Tensor | Sequence[str], cycle_length: int) -> tf.data.Dataset:
  """Serialized records of `files`, one record from each of `cycle_length` open files in turn."""
  return tf.data.Dataset.from_tensor_slices(files).interleave(
      tf.data.TFRecordDataset, cycle_length=cycle_length, block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class ClipDecoder:
  """Turns serialized clips into model inputs: one augmented view (train) or all views (eval).

  Built from the config and the dataset statistics (raises ValueError naming the config field or
  `stats_path` when they disagree). `views` also serves inputs that are not records (`avt_jax.export`).
  """

  def __init__(self, config: ml_collections.ConfigDict, stats: dict[str, Any],
               stats_path: str = data_format.STATS_FILE):
    cfg = config.input
    for field in ('num_frames', 'frame_stride', 'image_size', 'min_resize', 'audio_frames',
                  'n_mels', 'shuffle_buffer'):
      if int(cfg[field]) < 1:
        raise ValueError(f'config.input.{field} must be >= 1, got {cfg[field]}.')
    self.heads = tuple(config.data.label_heads)
    self.multi_label = bool(config.data.multi_label)
    self.num_classes = {}
    for head in self.heads:
      if head not in config.data.num_classes:
        raise ValueError(f'config.data.num_classes has no entry for label head {head!r}.')
      self.num_classes[head] = int(config.data.num_classes[head])
      if head not in stats['num_classes']:
        raise ValueError(f'{stats_path}: num_classes has no entry for label head {head!r} '
                         f'(has {sorted(stats["num_classes"])}).')
      if int(stats['num_classes'][head]) != self.num_classes[head]:
        raise ValueError(f'config.data.num_classes[{head!r}]={self.num_classes[head]} but '
                         f'{stats_path} says {stats["num_classes"][head]}.')
    self.n_mels = int(cfg.n_mels)
    if int(stats['n_mels']) != self.n_mels:
      raise ValueError(f'config.input.n_mels={self.n_mels} but {stats_path} says n_mels='
                       f'{stats["n_mels"]}.')
    self.logmel_mean = float(stats['logmel_mean'])
    self.logmel_std = float(stats['logmel_std'])
    self.num_frames = int(cfg.num_frames)
    self.frame_stride = int(cfg.frame_stride)
    self.span = data_format.window_frames(self.num_frames, self.frame_stride)  # stored frames read
    self.image_size = int(cfg.image_size)
    self.min_resize = int(cfg.min_resize)
    self.audio_frames = int(cfg.audio_frames)
    self.area_range = tuple(float(a) for a in cfg.crop_area_range)
    if not 0 < self.area_range[0] <= self.area_range[1] <= 1:
      raise ValueError(f'config.input.crop_area_range must satisfy 0 < min <= max <= 1, got '
                       f'{self.area_range}.')
    self.aspect_ratio_range = tuple(cfg.get('aspect_ratio_range', DEFAULT_ASPECT_RATIO_RANGE))
    self.flip = bool(cfg.flip)
    self.color_jitter = float(cfg.color_jitter)
    spec = cfg.spec_augment
    self.spec_augment = dict(freq_masks=int(spec.freq_masks), freq_width=int(spec.freq_width),
                             time_masks=int(spec.time_masks), time_width=int(spec.time_width))
    self.spec_stretch = dict(max_time=float(cfg.spec_stretch.time),
                             max_freq=float(cfg.spec_stretch.freq))
    # None when off (or absent: configs saved before it existed); dB -> the normalised log-power
    # spectrogram's units (log power: ln(10) / 10 per dB).
    filt = cfg.get('filter_augment')
    self.filter_augment = dict(
        max_gain=float(filt.max_db) * math.log(10) / 10 / self.logmel_std,
        bands=tuple(int(b) for b in filt.bands)) if filt and filt.max_db else None
    self.eval_clips = int(cfg.eval_clips)
    self.eval_crops = int(cfg.eval_crops)
    if self.eval_clips < 1 or self.eval_crops not in (1, 3):
      raise ValueError(f'config.input.eval_clips must be >= 1 and eval_crops 1 or 3, got '
                       f'{self.eval_clips} and {self.eval_crops}.')
    if self.image_size > self.min_resize:
      raise ValueError(f'config.input.image_size={self.image_size} must be <= '
                       f'config.input.min_resize={self.min_resize}.')

  @property
  def views_per_video(self) -> int:
    return self.eval_clips * self.eval_crops

  def _parse(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one record and checks its n_mels and labels, naming the clip id on failure."""
    clip = records.parse_clip(serialized, self.heads)
    clip_id = clip['id']
    num_mels = tf.shape(clip['logmel'])[1]
    checks = [tf.debugging.Assert(
        tf.equal(num_mels, self.n_mels),
        [f'Record log-mel has the wrong number of mel bins (config.input.n_mels={self.n_mels}); '
         'clip id:', clip_id, 'n_mels:', num_mels])]
    for head in self.heads:
      indices = clip[data_format.label_key(head)]
      checks.append(tf.debugging.Assert(
          tf.reduce_all((indices >= 0) & (indices < self.num_classes[head])),
          [f'Record label {head!r} outside [0, {self.num_classes[head]}); clip id:', clip_id,
           'labels:', indices]))
      if not self.multi_label:
        checks.append(tf.debugging.Assert(
            tf.size(indices) <= 1,
            [f'Record has several {head!r} labels but config.data.multi_label is False; clip id:',
             clip_id, 'labels:', indices]))
    with tf.control_dependencies(checks):
      return {key: tf.identity(value) for key, value in clip.items()}

  def _labels(self, clip: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """One-hot / multi-hot float32 [C] per head (all zeros when unlabelled)."""
    out = {}
    for head in self.heads:
      hot = tf.one_hot(clip[data_format.label_key(head)], self.num_classes[head])  # [n, C]
      out[data_format.label_key(head)] = tf.minimum(tf.reduce_sum(hot, axis=0), 1.0)
    return out

  def _frame_ids(self, start: tf.Tensor, num_stored: tf.Tensor) -> tf.Tensor:
    """[num_frames] int32 stored-frame indices of the window at `start`; repeats the last frame."""
    return tf.minimum(start + tf.range(self.num_frames) * self.frame_stride, num_stored - 1)

  def _resize(self, frames: tf.Tensor) -> tf.Tensor:
    """[T, h, w, 3] uint8 -> [T, S, S, 3] float32 in [0, 1]."""
    resized = tf.image.resize(frames, [self.image_size, self.image_size], method='bilinear')
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)

  def _audio_window(self, clip: dict[str, tf.Tensor], start_frame: tf.Tensor) -> tf.Tensor:
    """[audio_frames, n_mels] normalised log-mel centred on the video window starting at `start_frame`.

    Audio and video windows share their centre (so equal lengths share their start); a longer audio
    window is shifted to stay inside the clip where the clip is long enough.
    """
    logmel = clip['logmel']  # [frames, n_mels]
    video_span = data_format.window_span(self.num_frames, self.frame_stride)
    centre = (tf.cast(start_frame, tf.float64) + video_span / 2) / tf.cast(clip['fps'], tf.float64)
    first = tf.cast(tf.floor(centre * tf.cast(clip['audio_fps'], tf.float64)
                             - self.audio_frames / 2 + 0.5), tf.int32)
    first = tf.clip_by_value(first, 0, tf.maximum(tf.shape(logmel)[0] - self.audio_frames, 0))
    num_stored = tf.shape(logmel)[0]
    silence = tf.where(num_stored > 0, tf.reduce_min(logmel), self.logmel_mean)
    missing = tf.maximum(first + self.audio_frames - num_stored, 0)
    padded = tf.concat([logmel, tf.fill([missing, self.n_mels], silence)], axis=0)
    window = padded[first:first + self.audio_frames]
    window = tf.ensure_shape(window, [self.audio_frames, self.n_mels])
    return (window - self.logmel_mean) / self.logmel_std

  def train_example(self, counter: tf.Tensor, serialized: tf.Tensor,
                    example_seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """One augmented view of record number `counter` of the stream."""
    clip = self._parse(serialized)
    seed = augment.derive_seed(example_seed, counter)
    num_stored = tf.shape(clip['jpeg'])[0]
    max_start = tf.maximum(num_stored - self.span, 0)
    start = tf.random.stateless_uniform([], augment.derive_seed(seed, _TIME_STREAM), minval=0,
                                        maxval=max_start + 1, dtype=tf.int32)
    jpegs = tf.gather(clip['jpeg'], self._frame_ids(start, num_stored))  # [T]
    frame_shape = tf.io.extract_jpeg_shape(jpegs[0])
    window = augment.train_crop_window(
        augment.derive_seed(seed, _CROP_STREAM), frame_shape[0], frame_shape[1],
        image_size=self.image_size, min_resize=self.min_resize, area_range=self.area_range,
        aspect_ratio_range=self.aspect_ratio_range)
    frames = tf.map_fn(lambda jpeg: tf.io.decode_and_crop_jpeg(jpeg, window, channels=3), jpegs,
                       fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    video = self._resize(frames)  # [T, S, S, 3]
    if self.flip:
      video = augment.flip(video, augment.derive_seed(seed, _FLIP_STREAM))
    video = augment.color_jitter(video, augment.derive_seed(seed, _COLOR_STREAM), self.color_jitter)
    audio = self._audio_window(clip, start)  # [A, M]
    if self.spec_stretch['max_time'] or self.spec_stretch['max_freq']:
      audio = augment.spectrogram_stretch(audio, augment.derive_seed(seed, _STRETCH_STREAM),
                                          **self.spec_stretch)
    if self.filter_augment:
      audio = augment.filter_augment(audio, augment.derive_seed(seed, _FILTER_STREAM),
                                     **self.filter_augment)
    if self.spec_augment['freq_masks'] or self.spec_augment['time_masks']:
      audio = augment.spec_augment(audio, augment.derive_seed(seed, _SPEC_STREAM),
                                   **self.spec_augment)
    return {'video': video * 2.0 - 1.0, 'audio': audio, **self._labels(clip)}

  def _eval_starts(self, num_stored: tf.Tensor) -> list[tf.Tensor]:
    """`eval_clips` window starts evenly spaced over [0, max_start] (one clip: the centre)."""
    max_start = tf.maximum(num_stored - self.span, 0)
    if self.eval_clips == 1:
      return [max_start // 2]
    last = self.eval_clips - 1
    # round(i * max_start / last), halves rounded up.
    return [(2 * i * max_start + last) // (2 * last) for i in range(self.eval_clips)]

  def eval_views(self, index: tf.Tensor, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """All `eval_clips x eval_crops` views of one video, with a leading [views] axis."""
    clip = self._parse(serialized)
    decode = lambda jpegs: tf.map_fn(lambda jpeg: tf.io.decode_jpeg(jpeg, channels=3), jpegs,
                                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    views = self.views(lambda ids: decode(tf.gather(clip['jpeg'], ids)), tf.shape(clip['jpeg'])[0],
                       tf.io.extract_jpeg_shape(clip['jpeg'][0])[:2], clip)
    count = self.views_per_video
    labels = {key: tf.tile(value[None], [count, 1]) for key, value in self._labels(clip).items()}
    return {
        **views,
        **labels,  # [V, C]
        'mask': tf.ones([count], tf.float32),
        'index': tf.fill([count], tf.cast(index, tf.int32)),
    }

  def views(self, frames_at, num_stored: tf.Tensor, frame_size: tf.Tensor,
            clip: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The model inputs of all `eval_clips x eval_crops` views of one video (clip-major).

    Args:
      frames_at: [n] int32 stored-frame indices -> [n, H, W, 3] uint8 frames.
      num_stored: number of stored frames.
      frame_size: [2] int32 (H, W) of the stored frames.
      clip: `fps` (of the stored frames), `audio_fps` and `logmel` [frames, n_mels] (raw, not yet
        normalised).

    Returns:
      `video` float32 [V, num_frames, image_size, image_size, 3] in [-1, 1] and `audio` float32
      [V, audio_frames, n_mels] (normalised).
    """
    windows = augment.eval_crop_windows(frame_size[0], frame_size[1], image_size=self.image_size,
                                        min_resize=self.min_resize, num_crops=self.eval_crops)
    videos, audios = [], []
    for start in self._eval_starts(num_stored):
      frames = frames_at(self._frame_ids(start, num_stored))  # [T, H, W, 3]
      audio = self._audio_window(clip, start)
      for crop in range(self.eval_crops):
        y, x, height, width = tf.unstack(windows[crop])
        videos.append(self._resize(frames[:, y:y + height, x:x + width]) * 2.0 - 1.0)
        audios.append(audio)
    return {'video': tf.stack(videos), 'audio': tf.stack(audios)}  # [V, T, S, S, 3], [V, A, M]


def record_views(config: ml_collections.ConfigDict, stats: dict[str, Any],
                 stats_path: str = data_format.STATS_FILE) -> Callable[[bytes], Batch]:
  """Returns views(serialized record) -> the eval views of that one clip as numpy arrays.

  They are the rows `make_eval_iterator` yields for the record (same `ClipDecoder.eval_views`), with
  `index` 0: `video` [V, num_frames, image_size, image_size, 3], `audio` [V, audio_frames, n_mels],
  `labels/<head>` [V, C], `mask` [V], V = eval_clips x eval_crops. Like `make_eval_iterator` it runs
  in a tf.data map, so the graph optimisations and thus the values are bit for bit the same.
  """
  decoder = ClipDecoder(config, stats, stats_path)

  def views(serialized: bytes) -> Batch:
    dataset = tf.data.Dataset.from_tensors(serialized).enumerate().map(decoder.eval_views)
    return next(_numpy_batches(dataset.with_options(_options()), stats_path))

  return views


def _pad_value(key: str) -> int:
  return -1 if key == 'index' else 0


def _pad_batch(batch: dict[str, tf.Tensor], size: int) -> dict[str, tf.Tensor]:
  """Pads a partial batch to `size` examples (mask 0, index -1, everything else 0)."""
  missing = size - tf.shape(batch['mask'])[0]
  out = {}
  for key, value in batch.items():
    paddings = [[0, missing]] + [[0, 0]] * (value.shape.rank - 1)
    padded = tf.pad(value, paddings, constant_values=tf.cast(_pad_value(key), value.dtype))
    out[key] = tf.ensure_shape(padded, [size] + value.shape[1:].as_list())
  return out


def _empty_batch(element_spec: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
  return {key: tf.fill(spec.shape, tf.cast(_pad_value(key), spec.dtype))
          for key, spec in element_spec.items()}


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


class BadRecordError(ValueError):
  """A record fails the reader's checks; the message is one line naming the files and the check."""


def _numpy_batches(dataset: tf.data.Dataset, source: str, data_dir: str = '',
                   files: Sequence[str] = ()) -> Iterator[Batch]:
  """Iterates `dataset` as numpy dicts; failed record checks become a ValueError naming `source`, a
  damaged record file (TensorFlow's DataLossError) a `RecordFileError` naming it among `files`."""
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as error:
      raise _damaged(error, data_dir, files) from error
    except tf.errors.InvalidArgumentError as error:
      message = error.message
      if 'assertion failed:' in message:  # keep only the record check's own text
        message = message.split('assertion failed:', 1)[1].split('\n', 1)[0].strip()
      raise BadRecordError(f'Bad record in {source}: {message}') from error
    yield batch


def _damaged(error: tf.errors.DataLossError, data_dir: str, files: Sequence[str]
             ) -> record_files.RecordFileError:
  """The error naming the damaged file among `files` behind TensorFlow's `error` (which does not)."""
  found = record_files.locate_damage(list(files))
  if found is None:
    return record_files.RecordFileError(
        f'A record file of {data_dir} is damaged ({error.message.splitlines()[0]}); check the '
        'copy, or rerun the `python -m avt_jax.prepare` command on it to rewrite damaged shards.')
  return record_files.RecordFileError(record_files.damaged_message(*found, data_dir))


def _check_has_records(files: Sequence[str], data_dir: str) -> None:
  try:
    empty = not any(True for _ in tf.data.TFRecordDataset(list(files)).take(1))
  except tf.errors.DataLossError as error:
    raise _damaged(error, data_dir, files) from error
  if empty:
    raise ValueError(f'The record files of this process hold no records: {list(files)}.')


def _train_sharding(config: ml_collections.ConfigDict, data_dir: str, process_index: int,
                    process_count: int) -> SplitSharding:
  split = config.data.train_split
  return plan_sharding(config, list_split_files(data_dir, split),
                       data_format.split_pattern(data_dir, split), process_index, process_count)


def make_train_iterator(config: ml_collections.ConfigDict, data_dir: str, *, seed: int,
                        start_example: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[Batch]:
  """Infinite, deterministic, resumable iterator of augmented training batches for this host.

  Args:
    config: experiment config (`config.data`, `config.input`).
    data_dir: folder with the record files and stats.json (local path or `gs://`).
    seed: run seed; the same seed gives the same batches.
    start_example: number of examples already consumed by all hosts together (a checkpoint's
      `examples_seen`); the first batch starts with the next one, whatever the batch size was.
      When sharding by files, a multiple of `process_count`.
    process_index: this host's index (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    Iterator of dicts: `video` float32 [B, num_frames, image_size, image_size, 3] in [-1, 1],
    `audio` float32 [B, audio_frames, n_mels], `labels/<head>` float32 [B, C], `mask` float32 [B]
    (all ones), with B = batch_size // process_count.

  Raises:
    ValueError: a bad `start_example`, batch size, `config.input` field or record (naming it).
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  batch_size = _per_host_batch(int(config.input.batch_size), process_count, 'batch_size')
  shards = _train_sharding(config, data_dir, process_index, process_count)
  if start_example < 0 or start_example % shards.readers:
    raise ValueError(f'start_example must be a non-negative multiple of the process count '
                     f'{shards.readers}, got {start_example} (sharding by files).')
  reader_batch = batch_size * shards.shares  # the examples of all processes sharing the stream
  stats = load_stats(data_dir)
  decoder = ClipDecoder(config, stats, data_format.stats_path(data_dir))
  record_files.check_prepared(data_dir, list(shards.files))  # sizes as prepared: before step 1
  _check_has_records(shards.files, data_dir)
  cycle_length = _cycle_length(config, len(shards.files))
  shuffle_buffer = int(config.input.shuffle_buffer)
  reader_seed = tf.constant([seed, shards.reader], tf.int64)
  file_names = tf.constant(list(shards.files))

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    """The reader's serialized records in the order of `epoch`."""
    keys = tf.random.stateless_uniform(
        [len(shards.files)], augment.derive_seed(reader_seed, _FILE_ORDER_STREAM, epoch))
    records_ds = _interleave(tf.gather(file_names, tf.argsort(keys)), cycle_length)

    def permute(block_index: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
      keys = tf.random.stateless_uniform(
          tf.shape(block), augment.derive_seed(reader_seed, _SHUFFLE_STREAM, epoch, block_index))
      return tf.gather(block, tf.argsort(keys))

    return records_ds.batch(shuffle_buffer).enumerate().map(permute).unbatch()

  first_example = start_example // shards.readers  # the reader's records consumed so far
  first_epoch, skip = 0, 0
  if first_example:
    first_epoch, skip = divmod(first_example, sum(count_records(shards.files)))
  stream = epoch_records(tf.constant(first_epoch, tf.int64)).skip(skip).concatenate(
      tf.data.Dataset.range(first_epoch + 1, _EPOCH_LIMIT).flat_map(epoch_records))
  stream = stream.enumerate(start=first_example)
  if shards.shares > 1:  # keep this process's block of each reader batch, before decoding
    stream = stream.filter(lambda counter, _: (counter - first_example) % reader_batch // batch_size
                           == shards.share)

  example_seed = augment.derive_seed(reader_seed, _EXAMPLE_STREAM)
  dataset = stream.map(
      lambda counter, serialized: decoder.train_example(counter, serialized, example_seed),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  alpha = float(config.input.mixup_alpha)
  if alpha > 0:
    mix_keys = ['video', 'audio'] + [data_format.label_key(head) for head in decoder.heads]
    mixup_seed = augment.derive_seed(reader_seed, _MIXUP_STREAM)
    dataset = dataset.enumerate().map(  # seeded by the counter of the reader batch's first record
        lambda index, batch: augment.mixup(
            batch, augment.derive_seed(mixup_seed, first_example + index * reader_batch), alpha,
            mix_keys)[0],
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.map(lambda batch: {**batch, 'mask': tf.ones([batch_size], tf.float32)})
  dataset = dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _numpy_batches(dataset, data_format.split_pattern(data_dir, config.data.train_split),
                        data_dir, shards.files)


def stream_identity(config: ml_collections.ConfigDict, data_dir: str, *, seed: int,
                    process_count: int | None = None) -> dict[str, Any]:
  """What fixes the order of the training stream besides the example counter (JSON values).

  A checkpoint stores it next to `examples_seen`; `check_same_stream` compares it on resume. The
  batch size is not part of it: the stream is a function of the example counter; nor is the process
  count when sharding by examples (one reader whatever the number of processes).
  """
  _, process_count = _resolve_processes(None, process_count)
  split = config.data.train_split
  return {
      'seed': int(seed),
      'data.train_split': split,
      'train_files': [os.path.basename(f) for f in list_split_files(data_dir, split)],
      'input.shuffle_buffer': int(config.input.shuffle_buffer),
      'input.interleave_cycle_length': int(config.input.get('interleave_cycle_length',
                                                            DEFAULT_INTERLEAVE_CYCLE_LENGTH)),
      'readers': _train_sharding(config, data_dir, 0, process_count).readers,
  }


_STREAM_FIELD_NAMES = {
    'seed': 'config.seed',
    'data.train_split': 'config.data.train_split',
    'train_files': 'the training record files in config.data.data_dir',
    'input.shuffle_buffer': 'config.input.shuffle_buffer',
    'input.interleave_cycle_length': 'config.input.interleave_cycle_length',
    'readers': 'the number of processes reading their own training files (jax.process_count() '
               "when sharding by files, 1 by examples: config.input.shard_by)",
}


def check_same_stream(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
  """Raises ValueError naming the first setting that changes the order of the training examples.

  Args:
    saved: `stream_identity` stored in the checkpoint (None for checkpoints that predate it: not
      checked).
    current: `stream_identity` of this run.
  """
  if not saved:
    return
  if 'process_count' in saved and 'readers' not in saved:  # before sharding by examples existed,
    saved = {**saved, 'readers': saved['process_count']}  # every process read its own files
  for key, value in current.items():
    if key in saved and saved[key] != value:
      before, now = saved[key], value
      if key == 'train_files':
        before, now = f'{len(before)} files {before[:3]}...', f'{len(now)} files {now[:3]}...'
      raise ValueError(
          f'Cannot resume: {_STREAM_FIELD_NAMES.get(key, key)} is {before!r} in the checkpoint and '
          f'{now!r} now, which changes the order of the training examples (examples would be skipped '
          'or repeated). Restore it, or train in a new workdir.')


def make_eval_iterator(config: ml_collections.ConfigDict, data_dir: str, split: str, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[Batch]:
  """Finite iterator over all views of every video in this host's share of `split`.

  Args:
    config: experiment config (`config.data`, `config.input`).
    data_dir: folder with the record files and stats.json.
    split: split name, e.g. 'test'.
    process_index: this host's index (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    Iterator of dicts with B = eval_batch_size // process_count: `video` float32
    [B, num_frames, image_size, image_size, 3] in [-1, 1], `audio` float32
    [B, audio_frames, n_mels], `labels/<head>` float32 [B, C], `mask` float32 [B] (0 on padding),
    `index` int32 [B] (a number unique to the video across all processes, -1 on padding). The
    `eval_clips x eval_crops` views of a video are consecutive (clip-major) and may span two
    batches. With several processes, all hosts yield the same number of batches, and together
    every video of the split exactly once.

  Raises:
    ValueError: a bad batch size, `config.input` field or record (naming it).
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  batch_size = _per_host_batch(int(config.input.eval_batch_size), process_count, 'eval_batch_size')
  files, pattern = list_split_files(data_dir, split), data_format.split_pattern(data_dir, split)
  hosts = [plan_sharding(config, files, pattern, host, process_count)
           for host in range(process_count)]
  shards = hosts[process_index]
  record_files.check_prepared(data_dir, list(shards.files))
  stats = load_stats(data_dir)
  decoder = ClipDecoder(config, stats, data_format.stats_path(data_dir))
  videos = _interleave(list(shards.files), _cycle_length(config, len(shards.files))).enumerate()
  if shards.shares > 1:
    videos = videos.filter(lambda position, _: position % shards.shares == shards.share)
  videos = videos.map(  # an index unique across readers
      lambda position, serialized: (position * shards.readers + shards.reader, serialized))
  dataset = videos.map(decoder.eval_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.unbatch().batch(batch_size).map(lambda batch: _pad_batch(batch, batch_size))
  if process_count > 1:
    batches_per_host = [
        math.ceil(_num_videos(host) * decoder.views_per_video / batch_size) for host in hosts]
    extra = max(batches_per_host) - batches_per_host[process_index]
    if extra:
      dataset = dataset.concatenate(
          tf.data.Dataset.from_tensors(_empty_batch(dataset.element_spec)).repeat(extra))
  dataset = dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _numpy_batches(dataset, pattern, data_dir, shards.files)


def check_config(config: ml_collections.ConfigDict, data_dir: str, splits: Sequence[str]) -> None:
  """The checks `make_train_iterator` / `make_eval_iterator` make on `config.input` and on the
  files of `splits`, without reading a record: batch sizes, decoder fields against stats.json, file
  sharding, record file sizes against those `prepare` recorded (run before anything is written).

  Raises:
    ValueError (`data_format.StatsError`, `record_files.RecordFileError`): naming the field or file.
    FileNotFoundError: no data folder, stats.json or record files of a split.
  """
  process_index, process_count = _resolve_processes(None, None)
  _per_host_batch(int(config.input.batch_size), process_count, 'batch_size')
  _per_host_batch(int(config.input.eval_batch_size), process_count, 'eval_batch_size')
  ClipDecoder(config, load_stats(data_dir), data_format.stats_path(data_dir))
  for split in splits:
    files = list_split_files(data_dir, split)
    shards = plan_sharding(config, files, data_format.split_pattern(data_dir, split), process_index,
                           process_count)
    record_files.check_prepared(data_dir, list(shards.files))


def _num_videos(shards: SplitSharding) -> int:
  """Number of videos a process evaluates: its share of its files' records."""
  return len(range(shards.share, sum(count_records(shards.files)), shards.shares))
