"""EPIC-Kitchens-100 (`--dataset=epic_kitchens_100`): segments of long videos, verb and noun heads.

Annotations: `EPIC_100_train.csv`, `EPIC_100_validation.csv` (and the unlabelled
`EPIC_100_test_timestamps.csv`); class names from `EPIC_100_{verb,noun}_classes.csv`. Defaults: 25 fps,
short side 256 px, 128 mel bins, an 8 s window centred on each segment.
"""

import os
import re
from typing import Sequence

import numpy as np

from avt_jax.prep import annotations
from avt_jax.prep import demo_data
from avt_jax.prep import smoke_clips
from avt_jax.prep.annotations import ClipSpec, VideoIndex
from avt_jax.prep.datasets import Dataset, Defaults, TfdsSpec

NUM_CLASSES = {'verb': 97, 'noun': 300}
_TIMESTAMP_RE = re.compile(r'^([0-9]+):([0-5][0-9]):([0-5][0-9](?:\.[0-9]*)?)$')
_FILE_RE = re.compile(r'^EPIC_100_(train|validation|test)(?:_timestamps)?\.csv$')
_COLUMNS = ('narration_id', 'participant_id', 'video_id', 'start_timestamp', 'stop_timestamp')
_SMOKE_HEADER = ('narration_id', 'participant_id', 'video_id', 'narration_timestamp', 'start_timestamp',
                 'stop_timestamp', 'start_frame', 'stop_frame', 'narration', 'verb', 'verb_class', 'noun',
                 'noun_class', 'all_nouns', 'all_noun_classes')


def read_epic_kitchens(
    paths: Sequence[str],
    video_dir: str,
    index: VideoIndex | None = None,
) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """Reads EPIC-Kitchens-100 annotation CSV files: verb and noun label heads.

  Files are named `EPIC_100_{train,validation}.csv` (labelled; the split is taken from the name) or
  `EPIC_100_test_timestamps.csv` (unlabelled, split `test`). Columns used: `narration_id` (the clip
  id), `participant_id`, `video_id`, `start_timestamp`, `stop_timestamp` (`HH:MM:SS.ff`), and
  `verb_class`, `noun_class` when present. Segments are cut from the long videos, found as
  `{participant}/videos/{video_id}.<ext>` or `{participant}/{video_id}.<ext>` (`MP4` or any other
  video extension), else anywhere under `video_dir`.

  Class names come from `EPIC_100_verb_classes.csv` and `EPIC_100_noun_classes.csv` (columns `id`,
  `key`) next to the first annotation file when they exist, else they are the class indices.

  Args:
    paths: annotation CSV files.
    video_dir: folder holding the participant folders.
    index: a prebuilt index of `video_dir` (built when None).

  Returns:
    (clips in file order, {'verb': 97 names, 'noun': 300 names}).

  Raises:
    ValueError: an unexpected file name, a missing column, an invalid id, timestamp or class index, or
      a repeated narration id; the message names the file and line.
  """
  index = index or VideoIndex(video_dir)
  specs = []
  for path in paths:
    match = _FILE_RE.match(os.path.basename(path))
    if not match:
      raise ValueError(f'{path}: expected an EPIC-Kitchens-100 file named EPIC_100_train.csv, '
                       'EPIC_100_validation.csv or EPIC_100_test_timestamps.csv (the split comes from '
                       'the name).')
    split = match.group(1)
    for line, row in annotations.read_table(path, _COLUMNS, optional=tuple(f'{h}_class' for h in
                                                                     NUM_CLASSES)):
      where = f'{path}:{line}'
      participant = annotations.check_id(row['participant_id'], 'participant_id', where)
      video = annotations.check_id(row['video_id'], 'video_id', where)
      narration = row['narration_id']
      if not narration:
        raise ValueError(f'{where}: `narration_id` must not be empty.')
      start = _timestamp(row['start_timestamp'], 'start_timestamp', where)
      stop = _timestamp(row['stop_timestamp'], 'stop_timestamp', where)
      if stop <= start:
        raise ValueError(f'{where}: `stop_timestamp` must be after `start_timestamp`, got '
                         f'{row["start_timestamp"]} to {row["stop_timestamp"]}.')
      labels = {}
      for head, num_classes in NUM_CLASSES.items():
        value = row.get(f'{head}_class', '')
        if not value:
          labels[head] = []
        elif annotations.INDEX_RE.match(value) and int(value) < num_classes:
          labels[head] = [int(value)]
        else:
          raise ValueError(f'{where}: `{head}_class` must be an integer in [0, {num_classes}), got '
                           f'{value!r}.')
      found = index.find([video], prefer_folders=(f'{participant}/videos', participant))
      relative = found[1] if found else f'{participant}/videos/{video}.MP4'
      specs.append((where, ClipSpec(narration, relative, labels, start=start, end=stop, split=split)))
  names = {head: _class_names(os.path.dirname(paths[0]) if paths else '', head, num_classes)
           for head, num_classes in NUM_CLASSES.items()}
  seen = {}
  for where, spec in specs:
    key = (spec.split, spec.clip_id)
    if key in seen:
      raise ValueError(f'{where}: narration id {spec.clip_id!r} repeats {seen[key]}.')
    seen[key] = where
  return [spec for _, spec in specs], names


