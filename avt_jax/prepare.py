"""Prepares a dataset: raw videos + the dataset's own annotation files -> sharded training records.

    python -m avt_jax.prepare --dataset=kinetics_sounds \\
        --annotations kinetics400/train.csv kinetics400/validate.csv \\
        --videos=/data/kinetics400/videos --output=/data/kinetics_sounds_records
    python -m avt_jax.prepare --dataset=vggsound --annotations vggsound.csv \\
        --videos=/data/vggsound/video --output=/data/vggsound_records
    python -m avt_jax.prepare --dataset=epic_kitchens_100 \\
        --annotations EPIC_100_train.csv EPIC_100_validation.csv \\
        --videos=/data/EPIC-KITCHENS --output=/data/epic_kitchens_100_records
    python -m avt_jax.prepare --dataset=manifest --annotations my_clips.csv --videos=... --output=...
    # the same as an Apache Beam pipeline (DirectRunner here; Dataflow etc. by --beam_options):
    python -m avt_jax.prepare --dataset=vggsound --annotations vggsound.csv \
        --videos=/mnt/vggsound/video --output=gs://B/vggsound_records --runner=beam \
        --beam_options="--runner=DataflowRunner --project=P --region=us-central1 \
                        --temp_location=gs://B/tmp --setup_file=./setup.py"

Annotation formats and video file naming: see `avt_jax.prep.annotations` (`read_kinetics`,
`read_vggsound`, `read_epic_kitchens`, `read_manifest`). Output: `{split}-NNNNN-of-NNNNN.tfrecord` files
(`--num_shards` per split; by default about 256 clips per file but at least 64 files where each keeps
8 clips, so that the hosts of a multi-host job read their own files)
of JPEG frames and log-mel spectrograms (`avt_jax.records`), `stats.json` and `report.jsonl` (see
`avt_jax.prep.shards.prepare_dataset`); training reads them with `--config.data.data_dir=<output>`.

Per-clip problems never stop the run: a missing, unreadable or corrupt file, or one whose decoder crashes
its worker process (`decoder crashed`), is skipped; a clip shorter than `--clip_seconds` is padded (last
frame repeated, silence), damaged packets are skipped, and a file without audio, or whose audio stream
cannot be decoded, keeps its video and gets silence and the `audio/missing` flag (or is skipped with
`--missing_audio=skip`); each case is written to `report.jsonl` and counted in the final summary. Bad annotation files, and ids or
paths that would lead outside `--videos`, stop the run before any work with an error naming the file
and line. An interrupted run resumes where it stopped when started again with the same arguments.

Defaults per dataset (`DATASET_DEFAULTS`): 25 fps, short side 256 px, 128 mel bins; 10 s clips for
Kinetics(-Sounds) and VGGSound, an 8 s window centred on each EPIC-Kitchens-100 segment, and the
annotated segments as they are for a manifest. Add `--tfds_data_dir=DIR` to also build the
tensorflow-datasets copy (`avt_jax.input.tfds_builders`).
"""

import argparse
import collections
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

from avt_jax.prep import annotations

DATASETS = ('kinetics_sounds', 'kinetics', 'vggsound', 'epic_kitchens_100', 'manifest')
DATASET_DEFAULTS = {
    'kinetics_sounds': dict(fps=25.0, short_side=256, n_mels=128, clip_seconds=10.0),
    'kinetics': dict(fps=25.0, short_side=256, n_mels=128, clip_seconds=10.0),
    'vggsound': dict(fps=25.0, short_side=256, n_mels=128, clip_seconds=10.0),
    'epic_kitchens_100': dict(fps=25.0, short_side=256, n_mels=128, clip_seconds=8.0),
    'manifest': dict(fps=25.0, short_side=256, n_mels=128, clip_seconds=None),
}
_NUMBER_RE = re.compile(r'-?[0-9]+(?:\.[0-9]+)?')


