"""Kinetics-400/600/700 and its Kinetics-Sounds subset (`--dataset=kinetics`, `kinetics_sounds`).

Annotations: the Kinetics CSV files with the header `label,youtube_id,time_start,time_end,split` (any
column order, extra columns ignored, `label` absent or empty for unlabelled test rows). With a class
subset (e.g. `kinetics_sounds_classes()`), rows of other classes are left out: this is how the
Kinetics-Sounds subset is read. Defaults: 25 fps, short side 256 px, 128 mel bins, 10 s clips.
"""

import os
from typing import Sequence

import numpy as np

from avt_jax.prep import annotations
from avt_jax.prep import smoke_clips
from avt_jax.prep.annotations import CLASS_HEAD, ClipSpec, VideoIndex
from avt_jax.prep.datasets import Dataset, Defaults, TfdsSpec

KINETICS_SOUNDS_SHIPPED = ('31',)  # variants shipped as data/kinetics_sounds_{variant}.txt
_COLUMNS = ('youtube_id', 'time_start', 'time_end', 'split')


def kinetics_sounds_classes(variant: str = '31') -> list[str]:
  """The Kinetics-Sounds class list.

  Args:
    variant: a variant shipped in `data/` (`KINETICS_SOUNDS_SHIPPED`; see the file header for its
      source), or the path of a class list file (one Kinetics class name per line), e.g. for the 32-
      or 34-class versions found in the literature, which are not shipped.

  Returns:
    Class names; their order is the class index order.
  """
  if variant in KINETICS_SOUNDS_SHIPPED:
    path = os.path.join(annotations.DATA_DIR, f'kinetics_sounds_{variant}.txt')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: the class lists ship in data/ of the avt_jax source '
                              'tree; pass the path of a class list file instead.')
    return annotations.read_class_list(path)
  if os.path.isfile(variant):
    return annotations.read_class_list(variant)
  raise ValueError(f'Kinetics-Sounds classes: expected one of {list(KINETICS_SOUNDS_SHIPPED)} or the '
                   f'path of a class list file (one Kinetics class name per line), got {variant!r}.')


def read_kinetics(paths: Sequence[str], video_dir: str, subset: Sequence[str] | None = None,
                  index: VideoIndex | None = None) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """Reads Kinetics CSV files (see the module docstring); with `subset`, the Kinetics-Sounds way.

  Video files: `{youtube_id}_{time_start:06d}_{time_end:06d}.<ext>` (seconds, zero-padded: a clip
  already cut, decoded whole) or `{youtube_id}.<ext>` (the full video, cut at [time_start, time_end]),
  in any sub-folder of `video_dir`. Clip ids are `{youtube_id}_{time_start:06d}_{time_end:06d}`.

  Labels match class names after normalisation (case, surrounding quotes, `_` for spaces), so CSVs
  from mirrors that rename classes that way still match.

  Args:
    paths: CSV files (e.g. train.csv, validate.csv); the `split` column gives each row's split.
    video_dir: folder holding the video files.
    subset: keep only rows labelled with one of these classes, indexed in this order (unlabelled
      rows are then left out); None keeps every row, with the labels found as classes (sorted after
      normalisation, each spelled as it first appears).
    index: a prebuilt index of `video_dir` (built when None).

  Returns:
    (clips in file order, {'class': class names}).

  Raises:
    ValueError: a missing column, an invalid id or time, or one clip listed with two labels; the
      message names the file and line.
  """
  index = index or VideoIndex(video_dir)
  rows = []  # (where, youtube_id, start, end, split, label)
  for path in paths:
    for line, row in annotations.read_table(path, _COLUMNS, optional=('label',)):
      where = f'{path}:{line}'
      youtube_id = annotations.check_id(row['youtube_id'], 'youtube_id', where)
      start = annotations.required_seconds(row['time_start'], 'time_start', where)
      end = annotations.required_seconds(row['time_end'], 'time_end', where)
      if end <= start:
        raise ValueError(f'{where}: `time_end` ({end:g}) must be greater than `time_start` ({start:g}).')
      rows.append((where, youtube_id, start, end, annotations.check_split(row['split'], where),
                   row.get('label', '')))
  if subset is None:  # one name per normalised label: its first spelling in the files
    spellings = {}
    for *_, label in rows:
      if label:
        spellings.setdefault(_canonical_label(label), label)
    names = [spellings[key] for key in sorted(spellings)]
  else:
    names = list(subset)
  index_of = {_canonical_label(name): i for i, name in enumerate(names)}
  specs = []
  for where, youtube_id, start, end, split, label in rows:
    if label:
      class_index = index_of.get(_canonical_label(label))
      if class_index is None:
        continue  # a class outside `subset`
      labels = [class_index]
    elif subset is not None:
      continue
    else:
      labels = []
    clip_id = f'{youtube_id}_{int(start):06d}_{int(end):06d}'
    found = index.find([clip_id, youtube_id])
    if found is None or found[0] == clip_id:  # cut clip (or missing: reported by the writer)
      spec = ClipSpec(clip_id, found[1] if found else f'{clip_id}.mp4', {CLASS_HEAD: labels}, split=split)
    else:
      spec = ClipSpec(clip_id, found[1], {CLASS_HEAD: labels}, start=start, end=end, split=split)
    specs.append((where, spec))
  return annotations.merge_duplicates(specs), {CLASS_HEAD: names}


