"""Prepares a dataset: raw videos + the dataset's own annotation files -> sharded training records.

    python -m avt_jax.prepare --dataset=kinetics_sounds \\
        --annotations=kinetics400/train.csv,kinetics400/validate.csv \\
        --videos=/data/kinetics400/videos --output=/data/kinetics_sounds_records
    python -m avt_jax.prepare --dataset=vggsound --annotations=vggsound.csv \\
        --videos=/data/vggsound/video --output=/data/vggsound_records
    python -m avt_jax.prepare --dataset=epic_kitchens_100 \\
        --annotations=EPIC_100_train.csv,EPIC_100_validation.csv \\
        --videos=/data/EPIC-KITCHENS --output=/data/epic_kitchens_100_records
    python -m avt_jax.prepare --dataset=manifest --annotations my_clips.csv --videos=... --output=...
    # the same as an Apache Beam pipeline (DirectRunner here; Dataflow etc. by --beam_options):
    python -m avt_jax.prepare --dataset=vggsound --annotations=vggsound.csv \
        --videos=/mnt/vggsound/video --output=gs://B/vggsound_records --runner=beam \
        --beam_options="--runner=DataflowRunner --project=P --region=us-central1 \
                        --temp_location=gs://B/tmp --setup_file=./setup.py"

This module only parses the command line; the work is `avt_jax.prep.preparation.prepare` (also
importable as `avt_jax.prepare.prepare`, its name before the dataset registry). Annotation
formats and video file naming: see the dataset modules in `avt_jax.prep.datasets` (`kinetics`,
`vggsound`, `epic_kitchens_100`, `manifest`; looked up in `avt_jax.prep.registry`). Output:
`{split}-NNNNN-of-NNNNN.tfrecord` files (`--num_shards` per split; by default about 256 clips per file
but at least 64 files where each keeps 8 clips, so that the hosts of a multi-host job read their own
files) of JPEG frames and log-mel spectrograms (`avt_jax.records`), `stats.json` and `report.jsonl`
(see `avt_jax.prep.shards.prepare_dataset`); training reads them with
`--config.data.data_dir=<output>`.

Per-clip problems never stop the run: a missing, unreadable or corrupt file, or one whose decoder crashes
its worker process (`decoder crashed`), is skipped; a clip shorter than `--clip_seconds` is padded (last
frame repeated, silence), damaged packets are skipped, and a file without audio, or whose audio stream
cannot be decoded, keeps its video and gets silence and the `audio/missing` flag (or is skipped with
`--missing_audio=skip`); each case is written to `report.jsonl` and counted in the final summary. Bad annotation files, and ids or
paths that would lead outside `--videos`, stop the run before any work with an error naming the file
and line. An interrupted run resumes where it stopped when started again with the same arguments.

Defaults per dataset (`avt_jax.prep.datasets.Defaults`): 25 fps, short side 256 px, 128 mel bins;
10 s clips for Kinetics(-Sounds) and VGGSound, an 8 s window centred on each EPIC-Kitchens-100
segment, and the annotated segments as they are for a manifest. Add `--tfds_data_dir=DIR` to also build the
tensorflow-datasets copy (`avt_jax.input.tfds_builders`).
"""

import dataclasses
import os
import sys
from typing import Sequence

from avt_jax import command_line  # before TensorFlow and JAX load

command_line.quiet_native_logs()

from absl import flags  # noqa: E402

from avt_jax.prep import preparation  # noqa: E402
from avt_jax.prep import registry  # noqa: E402
from avt_jax.prep.preparation import prepare  # noqa: F401,E402  the Python API, kept at its old name


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
      raise ValueError(f'--num_shards: expected SPLIT=N entries (e.g. train=512,test=64) when '
                       f'giving several, got {value!r}.')
    result[split] = int(number)
  return result


PROG = 'python -m avt_jax.prepare'


