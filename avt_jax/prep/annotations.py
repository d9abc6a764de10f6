"""Clip lists from annotation files.

Every dataset parser turns its annotation files into a list of `ClipSpec` (what to cut from which
video, with which labels, for which split) plus the class names of each label head. The shard writer
(`avt_jax.prep.shards.prepare_dataset`) only sees `ClipSpec`s, so supporting a new dataset means
adding one `read_<dataset>` function here that returns the same pair.

Parsers (each error names the file and line, and what was expected):

* `read_manifest`: the generic manifest, see below.
* `read_kinetics`: Kinetics-400/600/700 CSV files with the header `label,youtube_id,time_start,
  time_end,split` (any column order, extra columns ignored, `label` absent or empty for unlabelled test
  rows). With `class_names` (e.g. `kinetics_sounds_classes()`), rows of other classes are left out: this
  is how the Kinetics-Sounds subset is read.
* `read_vggsound`: VGGSound CSV rows `youtube_id,start_seconds,label,split` without a header; clips
  last `VGGSOUND_CLIP_SECONDS`.
* `read_epic_kitchens`: EPIC-Kitchens-100 `EPIC_100_train.csv`, `EPIC_100_validation.csv` (and the
  unlabelled `EPIC_100_test_timestamps.csv`); verb and noun label heads.

YouTube ids and EPIC participant/video ids must match `[A-Za-z0-9_-]+`, so an id can never name a
path outside the video folder. Video files are looked up in an index of the video folder (see
`VideoIndex`); a clip whose file is not found keeps its conventional path and is reported as missing
by the shard writer, never fatal.

The generic manifest (`read_manifest`) is either a CSV file with the header
`path,label[,start,end][,split][,id]` or a JSON-lines file with the same keys:

* `path`: video path relative to the video folder.
* `label`: class name or integer class index; several labels (multi-label) as `a|b` in CSV or a JSON
  list; empty for an unlabelled clip.
* `start`, `end`: optional segment in seconds (empty or absent: the whole video).
* `split`: optional split name (default `train`).
* `id`: optional clip id. The default is `path` (normalised, extension kept, so `clip.mp4` and
  `clip.avi` differ) plus `#start-end` when a segment is given, with the numbers written exactly, so
  every distinct file and segment gets its own id; rows whose default ids would still coincide (a file
  literally named like another file's segment id) are refused with both lines named.
"""

import collections
import csv
import dataclasses
import json
import os
import posixpath
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

CLASS_HEAD = 'class'
DEFAULT_SPLIT = 'train'
# Small dataset metadata (class lists) shipped with the source tree, next to the `avt_jax` package.
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        'data')
KINETICS_SOUNDS_SHIPPED = ('31',)  # variants shipped as data/kinetics_sounds_{variant}.txt
VGGSOUND_CLIP_SECONDS = 10.0
VGGSOUND_NUM_CLASSES = 309
EPIC_NUM_CLASSES = {'verb': 97, 'noun': 300}
VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v', '.mpg', '.mpeg', '.ts', '.ogv',
                    '.ogg', '.flv', '.3gp', '.wmv')
_INDEX_RE = re.compile(r'^[0-9]+$')
_MANIFEST_KEYS = ('path', 'label', 'start', 'end', 'split', 'id')
_ID_RE = re.compile(r'^[A-Za-z0-9_-]+$')
_TIMESTAMP_RE = re.compile(r'^([0-9]+):([0-5][0-9]):([0-5][0-9](?:\.[0-9]*)?)$')
_EPIC_FILE_RE = re.compile(r'^EPIC_100_(train|validation|test)(?:_timestamps)?\.csv$')
_KINETICS_COLUMNS = ('youtube_id', 'time_start', 'time_end', 'split')
_EPIC_COLUMNS = ('narration_id', 'participant_id', 'video_id', 'start_timestamp', 'stop_timestamp')


