"""Clip lists from annotation files.

Every dataset parser turns its annotation files into a list of `ClipSpec` (what to cut from which
video, with which labels, for which split) plus the class names of each label head. The shard writer
(`avt_jax.prep.shards.prepare_dataset`) only sees `ClipSpec`s, so supporting a new dataset means
adding one `read_<dataset>` function here that returns the same pair.

The generic manifest (`read_manifest`) is either a CSV file with the header
`path,label[,start,end][,split][,id]` or a JSON-lines file with the same keys:

* `path`: video path relative to the video folder.
* `label`: class name or integer class index; several labels (multi-label) as `a|b` in CSV or a JSON
  list; empty for an unlabelled clip.
* `start`, `end`: optional segment in seconds (empty or absent: the whole video).
* `split`: optional split name (default `train`).
* `id`: optional clip id (default: `path` without extension, plus `#start-end` when a segment is given).
"""

import csv
import dataclasses
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

CLASS_HEAD = 'class'
DEFAULT_SPLIT = 'train'
_INDEX_RE = re.compile(r'^[0-9]+$')
_MANIFEST_KEYS = ('path', 'label', 'start', 'end', 'split', 'id')


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
  """Clip id derived from the video path and the segment: `dir/video` or `dir/video#1.5-3`."""
  base = os.path.splitext(path)[0]
  if start is None and end is None:
    return base
  return f'{base}#{"" if start is None else f"{start:g}"}-{"" if end is None else f"{end:g}"}'


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
    clip_id = row.get('id') or default_clip_id(video, start, end)
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
