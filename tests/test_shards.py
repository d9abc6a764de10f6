"""Tests for avt_jax.prep.shards: sharded records, statistics, report, resumability."""

import glob
import json
import os
import shutil

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from avt_jax import record_files
from avt_jax import records
from avt_jax.prep import annotations
from avt_jax.prep import shards
from avt_jax.prep.demo_data import write_mp4

LABEL_NAMES = {'class': ['a', 'b', 'c']}
GOOD = {'train': ['t0', 't1', 't2', 't3', 't4'], 'test': ['v0', 'v1']}
SETTINGS = dict(fps=4, short_side=16, n_mels=32, label_names=LABEL_NAMES, num_shards_per_split={'train': 2},
                progress=False)


def _spec(clip_id, split, label, path=None):
  return annotations.ClipSpec(clip_id=clip_id, path=path or f'{clip_id}.mp4', labels={'class': [label]},
                              split=split)


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  """Small clips: good ones, one without audio, one corrupt and one missing file."""
  folder = str(tmp_path_factory.mktemp('videos'))
  rng = np.random.default_rng(0)
  specs = []
  for split, ids in GOOD.items():
    for i, clip_id in enumerate(ids):
      frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
      tone = np.sin(2 * np.pi * (300 + 400 * i) * np.arange(16000) / 16000) * rng.uniform(0.05, 0.5)
      write_mp4(os.path.join(folder, f'{clip_id}.mp4'), frames, tone.astype(np.float32), fps=8)
      specs.append(_spec(clip_id, split, i % 3))
  mute_frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  write_mp4(os.path.join(folder, 'mute.mp4'), mute_frames, None, fps=8)
  specs.append(_spec('mute', 'train', 2))
  with open(os.path.join(folder, 'corrupt.mp4'), 'wb') as f:
    f.write(b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 4)
  specs.append(_spec('corrupt', 'train', 0))
  specs.append(_spec('missing', 'test', 1))
  return folder, specs


@pytest.fixture(scope='module')
def prepared(videos, tmp_path_factory):
  folder, specs = videos
  out_dir = str(tmp_path_factory.mktemp('prepared'))
  stats = shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **SETTINGS)
  return out_dir, stats


def _read(path, heads=('class',)):
  return [records.parse_clip(x, heads) for x in tf.data.TFRecordDataset(path)]


def _shard_files(out_dir):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, '*.tfrecord')))


def test_shard_files_are_complete_and_named(prepared):
  out_dir, _ = prepared
  assert _shard_files(out_dir) == ['test-00000-of-00001.tfrecord', 'train-00000-of-00002.tfrecord',
                                   'train-00001-of-00002.tfrecord']
  assert not os.path.exists(os.path.join(out_dir, shards.INCOMPLETE_DIR))
  train_ids = [x['id'].numpy().decode() for name in ('train-00000-of-00002', 'train-00001-of-00002')
               for x in _read(os.path.join(out_dir, name + '.tfrecord'))]
  assert sorted(train_ids) == sorted(GOOD['train'] + ['mute'])
  test_ids = [x['id'].numpy().decode() for x in _read(os.path.join(out_dir, 'test-00000-of-00001.tfrecord'))]
  assert sorted(test_ids) == GOOD['test']


def test_records_hold_the_decoded_clip(prepared):
  out_dir, _ = prepared
  clip = {x['id'].numpy().decode(): x for x in _read(os.path.join(out_dir, 'test-00000-of-00001.tfrecord'))}
  v1 = clip['v1']
  assert v1['jpeg'].shape == (4,)  # 1 s at 4 fps
  assert tf.io.decode_jpeg(v1['jpeg'][0]).shape == (16, 16, 3)
  assert v1['logmel'].shape == (100, 32)
  assert v1['labels/class'].numpy().tolist() == [1]
  assert v1['audio_missing'].numpy() == 0


def test_stats_match_numpy_over_the_written_records(prepared):
  out_dir, stats = prepared
  with open(os.path.join(out_dir, 'stats.json')) as f:
    assert json.load(f) == stats
  train = [x for path in glob.glob(os.path.join(out_dir, 'train-*.tfrecord')) for x in _read(path)]
  logmels = np.concatenate([x['logmel'].numpy().ravel() for x in train])
  assert stats['logmel_mean'] == pytest.approx(logmels.astype(np.float64).mean(), rel=1e-9)
  assert stats['logmel_std'] == pytest.approx(logmels.astype(np.float64).std(), rel=1e-6)
  assert stats['logmel_stats_splits'] == ['train']
  assert stats['num_clips'] == {'train': 6, 'test': 2}
  assert stats['num_skipped'] == {'train': 1, 'test': 1}
  assert stats['num_degraded'] == {'train': 1, 'test': 0}
  train_labels = [int(x['labels/class'][0]) for x in train]
  assert stats['class_counts'] == {'class': {'train': np.bincount(train_labels, minlength=3).tolist(),
                                             'test': [1, 1, 0]}}
  assert stats['num_classes'] == {'class': 3}
  assert stats['label_names'] == LABEL_NAMES
  assert (stats['fps'], stats['short_side'], stats['n_mels']) == (4.0, 16, 32)
  assert stats['audio_frames_per_second'] == 100.0