@dataclasses.dataclass
class ClipSpec:
  """One clip to prepare.

  Attributes:
    clip_id: unique id within its split.
    path: video path relative to the video folder.
    labels: label head -> class indices, e.g. {'class': [3]} or {'verb': [2], 'noun': [7]}.
    start: segment start in seconds, or None for the start of the video.
    end: segment end in seconds, or None for the end of the video.
    split: split name, e.g. 'train', 'test'.
  """
  clip_id: str
  path: str
  labels: dict[str, list[int]]
  start: float | None = None
  end: float | None = None
  split: str = DEFAULT_SPLIT


def safe_join(root: str, relative: str) -> str:
  """Joins a path taken from an annotation file onto `root`, refusing paths that leave `root`.

  Args:
    root: the trusted folder (e.g. the video folder).
    relative: untrusted relative path from an annotation file.

  Returns:
    `root` joined with the normalised `relative`.

  Raises:
    ValueError: `relative` is empty, absolute, contains a NUL byte, or resolves (through `..` or
      symbolic links) to a location outside `root`.
  """
  if not relative or '\0' in relative:
    raise ValueError(f'Invalid relative path {relative!r}: must be non-empty without NUL bytes.')
  if os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
    raise ValueError(f'Path {relative!r} must be relative to {root!r}, got an absolute path.')
  joined = os.path.join(root, os.path.normpath(relative))
  real_root = os.path.realpath(root)
  real_joined = os.path.realpath(joined)
  if os.path.commonpath([real_root, real_joined]) != real_root:
    raise ValueError(f'Path {relative!r} resolves to {real_joined!r}, outside of {root!r}.')
  return joined


def default_clip_id(path: str, start: float | None, end: float | None) -> str:
  """Clip id derived from the video path and the segment: `dir/video.mp4` or `dir/video.mp4#1.5-3`.

  The path is normalised (`./a//b.mp4` -> `a/b.mp4`) and keeps its extension, and the segment bounds
  are written exactly (the shortest form that reads back as the same number), so distinct files and
  segments get distinct ids.
  """
  base = posixpath.normpath(path.replace(os.sep, '/'))
  if start is None and end is None:
    return base
  return f'{base}#{"" if start is None else _exact(start)}-{"" if end is None else _exact(end)}'


def _exact(seconds: float) -> str:
  """`seconds` as text that reads back as the same float: `3`, `1.5`, `1234.5678`."""
  short = f'{seconds:g}'
  return short if float(short) == seconds else repr(float(seconds))


def read_manifest(
    path: str,
    class_names: Sequence[str] | None = None,
    default_split: str = DEFAULT_SPLIT,
) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """Reads a generic manifest (CSV or JSON lines, see the module docstring).

  Labels are resolved as follows. With `class_names`, a label is first looked up as a name, and
  otherwise (CSV digits or JSON integers) used as an index into `class_names`. Without `class_names`,
  labels must be all names (classes = sorted unique names) or all indices (classes `'0'`..`'max'`).

  Args:
    path: `.csv`, `.jsonl` or `.json` (one JSON object per line) file.
    class_names: optional class list fixing the names and the index order.
    default_split: split of rows without a `split` value.

  Returns:
    (clips in file order, {'class': class names}).

  Raises:
    ValueError: unknown file type, missing/unknown columns, or a malformed row; the message names
      the file and line.
  """
  rows = list(_read_rows(path))
  raw_labels = [_split_labels(row['label'], path, line) for line, row in rows]
  names = list(class_names) if class_names is not None else _infer_class_names(raw_labels, path, rows)
  index_of = {name: i for i, name in enumerate(names)}
  specs = []
  default_ids: dict[str, tuple[int, tuple]] = {}  # default id -> (line, (path, start, end))
  for (line, row), labels in zip(rows, raw_labels):
    where = f'{path}:{line}'
    video = row.get('path')
    if not isinstance(video, str) or not video:
      raise ValueError(f'{where}: `path` must be a non-empty string, got {video!r}.')
    start = _optional_seconds(row.get('start'), 'start', where)
    end = _optional_seconds(row.get('end'), 'end', where)
    if start is not None and end is not None and end <= start:
      raise ValueError(f'{where}: `end` ({end}) must be greater than `start` ({start}).')
    split = row.get('split') or default_split
    clip_id = row.get('id')
    if not clip_id:
      clip_id = default_clip_id(video, start, end)
      key = (default_clip_id(video, None, None), start, end)
      other_line, other_key = default_ids.setdefault(clip_id, (line, key))
      if other_key != key:
        raise ValueError(f'{where}: the default id {clip_id!r} of this row is also the default id of '
                         f'line {other_line} ({other_key[0]!r}); give the rows an `id`.')
    if not isinstance(split, str) or not isinstance(clip_id, str):
      raise ValueError(f'{where}: `split` and `id` must be strings.')
    indices = [_label_index(label, index_of, len(names), where) for label in labels]
    specs.append(ClipSpec(clip_id=clip_id, path=video, labels={CLASS_HEAD: indices},
                          start=start, end=end, split=split))
  return specs, {CLASS_HEAD: names}


