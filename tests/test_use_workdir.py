"""Using a trained workdir: `python -m avt_jax.predict` (the same inputs as the records path, the same
scores as `evaluate`, named outcomes for bad files) and the evaluation pictures in TensorBoard."""

import json
import os
import subprocess
import sys

import av
import jax
import numpy as np
import pytest
from clu import metric_writers
import tensorflow as tf

from avt_jax import (checkpoint_adaptation, checkpointing, evaluate, export, input as input_lib,
                     predict, records, sharding, train, workdir as workdir_lib)
from avt_jax.models import build_model
from avt_jax.prep import demo_data, logmel, media, preparation
from avt_jax.train_step import setup
from conftest import random_params, tiny_config
from media_files import BLUE, write, write_song

CLIP = 'videos/test_00004.mp4'  # green_mid
LOG_MEL_TOLERANCE = 1e-3  # TensorFlow's float32 FFT against librosa's, log units (measured <= 2.3e-4)
EXPORT_TOLERANCE = 1e-6  # SavedModel against the JAX model, probabilities (measured 3.3e-8)


def predict_config():
  """The tiny AVT on the demo videos' records: 2 clips x 3 crops = 6 views per video."""
  return tiny_config(**{'data.num_classes': {'class': len(demo_data.CLASS_NAMES)},
                        'data.eval_split': 'test', 'input.n_mels': demo_data.PREPARED_N_MELS,
                        'input.frame_stride': 2, 'input.eval_clips': 2, 'input.eval_crops': 3})


def save_random_checkpoint(config, workdir, data_dir):
  """A workdir as training leaves it (config.json, stats.json, a checkpoint), with random weights."""
  *_, init = setup(config)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), random_params(abstract.params, seed=3),
                        abstract.params)
  state = state.replace(params=params)
  workdir_lib.save_run(config, workdir, data_dir)
  with checkpointing.Checkpointer(workdir) as ckpt:
    snapshot = checkpoint_adaptation.config_snapshot(config)
    ckpt.save(2, state, {'step': 2, 'config': snapshot}, force=True)
  return state.params


@pytest.fixture(scope='module')
def setting(tmp_path_factory):
  """Demo videos (one per class), their prepared records and a workdir; the predictor."""
  videos = str(tmp_path_factory.mktemp('videos'))
  manifest = demo_data.write_demo_videos(videos, {'test': 1}, num_workers=0)
  data_dir = str(tmp_path_factory.mktemp('records'))
  preparation.prepare('manifest', [manifest], videos, data_dir, fps=demo_data.PREPARED_FPS,
                      short_side=demo_data.PREPARED_SHORT_SIDE, n_mels=demo_data.PREPARED_N_MELS,
                      workers=0, progress=False)
  workdir = str(tmp_path_factory.mktemp('workdir'))
  config = predict_config()
  params = save_random_checkpoint(config, workdir, data_dir)
  return {'videos': videos, 'data_dir': data_dir, 'workdir': workdir, 'config': config,
          'params': params, 'predictor': predict.Predictor(workdir)}


def record_ids(data_dir):
  files = input_lib.pipeline.list_split_files(data_dir, 'test')
  return [records.parse_clip(r)['id'].numpy().decode() for r in tf.data.TFRecordDataset(files)]


def test_inputs_equal_the_records_path_and_scores_equal_evaluate(setting):
  config, predictor = setting['config'], setting['predictor']
  decoded = predictor.decode(os.path.join(setting['videos'], CLIP))
  assert decoded.issues == []
  inputs = predictor.inputs(decoded)

  position = record_ids(setting['data_dir']).index(CLIP)
  views = 6
  rows = {k: [] for k in ('video', 'audio')}
  for batch in input_lib.make_eval_iterator(config, setting['data_dir'], 'test'):
    for key in rows:
      rows[key].extend(batch[key][batch['index'] == position])
  for key in rows:
    assert len(rows[key]) == views
    np.testing.assert_array_equal(inputs[key], np.stack(rows[key]), err_msg=key)

  mesh = sharding.make_mesh(config.mesh)
  scorer = evaluate.make_video_scorer(config, build_model(config), mesh, setting['data_dir'], 'test')
  index, logits, _ = scorer(predictor.params).videos()
  expected = jax.nn.softmax(logits['class'][list(index).index(position)])
  np.testing.assert_allclose(predictor.probabilities(inputs)['class'], expected, rtol=1e-5, atol=1e-7)
  # and the restored parameters are the saved ones
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(predictor.params), setting['params'])