def test_report_lists_skipped_and_degraded_clips(prepared):
  out_dir, _ = prepared
  with open(os.path.join(out_dir, 'report.jsonl')) as f:
    report = {entry['clip_id']: entry for entry in map(json.loads, f)}
  assert sorted(report) == ['corrupt', 'missing', 'mute']
  assert report['missing']['status'] == 'skipped' and 'file not found' in report['missing']['reason']
  assert report['missing']['path'] == 'missing.mp4' and report['missing']['split'] == 'test'
  assert report['corrupt']['status'] == 'skipped' and 'cannot decode' in report['corrupt']['reason']
  assert report['mute'] == {'clip_id': 'mute', 'path': 'mute.mp4', 'split': 'train', 'status': 'degraded',
                            'reason': 'no audio stream; silence substituted'}


def test_missing_audio_becomes_flagged_silence(prepared):
  out_dir, _ = prepared
  train = [x for path in glob.glob(os.path.join(out_dir, 'train-*.tfrecord')) for x in _read(path)]
  mute = next(x for x in train if x['id'].numpy() == b'mute')
  assert mute['audio_missing'].numpy() == 1
  np.testing.assert_array_equal(mute['logmel'].numpy(), np.float16(np.log(1e-6)).astype(np.float32))


def test_missing_audio_skip_policy(videos, tmp_path):
  folder, specs = videos
  subset = [s for s in specs if s.clip_id in ('mute', 't0')]
  stats = shards.prepare_dataset(subset, folder, str(tmp_path), num_workers=0, missing_audio='skip',
                                 **SETTINGS)
  assert stats['num_clips'] == {'train': 1} and stats['num_skipped'] == {'train': 1}
  with open(tmp_path / 'report.jsonl') as f:
    assert [json.loads(line)['reason'] for line in f] == ['no audio stream']


def test_worker_processes_write_identical_shards(videos, prepared, tmp_path):
  folder, specs = videos
  out_dir, _ = prepared
  shards.prepare_dataset(specs, folder, str(tmp_path), num_workers=2, **SETTINGS)
  for name in _shard_files(out_dir):
    with open(os.path.join(out_dir, name), 'rb') as a, open(tmp_path / name, 'rb') as b:
      assert a.read() == b.read(), name


def test_interrupted_run_resumes_without_rewriting_finished_shards(videos, prepared, tmp_path,
                                                                   monkeypatch):
  folder, specs = videos
  reference_dir, reference_stats = prepared
  out_dir = str(tmp_path / 'out')
  encode = records.encode_clip
  calls = []

  def encode_then_die(clip):
    calls.append(clip.clip_id)
    if len(calls) == 4:  # The test shard (2 clips) is done; the first train shard is half written.
      raise KeyboardInterrupt
    return encode(clip)

  monkeypatch.setattr(records, 'encode_clip', encode_then_die)
  with pytest.raises(KeyboardInterrupt):
    shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **SETTINGS)
  monkeypatch.setattr(records, 'encode_clip', encode)
  # Only the finished shard is visible; the partial one waits under .incomplete/.
  assert _shard_files(out_dir) == ['test-00000-of-00001.tfrecord']
  assert os.listdir(os.path.join(out_dir, shards.INCOMPLETE_DIR)) == ['train-00000-of-00002.tfrecord']
  finished = os.path.join(out_dir, 'test-00000-of-00001.tfrecord')
  os.utime(finished, ns=(1_000_000_000, 1_000_000_000))  # an mtime no rewrite could keep

  stats = shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **SETTINGS)
  assert os.stat(finished).st_mtime_ns == 1_000_000_000
  assert _shard_files(out_dir) == _shard_files(reference_dir)
  assert stats == reference_stats
  for name in _shard_files(out_dir):
    with open(os.path.join(out_dir, name), 'rb') as a, open(os.path.join(reference_dir, name), 'rb') as b:
      assert a.read() == b.read(), name
  # A shard whose stats file is missing counts as unfinished and is redone; the others are kept.
  os.remove(os.path.join(out_dir, shards.SHARD_STATS_DIR, 'train-00001-of-00002.json'))
  redone = os.path.join(out_dir, 'train-00001-of-00002.tfrecord')
  os.utime(redone, ns=(1_000_000_000, 1_000_000_000))
  assert shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **SETTINGS) == reference_stats
  assert os.stat(redone).st_mtime_ns != 1_000_000_000
  assert os.stat(finished).st_mtime_ns == 1_000_000_000