def _read_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (1-based line number, row dict) from a CSV or JSON-lines manifest."""
  extension = os.path.splitext(path)[1].lower()
  if extension == '.csv':
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      header = reader.fieldnames or []
      _check_keys(header, path, 1)
      for row in reader:
        if None in row or any(value is None for value in row.values()):
          raise ValueError(f'{path}:{reader.line_num}: expected {len(header)} columns '
                           f'({",".join(header)}), got a row with a different count.')
        yield reader.line_num, {key: value.strip() for key, value in row.items()}
  elif extension in ('.jsonl', '.json'):
    with open(path, encoding='utf-8') as f:
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{line}: invalid JSON ({e.msg}).') from None
        if not isinstance(row, dict):
          raise ValueError(f'{path}:{line}: expected a JSON object, got {type(row).__name__}.')
        _check_keys(list(row), path, line)
        yield line, row
  else:
    raise ValueError(f'{path}: unknown manifest type {extension!r}; expected .csv or .jsonl.')


def _check_keys(keys: Sequence[str], path: str, line: int) -> None:
  unknown = sorted(set(keys) - set(_MANIFEST_KEYS))
  missing = [key for key in ('path', 'label') if key not in keys]
  if unknown or missing:
    raise ValueError(f'{path}:{line}: expected keys path,label[,start,end][,split][,id]; '
                     f'missing {missing}, unknown {unknown}.')


def _split_labels(value: Any, path: str, line: int) -> list[str | int]:
  """Labels of one row: CSV `a|b` strings or JSON scalars/lists; empty = unlabelled."""
  if value is None or value == '':
    return []
  values = value if isinstance(value, list) else (value.split('|') if isinstance(value, str) else [value])
  labels = []
  for label in values:
    if isinstance(label, str) and label.strip():
      labels.append(label.strip())
    elif isinstance(label, int) and not isinstance(label, bool):
      labels.append(label)
    else:
      raise ValueError(f'{path}:{line}: labels must be non-empty names or integer indices, '
                       f'got {label!r}.')
  return labels


def _is_index(label: str | int) -> bool:
  return isinstance(label, int) or bool(_INDEX_RE.match(label))


def _infer_class_names(raw_labels: list[list[str | int]], path: str,
                       rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
  """Class names when none are given: sorted unique names, or '0'..'max' for indices."""
  kinds = {(line, _is_index(label)) for (line, _), labels in zip(rows, raw_labels) for label in labels}
  if {is_index for _, is_index in kinds} == {True, False}:
    line = min(line for line, is_index in kinds if is_index)
    raise ValueError(f'{path}:{line}: labels mix class names and integer indices; pass class_names '
                     'or use one kind.')
  flat = [label for labels in raw_labels for label in labels]
  if flat and _is_index(flat[0]):
    return [str(i) for i in range(max(int(label) for label in flat) + 1)]
  return sorted(set(flat))


def _label_index(label: str | int, index_of: Mapping[str, int], num_classes: int, where: str) -> int:
  if isinstance(label, str) and label in index_of:
    return index_of[label]
  if _is_index(label):
    index = int(label)
    if index < num_classes:
      return index
    raise ValueError(f'{where}: class index {index} out of range [0, {num_classes}).')
  raise ValueError(f'{where}: unknown class name {label!r}.')


def _optional_seconds(value: Any, field: str, where: str) -> float | None:
  if value is None or value == '':
    return None
  try:
    seconds = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: `{field}` must be a number of seconds, got {value!r}.') from None
  if not seconds >= 0 or seconds == float('inf'):
    raise ValueError(f'{where}: `{field}` must be a finite number >= 0, got {value!r}.')
  return seconds


def read_class_list(path: str) -> list[str]:
  """Class names from a text file: one per line; blank lines and lines starting with '#' are skipped.

  Raises:
    ValueError: the file holds no names or a name twice.
  """
  with open(path, encoding='utf-8-sig') as f:
    names = [line.strip() for line in f]
  names = [name for name in names if name and not name.startswith('#')]
  repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if not names or repeated:
    raise ValueError(f'{path}: expected one unique class name per line; '
                     f'{"no names" if not names else f"repeated names {repeated}"}.')
  return names


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
    path = os.path.join(DATA_DIR, f'kinetics_sounds_{variant}.txt')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: the class lists ship in data/ of the avt_jax source '
                              'tree; pass the path of a class list file instead.')
    return read_class_list(path)
  if os.path.isfile(variant):
    return read_class_list(variant)
  raise ValueError(f'Kinetics-Sounds classes: expected one of {list(KINETICS_SOUNDS_SHIPPED)} or the '
                   f'path of a class list file (one Kinetics class name per line), got {variant!r}.')


class VideoIndex:
  """The video files under a folder, looked up by file name without extension.

  The folder is walked once (symbolic links to folders are not followed); files whose extension is in
  `VIDEO_EXTENSIONS` (any case) count, in any sub-folder, so `train/<label>/<id>.mp4` and flat layouts
  both work. Paths are relative to the folder, with '/' separators.
  """

  def __init__(self, video_dir: str):
    if not os.path.isdir(video_dir):
      raise FileNotFoundError(f'Video folder {video_dir!r} does not exist.')
    self._by_stem: dict[str, list[str]] = collections.defaultdict(list)
    for folder, subfolders, files in os.walk(video_dir):
      subfolders.sort()
      for name in sorted(files):
        stem, extension = os.path.splitext(name)
        if extension.lower() in VIDEO_EXTENSIONS:
          relative = os.path.relpath(os.path.join(folder, name), video_dir)
          self._by_stem[stem].append(relative.replace(os.sep, '/'))

  def __len__(self) -> int:
    return sum(len(paths) for paths in self._by_stem.values())

  def find(self, stems: Sequence[str], prefer_folders: Sequence[str] = ()) -> tuple[str, str] | None:
    """The first of `stems` that names a file, as (stem, relative path), or None.

    Among several files with that stem, the first one (in `prefer_folders` order) whose folder is in
    `prefer_folders` wins, else the first in walk order.
    """
    for stem in stems:
      paths = self._by_stem.get(stem)
      if paths:
        for folder in prefer_folders:
          for path in paths:
            if os.path.dirname(path) == folder:
              return stem, path
        return stem, paths[0]
    return None


def read_kinetics(
    paths: Sequence[str],
    video_dir: str,
    subset: Sequence[str] | None = None,
    index: VideoIndex | None = None,
) -> tuple[list[ClipSpec], dict[str, list[str]]]:
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
    for line, row in _read_table(path, _KINETICS_COLUMNS, optional=('label',)):
      where = f'{path}:{line}'
      youtube_id = _check_id(row['youtube_id'], 'youtube_id', where)
      start = _seconds(row['time_start'], 'time_start', where)
      end = _seconds(row['time_end'], 'time_end', where)
      if end <= start:
        raise ValueError(f'{where}: `time_end` ({end:g}) must be greater than `time_start` ({start:g}).')
      rows.append((where, youtube_id, start, end, _check_split(row['split'], where),
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
  return _merge_duplicates(specs), {CLASS_HEAD: names}


def read_vggsound(
    paths: Sequence[str],
    video_dir: str,
    class_names: Sequence[str] | None = None,
    index: VideoIndex | None = None,
) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """Reads VGGSound CSV files: rows `youtube_id,start_seconds,label,split`, no header.

  Video files: `{youtube_id}_{start:06d}.<ext>` or `{youtube_id}_{start:06d}_{start + 10:06d}.<ext>`
  (a clip already cut, decoded whole), or `{youtube_id}.<ext>` (the full video, cut at
  [start, start + 10]), in any sub-folder of `video_dir`. Clip ids are `{youtube_id}_{start:06d}`.

  Args:
    paths: CSV files (usually the single `vggsound.csv`).
    video_dir: folder holding the video files.
    class_names: fixes the class order (every label must be in it); None for the sorted unique labels,
      which for the full `vggsound.csv` are the `VGGSOUND_NUM_CLASSES` classes.
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
        rows.append((where, _check_id(youtube_id, 'youtube_id', where),
                     _seconds(start, 'start_seconds', where), label, _check_split(split, where)))
  names = list(class_names) if class_names is not None else sorted({row[3] for row in rows})
  index_of = {name: i for i, name in enumerate(names)}
  specs = []
  for where, youtube_id, start, label, split in rows:
    if label not in index_of:
      raise ValueError(f'{where}: label {label!r} is not in the class list.')
    clip_id = f'{youtube_id}_{int(start):06d}'
    end = start + VGGSOUND_CLIP_SECONDS
    found = index.find([clip_id, f'{clip_id}_{int(end):06d}', youtube_id])
    labels = {CLASS_HEAD: [index_of[label]]}
    if found is None or found[0] != youtube_id:
      spec = ClipSpec(clip_id, found[1] if found else f'{clip_id}.mp4', labels, split=split)
    else:
      spec = ClipSpec(clip_id, found[1], labels, start=start, end=end, split=split)
    specs.append((where, spec))
  return _merge_duplicates(specs), {CLASS_HEAD: names}


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
    match = _EPIC_FILE_RE.match(os.path.basename(path))
    if not match:
      raise ValueError(f'{path}: expected an EPIC-Kitchens-100 file named EPIC_100_train.csv, '
                       'EPIC_100_validation.csv or EPIC_100_test_timestamps.csv (the split comes from '
                       'the name).')
    split = match.group(1)
    for line, row in _read_table(path, _EPIC_COLUMNS, optional=tuple(f'{h}_class' for h in
                                                                     EPIC_NUM_CLASSES)):
      where = f'{path}:{line}'
      participant = _check_id(row['participant_id'], 'participant_id', where)
      video = _check_id(row['video_id'], 'video_id', where)
      narration = row['narration_id']
      if not narration:
        raise ValueError(f'{where}: `narration_id` must not be empty.')
      start = _timestamp(row['start_timestamp'], 'start_timestamp', where)
      stop = _timestamp(row['stop_timestamp'], 'stop_timestamp', where)
      if stop <= start:
        raise ValueError(f'{where}: `stop_timestamp` must be after `start_timestamp`, got '
                         f'{row["start_timestamp"]} to {row["stop_timestamp"]}.')
      labels = {}
      for head, num_classes in EPIC_NUM_CLASSES.items():
        value = row.get(f'{head}_class', '')
        if not value:
          labels[head] = []
        elif _INDEX_RE.match(value) and int(value) < num_classes:
          labels[head] = [int(value)]
        else:
          raise ValueError(f'{where}: `{head}_class` must be an integer in [0, {num_classes}), got '
                           f'{value!r}.')
      found = index.find([video], prefer_folders=(f'{participant}/videos', participant))
      relative = found[1] if found else f'{participant}/videos/{video}.MP4'
      specs.append((where, ClipSpec(narration, relative, labels, start=start, end=stop, split=split)))
  names = {head: _epic_class_names(os.path.dirname(paths[0]) if paths else '', head, num_classes)
           for head, num_classes in EPIC_NUM_CLASSES.items()}
  seen = {}
  for where, spec in specs:
    key = (spec.split, spec.clip_id)
    if key in seen:
      raise ValueError(f'{where}: narration id {spec.clip_id!r} repeats {seen[key]}.')
    seen[key] = where
  return [spec for _, spec in specs], names


