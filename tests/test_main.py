"""End to end through `python -m avt_jax.main`: kill/resume, preemption, eval-only, evaluation
during training with a best checkpoint, config errors."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from avt_jax import checkpointing
from avt_jax import evaluate
from avt_jax import workdir as workdir_lib
from avt_jax.losses import OBJECTIVES, SELF_SUPERVISED
from avt_jax.prep import demo_data
from conftest import TINY_MAIN_FLAGS, demo_main_config as demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_MAIN_FLAGS


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp('cache')), train_per_class=2,
                                    test_per_class=1)


def command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'avt_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *TINY, *extra]


# Training subprocesses see 2 simulated devices (2-way data parallel): enough to exercise sharding
# and mesh changes, cheaper to run than 8 on a 2-core machine.
ENV = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'].replace(
    'device_count=8', 'device_count=2'))


def run(args):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


# For runs whose tests check neither the training-subset scores nor the pictures (both checked on
# `straight_run`): the evaluations then score the eval split only (training is unchanged).
EVAL_SPLIT_ONLY = ('--config.eval.train_subset_size=0', '--config.train.eval_pictures=False')


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """An uninterrupted 8-step run."""
  workdir = tmp_path_factory.mktemp('straight')
  result = run(command(workdir, data_dir, '--config.train.steps=8'))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigkill_then_resume_matches_uninterrupted(data_dir, straight_run, tmp_path):
  steps = '--config.train.steps=8'
  proc = subprocess.Popen(command(tmp_path, data_dir, steps, *EVAL_SPLIT_ONLY), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
  deadline = time.time() + 300
  while not (tmp_path / 'checkpoints' / '4').exists():
    assert proc.poll() is None, 'training ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'results.json').exists()
  resumed = run(command(tmp_path, data_dir, steps, *EVAL_SPLIT_ONLY))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout

  config = demo_config(steps)
  a = workdir_lib.restore_params(config, str(straight_run))
  b = workdir_lib.restore_params(config, str(tmp_path))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['steps'] == 8 and results['eval']['num_videos'] == 9


def test_results_hold_the_training_subset_and_a_diagnosis(data_dir, straight_run):
  results = json.loads((straight_run / 'results.json').read_text())
  with open(os.path.join(data_dir, 'stats.json')) as f:
    train_clips = json.load(f)['num_clips']['train']
  assert set(results['train_eval']) == set(results['eval'])  # the same scores
  assert results['train_eval']['num_videos'] == min(train_clips, 256)  # eval.train_subset_size
  assert {'modality_top1/video', 'modality_top1/audio', 'retrieval/v2a_R@1'} <= set(results['eval'])
  assert isinstance(results['diagnosis'], list) and all(isinstance(n, str) for n in
                                                         results['diagnosis'])


def test_tensorboard_events_hold_every_objective_progress_and_pictures(straight_run):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in tf.io.gfile.glob(str(straight_run / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {f'loss/{o}' for o in OBJECTIVES} <= tags  # all are on in configs/demo.py
  assert {'loss', 'learning_rate', 'grad_norm', 'steps_per_sec', 'eta_seconds', 'eval/top1'} <= tags
  # Each modality's own scores and retrieval (contrastive is on), also on the training subset.
  for split in ('eval', 'train_eval'):
    assert {f'{split}/{k}' for k in ('top1', 'modality_top1/video', 'modality_top1/audio',
                                     'retrieval/v2a_R@1', 'retrieval/a2v_R@10')} <= tags
  assert {'eval_pictures/confusion/class', 'eval_pictures/per_class_accuracy/class',
          'eval_pictures/attention/clip_0'} <= tags


def test_non_finite_loss_stops_naming_objective_and_keeps_good_checkpoints(data_dir, tmp_path):
  result = run(command(tmp_path, data_dir, '--config.train.steps=30', '--config.optim.warmup_steps=1',
                       '--config.optim.learning_rate=1e30', '--config.optim.grad_clip_norm=0',
                       '--config.train.checkpoint_every=1',
                       *[f'--config.loss.weights.{o}=0' for o in SELF_SUPERVISED]))
  assert result.returncode != 0
  message = result.stderr[result.stderr.index('NonFiniteLossError'):]
  assert re.search(r"Objective '(\w+)' became non-finite at step (\d+)", message), message[:500]
  bad_step = int(re.search(r'at step (\d+)', message).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) == bad_step - 1


def test_a_second_run_is_refused_and_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  proc = subprocess.Popen(command(tmp_path, data_dir, '--config.train.steps=100000'), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith('step 2/'):
      break
  config_json = (tmp_path / 'config.json').read_text()
  second = run(command(tmp_path, data_dir, '--config.train.steps=100000',
                       '--config.optim.learning_rate=0.5'))
  assert proc.poll() is None, 'the first run must still be training'
  proc.send_signal(signal.SIGTERM)
  assert second.returncode == 1 and 'Traceback' not in second.stderr, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith('Error: ')]
  assert len(errors) == 1 and f'{tmp_path} is in use' in errors[0] and f'pid {proc.pid}' in errors[0]
  assert 'Resumed' not in second.stdout and 'step ' not in second.stdout
  assert (tmp_path / 'config.json').read_text() == config_json
  assert not (tmp_path / 'error.log').exists()  # nothing written into the other run's workdir
  out = proc.stdout.read()
  assert proc.wait(timeout=300) == 0
  assert 'Preemption requested: saved step' in out
  saved = int(out.split('saved step ')[1].split(',')[0])
  assert saved >= 2 and (tmp_path / 'checkpoints' / str(saved)).is_dir()
  assert not (tmp_path / 'run.lock').exists()  # released on the way out


def test_eval_only_restores_onto_another_mesh(data_dir, straight_run):
  first = json.loads((straight_run / 'results.json').read_text())
  again = run(command(straight_run, data_dir, '--config.train.steps=50',
                      '--config.train.eval_only=True', '--config.mesh.data=1', '--config.mesh.model=2'))
  assert again.returncode == 0, again.stderr[-3000:]
  results = json.loads((straight_run / 'results.json').read_text())
  assert results['steps'] == 8 and results['train_seconds'] == 0.0
  assert results['eval']['num_videos'] == first['eval']['num_videos'] == 9
  assert results['eval']['top1'] == pytest.approx(first['eval']['top1'])
  assert 'eval top1' in again.stdout


def _copy_of(workdir, tmp_path):
  copy = tmp_path / 'workdir'
  shutil.copytree(workdir, copy)
  return copy


def test_resume_with_another_batch_size_starts_after_the_examples_seen(data_dir, straight_run, tmp_path):
  """8 steps at batch 8 consumed examples 0..63; 2 more steps at batch 4 take examples 64..71."""
  workdir = _copy_of(straight_run, tmp_path)
  result = run(command(workdir, data_dir, '--config.train.steps=10', '--config.input.batch_size=4',
                       *EVAL_SPLIT_ONLY))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from" in result.stdout and "'examples_seen': 64" in result.stdout
  with checkpointing.Checkpointer(workdir) as ckpt:
    assert ckpt.restore_meta(10)['examples_seen'] == 72


def test_resume_refuses_an_input_change_that_reorders_the_examples(data_dir, straight_run, tmp_path):
  workdir = _copy_of(straight_run, tmp_path)
  result = run(command(workdir, data_dir, '--config.train.steps=10', '--config.input.shuffle_buffer=64'))
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert re.search(r'Error: .*Cannot resume: config.input.shuffle_buffer is 512 in the checkpoint and 64 '
                   'now, which changes the order of the training examples', result.stderr)
  assert not (workdir / 'checkpoints' / '10').exists()  # nothing trained or written


def test_eval_only_adapts_the_checkpoint_to_config_changes(data_dir, straight_run, tmp_path):
  """Longer audio (position embeddings resized), one objective switched off (its decoder dropped)
  and scanned layers (converted): the workdir still evaluates."""
  workdir = _copy_of(straight_run, tmp_path)
  result = run(command(workdir, data_dir, '--config.train.steps=8', '--config.train.eval_only=True',
                       '--config.input.audio_frames=128', '--config.loss.weights.masked_video=0',
                       '--config.model.scan_layers=True'))
  assert result.returncode == 0, result.stderr[-3000:]
  notes = [line.strip() for line in result.stdout.splitlines() if line.startswith('  restore: ')]
  assert notes[0] == 'restore: converted the encoder layers from the unrolled layout'
  assert any('posembed_audio/posembed_input from a (12, 4) to a (8, 4) token grid' in n for n in notes)
  assert 'restore: dropped the parameters not in the config: decoder_video' in notes
  assert json.loads((workdir / 'results.json').read_text())['eval']['num_videos'] == 9


def test_restore_that_cannot_adapt_stops_with_one_line_naming_the_field(data_dir, straight_run,
                                                                        tmp_path):
  result = run(command(straight_run, data_dir, '--config.train.eval_only=True',
                       '--config.model.hidden_size=48'))
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
  # One short line, apart from the workdir's path (named twice; pytest's tmp paths vary in length).
  assert len(errors) == 1 and len(errors[0].replace(str(straight_run), '')) < 320, result.stderr[-3000:]
  assert 'config.model.hidden_size is 32 in the checkpoint and 48 now' in errors[0]


@pytest.mark.parametrize('flag, field', [
    ('--config.model.fusion_layer=9', 'config.model.fusion_layer'),
    ('--config.model.n_bottlenecks=0', 'config.model.n_bottlenecks'),
    ('--config.input.image_size=70', 'config.model.video_patch'),
])
def test_bad_config_fails_before_any_work_naming_the_field(tmp_path, flag, field):
  result = run(command(tmp_path, '/nonexistent', flag))
  assert result.returncode != 0
  assert field in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def eval_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """{'eval/<metric>': [(step, value), ...]} of a workdir's TensorBoard events, as written."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(tf.io.gfile.glob(str(workdir / 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag.startswith('eval/'):
          scalars.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
  return scalars


