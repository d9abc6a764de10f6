"""The on-disk format of a prepared dataset, without TensorFlow: file names, stats.json, label keys,
the spectrogram frame rate and the time convention of a clip.

A prepared folder (`data_dir`: a local path or any path `etils.epath` opens, e.g. `gs://`) holds

  `{split}-{i:05d}-of-{n:05d}.tfrecord`  shard `i` of `n` of a split (`shard_name`, `split_pattern`):
                                        clips serialized by `avt_jax.records` (which owns the record
                                        feature keys and the TensorFlow encoder and decoder);
  `stats.json`                          dataset statistics (`read_stats`, `write_stats`).

stats.json (written by `avt_jax.prep.shards.prepare_dataset`; `REQUIRED_STATS_KEYS` are what every
reader needs, the rest is written by preparation and read where present):

  `logmel_mean`, `logmel_std`  float   mean and standard deviation of all stored log-mel values of
                                       the train split (all splits when there is none): the
                                       normalisation `(x - mean) / std`
  `n_mels`                     int     mel bins of the stored spectrograms
  `num_classes`                {head: C}
  `num_clips`                  {split: clips written}
  `num_skipped`, `num_degraded`, `num_shards`  {split: int}
  `logmel_stats_splits`        [split] the splits `logmel_mean` / `logmel_std` are over
  `class_counts`               {head: {split: [clips per class]}}
  `label_names`                {head: [class name]}
  `fps`                        float   stored video frames per second
  `short_side`                 int     short side of the stored frames, pixels
  `audio_frames_per_second`    float   spectrogram frames per second (`AUDIO_FRAMES_PER_SECOND`)
  `audio_sample_rate`          int     Hz of the waveform the spectrograms were computed from
  `logmel_log_offset`          float   the values are log(mel power + offset)
  `clip_seconds`               float or null: fixed clip length; null keeps the annotated segments
  `jpeg_quality`               int     1..100
  `missing_audio`              str     'silence' or 'skip': clips without audio

Batches of the input pipeline hold the labels of head `h` under `label_key(h)` = `labels/h`, as
records do (our design).
"""

import json
import os
import re
from typing import Any, Mapping, NamedTuple, TypeVar

from etils import epath

# 10 ms hop: the log-mel convention of AST (Gong et al., 2021), which the audio encoder follows.
AUDIO_FRAMES_PER_SECOND = 100.0
LABEL_PREFIX = 'labels/'
STATS_FILE = 'stats.json'
REQUIRED_STATS_KEYS = ('logmel_mean', 'logmel_std', 'n_mels', 'num_classes')
_SHARD_RE = re.compile(r'^(?P<split>.+)-(?P<index>\d{5,})-of-(?P<num_shards>\d{5,})\.tfrecord$')

Value = TypeVar('Value')


class StatsError(ValueError):
  """A stats.json cannot be read, or lacks or holds an impossible value for a key it needs."""


