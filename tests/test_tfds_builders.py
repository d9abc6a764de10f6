"""Tests for avt_jax.input.tfds_builders: offline TFDS copies of prepared record folders."""

import glob
import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from avt_jax import prepare
from avt_jax import records
from avt_jax.input import tfds_builders
from avt_jax.prep import smoke_data


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """EPIC-Kitchens-100 and VGGSound smoke data, prepared and built as TFDS datasets."""
  cache = str(tmp_path_factory.mktemp('cache'))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepared = {name: smoke_data.ensure_smoke_data(name, cache, progress=False)
              for name in ('epic_kitchens_100', 'vggsound')}
  for name, folder in prepared.items():
    tfds_builders.build(name, folder, data_dir)
  return prepared, data_dir


def _records(prepared, split, heads):
  clips = {}
  for path in glob.glob(os.path.join(prepared, f'{split}-*.tfrecord')):
    for serialized in tf.data.TFRecordDataset(path):
      clip = records.parse_clip(serialized, heads)
      clips[clip['id'].numpy().decode()] = clip
  return clips


def test_tfds_load_offline_gives_the_prepared_clips(built):
  prepared, data_dir = built
  dataset, info = tfds.load('avt_epic_kitchens_100', split='validation', data_dir=data_dir,
                            download=False, with_info=True)
  assert sorted(info.splits.keys()) == ['train', 'validation']
  assert info.features['verb'].num_classes == 97 and info.features['noun'].num_classes == 300
  expected = _records(prepared['epic_kitchens_100'], 'validation', ('verb', 'noun'))
  examples = {ex['id'].decode(): ex for ex in tfds.as_numpy(dataset)}
  assert sorted(examples) == sorted(expected) == ['P02_01_1', 'P02_01_2']
  for clip_id, ex in examples.items():
    clip = expected[clip_id]
    frames = np.stack([tf.io.decode_jpeg(jpeg).numpy() for jpeg in clip['jpeg']])
    np.testing.assert_array_equal(ex['video'], frames)  # [16, 36, 36, 3], same pixels
    np.testing.assert_array_equal(ex['logmel'], clip['logmel'].numpy().astype(np.float16))
    assert ex['verb'] == clip['labels/verb'].numpy()[0] and ex['noun'] == clip['labels/noun'].numpy()[0]
    assert (ex['fps'], ex['audio_fps'], ex['audio_missing']) == (8.0, 100.0, False)


def test_built_folder_is_readable_without_this_module(built):
  prepared, data_dir = built
  builder = tfds.builder_from_directory(os.path.join(data_dir, 'avt_vggsound', '1.0.0'))
  with open(os.path.join(prepared['vggsound'], 'stats.json')) as f:
    assert builder.info.features['label'].names == json.load(f)['label_names']['class']
  labels = {ex['id'].decode(): int(ex['label']) for ex in tfds.as_numpy(builder.as_dataset(split='test'))}
  assert labels == {'-vse00_A_000030': 0, '-vse01_A_000031': 1, '-vse02_A_000032': 2}


def test_building_again_reuses_the_dataset(built):
  prepared, data_dir = built
  files = os.path.join(data_dir, 'avt_vggsound', '1.0.0', '*.tfrecord*')
  before = {path: os.stat(path).st_mtime_ns for path in glob.glob(files)}
  tfds_builders.build('vggsound', prepared['vggsound'], data_dir)
  assert {path: os.stat(path).st_mtime_ns for path in glob.glob(files)} == before


def test_wrong_or_missing_prepared_folder(built, tmp_path):
  prepared, _ = built
  with pytest.raises(ValueError, match="expected 31 classes for label head 'class', found 309"):
    tfds_builders.build('kinetics_sounds', prepared['vggsound'], str(tmp_path / 'a'))
  with pytest.raises(FileNotFoundError, match='stats.json not found'):
    tfds_builders.build('vggsound', str(tmp_path), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match="No TFDS builder for 'manifest'"):
    tfds_builders.build('manifest', str(tmp_path), str(tmp_path / 'c'))


def test_prepare_command_line_builds_the_tfds_copy(built, tmp_path, capsys):
  prepared, _ = built
  raw = os.path.join(os.path.dirname(prepared['epic_kitchens_100']), 'raw')
  status = prepare.main([
      '--dataset=epic_kitchens_100',
      f'--annotations={os.path.join(raw, "EPIC_100_train.csv")},'
      f'{os.path.join(raw, "EPIC_100_validation.csv")}', f'--videos={raw}/videos', f'--output={tmp_path / "out"}',
      '--fps=4', '--short_side=16', '--n_mels=16', '--clip_seconds=1', '--workers=0',
      f'--tfds_data_dir={tmp_path / "tfds"}'])
  assert status == 0
  assert "tfds.load('avt_epic_kitchens_100'" in capsys.readouterr().out
  train = tfds.load('avt_epic_kitchens_100', split='train', data_dir=str(tmp_path / 'tfds'), download=False)
  shapes = {tuple(ex['video'].shape) + tuple(ex['logmel'].shape) for ex in train}
  assert shapes == {(4, 16, 16, 3, 100, 16)}  # 1 s at 4 fps, 16 mel bins
  assert prepare.main(['--dataset=manifest', '--annotations=x.csv', f'--videos={raw}', f'--output={tmp_path}',
                       f'--tfds_data_dir={tmp_path}']) == 2
