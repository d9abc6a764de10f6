"""tensorflow-datasets builders over prepared record folders, for users who load data with `tfds`.

Training reads the prepared records directly (`avt_jax.input.pipeline`); these builders make the same
clips available as TFDS datasets, fully offline: the folder written by `python -m avt_jax.prepare` is
the builder's manual folder, and building copies its clips (JPEG bytes unchanged) into TFDS files.

    from avt_jax.input import tfds_builders
    tfds_builders.build('vggsound', '/data/vggsound_records', '/data/tfds')  # once (or --tfds_data_dir)
    ds = tfds.load('avt_vggsound', split='test', data_dir='/data/tfds', download=False)

Loading needs no import of this module: the built folder holds its own metadata. Datasets
(`BUILDERS`, one per registered dataset with a `TfdsSpec`, see `avt_jax.prep.registry`):
`avt_kinetics_sounds`, `avt_vggsound`, `avt_epic_kitchens_100`; the splits are those of the prepared
folder. Features of each example:

  `id`            Text      clip id
  `video`         Video     [frames, height, width, 3] uint8, JPEG-encoded frames as prepared
  `fps`           float32   frame rate of `video`
  `logmel`        float16   [frames, n_mels] log-mel spectrogram
  `audio_fps`     float32   spectrogram frames per second
  `audio_missing` bool      the source had no audio stream; `logmel` is silence
  `label`         ClassLabel (Kinetics-Sounds, VGGSound), or `verb` and `noun` (EPIC-Kitchens-100);
                  -1 for an unlabelled clip; class names from the prepared `stats.json`.
"""

import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
from etils import epath
import tensorflow_datasets as tfds

from avt_jax import data_format
from avt_jax import records
from avt_jax.prep import registry

_MANUAL_INSTRUCTIONS = ('Prepare the dataset with `python -m avt_jax.prepare --dataset={dataset} ... '
                        '--output=DIR` and pass DIR as the manual folder (`tfds_builders.build`, or '
                        '`tfds.download.DownloadConfig(manual_dir=DIR)`).')


class _PreparedRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Copies a prepared record folder (`manual_dir`) into a TFDS dataset.

  Subclasses (`_builder_class`) set `DATASET` (the `avt_jax.prepare` dataset name) and `LABELS` (TFDS
  feature name -> (label head in the records, number of classes)) from the dataset's registry entry.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Clips of a folder prepared by avt_jax.prepare.'}
  DATASET = ''
  LABELS: dict[str, tuple[str, int]] = {}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (tensorflow-datasets 4.9.10 looks it up through the `importlib_resources` backport,
    which it installs only for Python < 3.9, and fails without it.)"""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    labels = {name: tfds.features.ClassLabel(num_classes=num_classes)
              for name, (_, num_classes) in self.LABELS.items()}
    return self.dataset_info_from_configs(
        description=f'{self.DATASET} clips prepared by avt_jax.prepare: JPEG frames and log-mel '
        'spectrograms.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'video': tfds.features.Video(shape=(None, None, None, 3), encoding_format='jpeg'),
            'fps': tfds.features.Scalar(np.float32),
            'logmel': tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding='zlib'),
            'audio_fps': tfds.features.Scalar(np.float32),
            'audio_missing': tfds.features.Scalar(np.bool_),
            **labels,
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    prepared = os.fspath(dl_manager.manual_dir)
    stats_path = data_format.stats_path(prepared)
    if not tf.io.gfile.exists(stats_path):
      raise FileNotFoundError(f'{stats_path} not found: the manual folder must be the --output of '
                              f'`python -m avt_jax.prepare --dataset={self.DATASET}`.')
    stats = data_format.read_stats(prepared, required=('num_clips',))
    for name, (head, num_classes) in self.LABELS.items():
      names = stats.get('label_names', {}).get(head)
      if names is None or len(names) != num_classes:
        raise ValueError(f'{stats_path}: expected {num_classes} classes for label head {head!r}, '
                         f'found {None if names is None else len(names)}.')
      self.info.features[name].names = names
    return {split: self._generate_examples(sorted(tf.io.gfile.glob(
        data_format.split_pattern(prepared, split)))) for split in sorted(stats['num_clips'])}

  def _generate_examples(self, files: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    heads = tuple(head for head, _ in self.LABELS.values())
    for path in files:
      for serialized in tf.data.TFRecordDataset(path):
        clip = records.parse_clip(serialized, heads)
        clip_id = clip['id'].numpy().decode()
        example = {
            'id': clip_id,
            'video': list(clip['jpeg'].numpy()),
            'fps': clip['fps'].numpy(),
            'logmel': clip['logmel'].numpy().astype(np.float16),
            'audio_fps': clip['audio_fps'].numpy(),
            'audio_missing': bool(clip['audio_missing'].numpy()),
        }
        for name, (head, _) in self.LABELS.items():
          indices = clip[data_format.label_key(head)].numpy().tolist()
          if len(indices) > 1:
            raise ValueError(f'{path}: clip {clip_id!r} has several {head!r} labels {indices}; the '
                             'TFDS builders hold one label per head.')
          example[name] = indices[0] if indices else -1
        yield clip_id, example


def _builder_class(dataset: str) -> type[_PreparedRecords]:
  """The TFDS builder of a registered dataset with a `TfdsSpec` (`avt_jax.prep.registry`)."""
  spec = registry.get(dataset).tfds
  return type(''.join(word.capitalize() for word in spec.name.split('_')), (_PreparedRecords,), {
      '__doc__': f'{spec.title} prepared by avt_jax.prepare.', '__module__': __name__,
      'name': spec.name, 'DATASET': dataset, 'LABELS': dict(spec.labels),
      'MANUAL_DOWNLOAD_INSTRUCTIONS': _MANUAL_INSTRUCTIONS.format(dataset=dataset)})


BUILDERS = {name: _builder_class(name) for name, entry in registry.DATASETS.items() if entry.tfds}
AvtKineticsSounds = BUILDERS['kinetics_sounds']
AvtVggsound = BUILDERS['vggsound']
AvtEpicKitchens100 = BUILDERS['epic_kitchens_100']


def build(dataset: str, prepared_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the TFDS copy of a prepared folder under `data_dir` (no network; a no-op when built).

  Args:
    dataset: a key of `BUILDERS` ('kinetics_sounds', 'vggsound' or 'epic_kitchens_100').
    prepared_dir: the folder written by `python -m avt_jax.prepare --dataset=<dataset>`.
    data_dir: the TFDS data folder.

  Returns:
    The builder; `builder.as_dataset(split=...)` or `tfds.load(builder.name, data_dir=data_dir,
    download=False)` read the examples.
  """
  if dataset not in BUILDERS:
    raise ValueError(f'No TFDS builder for {dataset!r}; expected one of {sorted(BUILDERS)}.')
  builder = BUILDERS[dataset](data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=prepared_dir, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder
