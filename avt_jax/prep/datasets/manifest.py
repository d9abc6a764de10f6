"""The generic manifest: your own labelled videos, one row per clip (`--dataset=manifest`).

A manifest is either a CSV file with the header `path,label[,start,end][,split][,id][,group]` or a JSON-lines
file with the same keys (our design):

* `path`: video path relative to the video folder.
* `label`: class name or integer class index; several labels (multi-label) as `a|b` in CSV or a JSON
  list; empty for an unlabelled clip.
* `start`, `end`: optional segment in seconds (empty or absent: the whole video).
* `split`: optional split name (default `train`).
* `group`: optional source of the clip (speaker, source video, session): the validation split that
  preparation holds out of `train` takes whole groups (`avt_jax.prep.holdout`).
* `id`: optional clip id. The default is `path` (normalised, extension kept, so `clip.mp4` and
  `clip.avi` differ) plus `#start-end` when a segment is given, with the numbers written exactly, so
  every distinct file and segment gets its own id; rows whose default ids would still coincide (a file
  literally named like another file's segment id) are refused with both lines named.

Manifests saved by spreadsheet programs are read as they come: a UTF-8 byte-order mark, Windows line
endings, header names in another case or with spaces around them, rows left empty. Columns other than
the ones above (notes, durations, ...) are ignored, with one note on stderr listing them. A video that
appears in two splits (a train/test leak) gets a warning on stderr naming both rows; the manifest is
still read.

Defaults: 25 fps, short side 256 px, 128 mel bins, the annotated segments as they are, 15% of the
`train` clips held out by group as `val` when the manifest has no `val` rows (fusion calibration). The
demo and VoiceDigits datasets (`avt_jax.prep.demo_data`, `avt_jax.prep.voice_digits`) are written as manifests.
"""

import csv
import json
import os
import posixpath
import sys
from typing import Any, Iterator, Mapping, Sequence

from avt_jax.prep import annotations
from avt_jax.prep.annotations import CLASS_HEAD, DEFAULT_SPLIT, ClipSpec
from avt_jax.prep.datasets import Dataset, Defaults

_MANIFEST_KEYS = ('path', 'label', 'start', 'end', 'split', 'id', 'group')


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
    ValueError: unknown file type, missing columns, or a malformed row; the message names the file and
      line.
  """
  rows = list(_read_rows(path))
  ignored = sorted({key for _, row in rows for key in row} - set(_MANIFEST_KEYS))
  if ignored:
    sys.stderr.write(f'manifest: note: {path}: columns {ignored} ignored (read: '
                     f'{",".join(_MANIFEST_KEYS)}).\n')
  raw_labels = [_split_labels(row['label'], path, line) for line, row in rows]
  names = list(class_names) if class_names is not None else _infer_class_names(raw_labels, path, rows)
  index_of = {name: i for i, name in enumerate(names)}
  specs = []
  default_ids: dict[str, tuple[int, tuple]] = {}  # default id -> (line, (path, start, end))
  splits_of: dict[str, dict[str, int]] = {}  # normalised video path -> split -> first line
  for (line, row), labels in zip(rows, raw_labels):
    where = f'{path}:{line}'
    video = row.get('path')
    if not isinstance(video, str) or not video:
      raise ValueError(f'{where}: `path` must be a non-empty string, got {video!r}.')
    start = annotations.optional_seconds(row.get('start'), 'start', where)
    end = annotations.optional_seconds(row.get('end'), 'end', where)
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
    _warn_if_in_two_splits(splits_of.setdefault(default_clip_id(video, None, None), {}), split, line,
                           video, path)
    indices = [_label_index(label, index_of, len(names), where) for label in labels]
    specs.append(ClipSpec(clip_id=clip_id, path=video, labels={CLASS_HEAD: indices},
                          start=start, end=end, split=split, group=row.get('group') or None))
  return specs, {CLASS_HEAD: names}


def _warn_if_in_two_splits(first_lines: dict[str, int], split: str, line: int, video: str,
                           path: str) -> None:
  """Warns once per pair of splits that share the video `video` (first rows of each named)."""
  if split not in first_lines:
    for other, other_line in first_lines.items():
      sys.stderr.write(f'manifest: warning: {path}: the video {video!r} is in split {other!r} (line '
                       f'{other_line}) and in split {split!r} (line {line}); the splits overlap.\n')
    first_lines[split] = line


def _read_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (1-based line number, row dict) from a CSV or JSON-lines manifest."""
  extension = os.path.splitext(path)[1].lower()
  if extension == '.csv':
    with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: a byte-order mark is dropped
      reader = csv.DictReader(f)
      header = [name.strip().lower() for name in reader.fieldnames or []]
      reader.fieldnames = header
      _check_keys(header, path, 1)
      for row in reader:
        if None in row or any(value is None for value in row.values()):
          raise ValueError(f'{path}:{reader.line_num}: expected {len(header)} columns '
                           f'({",".join(header)}), got a row with a different count.')
        if not any(value.strip() for value in row.values()):
          continue  # a row left empty (spreadsheets write `,,,`)
        yield reader.line_num, {key: value.strip() for key, value in row.items()}
  elif extension in ('.jsonl', '.json'):
    with open(path, encoding='utf-8-sig') as f:
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
  missing = [key for key in ('path', 'label') if key not in keys]
  if missing:
    raise ValueError(f'{path}:{line}: expected keys path,label[,start,end][,split][,id][,group]; '
                     f'missing {missing}, got {list(keys)}.')


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
  return isinstance(label, int) or bool(annotations.INDEX_RE.match(label))


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


def write_manifest(folder: str, rows: list[dict[str, str]]) -> str:
  """Writes `rows` (path, label, split[, group]) as `folder/manifest.csv`; returns its path."""
  manifest = os.path.join(folder, 'manifest.csv')
  with open(manifest, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[k for k in _MANIFEST_KEYS if rows and k in rows[0]])
    writer.writeheader()
    writer.writerows(rows)
  return manifest


def _read(paths: Sequence[str], video_dir: str, classes: str | None
          ) -> tuple[list[ClipSpec], dict[str, list[str]]]:
  """`read_manifest` of the one manifest in `paths`; `classes`: a class list file fixing the order."""
  del video_dir  # manifest paths are relative to it; the shard writer joins them
  class_names = annotations.read_class_list(classes) if classes else None
  if len(paths) != 1:
    raise ValueError(f'A manifest is one file (its `split` column gives the splits), got '
                     f'{len(paths)}: {list(paths)}.')
  return read_manifest(paths[0], class_names=class_names)


DATASET = Dataset('manifest', _read, Defaults(clip_seconds=None, val_fraction=0.15))