def _class_names(folder: str, head: str, num_classes: int) -> list[str]:
  """`key` of each class from `EPIC_100_{head}_classes.csv` in `folder`, or the indices as names."""
  path = os.path.join(folder, f'EPIC_100_{head}_classes.csv')
  if not os.path.isfile(path):
    return [str(i) for i in range(num_classes)]
  names = {}
  for line, row in annotations.read_table(path, ('id', 'key')):
    if not annotations.INDEX_RE.match(row['id']) or int(row['id']) >= num_classes or not row['key']:
      raise ValueError(f'{path}:{line}: expected an id in [0, {num_classes}) and a non-empty key.')
    names[int(row['id'])] = row['key']
  if sorted(names) != list(range(num_classes)):
    raise ValueError(f'{path}: expected the {num_classes} ids 0..{num_classes - 1} once each.')
  return [names[i] for i in range(num_classes)]


def _timestamp(value: str, field: str, where: str) -> float:
  """Seconds from an `HH:MM:SS[.fraction]` timestamp."""
  match = _TIMESTAMP_RE.match(value)
  if not match:
    raise ValueError(f'{where}: `{field}` must be HH:MM:SS.ff, got {value!r}.')
  hours, minutes, seconds = match.groups()
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _read(paths: Sequence[str], video_dir: str, classes: str | None
          ) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """`read_epic_kitchens`; `classes` must be None (names come from `EPIC_100_{verb,noun}_classes.csv`)."""
  if classes:
    raise ValueError('--classes does not apply to epic_kitchens_100: class names are read from '
                     'EPIC_100_verb_classes.csv and EPIC_100_noun_classes.csv next to the annotations.')
  return read_epic_kitchens(paths, video_dir)


def write_smoke(raw: str, rng: np.random.Generator) -> tuple[list[str], str, str | None]:
  """Writes EPIC-Kitchens-100 smoke data into `raw` as EPIC ships it (`avt_jax.prep.smoke_data`).

  `EPIC_100_train.csv` / `EPIC_100_validation.csv` with the EPIC columns and `HH:MM:SS.ff` timestamps;
  segments cut from six-second videos stored as `videos/P01/videos/P01_01.MP4` and
  `videos/P02/P02_01.MP4`, and a segment of a missing video. Verb = the beep pitch (0-2), noun = the
  square colour (0-2).

  Returns:
    (annotation files, video folder, `--classes`).
  """
  scenes = {'P01_01': [0, 4, 8], 'P02_01': [1, 5, 6]}  # demo classes of the three 2 s scenes
  smoke_clips.write_clip(os.path.join(raw, 'videos', 'P01', 'videos', 'P01_01.MP4'), rng,
                         scenes['P01_01'])
  smoke_clips.write_clip(os.path.join(raw, 'videos', 'P02', 'P02_01.MP4'), rng, scenes['P02_01'])
  scenes['P04_01'] = [2]  # annotated, never downloaded
  splits = {('P01_01', 0): 'train', ('P01_01', 1): 'train', ('P01_01', 2): 'train',
            ('P02_01', 0): 'train', ('P02_01', 1): 'validation', ('P02_01', 2): 'validation',
            ('P04_01', 0): 'validation'}
  rows = {'train': [], 'validation': []}
  for (video, k), split in splits.items():
    colour, pitch = smoke_clips.scene_class(scenes[video][k])
    verb, noun = list(demo_data.PITCHES).index(pitch), list(demo_data.COLOURS).index(colour)
    start, stop = 2 * k + 0.25, 2 * k + 1.75
    stamp = lambda seconds: f'00:00:{seconds:05.2f}'
    rows[split].append((f'{video}_{k}', video.split('_')[0], video, stamp(start), stamp(start),
                        stamp(stop), round(start * 50), round(stop * 50), f'beep {pitch} {colour}',
                        f'beep-{pitch}', verb, colour, noun, f"['{colour}']", f'[{noun}]'))
  files = []
  for split, split_rows in rows.items():
    files.append(os.path.join(raw, f'EPIC_100_{split}.csv'))
    smoke_clips.write_csv(files[-1], split_rows, _SMOKE_HEADER)
  return files, os.path.join(raw, 'videos'), None


DATASET = Dataset(
    'epic_kitchens_100', _read, Defaults(clip_seconds=8.0),
    tfds=TfdsSpec('avt_epic_kitchens_100', 'EPIC-Kitchens-100 (97 verbs, 300 nouns)',
                  {head: (head, count) for head, count in NUM_CLASSES.items()}),
    write_smoke=write_smoke)