class ShardName(NamedTuple):
  """The parts of a shard file name: shard `index` of `num_shards` of `split`."""
  split: str
  index: int
  num_shards: int


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards` of `split`, e.g. `train-00003-of-00064.tfrecord`."""
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def parse_shard_name(name: str) -> ShardName:
  """The inverse of `shard_name` (a bare file name). Raises ValueError naming `name` otherwise."""
  match = _SHARD_RE.match(name)
  if not match:
    raise ValueError(f'{name!r} is not a shard file name `{{split}}-NNNNN-of-NNNNN.tfrecord`.')
  return ShardName(match['split'], int(match['index']), int(match['num_shards']))


def split_pattern(data_dir: str, split: str) -> str:
  """The glob matching the shard files of `split` in `data_dir`."""
  return os.path.join(data_dir, f'{split}-*-of-*.tfrecord')


def stats_path(data_dir: str) -> str:
  """`{data_dir}/stats.json`."""
  return os.path.join(data_dir, STATS_FILE)


def read_stats(data_dir: str, required: tuple[str, ...] = REQUIRED_STATS_KEYS) -> dict[str, Any]:
  """Reads `{data_dir}/stats.json` and checks that it has the `required` keys.

  Raises:
    FileNotFoundError: the file does not exist (naming it).
    StatsError: the file is not a JSON object, or lacks required keys (naming the file and keys).
  """
  path = stats_path(data_dir)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'Dataset statistics {path!r} not found (written by data preparation, '
                            '`python -m avt_jax.prepare`).')
  try:
    stats = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise StatsError(f'{path}: cannot read JSON ({e}).') from e
  if not isinstance(stats, dict):
    raise StatsError(f'{path}: expected a JSON object, got {type(stats).__name__}.')
  missing = [key for key in required if key not in stats]
  if missing:
    raise StatsError(f'{path} lacks keys {missing}; expected at least {list(required)}.')
  return stats


def write_json(path: str, content: Any) -> None:
  """Writes `content` as JSON to `path` atomically: to `{path}.tmp`, then renamed over `path`, so a
  reader sees the old file or the new one, never a part."""
  temporary = epath.Path(f'{path}.tmp')
  temporary.write_text(json.dumps(content, indent=1))
  temporary.replace(path)


def write_stats(data_dir: str, stats: Mapping[str, Any]) -> str:
  """Writes `{data_dir}/stats.json` atomically (`write_json`); returns its path.

  Raises:
    StatsError: `stats` lacks one of `REQUIRED_STATS_KEYS` (naming it), so that every file written
      can be read by `read_stats`.
  """
  missing = [key for key in REQUIRED_STATS_KEYS if key not in stats]
  if missing:
    raise StatsError(f'Dataset statistics for {stats_path(data_dir)!r} lack keys {missing}; '
                     f'expected at least {list(REQUIRED_STATS_KEYS)}.')
  path = stats_path(data_dir)
  write_json(path, dict(stats))
  return path


def label_key(head: str) -> str:
  """The batch (and record) key of label head `head`: `labels/<head>`."""
  return LABEL_PREFIX + head


def batch_labels(batch: Mapping[str, Value]) -> dict[str, Value]:
  """Label head -> labels: the `labels/<head>` entries of `batch`."""
  return {key.removeprefix(LABEL_PREFIX): value for key, value in batch.items()
          if key.startswith(LABEL_PREFIX)}


def frame_count(start: float, end: float, rate: float) -> int:
  """Frames (video frames, spectrogram frames or audio samples) at `rate` per second in [start, end).

  Frame `k` of a clip is at `start + k / rate` seconds, so the frame at time t (from `start`) is
  `round(t * rate)` and the span holds `round((end - start) * rate)` frames (our design, for video
  and audio alike, so that both streams of a clip stay aligned).
  """
  return round((end - start) * rate)


def window_frames(num_frames: int, frame_stride: int) -> int:
  """Stored video frames a window of `num_frames` frames `frame_stride` apart reads, first to last."""
  return (num_frames - 1) * frame_stride + 1


def window_span(num_frames: int, frame_stride: int) -> int:
  """Stored video frames a window of `num_frames` frames `frame_stride` apart stands for in time:
  each frame covers `frame_stride` stored frames, so a window starting at frame s spans
  [s, s + num_frames * frame_stride) (one period more than `window_frames` reads). The audio window
  is centred on this span, and `stats.json`-derived configs size their clip windows by it (our design).
  """
  return num_frames * frame_stride


def view_seconds(num_frames: int, frame_stride: int, fps: float, audio_frames: int) -> float:
  """Seconds of a clip that one input view reads: its video window's `window_frames` stored frames at
  `fps`, or its audio window's `audio_frames` spectrogram frames, whichever is longer."""
  return max(window_frames(num_frames, frame_stride) / fps, audio_frames / AUDIO_FRAMES_PER_SECOND)
