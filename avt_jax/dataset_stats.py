"""Fills config fields from a prepared dataset's `stats.json` (used by `configs/manifest.py`).

`python -m avt_jax.prepare` writes `stats.json` beside the records: classes, clip counts, stored fps,
clip length and mel bins. A config with `data.from_stats = True` leaves those fields to this module,
so a user gives only `--config.data.data_dir`. Our design:

* `data.num_classes`, `data.label_heads`, `input.n_mels` come from the file.
* The video window spans the clip: `input.frame_stride = max(1, round(clip_frames / num_frames))`
  with `clip_frames = clip_seconds * fps`; the audio window covers the same seconds, rounded down to
  whole audio patches (`data_format.AUDIO_FRAMES_PER_SECOND` log-mel frames per second).
* `input.min_resize` is the stored short side and `input.image_size` the largest multiple of the
  video patch not above it nor above the configured `input.image_size` (a cap).
* With `train.epochs > 0`, `train.steps = ceil(epochs * train clips / batch_size)` and
  `optim.warmup_steps = round(optim.warmup_epochs * steps per epoch)`; where that gives fewer than
  `train.min_steps` steps, the whole schedule is stretched to `train.min_steps` (warm-up included),
  so that a few dozen clips still get enough updates to fit them.
"""

import math

import ml_collections

from avt_jax import data_format


class DatasetStatsError(ValueError):
  """The data folder is not a prepared dataset, or its stats.json lacks a field."""


def read_stats(data_dir: str) -> dict:
  """Reads `{data_dir}/stats.json` (`data_format.read_stats`, no required keys: `_field` checks them).

  Raises:
    DatasetStatsError: the folder or file is missing or unreadable; the message says what to run.
  """
  try:
    return data_format.read_stats(data_dir, required=())
  except FileNotFoundError as e:
    raise DatasetStatsError(
        f'config.data.data_dir={data_dir!r} is not a prepared dataset: '
        f'{data_format.stats_path(data_dir)} does not exist. Prepare videos with `python -m '
        'avt_jax.prepare --dataset=manifest --annotations=FILE --videos=DIR --output=DIR` and pass '
        'that output folder.') from e
  except ValueError as e:
    raise DatasetStatsError(str(e)) from e


def _field(stats: dict, key: str, path: str):
  if key not in stats or stats[key] is None:
    raise DatasetStatsError(f'{path} has no {key!r} (written by `python -m avt_jax.prepare`); '
                            f'it has {sorted(stats)}.')
  return stats[key]


def apply_stats(config: ml_collections.ConfigDict, data_dir: str) -> dict:
  """Sets the fields listed in the module docstring from `{data_dir}/stats.json`, in place.

  Returns:
    The fields that were set, `{'input.n_mels': 64, ...}` (for logs and results.json).

  Raises:
    DatasetStatsError: missing folder, file or field; a split without training clips.
  """
  stats = read_stats(data_dir)
  where = data_format.stats_path(data_dir)
  num_classes = {head: int(n) for head, n in _field(stats, 'num_classes', where).items()}
  train_clips = int(_field(stats, 'num_clips', where).get(config.data.train_split, 0))
  if train_clips < 1:
    raise DatasetStatsError(f'{where}: no clips in the training split '
                            f'{config.data.train_split!r} (config.data.train_split).')
  fields = _data_fields(config, stats, where, num_classes) if config.data.from_stats else {}
  if epochs := config.train.get('epochs', 0):
    # Steps per epoch, or more where train.min_steps rules: the schedule is stretched as a whole.
    per_epoch = max(train_clips / int(config.input.batch_size),
                    config.train.get('min_steps', 0) / epochs)
    fields['train.steps'] = max(1, math.ceil(epochs * per_epoch))
    fields['optim.warmup_steps'] = int(round(config.optim.warmup_epochs * per_epoch))
  with config.unlocked():
    for key, value in fields.items():
      section, name = key.split('.')
      config[section][name] = value
  return fields


def _data_fields(config: ml_collections.ConfigDict, stats: dict, where: str,
                 num_classes: dict[str, int]) -> dict:
  """Label space, mel bins, clip windows and frame sizes from `stats` (see the module docstring)."""
  inp = config.input
  fps = float(_field(stats, 'fps', where))
  # Prepared with --clip_seconds=0 (annotated segments of any length): the configured window stays.
  clip_seconds = (stats.get('clip_seconds')
                  or data_format.window_span(inp.num_frames, inp.frame_stride) / fps)
  short_side = int(_field(stats, 'short_side', where))
  num_frames = int(inp.num_frames)
  stride = max(1, round(clip_seconds * fps / num_frames))
  window_seconds = min(clip_seconds, data_format.window_span(num_frames, stride) / fps)
  patch_time = int(config.model.audio_patch[0])
  audio_frames = int(window_seconds * data_format.AUDIO_FRAMES_PER_SECOND)
  audio_frames = max(patch_time, audio_frames // patch_time * patch_time)
  patch_side = int(config.model.video_patch[1])
  image_size = min(int(inp.image_size), short_side) // patch_side * patch_side
  if image_size < patch_side:
    raise DatasetStatsError(f'{where}: frames have short side {short_side}, smaller than the video '
                            f'patch {patch_side} (config.model.video_patch).')
  return {
      'data.num_classes': num_classes, 'data.label_heads': tuple(num_classes),
      'input.n_mels': int(_field(stats, 'n_mels', where)), 'input.frame_stride': stride,
      'input.audio_frames': audio_frames, 'input.image_size': image_size,
      'input.min_resize': short_side,
  }


def class_names(config: ml_collections.ConfigDict, stats: dict) -> dict[str, list[str]]:
  """Label head -> class names: stats.json's `label_names`, else the class indices as strings."""
  names = stats.get('label_names') or {}
  return {head: list(names.get(head) or map(str, range(int(config.data.num_classes[head]))))
          for head in config.data.label_heads}
