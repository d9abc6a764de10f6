"""What every annotation parser shares: the clip description, safe paths, the video index, CSV fields.

Each dataset's parser (`avt_jax.prep.datasets`, one module per dataset) turns its annotation files into
a list of `ClipSpec` (what to cut from which video, with which labels, for which split) plus the class
names of each label head. The shard writer (`avt_jax.prep.shards.prepare_dataset`) only sees
`ClipSpec`s, so supporting a new dataset means adding one module there that returns the same pair
(`avt_jax.prep.registry`).

YouTube ids and EPIC participant/video ids must match `[A-Za-z0-9_-]+` (`check_id`), so an id can never
name a path outside the video folder. Video files are looked up in an index of the video folder (see
`VideoIndex`); a clip whose file is not found keeps its conventional path and is reported as missing
by the shard writer, never fatal. Every error names the file and line, and what was expected.
"""

import collections
import csv
import dataclasses
import os
import re
from typing import Any, Iterable, Iterator, Sequence

CLASS_HEAD = 'class'
DEFAULT_SPLIT = 'train'
# Small dataset metadata (class lists) shipped with the source tree, next to the `avt_jax` package.
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        'data')
VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v', '.mpg', '.mpeg', '.ts', '.ogv',
                    '.ogg', '.flv', '.3gp', '.wmv')
INDEX_RE = re.compile(r'^[0-9]+$')
_ID_RE = re.compile(r'^[A-Za-z0-9_-]+$')


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
    group: what the clip shares its source with (speaker, source video, session), or None; clips of
      one group are held out together (`avt_jax.prep.holdout`).
  """
  clip_id: str
  path: str
  labels: dict[str, list[int]]
  start: float | None = None
  end: float | None = None
  split: str = DEFAULT_SPLIT
  group: str | None = None


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


def optional_seconds(value: Any, field: str, where: str) -> float | None:
  """Seconds from an optional annotation field: None when empty.

  Raises:
    ValueError: not a finite number >= 0; the message names `where` (file:line) and `field`.
  """
  if value is None or value == '':
    return None
  try:
    seconds = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: `{field}` must be a number of seconds, got {value!r}.') from None
  if not seconds >= 0 or seconds == float('inf'):
    raise ValueError(f'{where}: `{field}` must be a finite number >= 0, got {value!r}.')
  return seconds


def read_table(path: str, required: Sequence[str],
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


def check_id(value: str, field: str, where: str) -> str:
  """`value` if it is letters, digits, '_' or '-' (a YouTube or EPIC id); else ValueError at `where`."""
  if not _ID_RE.match(value):
    raise ValueError(f'{where}: `{field}` must be letters, digits, "_" or "-", got {value!r}.')
  return value


def check_split(value: str, where: str) -> str:
  """`value` if it is a non-empty split name; else ValueError at `where`."""
  if not value:
    raise ValueError(f'{where}: `split` must not be empty.')
  return value


def required_seconds(value: str, field: str, where: str) -> float:
  """Seconds from a required annotation field (see `optional_seconds`); ValueError when empty."""
  seconds = optional_seconds(value, field, where)
  if seconds is None:
    raise ValueError(f'{where}: `{field}` must not be empty.')
  return seconds


def merge_duplicates(specs: Iterable[tuple[str, ClipSpec]]) -> list[ClipSpec]:
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