def test_command_line_names_each_files_outcome(setting, tmp_path, capsys):
  folder = tmp_path / 'mixed'
  folder.mkdir()
  rng = np.random.default_rng(0)
  scene = demo_data.make_scene(rng, 'red', 'high')
  frames = demo_data.render_video(scene, rng)
  demo_data.write_mp4(str(folder / 'no_audio.mp4'), frames, None)
  demo_data.write_mp4(str(folder / 'short.mp4'), frames[:4], demo_data.render_audio(scene, rng)[:4000])
  (folder / 'broken.mp4').write_bytes(b'\0not a video' * 100)
  (folder / 'notes.txt').write_text('not a video: ignored')
  (folder / '._short.mp4').write_bytes(b'\0\5\26\7' + b'\0' * 60)  # macOS AppleDouble metadata
  write(str(folder / 'two_audio.mkv'), 'matroska', BLUE, [300.0, 2000.0],
        dispositions=[0, av.stream.Disposition.default], titles=['commentary', 'main'])
  write_song(str(folder / 'song.mkv'), 'matroska', 'aac')  # audio and a cover image only
  good = os.path.join(setting['videos'], CLIP)
  output = tmp_path / 'out.jsonl'
  status = predict.main(['--workdir', setting['workdir'], '--top_k=3', f'--output={output}', good,
                         str(folder), str(tmp_path / 'missing.mp4')])
  assert status == 0
  outcomes = {os.path.basename(o['path']): o for o in map(json.loads, output.read_text().splitlines())}
  assert list(outcomes) == ['test_00004.mp4', 'broken.mp4', 'no_audio.mp4', 'short.mp4', 'song.mkv',
                            'two_audio.mkv', 'missing.mp4']
  ok = outcomes['test_00004.mp4']
  assert ok['status'] == 'ok' and ok['views'] == 6 and ok['seconds'] == pytest.approx(2.0)
  assert len(ok['top_k']['class']) == 3 and ok['top_k']['class'][0]['label'] in demo_data.CLASS_NAMES
  probabilities = [p['probability'] for p in ok['top_k']['class']]
  assert probabilities == sorted(probabilities, reverse=True)
  assert outcomes['no_audio.mp4']['status'] == 'degraded'
  assert outcomes['no_audio.mp4']['issues'] == ['no_audio']
  assert outcomes['short.mp4']['issues'] == ['too_short']
  assert outcomes['broken.mp4']['status'] == 'failed' and 'cannot' in outcomes['broken.mp4']['error']
  assert outcomes['song.mkv'] == {'path': str(folder / 'song.mkv'), 'status': 'failed',
                                  'error': media.COVER_ONLY}
  two_audio = outcomes['two_audio.mkv']
  assert two_audio['status'] == 'ok' and two_audio['notes'] == [
      "audio stream #2 (aac, default, 'main') used of 2 (not #1 (aac, 'commentary'))"]
  assert outcomes['missing.mp4'] == {'path': str(tmp_path / 'missing.mp4'), 'status': 'failed',
                                     'error': 'file not found'}
  out, err = capsys.readouterr()
  assert '7 files: 2 ok, 2 degraded, 3 failed' in out
  assert f'[7/7] {tmp_path / "missing.mp4"}' in err
  assert f'predict: skipped {folder / "._short.mp4"} (macOS metadata file, not a video)\n' in err
  assert f'predict: skipped {folder / "notes.txt"} (not a video file extension)\n' in err
  assert ok['top_k']['class'][0]['label'] in out.splitlines()[1]


def test_bad_workdir_or_checkpoint_is_one_line_naming_it(setting, tmp_path, capsys):
  assert predict.main(['--workdir', str(tmp_path), 'x.mp4']) == 2
  assert f'{tmp_path / "config.json"} not found' in capsys.readouterr().err
  assert predict.main(['--workdir', setting['workdir'], '--checkpoint=newest', 'x.mp4']) == 2
  assert ("--checkpoint: expected 'latest', 'best' or a step number, got 'newest'"
          in capsys.readouterr().err)
  assert predict.main(['--workdir', setting['workdir'], '--checkpoint=7', 'x.mp4']) == 2
  assert 'No checkpoint for step 7' in capsys.readouterr().err
  assert export.main(['--workdir', setting['workdir'], f'--output={tmp_path}', '--platforms=gpu']) == 2
  assert "--platforms: expected a non-empty subset of ('cpu', 'cuda', 'tpu'), got ['gpu']" in \
      capsys.readouterr().err