def usage() -> str:
  """What the command does, with the dataset defaults (printed by --help)."""
  return ('Decode a dataset\'s videos into sharded records of JPEG frames and log-mel spectrograms, '
          'reading the dataset\'s own annotation files.\n\nDataset defaults: ' + '; '.join(
              f'{name}: ' + ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(entry.defaults).items())
              for name, entry in registry.DATASETS.items()) + '.')


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (`avt_jax.command_line`)."""
  flags.DEFINE_enum('dataset', None, registry.NAMES, 'Annotation format.', flag_values=fv)
  flags.DEFINE_list('annotations', None, 'Annotation files, comma-separated: Kinetics '
                    'train/validate/test CSVs; vggsound.csv; EPIC_100_train.csv / '
                    'EPIC_100_validation.csv / EPIC_100_test_timestamps.csv; manifest CSV or JSON '
                    'lines.', flag_values=fv)
  flags.DEFINE_string('videos', None, 'Folder holding the videos.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Records folder to write.', flag_values=fv)
  flags.DEFINE_string('classes', None, "kinetics_sounds: '31' (shipped in data/) or a class list "
                      'file (one name per line); kinetics: keep only the classes in this file; '
                      'vggsound/manifest: file fixing the class order. Default: kinetics_sounds 31, '
                      'others the sorted labels found.', flag_values=fv)
  flags.DEFINE_float('fps', None, 'Stored frames per second (default: the dataset default).',
                     flag_values=fv)
  flags.DEFINE_integer('short_side', None, 'Stored frame short side in pixels, even (default: the '
                       'dataset default).', flag_values=fv)
  flags.DEFINE_integer('n_mels', None, 'Mel bins of the log-mel spectrogram (default: the dataset '
                       'default).', flag_values=fv)
  flags.DEFINE_float('clip_seconds', -1.0, 'Fixed clip duration (window centred on the annotated '
                     'segment); 0 keeps the annotated segments (default: the dataset default).',
                     flag_values=fv)
  flags.DEFINE_float('val_fraction', None, 'When the annotations have no `val` split: hold out at '
                     'least this fraction of the `train` clips, whole groups at a time (manifest '
                     '`group` column), as `val`, on which training calibrates its audio-video '
                     'fusion; 0 holds out nothing (default: the dataset default, 0.15 for manifest, '
                     '0 for the others).', flag_values=fv)
  flags.DEFINE_float('test_fraction', 0.0, 'When the annotations have no `test` split: hold out at '
                     'least this fraction of the `train` clips, whole groups at a time (manifest '
                     '`group` column), as `test`, on which training evaluates; taken before '
                     '--val_fraction, which then holds out of what stays in `train`, so no group is '
                     'in both; 0 holds out nothing (default).', flag_values=fv)
  flags.DEFINE_enum('missing_audio', 'silence', ('silence', 'skip'), 'Files without an audio '
                    'stream, or whose audio stream cannot be decoded: keep the video with silence '
                    'and the audio/missing flag, or skip.', flag_values=fv)
  flags.DEFINE_integer('workers', os.cpu_count(), 'Decoding processes; 0 decodes in this process '
                       '(default: all cores).', flag_values=fv)
  flags.DEFINE_integer('jpeg_quality', 90, 'JPEG quality of the stored frames.', flag_values=fv)
  flags.DEFINE_list('num_shards', None, 'Record files per split: one number N for every split, or '
                    'comma-separated SPLIT=N entries (e.g. train=1024,test=64; other splits get the '
                    'default). Multi-host training reads files per host, so aim for files >= hosts x '
                    '4. Default: about 256 clips per file, but at least 64 files where each keeps 8 '
                    'clips.', flag_values=fv)
  flags.DEFINE_enum('runner', 'local', preparation.RUNNERS, 'local: decoding processes on this '
                    'machine (--workers); beam: an Apache Beam pipeline, one element per shard (pip '
                    'install -e ".[beam]"; default: the embedded DirectRunner). Same output either '
                    'way.', flag_values=fv)
  flags.DEFINE_string('beam_options', '', 'With --runner=beam: Beam pipeline options in one string, '
                      'e.g. "--runner=DataflowRunner --project=P --region=R '
                      '--temp_location=gs://B/tmp --setup_file=./setup.py".', flag_values=fv)
  flags.DEFINE_string('tfds_data_dir', None, 'Also build the tensorflow-datasets copy there '
                      '(kinetics_sounds, vggsound, epic_kitchens_100), loadable with '
                      'tfds.load(..., data_dir=DIR, download=False).', flag_values=fv)
  flags.mark_flags_as_required(['dataset', 'annotations', 'videos', 'output'], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line (default: sys.argv[1:]); returns the exit status (2 for bad input)."""
  args, _ = command_line.parse(PROG, usage(), define_flags,
                               sys.argv[1:] if argv is None else argv)
  if args.tfds_data_dir:
    from avt_jax.input import tfds_builders  # pylint: disable=g-import-not-at-top
    if args.dataset not in tfds_builders.BUILDERS:
      sys.stderr.write(f'prepare: error: --tfds_data_dir supports {sorted(tfds_builders.BUILDERS)}, '
                       f'not {args.dataset}.\n')
      return 2
  try:
    stats = preparation.prepare(
        args.dataset, args.annotations, args.videos, args.output, classes=args.classes,
        fps=args.fps, short_side=args.short_side, n_mels=args.n_mels,
        clip_seconds=None if args.clip_seconds == 0 else args.clip_seconds,
        missing_audio=args.missing_audio, workers=args.workers, jpeg_quality=args.jpeg_quality,
        num_shards=parse_num_shards(args.num_shards), runner=args.runner,
        beam_options=args.beam_options, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.stderr.write(f'prepare: error: {e}\n')
    return 2
  print(preparation.summary(args.output, stats), flush=True)
  if args.tfds_data_dir:
    builder = tfds_builders.build(args.dataset, args.output, args.tfds_data_dir)
    print(f'TFDS: tfds.load({builder.name!r}, data_dir={args.tfds_data_dir!r}, download=False)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