def test_folder_with_other_settings_is_refused(videos, prepared):
  folder, specs = videos
  out_dir, _ = prepared
  with pytest.raises(ValueError, match='prepared from other clips or settings'):
    shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **dict(SETTINGS, fps=5))
  with pytest.raises(ValueError, match='prepared from other clips or settings'):
    shards.prepare_dataset(specs[:-1], folder, out_dir, num_workers=0, **SETTINGS)


@pytest.mark.parametrize('bad_specs, message', [
    ([_spec('x', 'train', 0), _spec('x', 'train', 1)], "Duplicate clip id 'x'"),
    ([_spec('x', 'train', 0, path='../x.mp4')], 'outside'),
    ([_spec('x', 'train', 3)], 'class index 3 out of range'),
    ([annotations.ClipSpec('x', 'x.mp4', {'verb': [0]})], "label head 'verb'"),
    ([_spec('x', '../train', 0)], 'split name'),
])
def test_bad_specs_fail_before_any_work(tmp_path, bad_specs, message):
  with pytest.raises(ValueError, match=message):
    shards.prepare_dataset(bad_specs, str(tmp_path), str(tmp_path / 'out'), num_workers=0, **SETTINGS)
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('override', [dict(short_side=15), dict(fps=0), dict(missing_audio='drop')])
def test_bad_settings_fail_before_any_work(videos, tmp_path, override):
  folder, specs = videos
  with pytest.raises(ValueError):
    shards.prepare_dataset(specs, folder, str(tmp_path / 'out'), num_workers=0, **dict(SETTINGS, **override))
  assert not os.path.exists(tmp_path / 'out')


def test_shard_assignment_is_deterministic_and_balanced():
  specs = [_spec(f'c{i:03d}', 'train', i % 3) for i in range(103)]
  assigned = shards.assign_shards(specs, 4)
  assert sorted(len(s) for s in assigned) == [25, 26, 26, 26]
  assert sorted(s.clip_id for shard in assigned for s in shard) == [s.clip_id for s in specs]
  reordered = shards.assign_shards(list(reversed(specs)), 4)
  ids = lambda parts: [[s.clip_id for s in shard] for shard in parts]
  assert ids(reordered) == ids(assigned)
  # Shards mix the classes even though the input is ordered.
  assert all(len({s.labels['class'][0] for s in shard}) == 3 for shard in assigned)
  assert len(shards.assign_shards(specs[:3], 10)) == 3  # never more shards than clips
  assert len(shards.assign_shards(specs * 4, None)) == 2  # about 256 clips per shard by default


def test_clip_window():
  spec = annotations.ClipSpec('x', 'x.mp4', {}, start=4.0, end=5.0)
  assert shards.clip_window(spec, None) == (4.0, 5.0)
  assert shards.clip_window(spec, 3.0) == (3.0, 6.0)  # centred on the segment
  assert shards.clip_window(annotations.ClipSpec('x', 'x.mp4', {}, 0.2, 0.6), 2.0) == (0.0, 2.0)
  assert shards.clip_window(annotations.ClipSpec('x', 'x.mp4', {}), 2.0) == (0.0, 2.0)


def _tasks(videos, clip_ids):
  folder, specs = videos
  by_id = {spec.clip_id: spec for spec in specs}
  settings = shards.RecordSettings(fps=4, short_side=16, n_mels=32, clip_seconds=None,
                                   missing_audio='silence', jpeg_quality=90)
  tasks = []
  for clip_id in clip_ids:
    spec = by_id.get(clip_id) or _spec(clip_id, 'train', 0, path='t0.mp4')  # 'crash*': any file
    tasks.append(shards._Task(spec, os.path.join(folder, spec.path), settings))
  return tasks


