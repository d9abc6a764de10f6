"""Checks that a TFRecord file is whole: against the size `prepare` recorded, or by its framing.

A TFRecord file is a sequence of records, each `uint64 length | uint32 masked CRC of the length |
length bytes of data | uint32 masked CRC of the data` (little-endian; the TFRecord format spec of
`tf.io.TFRecordWriter`). A file cut short (an interrupted copy or download) ends inside a record.
`prepare` records each shard's size and record count in `shard_stats/<shard>.json` (`num_bytes`,
`num_clips`); `damage` compares a file with them, or walks its framing when no size was recorded.
The walk reads only the 12-byte headers (one seek per record), so it does not see flipped bits
inside a record's data; TensorFlow's reader does (`DataLossError: corrupted record`), and
`locate_damage` falls back on it to name the file.
"""

from __future__ import annotations

import json
import os
import struct

class RecordFileError(ValueError):
  """A record file is damaged; the message is one line naming it and what to do."""


_HEADER = 12  # uint64 length + uint32 CRC
_FOOTER = 4   # uint32 CRC of the data


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def walk(path: str) -> tuple[int, int | None]:
  """(complete records, byte offset where the framing breaks or None) of a TFRecord file."""
  gfile = _gfile()
  size = gfile.stat(path).length
  count, offset = 0, 0
  with gfile.GFile(path, 'rb') as f:
    while offset < size:
      f.seek(offset)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        return count, offset
      (length,) = struct.unpack('<Q', header[:8])
      end = offset + _HEADER + length + _FOOTER
      if end > size:
        return count, offset
      count, offset = count + 1, end
  return count, None


def shard_stats_path(data_dir: str, name: str) -> str:
  """`<data_dir>/shard_stats/<shard>.json`, written by `prepare` next to each finished shard."""
  return os.path.join(data_dir, 'shard_stats', name.replace('.tfrecord', '.json'))


def damage(path: str, num_bytes: int | None = None, num_records: int | None = None) -> str | None:
  """Why the record file `path` is damaged, or None when it looks whole.

  Args:
    path: a TFRecord file.
    num_bytes: its size when written, if known: a different size is damage (no reading).
    num_records: its record count when written, if known: checked by walking the framing when the
      size is unknown.
  """
  gfile = _gfile()
  if not gfile.exists(path):
    return 'missing'
  size = gfile.stat(path).length
  if num_bytes is not None:
    return None if size == num_bytes else f'{size} bytes, {num_bytes} when written'
  count, broken = walk(path)
  if broken is not None:
    return f'cut short: the record at byte {broken} ends past the end of the file ({size} bytes)'
  if num_records is not None and count != num_records:
    return f'{count} records, {num_records} when written'
  return None


def recorded(data_dir: str, name: str) -> dict | None:
  """The `shard_stats` JSON of shard `name` in `data_dir`, or None (not prepared by `prepare`)."""
  path = shard_stats_path(data_dir, name)
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path) as f:
    return json.load(f)


def check_prepared(data_dir: str, files: list[str]) -> None:
  """Compares each file's size with the one `prepare` recorded (a stat per file, no reading).

  Raises:
    RecordFileError: one line naming the first damaged file and what to do.
  """
  for path in files:
    stats = recorded(data_dir, os.path.basename(path))
    if stats is None or 'num_bytes' not in stats:
      continue
    reason = damage(path, num_bytes=stats['num_bytes'])
    if reason is not None:
      raise RecordFileError(damaged_message(path, reason, data_dir))


def damaged_message(path: str, reason: str, data_dir: str) -> str:
  return (f'{path}: damaged record file ({reason}); copy it again, or rerun the same '
          f'`python -m avt_jax.prepare` command on {data_dir} to rewrite it.')


def locate_damage(files: list[str]) -> tuple[str, str] | None:
  """(file, reason) of the first damaged file among `files`, or None: framing first, then TF's CRCs."""
  for path in files:
    reason = damage(path)
    if reason is not None:
      return path, reason
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset(path):
        pass
    except tf.errors.DataLossError as e:
      return path, e.message.splitlines()[0]
  return None
