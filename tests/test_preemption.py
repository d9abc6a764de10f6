"""Preemption inside the training loop (`train.train_and_evaluate`, in process): the time from
SIGTERM to a checkpoint on disk is about two steps plus the save, also during an evaluation.

Steps are slowed down on the device, so that a loop which dispatched steps ahead of the device would
save a step far beyond those finished when the signal came (and wait for all of them); the
assertions are on step numbers and batches, not on times."""

import os
import signal
import threading

import jax
import jax.numpy as jnp
import pytest

from avt_jax import checkpointing, train
from avt_jax import input as input_lib
from avt_jax.prep import demo_data
from conftest import demo_main_config

SLOW_ITERATIONS = 12  # 384x384 matmuls added to every step (~0.1-0.3 s on a 2-core CPU)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp('cache')), train_per_class=2,
                                    test_per_class=1)


@pytest.fixture
def preemption(monkeypatch):
  """A fresh preemption flag; SIGTERM's handler restored afterwards."""
  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(checkpointing, '_preemption_flag', threading.Event())
  yield
  signal.signal(signal.SIGTERM, previous)


def _config(data_dir, *flags):
  config = demo_main_config('--config.train.steps=30', '--config.train.log_every=1000',
                            '--config.train.checkpoint_every=1000', *flags)
  config.data.data_dir = data_dir
  return config


def _slow_steps(monkeypatch) -> list:
  """Makes every train step longer on the device (matmuls inside the step, so that dispatch stays
  asynchronous: host callbacks would make it synchronous). Returns the list of each step's metrics
  arrays, appended as the loop dispatches them (`is_ready()` tells which steps have finished)."""
  outputs = []
  make, jit = train.make_train_step, jax.jit

  def slowed(*args):
    step_fn = make(*args)

    def run(state, batch):
      x = jnp.full((384, 384), 1e-3 * jnp.mean(batch['audio']))
      x = jax.lax.fori_loop(0, SLOW_ITERATIONS, lambda _, y: jnp.tanh(y @ y), x)
      state, metrics = step_fn(state, batch)
      return state, {**metrics, 'slow': jnp.mean(x)}

    slowed.run = run
    return run

  def recording_jit(fun, **kwargs):
    jitted = jit(fun, **kwargs)
    if fun is not getattr(slowed, 'run', None):
      return jitted

    def step(*args):
      state, metrics = jitted(*args)
      outputs.append(metrics)
      return state, metrics
    return step

  monkeypatch.setattr(train, 'make_train_step', slowed)
  monkeypatch.setattr(jax, 'jit', recording_jit)
  return outputs


def _finished(outputs) -> int:
  return sum(all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(m)) for m in outputs)


def _signal_at_batch(monkeypatch, module, name, index, seen):
  """Wraps `module.name` (an iterator factory) to send SIGTERM as it yields batch `index` (from 0),
  calling `seen(i)` for each batch it yields."""
  make = getattr(module, name)

  def wrapped(*args, **kwargs):
    for i, batch in enumerate(make(*args, **kwargs)):
      seen(i)
      if i == index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(module, name, wrapped)


def _saved_steps(workdir, subdir='checkpoints'):
  path = workdir / subdir
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def test_sigterm_saves_within_two_steps_of_the_finished_ones(data_dir, tmp_path, monkeypatch,
                                                             preemption, capsys):
  outputs = _slow_steps(monkeypatch)
  finished_at_signal = []
  _signal_at_batch(monkeypatch, input_lib, 'make_train_iterator', 7,
                   lambda i: finished_at_signal.append(_finished(outputs)) if i == 7 else None)
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(_config(data_dir), str(tmp_path), data_dir)
  assert stop.value.code == 0
  saved = _saved_steps(tmp_path)
  # A loop dispatching ahead of the devices would save step 8 (the one it got the batch for)
  # while far fewer steps had finished, and the save would wait for all of them.
  assert len(saved) == 1 and saved[0] <= finished_at_signal[0] + 2, (saved, finished_at_signal)
  assert f'Preemption requested: saved step {saved[0]}' in capsys.readouterr().out


def test_sigterm_during_an_evaluation_abandons_it_and_saves_its_step(data_dir, tmp_path,
                                                                     monkeypatch, preemption, capsys):
  _slow_steps(monkeypatch)  # the same train step as above: compiled once
  taken = []
  _signal_at_batch(monkeypatch, input_lib, 'make_eval_iterator', 1, taken.append)
  config = _config(data_dir, '--config.train.eval_every=3', '--config.input.eval_batch_size=8')
  config.input.eval_clips = 2  # 9 videos x 2 clips x 3 crops: 7 batches of 8 views
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(config, str(tmp_path), data_dir)
  assert stop.value.code == 0
  assert taken == [0, 1]  # abandoned at the batch where the signal came, not after all 7
  assert _saved_steps(tmp_path) == [3]
  assert _saved_steps(tmp_path, 'best') == []  # nothing evaluated, nothing kept as best
  out = capsys.readouterr().out
  assert 'during the evaluation of step 3' in out and 'eval step' not in out