def _epic_class_names(folder: str, head: str, num_classes: int) -> list[str]:
  """`key` of each class from `EPIC_100_{head}_classes.csv` in `folder`, or the indices as names."""
  path = os.path.join(folder, f'EPIC_100_{head}_classes.csv')
  if not os.path.isfile(path):
    return [str(i) for i in range(num_classes)]
  names = {}
  for line, row in _read_table(path, ('id', 'key')):
    if not _INDEX_RE.match(row['id']) or int(row['id']) >= num_classes or not row['key']:
      raise ValueError(f'{path}:{line}: expected an id in [0, {num_classes}) and a non-empty key.')
    names[int(row['id'])] = row['key']
  if sorted(names) != list(range(num_classes)):
    raise ValueError(f'{path}: expected the {num_classes} ids 0..{num_classes - 1} once each.')
  return [names[i] for i in range(num_classes)]


def _read_table(path: str, required: Sequence[str],
                optional: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (line, row) of a CSV file with a header holding `required` (and maybe `optional`) columns.

  Other columns are ignored. Values are stripped; absent optional columns read as ''.
  """
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in required if name not in header]
    if missing:
      raise ValueError(f'{path}:1: expected the columns {",".join(required)}'
                       f'{" (and optionally " + ",".join(optional) + ")" if optional else ""}; '
                       f'missing {missing} in the header {header}.')
    reader.fieldnames = header
    for row in reader:
      if None in row or any(value is None for value in row.values()):
        raise ValueError(f'{path}:{reader.line_num}: expected {len(header)} columns '
                         f'({",".join(header)}), got a row with a different count.')
      if not any(value.strip() for value in row.values()):
        continue
      yield reader.line_num, {name: row.get(name, '').strip() for name in (*required, *optional)}


def _check_id(value: str, field: str, where: str) -> str:
  if not _ID_RE.match(value):
    raise ValueError(f'{where}: `{field}` must be letters, digits, "_" or "-", got {value!r}.')
  return value


def _check_split(value: str, where: str) -> str:
  if not value:
    raise ValueError(f'{where}: `split` must not be empty.')
  return value


def _seconds(value: str, field: str, where: str) -> float:
  seconds = _optional_seconds(value, field, where)
  if seconds is None:
    raise ValueError(f'{where}: `{field}` must not be empty.')
  return seconds


def _timestamp(value: str, field: str, where: str) -> float:
  """Seconds from an `HH:MM:SS[.fraction]` timestamp."""
  match = _TIMESTAMP_RE.match(value)
  if not match:
    raise ValueError(f'{where}: `{field}` must be HH:MM:SS.ff, got {value!r}.')
  hours, minutes, seconds = match.groups()
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _canonical_label(label: str) -> str:
  """Kinetics class name for matching: lower case, no surrounding quotes, '_' read as ' '."""
  return ' '.join(label.strip().strip('"\'').replace('_', ' ').lower().split())


def _merge_duplicates(specs: Iterable[tuple[str, ClipSpec]]) -> list[ClipSpec]:
  """Drops rows that repeat an earlier clip (same split and id) with the same labels.

  Raises:
    ValueError: a clip appears twice with different labels.
  """
  first: dict[tuple[str, str], tuple[str, ClipSpec]] = {}
  kept = []
  for where, spec in specs:
    key = (spec.split, spec.clip_id)
    if key not in first:
      first[key] = (where, spec)
      kept.append(spec)
    elif first[key][1].labels != spec.labels:
      raise ValueError(f'{where}: clip {spec.clip_id!r} of split {spec.split!r} is listed with other '
                       f'labels at {first[key][0]}.')
  return kept
