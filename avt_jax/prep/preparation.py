"""One dataset's annotation files and videos -> sharded records: what `python -m avt_jax.prepare` runs.

`read_annotations` looks the dataset up in `avt_jax.prep.registry`, `prepare` fills in its defaults and
hands the clips to `avt_jax.prep.shards.prepare_dataset`, `summary` reports what was written.
"""

import collections
import functools
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

from avt_jax.prep import annotations
from avt_jax.prep import holdout
from avt_jax.prep import registry
from avt_jax.prep import shards

_NUMBER_RE = re.compile(r'-?[0-9]+(?:\.[0-9]+)?')
RUNNERS = ('local', 'beam')


def shard_writer(runner: str, beam_options: str = '') -> shards.ShardWriter | None:
  """The shard writer of `runner`: None for 'local' (`shards.prepare_dataset`'s processes on this
  machine), or for 'beam' Apache Beam (`avt_jax.prep.beam_runner`: one element per unfinished
  shard, decoded clip by clip in a worker process of the Beam worker).

  Args:
    runner: 'local' or 'beam'.
    beam_options: with runner='beam', Beam pipeline options as on a command line (e.g.
      '--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp'); empty for the
      embedded DirectRunner.

  Raises:
    ValueError: an unknown runner or bad Beam options. ImportError: Apache Beam is not installed.
  """
  if runner not in RUNNERS:
    raise ValueError(f'runner must be one of {RUNNERS}, got {runner!r}.')
  if runner == 'local':
    return None
  from avt_jax.prep import beam_runner  # pylint: disable=g-import-not-at-top  # optional extra
  return functools.partial(beam_runner.write_shards, options=beam_runner.parse_options(beam_options))


def read_annotations(dataset: str, annotation_paths: Sequence[str], video_dir: str,
                     classes: str | None = None
                     ) -> tuple[list[annotations.ClipSpec], dict[str, list[str]]]:
  """Clips and class names of `dataset` from its own annotation files.

  Args:
    dataset: a `registry.NAMES` entry.
    annotation_paths: the dataset's annotation files.
    video_dir: the video folder.
    classes: Kinetics-Sounds: a shipped variant ('31', the default) or a class list file; Kinetics
      (keep only these classes), VGGSound and manifest (fix the class order): a class list file;
      EPIC-Kitchens-100: must be None (names come from `EPIC_100_{verb,noun}_classes.csv`).

  Returns:
    (`ClipSpec` list, label head -> class names).

  Raises:
    FileNotFoundError: an annotation file does not exist. ValueError: an unknown dataset, or the
      dataset's parser refuses the files (naming the file and line).
  """
  for path in annotation_paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Annotation file {path!r} does not exist.')
  return registry.get(dataset).read(annotation_paths, video_dir, classes)


