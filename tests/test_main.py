"""End to end through `python -m avt_jax.main`: kill/resume, preemption, eval-only, config errors."""

import importlib.util
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
from avt_jax import train
from avt_jax.prep import demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.hidden_size=32', '--config.model.num_layers=2', '--config.model.num_heads=2',
        '--config.model.mlp_dim=64', '--config.model.fusion_layer=1', '--config.model.decoder_width=16',
        '--config.model.decoder_heads=2', '--config.model.decoder_mlp_dim=32',
        '--config.model.contrastive_dim=16', '--config.input.batch_size=8',
        '--config.input.eval_batch_size=8', '--config.train.log_every=2',
        '--config.train.checkpoint_every=2', '--config.data.synthetic=']


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


def demo_config(*overrides):
  spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs/demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for flag in TINY + list(overrides):
    key, value = flag.removeprefix('--config.').split('=')
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if value else value
  return c


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """An uninterrupted 8-step run."""
  workdir = tmp_path_factory.mktemp('straight')
  result = run(command(workdir, data_dir, '--config.train.steps=8'))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigkill_then_resume_matches_uninterrupted(data_dir, straight_run, tmp_path):
  steps = '--config.train.steps=8'
  proc = subprocess.Popen(command(tmp_path, data_dir, steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=ENV)
  deadline = time.time() + 300
  while not (tmp_path / 'checkpoints' / '4').exists():
    assert proc.poll() is None, 'training ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'results.json').exists()
  resumed = run(command(tmp_path, data_dir, steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout

  config = demo_config(steps)
  a = train.restore_params(config, str(straight_run))
  b = train.restore_params(config, str(tmp_path))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['steps'] == 8 and results['eval']['num_videos'] == 9


def test_tensorboard_events_hold_every_objective_and_progress(straight_run):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in tf.io.gfile.glob(str(straight_run / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  objectives = ('classification', 'contrastive', 'matching', 'masked_video', 'masked_audio',
                'masked_audio_segment')  # all six are on in configs/demo.py
  assert {f'loss/{o}' for o in objectives} <= tags
  assert {'loss', 'learning_rate', 'grad_norm', 'steps_per_sec', 'eta_seconds', 'eval/top1'} <= tags


def test_non_finite_loss_stops_naming_objective_and_keeps_good_checkpoints(data_dir, tmp_path):
  result = run(command(tmp_path, data_dir, '--config.train.steps=30', '--config.optim.warmup_steps=1',
                       '--config.optim.learning_rate=1e30', '--config.optim.grad_clip_norm=0',
                       '--config.train.checkpoint_every=1',
                       *[f'--config.loss.weights.{o}=0' for o in ('contrastive', 'matching', 'masked_video',
                                                                  'masked_audio', 'masked_audio_segment')]))
  assert result.returncode != 0
  message = result.stderr[result.stderr.index('NonFiniteLossError'):]
  assert re.search(r"Objective '(\w+)' became non-finite at step (\d+)", message), message[:500]
  bad_step = int(re.search(r'at step (\d+)', message).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) == bad_step - 1


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  proc = subprocess.Popen(command(tmp_path, data_dir, '--config.train.steps=100000'), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith('step 2/'):
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.stdout.read()
  assert proc.wait(timeout=300) == 0
  assert 'Preemption requested: saved step' in out
  saved = int(out.split('saved step ')[1].split(',')[0])
  assert saved >= 2 and (tmp_path / 'checkpoints' / str(saved)).is_dir()


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
  result = run(command(workdir, data_dir, '--config.train.steps=10', '--config.input.batch_size=4'))
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
  assert len(errors) == 1 and len(errors[0]) < 400, result.stderr[-3000:]
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