def test_a_crashing_decoder_costs_only_its_clip(videos):
  """A worker killed by SIGSEGV: its clip (retried once in a fresh process) is reported as crashed;
  every other clip, also the one queued behind it in the same worker, gets its result, in order."""
  import crashing_decoder  # pylint: disable=g-import-not-at-top
  ids = ['t0', 'crash', 't1', 't2', 't3']  # 2 workers: 't2' is queued behind 'crash'
  results = list(shards._run_tasks(_tasks(videos, ids), 2, process=crashing_decoder.stand_in_or_crash))
  assert [result.spec.clip_id for result in results] == ids
  assert results[1].error == 'decoder crashed (the decoding process died 2 times on this file)'
  assert all(result.error is None and result.issues[0].startswith('process ')
             for i, result in enumerate(results) if i != 1)
  assert len({result.issues[0] for result in results if result.issues}) >= 2  # several processes


def test_prepare_reports_a_crashed_decoder_and_writes_the_others(videos, tmp_path, monkeypatch):
  import crashing_decoder  # pylint: disable=g-import-not-at-top
  folder, specs = videos
  run_tasks = shards._run_tasks
  monkeypatch.setattr(shards, '_run_tasks', lambda tasks, workers: run_tasks(
      tasks, workers, process=crashing_decoder.stand_in_or_crash))
  subset = [s for s in specs if s.clip_id in ('t0', 't1')] + [_spec('crash', 'train', 0, path='t2.mp4')]
  stats = shards.prepare_dataset(subset, folder, str(tmp_path), num_workers=1,
                                 **dict(SETTINGS, num_shards_per_split=None))
  assert stats['num_clips'] == {'train': 2} and stats['num_skipped'] == {'train': 1}
  with open(tmp_path / 'report.jsonl') as f:
    report = [json.loads(line) for line in f if 'decoder crashed' in line]
  assert report == [{'clip_id': 'crash', 'path': 't2.mp4', 'split': 'train', 'status': 'skipped',
                     'reason': 'decoder crashed (the decoding process died 2 times on this file)'}]
  written = [x['id'].numpy() for x in _read(tmp_path / 'train-00000-of-00001.tfrecord')]
  assert sorted(written) == [b't0', b't1']


def test_workers_that_always_die_stop_the_run(videos, monkeypatch):
  import crashing_decoder  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(shards, '_MAX_CONSECUTIVE_CRASHES', 2)
  tasks = _tasks(videos, ['crash0', 'crash1', 'crash2'])
  with pytest.raises(RuntimeError, match='died on 2 clips in a row'):
    list(shards._run_tasks(tasks, 1, process=crashing_decoder.stand_in_or_crash))


@pytest.mark.parametrize('recorded_size', [True, False])  # False: a folder prepared before sizes
def test_rerun_rewrites_a_damaged_shard_naming_it(videos, prepared, tmp_path, capsys, recorded_size):
  folder, specs = videos
  reference_dir, reference_stats = prepared
  out_dir = str(tmp_path / 'out')
  shutil.copytree(reference_dir, out_dir)
  damaged = os.path.join(out_dir, 'train-00001-of-00002.tfrecord')
  intact = os.path.join(out_dir, 'train-00000-of-00002.tfrecord')
  size = os.path.getsize(damaged)
  stats_file = os.path.join(out_dir, shards.SHARD_STATS_DIR, 'train-00001-of-00002.json')
  shard_stats = json.load(open(stats_file))
  assert shard_stats['num_bytes'] == size
  if not recorded_size:
    del shard_stats['num_bytes']
    json.dump(shard_stats, open(stats_file, 'w'))
  os.truncate(damaged, int(size * 0.6))  # an interrupted copy
  assert record_files.damage(damaged, shard_stats.get('num_bytes'), shard_stats['num_clips'])
  assert record_files.damage(intact) is None
  os.utime(intact, ns=(1_000_000_000, 1_000_000_000))
  capsys.readouterr()
  assert shards.prepare_dataset(specs, folder, out_dir, num_workers=0, **SETTINGS) == reference_stats
  assert f'{damaged} is damaged' in capsys.readouterr().err
  with open(damaged, 'rb') as a, open(os.path.join(reference_dir, os.path.basename(damaged)), 'rb') as b:
    assert a.read() == b.read()
  assert os.stat(intact).st_mtime_ns == 1_000_000_000  # whole shards are kept


def test_record_file_walk_counts_records_and_finds_the_cut(prepared, tmp_path):
  out_dir, stats = prepared
  name = 'train-00000-of-00002.tfrecord'
  path = os.path.join(out_dir, name)
  assert record_files.walk(path) == (len(_read(path)), None)
  cut = str(tmp_path / name)
  with open(path, 'rb') as f, open(cut, 'wb') as g:
    g.write(f.read()[:-3])
  count, broken = record_files.walk(cut)
  assert count == len(_read(path)) - 1 and 0 < broken < os.path.getsize(cut)