def _canonical_label(label: str) -> str:
  """Kinetics class name for matching: lower case, no surrounding quotes, '_' read as ' '."""
  return ' '.join(label.strip().strip('"\'').replace('_', ' ').lower().split())


def _read_kinetics(paths: Sequence[str], video_dir: str, classes: str | None
                   ) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """`read_kinetics`; `classes`: a class list file keeping only its classes, None for all."""
  subset = annotations.read_class_list(classes) if classes else None
  return read_kinetics(paths, video_dir, subset=subset)


def _read_kinetics_sounds(paths: Sequence[str], video_dir: str, classes: str | None
                          ) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """`read_kinetics` of the Kinetics-Sounds classes (`kinetics_sounds_classes(classes or '31')`)."""
  return read_kinetics(paths, video_dir, subset=kinetics_sounds_classes(classes or '31'))


def write_smoke(raw: str, rng: np.random.Generator) -> tuple[list[str], str, str | None]:
  """Writes Kinetics-Sounds smoke data into `raw` as Kinetics ships it (`avt_jax.prep.smoke_data`).

  `train.csv` / `validate.csv` (splits `train` / `val`) with the Kinetics header; clips cut and named
  `{id}_{start:06d}_{end:06d}.mp4` under `videos/{split}/{label}/`, one full video `videos/{id}.mp4`
  cut at its annotated segment, a row of a class outside Kinetics-Sounds (left out) and a row whose
  file is missing (skipped). Classes: the shipped 31-class list.

  Returns:
    (annotation files, video folder, `--classes`).
  """
  names = kinetics_sounds_classes('31')
  header = ('label', 'youtube_id', 'time_start', 'time_end', 'split')
  files = []
  for split, csv_name, count in (('train', 'train.csv', 6), ('val', 'validate.csv', 3)):
    rows = []
    for i in range(count):
      youtube_id, label, start = f'ks{split[0]}{i:02d}-Xy_z', names[i % 3], 10 * i
      rows.append((label, youtube_id, start, start + 10, split))
      if split == 'train' and i == 0:  # the full video: annotated segment [2, 4) of a 4 s video
        rows[-1] = (label, youtube_id, 2, 4, split)
        smoke_clips.write_clip(os.path.join(raw, 'videos', f'{youtube_id}.mp4'), rng, [5, i % 3])
      else:
        name = f'{youtube_id}_{start:06d}_{start + 10:06d}.mp4'
        smoke_clips.write_clip(os.path.join(raw, 'videos', split, label, name), rng, [i % 3])
    rows.append(('abseiling', f'ks{split[0]}other', 0, 10, split))  # not a Kinetics-Sounds class
    rows.append((names[0], f'ks{split[0]}gone', 0, 10, split))  # video never downloaded
    files.append(os.path.join(raw, csv_name))
    smoke_clips.write_csv(files[-1], rows, header)
  return files, os.path.join(raw, 'videos'), '31'


KINETICS = Dataset('kinetics', _read_kinetics, Defaults())
KINETICS_SOUNDS = Dataset(
    'kinetics_sounds', _read_kinetics_sounds, Defaults(),
    tfds=TfdsSpec('avt_kinetics_sounds', 'Kinetics-Sounds (the shipped 31-class list)',
                  {'label': (CLASS_HEAD, 31)}),
    write_smoke=write_smoke)
