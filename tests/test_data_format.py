"""The on-disk format (avt_jax.data_format): shard names, stats.json, label keys, time spans."""

import json
import os
import re
import subprocess
import sys

import pytest

from avt_jax import data_format

STATS = {'logmel_mean': -5.0, 'logmel_std': 2.0, 'n_mels': 64, 'num_classes': {'class': 3},
         'num_clips': {'train': 10}}


def test_shard_name_round_trip():
  name = data_format.shard_name('train_2', 3, 64)
  assert name == 'train_2-00003-of-00064.tfrecord'
  assert data_format.parse_shard_name(name) == ('train_2', 3, 64)
  assert data_format.parse_shard_name(name).split == 'train_2'
  assert data_format.parse_shard_name(data_format.shard_name('a', 7, 123456)) == ('a', 7, 123456)
  pattern = data_format.split_pattern('/data', 'train_2')
  assert pattern == '/data/train_2-*-of-*.tfrecord'
  with pytest.raises(ValueError, match='stats.json'):
    data_format.parse_shard_name('stats.json')


def test_stats_reader_names_the_file_and_the_missing_key(tmp_path):
  path = os.path.join(tmp_path, 'stats.json')
  with pytest.raises(FileNotFoundError, match=re.escape(path)):
    data_format.read_stats(str(tmp_path))
  with open(path, 'w') as f:
    json.dump({k: v for k, v in STATS.items() if k != 'n_mels'}, f)
  with pytest.raises(ValueError, match=re.escape(f"{path} lacks keys ['n_mels']")):
    data_format.read_stats(str(tmp_path))
  assert 'n_mels' not in data_format.read_stats(str(tmp_path), required=())
  with open(path, 'w') as f:
    f.write('{"logmel_mean": ')
  with pytest.raises(ValueError, match=re.escape(f'{path}: cannot read JSON')):
    data_format.read_stats(str(tmp_path))


def test_stats_writer_round_trip_and_atomic(tmp_path):
  path = data_format.write_stats(str(tmp_path), STATS)
  assert path == os.path.join(tmp_path, 'stats.json')
  assert data_format.read_stats(str(tmp_path)) == STATS
  assert os.listdir(tmp_path) == ['stats.json']  # the temporary file was renamed over it
  data_format.write_stats(str(tmp_path), dict(STATS, n_mels=32))  # replaces the old file
  assert data_format.read_stats(str(tmp_path))['n_mels'] == 32
  with pytest.raises(ValueError, match=r"lack keys \['logmel_std'\]"):
    data_format.write_stats(str(tmp_path), {k: v for k, v in STATS.items() if k != 'logmel_std'})
  assert data_format.read_stats(str(tmp_path))['n_mels'] == 32  # a refused write leaves the file


def test_label_keys():
  assert data_format.label_key('verb') == 'labels/verb'
  batch = {'video': 0, 'labels/verb': 1, 'labels/noun': 2, 'mask': 3}
  assert data_format.batch_labels(batch) == {'verb': 1, 'noun': 2}


def test_time_spans_match_hand_computation():
  assert data_format.AUDIO_FRAMES_PER_SECOND == 100.0  # 10 ms hop
  # [1.5, 3.5) s at 25 fps: 2 s x 25 = 50 frames; at 16 kHz 32,000 samples; 200 spectrogram frames.
  assert data_format.frame_count(1.5, 3.5, 25.0) == 50
  assert data_format.frame_count(1.5, 3.5, 16000) == 32000
  assert data_format.frame_count(1.5, 3.5, data_format.AUDIO_FRAMES_PER_SECOND) == 200
  # 8 frames 4 apart read frames 0, 4, ..., 28: 29 stored frames.
  assert data_format.window_frames(8, 4) == 29
  assert data_format.window_span(8, 4) == 32  # one period more than the frames read
  # A view reads 29 frames at 25 fps = 1.16 s, or 128 spectrogram frames = 1.28 s: the longer.
  assert data_format.view_seconds(8, 4, 25.0, 128) == pytest.approx(1.28)
  assert data_format.view_seconds(8, 4, 25.0, 100) == pytest.approx(1.16)


def test_importing_the_format_does_not_import_tensorflow():
  code = 'import sys, avt_jax.data_format; print("tensorflow" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)})
  assert out.stdout.strip() == 'False'