def assert_same_params(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_eval_every_keeps_the_best_checkpoint_through_resume_and_eval_only(
    data_dir, straight_run, tmp_path):
  steps = '--config.train.steps=8'
  workdir = tmp_path / 'run'
  flags = (steps, '--config.train.eval_every=2', '--config.train.keep_checkpoints=2',
           *EVAL_SPLIT_ONLY)
  result = run(command(workdir, data_dir, *flags))
  assert result.returncode == 0, result.stderr[-3000:]
  assert [int(s) for s in re.findall(r'^eval step (\d+)/8', result.stdout, re.M)] == [2, 4, 6, 8]

  # Evaluating reads the parameters only: training is the same as without eval_every.
  config = demo_config(steps)
  assert_same_params(workdir_lib.restore_params(config, str(workdir)),
                     workdir_lib.restore_params(config, str(straight_run)))

  # eval/<metric> at every evaluated step, once: the final evaluation reuses step 8's.
  scalars = eval_scalars(workdir)
  assert set(scalars) == {f'eval/{k}' for k in (*evaluate.score_names(demo_config()), 'num_videos')}
  assert {'eval/top1', 'eval/top5', 'eval/mAP', 'eval/modality_top1/audio',
          'eval/retrieval/a2v_R@5'} <= set(scalars)
  for tag, points in scalars.items():
    assert [step for step, _ in points] == [2, 4, 6, 8], tag
  logged = {step: {tag.removeprefix('eval/'): points[i][1] for tag, points in scalars.items()}
            for i, step in enumerate([2, 4, 6, 8])}
  results = json.loads((workdir / 'results.json').read_text())
  assert results['eval'] == pytest.approx(logged[8])

  # The best step is the (first) argmax of the logged top1; the latest rotation kept 6 and 8 only
  # and left the best alone.
  top1 = [logged[s]['top1'] for s in (2, 4, 6, 8)]
  best_step = (2, 4, 6, 8)[int(np.argmax(top1))]
  assert results['best'] == {'metric': 'top1', 'mode': 'max', 'step': best_step,
                             'value': pytest.approx(max(top1))}
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['6', '8']
  assert [p.name for p in (workdir / 'best').iterdir()] == [str(best_step)]

  # Resume from step 6 (as if killed before the step 8 checkpoint): the best so far comes from disk,
  # so a worse evaluation at step 8 does not replace it.
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '8')
  (resumed / 'results.json').unlink()
  again = run(command(resumed, data_dir, *flags))
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from' in again.stdout and 'eval step 8/8' in again.stdout
  assert json.loads((resumed / 'results.json').read_text())['best'] == results['best']
  assert [p.name for p in (resumed / 'best').iterdir()] == [str(best_step)]
  assert_same_params(workdir_lib.restore_params(config, str(resumed)),
                     workdir_lib.restore_params(config, str(workdir)))

  # eval_only on the best checkpoint evaluates the best step's parameters.
  only = run(command(workdir, data_dir, steps, *EVAL_SPLIT_ONLY, '--config.train.eval_only=True',
                     '--config.train.eval_checkpoint=best'))
  assert only.returncode == 0, only.stderr[-3000:]
  assert f'Evaluating the best checkpoint: step {best_step}' in only.stdout
  evaluated = json.loads((workdir / 'results.json').read_text())
  assert evaluated['steps'] == best_step and evaluated['train_seconds'] == 0.0
  assert evaluated['eval'] == pytest.approx(logged[best_step])
  assert evaluated['best'] == results['best']