def read_annotations(dataset: str, annotation_paths: Sequence[str], video_dir: str,
                     classes: str | None = None
                     ) -> tuple[list[annotations.ClipSpec], dict[str, list[str]]]:
  """Clips and class names of `dataset` from its own annotation files.

  Args:
    dataset: one of `DATASETS`.
    annotation_paths: the dataset's annotation files.
    video_dir: the video folder.
    classes: Kinetics-Sounds: a shipped variant ('31', the default) or a class list file; Kinetics
      (keep only these classes), VGGSound and manifest (fix the class order): a class list file;
      EPIC-Kitchens-100: must be None (names come from `EPIC_100_{verb,noun}_classes.csv`).

  Returns:
    (`ClipSpec` list, label head -> class names).
  """
  for path in annotation_paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Annotation file {path!r} does not exist.')
  if dataset == 'epic_kitchens_100':
    if classes:
      raise ValueError('--classes does not apply to epic_kitchens_100: class names are read from '
                       'EPIC_100_verb_classes.csv and EPIC_100_noun_classes.csv next to the annotations.')
    return annotations.read_epic_kitchens(annotation_paths, video_dir)
  if dataset == 'kinetics_sounds':
    return annotations.read_kinetics(annotation_paths, video_dir,
                                     subset=annotations.kinetics_sounds_classes(classes or '31'))
  class_list = annotations.read_class_list(classes) if classes else None
  if dataset == 'kinetics':
    return annotations.read_kinetics(annotation_paths, video_dir, subset=class_list)
  if dataset == 'vggsound':
    return annotations.read_vggsound(annotation_paths, video_dir, class_names=class_list)
  if dataset == 'manifest':
    if len(annotation_paths) != 1:
      raise ValueError(f'A manifest is one file (its `split` column gives the splits), got '
                       f'{len(annotation_paths)}: {list(annotation_paths)}.')
    return annotations.read_manifest(annotation_paths[0], class_names=class_list)
  raise ValueError(f'Unknown dataset {dataset!r}; expected one of {DATASETS}.')


def prepare(dataset: str, annotation_paths: Sequence[str], video_dir: str, output_dir: str, *,
            classes: str | None = None, fps: float | None = None, short_side: int | None = None,
            n_mels: int | None = None, clip_seconds: float | None = -1.0,
            missing_audio: str = 'silence', workers: int | None = None, jpeg_quality: int = 90,
            num_shards: int | Mapping[str, int] | None = None, runner: str = 'local',
            beam_options: str = '', progress: bool = True) -> dict[str, Any]:
  """Reads the annotations and writes the records (see the module docstring).

  Args:
    dataset: one of `DATASETS`.
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
    runner: 'local' or 'beam' (Apache Beam, see `avt_jax.prep.beam_runner`).
    beam_options: Beam pipeline options as on a command line (runner='beam').
    progress: print progress and a summary on stderr.

  Returns:
    The dataset statistics (`stats.json`).

  Raises:
    ValueError: `num_shards` names a split the annotations do not have, or is < 1.
  """
  from avt_jax.prep import shards  # pylint: disable=g-import-not-at-top  # numpy, PyAV, librosa
  specs, label_names = read_annotations(dataset, annotation_paths, video_dir, classes)
  defaults = DATASET_DEFAULTS[dataset]
  per_split = collections.Counter(spec.split for spec in specs)
  shards_per_split = _shards_per_split(num_shards, per_split)
  if progress:
    splits = ', '.join(f'{split}: {count}' for split, count in sorted(per_split.items()))
    heads = ', '.join(f'{head}: {len(names)} classes' for head, names in label_names.items())
    sys.stderr.write(f'prepare: {len(specs)} clips ({splits}) from {len(annotation_paths)} annotation '
                     f'file(s); {heads}\n')
  return shards.prepare_dataset(
      specs, video_dir, output_dir, label_names=label_names,
      fps=defaults['fps'] if fps is None else fps,
      short_side=defaults['short_side'] if short_side is None else short_side,
      n_mels=defaults['n_mels'] if n_mels is None else n_mels,
      clip_seconds=defaults['clip_seconds'] if clip_seconds is not None and clip_seconds < 0
      else clip_seconds,
      missing_audio=missing_audio, num_workers=workers, jpeg_quality=jpeg_quality,
      num_shards_per_split=shards_per_split, runner=runner, beam_options=beam_options,
      progress=progress)


def _shards_per_split(num_shards: int | Mapping[str, int] | None,
                      clips_per_split: Mapping[str, int]) -> dict[str, int]:
  from avt_jax.prep import shards  # pylint: disable=g-import-not-at-top
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


