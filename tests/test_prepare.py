"""Tests for `python -m avt_jax.prepare`, the smoke datasets and the dataset configs."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import av
import numpy as np
import pytest
import tensorflow as tf

from avt_jax import prepare
from avt_jax import records
from avt_jax.input import pipeline
from avt_jax.models import validate
from avt_jax.prep import demo_data
from avt_jax.prep import preparation
from avt_jax.prep import shards
from avt_jax.prep import smoke_data
import media_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """The three smoke datasets, built once: dataset -> (raw folder, prepared folder)."""
  cache = str(tmp_path_factory.mktemp('cache'))
  prepared = {name: smoke_data.ensure_smoke_data(name, cache, progress=False)
              for name in smoke_data.SMOKE_DATASETS}
  return {name: (os.path.join(os.path.dirname(path), 'raw'), path) for name, path in prepared.items()}


def _read(prepared, split):
  """{clip id: (parsed clip, context features)} of a prepared split."""
  heads = ('verb', 'noun') if 'epic' in prepared else ('class',)
  clips = {}
  for path in glob.glob(os.path.join(prepared, f'{split}-*.tfrecord')):
    for serialized in tf.data.TFRecordDataset(path):
      clip = records.parse_clip(serialized, heads)
      context = tf.train.SequenceExample.FromString(serialized.numpy()).context.feature
      clips[clip['id'].numpy().decode()] = (clip, context)
  return clips


def _report(prepared):
  with open(os.path.join(prepared, 'report.jsonl')) as f:
    return [(entry['clip_id'], entry['status'], entry['reason']) for entry in map(json.loads, f)]


@pytest.mark.parametrize('help_flag', ['--help', '--helpshort'])
def test_help_lists_datasets_and_options(help_flag):
  result = subprocess.run([sys.executable, '-m', 'avt_jax.prepare', help_flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and not result.stderr, result.stderr
  for text in ('kinetics_sounds', 'vggsound', 'epic_kitchens_100', 'manifest', '--annotations',
               '--videos', '--output', '--fps', '--short_side', '--n_mels', '--clip_seconds',
               '--missing_audio', '--workers', '--classes', '--tfds_data_dir', '--num_shards',
               '--runner', '--beam_options', '--val_fraction', '--test_fraction'):
    assert text in result.stdout, text


def test_command_line_with_worker_processes(smoke, tmp_path):
  """The real entry point (spawned decoding workers) on the Kinetics-format smoke files."""
  raw, reference = smoke['kinetics_sounds']
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'avt_jax.prepare', '--dataset=kinetics_sounds',
       f'--annotations={os.path.join(raw, "train.csv")},{os.path.join(raw, "validate.csv")}',
       f'--videos={raw}/videos',
       f'--output={out}', '--fps=8', '--short_side=36', '--n_mels=32', '--clip_seconds=2',
       '--workers=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[:4] == [
      f'Prepared {out}:',
      '  split  written  skipped  degraded',
      '  train        6        1         0',
      '  val          3        1         0']
  assert '  skipped: 2 x file not found' in result.stdout
  assert 'prepare: 11 clips (train: 7, val: 4) from 2 annotation file(s); class: 31 classes' in result.stderr
  for name in ('train-00000-of-00001.tfrecord', 'val-00000-of-00001.tfrecord'):  # same as in-process
    written, expected = ([tf.train.SequenceExample.FromString(x.numpy()) for x in tf.data.TFRecordDataset(path)]
                         for path in (str(out / name), os.path.join(reference, name)))
    assert written == expected, name  # (protobuf maps serialize in a per-process order)


def test_num_shards_per_split_and_the_multihost_default(smoke, tmp_path, capsys):
  raw, reference = smoke['kinetics_sounds']
  args = ['--dataset=kinetics_sounds',
          f'--annotations={os.path.join(raw, "train.csv")},{os.path.join(raw, "validate.csv")}',
          f'--videos={raw}/videos', '--fps=8', '--short_side=36',
          '--n_mels=32', '--clip_seconds=2', '--workers=0']
  out = tmp_path / 'out'
  assert prepare.main([*args, f'--output={out}', '--num_shards', 'train=3']) == 0
  assert sorted(p.name for p in out.glob('*.tfrecord')) == [
      'train-00000-of-00003.tfrecord', 'train-00001-of-00003.tfrecord',
      'train-00002-of-00003.tfrecord', 'val-00000-of-00001.tfrecord']  # val: 4 clips, default 1
  ids = lambda folder: sorted(_read(str(folder), 'train'))
  assert ids(out) == ids(reference)  # the same 6 clips, in 3 files
  assert json.loads((out / 'stats.json').read_text())['num_shards'] == {'train': 3, 'val': 1}
  for value, message in [('vall=2', r"--num_shards: no split 'vall' in the annotations \(splits: "
                                    r"\['train', 'val'\]\)"),
                         ('two', "--num_shards: expected a number or SPLIT=N entries, got 'two'"),
                         ('0', '--num_shards: train needs at least 1 shard, got 0'),
                         ('train=1,x', r"expected SPLIT=N entries \(e.g. train=512,test=64\) when "
                                       "giving several, got 'x'")]:
    assert prepare.main([*args, f'--output={tmp_path / "bad"}', f'--num_shards={value}']) == 2
    assert re.search(message, capsys.readouterr().err), value
  assert not (tmp_path / 'bad').exists()
  # Default: about 256 clips per file, at least 64 files of >= 8 clips (multi-host reading).
  assert [shards.multihost_num_shards(n) for n in (7, 20, 1000, 200_000)] == [1, 2, 64, 781]


def test_summary_groups_reasons(tmp_path):
  report = [dict(clip_id=f'c{i}', path='x', split='train', status=status, reason=reason)
            for i, (status, reason) in enumerate([
                ('skipped', 'file not found'), ('skipped', 'file not found'),
                ('degraded', 'audio ends at 1.250s before the window end 2.000s; padded with silence'),
                ('degraded', 'audio ends at 0.500s before the window end 2.000s; padded with silence')])]
  with open(tmp_path / 'report.jsonl', 'w') as f:
    f.write(''.join(json.dumps(entry) + '\n' for entry in report))
  stats = {'num_clips': {'train': 10, 'test': 3}, 'num_skipped': {'train': 2, 'test': 0},
           'num_degraded': {'train': 2, 'test': 0}}
  assert preparation.summary(str(tmp_path), stats).splitlines()[1:] == [
      '  split  written  skipped  degraded',
      '  test         3        0         0',
      '  train       10        2         2',
      '  skipped: 2 x file not found',
      '  degraded: 2 x audio ends at #s before the window end #s; padded with silence',
      f'  (per clip: {tmp_path}/report.jsonl)']


def test_report_notes_the_stream_used_and_timestamps_followed(tmp_path):
  """A file with two audio tracks and a joined MPEG-TS are written whole, each with a `note`."""
  videos = tmp_path / 'videos'
  videos.mkdir()
  media_files.write(str(videos / 'two_audio.mkv'), 'matroska', media_files.BLUE, [300.0, 2000.0],
                    dispositions=[0, av.stream.Disposition.default], titles=['commentary', 'main'])
  os.rename(media_files.joined(tmp_path, 'mpegts', 'libx264', 'aac', 0.0), videos / 'joined.ts')
  manifest = tmp_path / 'm.csv'
  manifest.write_text('path,label\ntwo_audio.mkv,a\njoined.ts,b\n')
  out = tmp_path / 'out'
  stats = preparation.prepare('manifest', [str(manifest)], str(videos), str(out), fps=5, short_side=32,
                              n_mels=16, workers=0, progress=False)
  assert stats['num_clips'] == {'train': 2} and stats['num_degraded'] == {'train': 0}
  report = {e['clip_id']: e for e in map(json.loads, (out / 'report.jsonl').read_text().splitlines())}
  assert report['two_audio.mkv']['status'] == 'note'
  assert report['two_audio.mkv']['reason'] == ("audio stream #2 (aac, default, 'main') used of 2 "
                                               "(not #1 (aac, 'commentary'))")
  assert report['joined.ts']['status'] == 'note'
  assert report['joined.ts']['reason'].startswith('timestamps jump 1 time(s) (back ')
  files = pipeline.list_split_files(str(out), 'train')
  frames = {c['id'].numpy().decode(): len(c['jpeg'])
            for c in map(records.parse_clip, tf.data.TFRecordDataset(files))}
  assert frames == {'joined.ts': 20, 'two_audio.mkv': 10}  # 4 s and 2 s at 5 fps: both recordings
  lines = preparation.summary(str(out), stats).splitlines()
  assert "  note: 1 x audio stream ## (aac, default, 'main') used of # (not ## (aac, 'commentary'))" in lines


def _run_main(tmp_path, dataset, annotation_text, *extra, name='annotations.csv'):
  videos = tmp_path / 'videos'
  videos.mkdir(exist_ok=True)
  annotation = tmp_path / name
  annotation.write_text(annotation_text)
  return prepare.main([f'--dataset={dataset}', '--annotations', str(annotation), f'--videos={videos}',
                       f'--output={tmp_path / "out"}', '--workers=0', *extra])


@pytest.mark.parametrize('dataset, text, extra, message', [
    ('manifest', 'path,label\n../outside.mp4,a\n', (), "'../outside.mp4' resolves to .* outside of"),
    ('manifest', 'path,label\n/etc/hostname,a\n', (), 'must be relative to'),
    ('kinetics', 'label,youtube_id,time_start,time_end,split\na,../../x,0,10,train\n', (),
     r'annotations.csv:2: `youtube_id` must be letters'),
    ('kinetics', 'label,youtube_id,time_start,time_end,split\na,abc,0,10,../../evil\n', (),
     r"split name '../../evil' must match"),
    ('vggsound', 'abc,0,dog\n', (), r'annotations.csv:1: expected 4 fields'),
    ('kinetics_sounds', 'label,youtube_id,time_start,time_end,split\n', ('--classes=34',),
     r"expected one of \['31'\] or the path of a class list file"),
    ('epic_kitchens_100', 'narration_id\n', ('--classes=x.txt',), '--classes does not apply'),
    ('manifest', 'path,label\na.mp4,a\nb.mp4,b\n', ('--test_fraction=1',),
     r'^prepare: error: test_fraction: expected a number in \[0, 1\), got 1.0.$'),
])
def test_bad_input_exits_with_status_2_and_writes_nothing(tmp_path, capsys, dataset, text, extra, message):
  assert _run_main(tmp_path, dataset, text, *extra) == 2
  error = capsys.readouterr().err.splitlines()[-1]
  assert error.startswith('prepare: error: ') and re.search(message, error), error
  assert not (tmp_path / 'out').exists()


def test_test_fraction_holds_out_a_test_split(smoke, tmp_path, capsys):
  """Kinetics-Sounds train rows only (7, one file missing), no `test`: --test_fraction=0.3 moves at
  least 2.1 of them, i.e. 3 single clips (no groups), to `test`; the rest stays in `train`."""
  raw, reference = smoke['kinetics_sounds']
  out = tmp_path / 'out'
  assert prepare.main(['--dataset=kinetics_sounds', f'--annotations={os.path.join(raw, "train.csv")}',
                       f'--videos={raw}/videos', f'--output={out}', '--fps=8', '--short_side=36',
                       '--n_mels=32', '--clip_seconds=2', '--workers=0', '--test_fraction=0.3']) == 0
  assert ("prepare: held out 3 of 7 'train' clips (3 of 7 groups) as split 'test' for evaluation "
          '(test_fraction=0.3;') in capsys.readouterr().err
  stats = json.loads((out / 'stats.json').read_text())
  assert sorted(stats['num_clips']) == ['test', 'train']
  assert {split: stats['num_clips'][split] + stats['num_skipped'][split] for split in ('test', 'train')
          } == {'test': 3, 'train': 4}
  test, train = (set(_read(str(out), split)) for split in ('test', 'train'))
  assert len(test) == stats['num_clips']['test'] and not test & train
  assert test | train == set(_read(reference, 'train'))  # the same 6 clips written, split in two


def test_symlink_leaving_the_video_folder_is_refused(tmp_path, capsys):
  secret = tmp_path / 'secret.mp4'
  secret.write_bytes(b'not for reading')
  (tmp_path / 'videos').mkdir()
  os.symlink(secret, tmp_path / 'videos' / 'abc_000000_000010.mp4')
  status = _run_main(tmp_path, 'kinetics', 'label,youtube_id,time_start,time_end,split\na,abc,0,10,train\n')
  assert status == 2 and 'outside of' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_files_listed_without_commas_are_an_error_not_ignored(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(['--dataset=vggsound', '--annotations', 'a.csv', 'b.csv', f'--videos={tmp_path}',
                  f'--output={tmp_path / "out"}'])
  error = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and error.startswith('python -m avt_jax.prepare: error: ')
  assert "unexpected arguments ['b.csv']" in error and 'comma-separated' in error


def test_missing_annotation_file(tmp_path, capsys):
  status = prepare.main(['--dataset=vggsound', '--annotations', str(tmp_path / 'nope.csv'),
                         f'--videos={tmp_path}', f'--output={tmp_path / "out"}'])
  assert status == 2 and 'nope.csv' in capsys.readouterr().err


def test_kinetics_sounds_smoke_data(smoke):
  _, prepared = smoke['kinetics_sounds']
  with open(os.path.join(prepared, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_classes'] == {'class': 31} and stats['label_names']['class'][0] == 'blowing nose'
  assert (stats['num_clips'], stats['num_skipped']) == ({'train': 6, 'val': 3}, {'train': 1, 'val': 1})
  assert (stats['fps'], stats['short_side'], stats['n_mels']) == (8.0, 36, 32)
  train = _read(prepared, 'train')
  assert 'kstother_000000_000010' not in train  # 'abseiling' is not a Kinetics-Sounds class
  full, context = train['kst00-Xy_z_000002_000004']  # cut from the full video at its segment
  assert context['clip/source'].bytes_list.value == [b'kst00-Xy_z.mp4']
  assert (context['clip/start'].float_list.value[0], context['clip/end'].float_list.value[0]) == (2.0, 4.0)
  assert full['labels/class'].numpy().tolist() == [0]
  cut, context = train['kst01-Xy_z_000010_000020']
  assert context['clip/source'].bytes_list.value == [b'train/blowing out candles/kst01-Xy_z_000010_000020.mp4']
  assert cut['labels/class'].numpy().tolist() == [1] and cut['jpeg'].shape == (16,)
  assert sorted(_report(prepared)) == [('kstgone_000000_000010', 'skipped', 'file not found'),
                                       ('ksvgone_000000_000010', 'skipped', 'file not found')]


def test_vggsound_smoke_data(smoke):
  _, prepared = smoke['vggsound']
  with open(os.path.join(prepared, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_classes'] == {'class': 309}
  assert stats['label_names']['class'][2] == 'smoke sound 002, synthetic'
  assert stats['num_clips'] == {'train': 6, 'test': 3}
  test = _read(prepared, 'test')
  assert sorted(test) == ['-vse00_A_000030', '-vse01_A_000031', '-vse02_A_000032']
  assert [test[k][0]['labels/class'].numpy().tolist() for k in sorted(test)] == [[0], [1], [2]]
  assert _report(prepared) == [('-vsgone_000000', 'skipped', 'file not found')]


def _square_colour(frame: np.ndarray) -> str:
  """Demo colour nearest to the mean of the pixels far from the (grey) background."""
  background = np.median(frame.reshape(-1, 3), axis=0)
  square = frame[np.abs(frame.astype(float) - background).max(axis=-1) > 50].mean(axis=0)
  return min(demo_data.COLOURS, key=lambda c: np.sum((np.array(demo_data.COLOURS[c]) - square) ** 2))


def test_epic_smoke_segments_come_from_the_right_part_of_the_long_videos(smoke):
  _, prepared = smoke['epic_kitchens_100']
  with open(os.path.join(prepared, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_classes'] == {'verb': 97, 'noun': 300}
  assert stats['num_clips'] == {'train': 4, 'validation': 2}
  clips = {**_read(prepared, 'train'), **_read(prepared, 'validation')}
  assert sorted(clips) == ['P01_01_0', 'P01_01_1', 'P01_01_2', 'P02_01_0', 'P02_01_1', 'P02_01_2']
  colours = list(demo_data.COLOURS)
  for clip_id, (clip, context) in clips.items():
    k = int(clip_id[-1])
    assert (context['clip/start'].float_list.value[0], context['clip/end'].float_list.value[0]) == (2 * k,
                                                                                                 2 * k + 2)
    noun = clip['labels/noun'].numpy().tolist()
    middle = tf.io.decode_jpeg(clip['jpeg'][8]).numpy()  # 1 s into the segment's window
    assert [colours.index(_square_colour(middle))] == noun, clip_id  # noun = the square's colour
  assert clips['P01_01_1'][1]['clip/source'].bytes_list.value == [b'P01/videos/P01_01.MP4']
  assert clips['P02_01_1'][1]['clip/source'].bytes_list.value == [b'P02/P02_01.MP4']
  assert _report(prepared) == [('P04_01_0', 'skipped', 'file not found')]


def test_unknown_smoke_dataset():
  with pytest.raises(ValueError, match="No smoke dataset 'kinetics'"):
    smoke_data.ensure_smoke_data('kinetics')


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name, heads, eval_split, views', [
    ('kinetics_sounds', {'class': 31}, 'val', (4, 3)), ('vggsound', {'class': 309}, 'test', (4, 3)),
    ('epic_kitchens_100', {'verb': 97, 'noun': 300}, 'validation', (1, 3))])
def test_paper_scale_configs(name, heads, eval_split, views):
  c = _config(name)
  validate(c)
  assert dict(c.data.num_classes) == heads and tuple(c.data.label_heads) == tuple(heads)
  assert c.data.eval_split == eval_split and (c.input.eval_clips, c.input.eval_crops) == views
  assert (c.model.size, c.model.fusion, c.model.n_bottlenecks, c.model.fusion_layer) == ('base', 'bottleneck',
                                                                                         4, 8)
  assert (c.input.num_frames, c.input.image_size, c.input.audio_frames, c.input.n_mels) == (32, 224, 800, 128)
  assert all(weight > 0 for weight in c.loss.weights.values()) and len(c.loss.weights) == 6
  assert c.data.synthetic == ''


def test_kinetics_sounds_class_count_variants():
  assert _config('kinetics_sounds', '34').data.num_classes['class'] == 34
  with pytest.raises(ValueError, match="expected no argument, '31', '32', '34' or 'smoke'"):
    _config('kinetics_sounds', 'tiny')


@pytest.mark.parametrize('name', smoke_data.SMOKE_DATASETS)
def test_smoke_configs_read_their_smoke_data(smoke, name):
  """The smoke config matches its prepared data: one train batch and all eval views load."""
  c = _config(name, 'smoke')
  validate(c)
  assert c.data.synthetic == f'{name}_smoke' and c.model.hidden_size == 32 and c.model.num_layers == 2
  assert dict(c.data.num_classes) == dict(_config(name).data.num_classes)
  _, prepared = smoke[name]
  batch = next(pipeline.make_train_iterator(c, prepared, seed=0, process_index=0, process_count=1))
  assert batch['video'].shape == (8, 4, 32, 32, 3) and batch['audio'].shape == (8, 64, 32)
  for head in c.data.label_heads:
    assert batch[f'labels/{head}'].shape == (8, c.data.num_classes[head])
  views = list(pipeline.make_eval_iterator(c, prepared, c.data.eval_split, process_index=0,
                                           process_count=1))
  num_videos = pipeline.num_eval_videos(prepared, c.data.eval_split)
  assert sum(batch['mask'].sum() for batch in views) == num_videos * 6  # 2 clips x 3 crops


def test_an_unknown_runner_is_refused_before_anything_is_read():
  with pytest.raises(ValueError, match=r"runner must be one of \('local', 'beam'\), got 'spark'"):
    preparation.shard_writer('spark')
  assert preparation.shard_writer('local') is None  # prepare_dataset's processes on this machine
