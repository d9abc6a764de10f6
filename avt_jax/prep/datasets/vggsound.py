"""VGGSound (`--dataset=vggsound`): 10 s YouTube clips, 309 classes.

Annotations: `vggsound.csv` as published, rows `youtube_id,start_seconds,label,split` without a header;
clips last `CLIP_SECONDS`. Defaults: 25 fps, short side 256 px, 128 mel bins, 10 s clips.
"""

import csv
import os
from typing import Sequence

import numpy as np

from avt_jax.prep import annotations
from avt_jax.prep import smoke_clips
from avt_jax.prep.annotations import CLASS_HEAD, ClipSpec, VideoIndex
from avt_jax.prep.datasets import Dataset, Defaults, TfdsSpec

CLIP_SECONDS = 10.0
NUM_CLASSES = 309


def read_vggsound(paths: Sequence[str], video_dir: str, class_names: Sequence[str] | None = None,
                  index: VideoIndex | None = None) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """Reads VGGSound CSV files: rows `youtube_id,start_seconds,label,split`, no header.

  Video files: `{youtube_id}_{start:06d}.<ext>` or `{youtube_id}_{start:06d}_{start + 10:06d}.<ext>`
  (a clip already cut, decoded whole), or `{youtube_id}.<ext>` (the full video, cut at
  [start, start + 10]), in any sub-folder of `video_dir`. Clip ids are `{youtube_id}_{start:06d}`.

  Args:
    paths: CSV files (usually the single `vggsound.csv`).
    video_dir: folder holding the video files.
    class_names: fixes the class order (every label must be in it); None for the sorted unique labels,
      which for the full `vggsound.csv` are the `NUM_CLASSES` classes.
    index: a prebuilt index of `video_dir` (built when None).

  Returns:
    (clips in file order, {'class': class names}).

  Raises:
    ValueError: a row without 4 fields, an invalid id or time, an empty label or split, a label not in
      `class_names`, or one clip listed with two labels; the message names the file and line.
  """
  index = index or VideoIndex(video_dir)
  rows = []  # (where, youtube_id, start, label, split)
  for path in paths:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      for fields in reader:
        where = f'{path}:{reader.line_num}'
        if not fields or all(not field.strip() for field in fields):
          continue
        if len(fields) != 4:
          raise ValueError(f'{where}: expected 4 fields youtube_id,start_seconds,label,split (no '
                           f'header), got {len(fields)}.')
        youtube_id, start, label, split = (field.strip() for field in fields)
        if not label:
          raise ValueError(f'{where}: `label` must not be empty.')
        rows.append((where, annotations.check_id(youtube_id, 'youtube_id', where),
                     annotations.required_seconds(start, 'start_seconds', where), label,
                     annotations.check_split(split, where)))
  names = list(class_names) if class_names is not None else sorted({row[3] for row in rows})
  index_of = {name: i for i, name in enumerate(names)}
  specs = []
  for where, youtube_id, start, label, split in rows:
    if label not in index_of:
      raise ValueError(f'{where}: label {label!r} is not in the class list.')
    clip_id = f'{youtube_id}_{int(start):06d}'
    end = start + CLIP_SECONDS
    found = index.find([clip_id, f'{clip_id}_{int(end):06d}', youtube_id])
    labels = {CLASS_HEAD: [index_of[label]]}
    if found is None or found[0] != youtube_id:
      spec = ClipSpec(clip_id, found[1] if found else f'{clip_id}.mp4', labels, split=split)
    else:
      spec = ClipSpec(clip_id, found[1], labels, start=start, end=end, split=split)
    specs.append((where, spec))
  return annotations.merge_duplicates(specs), {CLASS_HEAD: names}


def _read(paths: Sequence[str], video_dir: str, classes: str | None
          ) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """`read_vggsound`; `classes`: a class list file fixing the class order, None for the sorted labels."""
  class_names = annotations.read_class_list(classes) if classes else None
  return read_vggsound(paths, video_dir, class_names=class_names)


def write_smoke(raw: str, rng: np.random.Generator) -> tuple[list[str], str, str | None]:
  """Writes VGGSound smoke data into `raw` as VGGSound ships it (`avt_jax.prep.smoke_data`).

  `vggsound.csv` without a header (labels with commas, quoted), splits `train` and `test`, clips named
  `video/{id}_{start:06d}.mp4` and one `{id}_{start:06d}_{end:06d}.mp4`, a row whose file is missing,
  and a 309-name class list (`--classes`), since the few rows cannot name all 309 classes.

  Returns:
    (annotation files, video folder, `--classes`).
  """
  names = [f'smoke sound {i:03d}, synthetic' for i in range(NUM_CLASSES)]
  classes_path = os.path.join(raw, 'classes.txt')
  with open(classes_path, 'w', encoding='utf-8') as f:
    f.write('# VGGSound smoke classes\n' + '\n'.join(names) + '\n')
  rows = []
  for split, count in (('train', 6), ('test', 3)):
    for i in range(count):
      youtube_id, start = f'-vs{split[1]}{i:02d}_A', 30 + i
      name = f'{youtube_id}_{start:06d}.mp4' if i else f'{youtube_id}_{start:06d}_{start + 10:06d}.mp4'
      smoke_clips.write_clip(os.path.join(raw, 'video', name), rng, [i % 3])
      rows.append((youtube_id, start, names[i % 3], split))
  rows.append(('-vsgone', 0, names[0], 'test'))  # video never downloaded
  path = os.path.join(raw, 'vggsound.csv')
  smoke_clips.write_csv(path, rows)
  return [path], os.path.join(raw, 'video'), classes_path


DATASET = Dataset(
    'vggsound', _read, Defaults(),
    tfds=TfdsSpec('avt_vggsound', 'VGGSound (309 classes)', {'label': (CLASS_HEAD, NUM_CLASSES)}),
    write_smoke=write_smoke)