def test_bad_eval_settings_name_the_field_and_what_exists(straight_run, tmp_path):
  def error(workdir=None, **train_fields):
    config = demo_config()
    config.train.update(train_fields)
    with pytest.raises(ValueError) as info:
      workdir_lib.check_eval_config(config, workdir and str(workdir))
    return str(info.value)

  assert workdir_lib.check_eval_config(demo_config()) == ('top1', 'max')
  message = error(best_metric='top3')
  assert 'config.train.best_metric' in message
  assert "('top1', 'top5', 'mAP', 'modality_top1/video'" in message
  epic = demo_config()
  epic.data.label_heads = ('verb', 'noun')
  assert workdir_lib.check_eval_config(epic) == ('action_top1', 'max')
  assert 'config.train.best_mode' in error(best_mode='maximum')
  assert 'config.train.eval_every' in error(eval_every=-1)
  assert 'config.train.eval_checkpoint' in error(eval_checkpoint='oldest')
  bad_subset = demo_config()
  bad_subset.eval.train_subset_size = -1
  with pytest.raises(ValueError, match='config.eval.train_subset_size: expected an integer >= 0'):
    workdir_lib.check_eval_config(bad_subset)
  # straight_run trained without eval_every: it has latest checkpoints and no best one.
  message = error(straight_run, eval_only=True, eval_checkpoint='best')
  assert re.search(r"config.train.eval_checkpoint='best': there is no best checkpoint in .*best "
                   r'.*latest checkpoints are steps \[4, 6, 8\]', message), message
  assert 'no checkpoints at all' in error(tmp_path, eval_only=True, eval_checkpoint='best')
  assert not (straight_run / 'best').exists() and not (tmp_path / 'best').exists()
  # Through main: before any data or checkpoint work.
  result = run(command(tmp_path, '/nonexistent', '--config.train.best_metric=accuracy'))
  assert result.returncode != 0
  assert "config.train.best_metric: 'accuracy' is not among" in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_bad_data_folder_stops_with_one_line_and_leaves_the_workdir_empty(data_dir, tmp_path):
  broken = tmp_path / 'records'
  shutil.copytree(data_dir, broken)
  stats = json.loads((broken / 'stats.json').read_text())
  del stats['logmel_std']
  (broken / 'stats.json').write_text(json.dumps(stats))
  workdir = tmp_path / 'run'
  result = run(command(workdir, broken))
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
  assert len(errors) == 1 and 'stats.json' in errors[0] and 'logmel_std' in errors[0], errors
  assert not workdir.exists() or not list(workdir.iterdir())