def prepare(dataset: str, annotation_paths: Sequence[str], video_dir: str, output_dir: str, *,
            classes: str | None = None, fps: float | None = None, short_side: int | None = None,
            n_mels: int | None = None, clip_seconds: float | None = -1.0,
            missing_audio: str = 'silence', workers: int | None = None, jpeg_quality: int = 90,
            num_shards: int | Mapping[str, int] | None = None, runner: str = 'local',
            beam_options: str = '', progress: bool = True, val_fraction: float | None = None,
            test_fraction: float = 0.0) -> dict[str, Any]:
  """Reads the annotations and writes the records (see `python -m avt_jax.prepare --help`).

  Args:
    dataset: a `registry.NAMES` entry.
    annotation_paths: the dataset's annotation files.
    video_dir: the video folder.
    output_dir: the records folder (created; an interrupted preparation there is resumed).
    classes: see `read_annotations`.
    fps: stored frame rate; None for the dataset default.
    short_side: stored frame short side in pixels (even); None for the dataset default.
    n_mels: mel bins; None for the dataset default.
    clip_seconds: fixed clip duration in seconds, None to keep the annotated segments, or a negative
      value for the dataset default.
    missing_audio: 'silence' or 'skip' for files without an audio stream or whose audio stream cannot
      be decoded.
    workers: decoding processes (None: all cores; 0: this process).
    jpeg_quality: JPEG quality of the stored frames.
    num_shards: record files per split: one number for all splits, or per split (splits left out
      get the default); None for `shards.multihost_num_shards` of each split's clip count.
    runner, beam_options: see `shard_writer`.
    progress: print progress and a summary on stderr.
    val_fraction: least fraction of `train` clips held out by group as split `val` when the
      annotations have none, taken after the `test` hold-out (`avt_jax.prep.holdout`); None for
      the dataset default.
    test_fraction: least fraction of `train` clips held out by group as split `test` when the
      annotations have none (`avt_jax.prep.holdout`); 0 holds out nothing.

  Returns:
    The dataset statistics (`stats.json`).

  Raises:
    ValueError: `num_shards` names a split the annotations do not have, or is < 1; a bad hold-out
      fraction (`holdout.hold_out_splits`); see also `shard_writer`.
  """
  write_shards = shard_writer(runner, beam_options)  # before any output: Beam missing stops here
  specs, label_names = read_annotations(dataset, annotation_paths, video_dir, classes)
  defaults = registry.get(dataset).defaults
  specs, notes = holdout.hold_out_splits(
      specs, test_fraction=test_fraction,
      val_fraction=defaults.val_fraction if val_fraction is None else val_fraction)
  if progress:
    sys.stderr.writelines(f'prepare: {note}\n' for note in notes)
  per_split = collections.Counter(spec.split for spec in specs)
  shards_per_split = _shards_per_split(num_shards, per_split)
  if progress:
    splits = ', '.join(f'{split}: {count}' for split, count in sorted(per_split.items()))
    heads = ', '.join(f'{head}: {len(names)} classes' for head, names in label_names.items())
    sys.stderr.write(f'prepare: {len(specs)} clips ({splits}) from {len(annotation_paths)} annotation '
                     f'file(s); {heads}\n')
  return shards.prepare_dataset(
      specs, video_dir, output_dir, label_names=label_names,
      fps=defaults.fps if fps is None else fps,
      short_side=defaults.short_side if short_side is None else short_side,
      n_mels=defaults.n_mels if n_mels is None else n_mels,
      clip_seconds=defaults.clip_seconds if clip_seconds is not None and clip_seconds < 0
      else clip_seconds,
      missing_audio=missing_audio, num_workers=workers, jpeg_quality=jpeg_quality,
      num_shards_per_split=shards_per_split, write_shards=write_shards, progress=progress)


def _shards_per_split(num_shards: int | Mapping[str, int] | None,
                      clips_per_split: Mapping[str, int]) -> dict[str, int]:
  """Record files per split from `num_shards` (see `prepare`); ValueError naming a bad entry."""
  if isinstance(num_shards, Mapping):
    unknown = sorted(set(num_shards) - set(clips_per_split))
    if unknown:
      raise ValueError(f'--num_shards: no split {unknown[0]!r} in the annotations (splits: '
                       f'{sorted(clips_per_split)}).')
    given = dict(num_shards)
  else:
    given = {split: num_shards for split in clips_per_split}
  for split, wanted in given.items():
    if wanted is not None and wanted < 1:
      raise ValueError(f'--num_shards: {split} needs at least 1 shard, got {wanted}.')
  return {split: shards.multihost_num_shards(count) if given.get(split) is None else given[split]
          for split, count in clips_per_split.items()}


def summary(output_dir: str, stats: dict[str, Any]) -> str:
  """A text table of clips written / skipped / degraded per split and the reasons, with counts."""
  splits = sorted(stats['num_clips'])
  rows = [('split', 'written', 'skipped', 'degraded')]
  rows += [(s, str(stats['num_clips'][s]), str(stats['num_skipped'][s]), str(stats['num_degraded'][s]))
           for s in splits]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = [f'Prepared {output_dir}:']
  lines += ['  ' + '  '.join(cell.rjust(w) if i else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
  reasons = {status: collections.Counter() for status in ('skipped', 'degraded', 'note')}
  with open(os.path.join(output_dir, 'report.jsonl'), encoding='utf-8') as f:
    for line in f:
      entry = json.loads(line)
      reasons[entry['status']][_NUMBER_RE.sub('#', entry['reason'])] += 1
  for status, counts in reasons.items():
    for reason, count in counts.most_common():
      lines.append(f'  {status}: {count} x {reason}')
  if any(reasons.values()):
    lines.append(f'  (per clip: {os.path.join(output_dir, "report.jsonl")})')
  return '\n'.join(lines)