def test_evaluation_writes_pictures_to_tensorboard(setting, tmp_path):
  """Evaluation as training runs it (`train.make_evaluator`): metrics, and pictures in the events."""
  config = setting['config']
  mesh = sharding.make_mesh(config.mesh)
  evaluator = train.make_evaluator(config, build_model(config), mesh, setting['data_dir'])
  evaluation = evaluator(setting['predictor'].params)
  results, images = evaluation.metrics, evaluation.images
  assert evaluation.train_metrics == {}  # the records hold no training split
  assert results['num_videos'] == 9
  writer = metric_writers.SummaryWriter(str(tmp_path))
  writer.write_images(5, images)
  writer.close()
  written = {}
  for path in tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        written[value.tag] = tf.io.decode_png(tf.make_ndarray(value.tensor)[-1]).shape
  assert set(written) == {'eval_pictures/confusion/class', 'eval_pictures/per_class_accuracy/class',
                          *(f'eval_pictures/attention/clip_{i}' for i in range(3)),
                          *(f'eval_pictures/reconstruction/{m}_clip_{i}'
                            for m in ('video', 'audio') for i in range(2))}
  assert all(shape[2] == 3 and shape[0] > 100 for shape in written.values())


SERVE = """
import sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
data = np.load(sys.argv[2])
out = model.signatures['serving_default'](frames=tf.constant(data['frames']),
                                          waveform=tf.constant(data['waveform']))
names = model.signatures['labels']()['class'].numpy().astype(str)
errors = []
for frames, waveform in ((data['frames'][:0], data['waveform']), (data['frames'], data['waveform'][:0])):
  try:
    model.signatures['serving_default'](frames=tf.constant(frames), waveform=tf.constant(waveform))
    errors.append('no error')
  except tf.errors.InvalidArgumentError as e:
    errors.append(e.message)
np.savez(sys.argv[3], probabilities=out['class'].numpy(), names=names, errors=errors)
assert not any(name.split('.')[0] in ('avt_jax', 'flax') for name in sys.modules)  # TF imports jax
"""


def raw_clip(path, fps):
  """uint8 [T, H, W, 3] frames at `fps` and the 16 kHz waveform of a video, decoded by PyAV."""
  decoded = media.decode_clip(path, None, None, fps, demo_data.FRAME_SIZE)
  frames = np.stack([tf.io.decode_jpeg(jpeg).numpy() for jpeg in decoded.jpeg_frames])
  return frames, decoded.waveform


def test_log_mel_in_tensorflow_matches_librosa(setting):
  _, waveform = raw_clip(os.path.join(setting['videos'], CLIP), demo_data.PREPARED_FPS)
  time = np.arange(32000) / 16000
  tone = 0.5 * np.sin(2 * np.pi * 1000 * time) + 1e-3 * np.random.default_rng(0).normal(size=time.size)
  for audio in (waveform, tone.astype(np.float32), waveform[:16017]):  # measured: 1.4e-5, 2.3e-4
    expected = logmel.log_mel(audio, n_mels=64)
    actual = export.tf_log_mel(tf.constant(audio), 64).numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=LOG_MEL_TOLERANCE, rtol=0)


def test_saved_model_serves_with_plain_tensorflow_like_the_jax_model(setting, tmp_path):
  config, stats = workdir_lib.load_run(setting['workdir'])
  assert export.main([f'--workdir={setting["workdir"]}', f'--output={tmp_path / "saved"}',
                      '--platforms=cpu']) == 0
  frames, waveform = raw_clip(os.path.join(setting['videos'], CLIP), stats['fps'])
  np.savez(tmp_path / 'inputs.npz', frames=frames, waveform=waveform)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, '-c', SERVE, *(str(tmp_path / name) for name in ('saved', 'inputs.npz', 'out.npz'))],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  served = np.load(tmp_path / 'out.npz')
  assert list(served['names']) == stats['label_names']['class']
  no_frames, no_audio = served['errors']  # empty inputs: a message naming the input, not a GatherV2 error
  assert ('assertion failed: [frames: expected uint8 [T, H, W, 3] with at least one frame of at least one '
          'pixel, got shape] [0 96 96...]') in no_frames and 'Gather' not in no_frames, no_frames
  assert 'assertion failed: [waveform: expected float32 [samples]' in no_audio, no_audio

  # The JAX model on the same frames and librosa's log-mel, cut into views by the input pipeline.
  decoder = input_lib.pipeline.ClipDecoder(config, stats)
  views = decoder.views(lambda ids: tf.gather(frames, ids), frames.shape[0], frames.shape[1:3],
                        {'logmel': logmel.log_mel(waveform, n_mels=stats['n_mels']),
                         'fps': stats['fps'], 'audio_fps': 100.0})
  inputs = {k: v.numpy() for k, v in views.items()}
  expected = setting['predictor'].probabilities({**inputs, 'mask': np.ones(6, np.float32)})['class']
  np.testing.assert_allclose(served['probabilities'], expected, atol=EXPORT_TOLERANCE, rtol=0)