def parse_num_shards(values: Sequence[str] | None) -> int | dict[str, int] | None:
  """`--num_shards` values: 'N' (every split) or 'SPLIT=N' entries (our design).

  Raises:
    ValueError: naming the value that is neither.
  """
  if not values:
    return None
  if len(values) == 1 and '=' not in values[0]:
    number = values[0]
    if not number.isdigit():
      raise ValueError(f"--num_shards: expected a number or SPLIT=N entries, got {number!r}.")
    return int(number)
  result = {}
  for value in values:
    split, _, number = value.partition('=')
    if not split or not number.isdigit():
      raise ValueError(f'--num_shards: expected SPLIT=N entries (e.g. train=512 test=64) when '
                       f'giving several, got {value!r}.')
    result[split] = int(number)
  return result


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
  reasons = {'skipped': collections.Counter(), 'degraded': collections.Counter()}
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


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  parser = argparse.ArgumentParser(
      prog='python -m avt_jax.prepare',
      description='Decode a dataset\'s videos into sharded records of JPEG frames and log-mel '
      'spectrograms, reading the dataset\'s own annotation files.',
      epilog='Dataset defaults: ' + '; '.join(
          f'{name}: ' + ', '.join(f'{k}={v}' for k, v in values.items())
          for name, values in DATASET_DEFAULTS.items()) + '.')
  parser.add_argument('--dataset', required=True, choices=DATASETS, help='Annotation format.')
  parser.add_argument('--annotations', required=True, nargs='+', action='extend', metavar='FILE',
                      help='Annotation files: Kinetics train/validate/test CSVs; vggsound.csv; '
                      'EPIC_100_train.csv / EPIC_100_validation.csv / EPIC_100_test_timestamps.csv; '
                      'manifest CSV or JSON lines.')
  parser.add_argument('--videos', required=True, metavar='DIR', help='Folder holding the videos.')
  parser.add_argument('--output', required=True, metavar='DIR', help='Records folder to write.')
  parser.add_argument('--classes', default=None, metavar='LIST',
                      help="kinetics_sounds: '31' (shipped in data/) or a class list file (one name "
                      'per line); kinetics: keep only the classes in this file; vggsound/manifest: '
                      'file fixing the class order. Default: kinetics_sounds 31, others the sorted '
                      'labels found.')
  parser.add_argument('--fps', type=float, default=None,
                      help='Stored frames per second (default: the dataset default).')
  parser.add_argument('--short_side', type=int, default=None,
                      help='Stored frame short side in pixels, even (default: the dataset default).')
  parser.add_argument('--n_mels', type=int, default=None,
                      help='Mel bins of the log-mel spectrogram (default: the dataset default).')
  parser.add_argument('--clip_seconds', type=float, default=-1.0,
                      help='Fixed clip duration (window centred on the annotated segment); 0 keeps '
                      'the annotated segments (default: the dataset default).')
  parser.add_argument('--missing_audio', choices=('silence', 'skip'), default='silence',
                      help='Files without an audio stream, or whose audio stream cannot be decoded: '
                      'keep the video with silence and the audio/missing flag, or skip (default: '
                      'silence).')
  parser.add_argument('--workers', type=int, default=os.cpu_count(),
                      help='Decoding processes; 0 decodes in this process (default: all cores).')
  parser.add_argument('--jpeg_quality', type=int, default=90,
                      help='JPEG quality of the stored frames (default: 90).')
  parser.add_argument('--num_shards', nargs='+', default=None, metavar='N|SPLIT=N',
                      help='Record files per split: one number for every split, or SPLIT=N entries '
                      '(e.g. train=1024 test=64; other splits get the default). Multi-host training '
                      'reads files per host, so aim for files >= hosts x 4. Default: about '
                      '256 clips per file, but at least 64 files where each keeps 8 clips.')
  parser.add_argument('--runner', choices=('local', 'beam'), default='local',
                      help='local: decoding processes on this machine (--workers); beam: an Apache '
                      'Beam pipeline, one element per shard (pip install -e ".[beam]"; default: '
                      'the embedded DirectRunner). Same output either way.')
  parser.add_argument('--beam_options', default='', metavar='OPTIONS',
                      help='With --runner=beam: Beam pipeline options in one string, e.g. '
                      '"--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp '
                      '--setup_file=./setup.py".')
  parser.add_argument('--tfds_data_dir', default=None, metavar='DIR',
                      help='Also build the tensorflow-datasets copy there (kinetics_sounds, vggsound, '
                      'epic_kitchens_100), loadable with tfds.load(..., data_dir=DIR, download=False).')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (2 for bad input)."""
  args = build_parser().parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.tfds_data_dir:
    from avt_jax.input import tfds_builders  # pylint: disable=g-import-not-at-top
    if args.dataset not in tfds_builders.BUILDERS:
      sys.stderr.write(f'prepare: error: --tfds_data_dir supports {sorted(tfds_builders.BUILDERS)}, '
                       f'not {args.dataset}.\n')
      return 2
  try:
    stats = prepare(args.dataset, args.annotations, args.videos, args.output, classes=args.classes,
                    fps=args.fps, short_side=args.short_side, n_mels=args.n_mels,
                    clip_seconds=None if args.clip_seconds == 0 else args.clip_seconds,
                    missing_audio=args.missing_audio, workers=args.workers,
                    jpeg_quality=args.jpeg_quality, num_shards=parse_num_shards(args.num_shards),
                    runner=args.runner, beam_options=args.beam_options)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.stderr.write(f'prepare: error: {e}\n')
    return 2
  print(summary(args.output, stats), flush=True)
  if args.tfds_data_dir:
    builder = tfds_builders.build(args.dataset, args.output, args.tfds_data_dir)
    print(f'TFDS: tfds.load({builder.name!r}, data_dir={args.tfds_data_dir!r}, download=False)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
