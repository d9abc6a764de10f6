"""Preemption inside the training loop (`train.train_and_evaluate`, in process): the time from
SIGTERM to a checkpoint on disk is about two steps plus the save, also during an evaluation.

Steps are slowed down on the device (a host callback that sleeps), so that a loop which dispatched
steps ahead of the device would save far later than the step running when the signal came; the
assertions are on step numbers and batches, not on times."""

import os
import signal
import threading
import time

import jax
from jax.experimental import io_callback
import pytest

from avt_jax import checkpointing, train
from avt_jax import input as input_lib
from avt_jax.prep import demo_data
from conftest import demo_main_config

STEP_SECONDS = 0.3


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


def _slow_steps(monkeypatch, signal_at: int | None = None) -> list[int]:
  """Each train step sleeps STEP_SECONDS on the device; SIGTERM while step `signal_at` runs.
  Returns the list of steps the device ran (filled as they run)."""
  ran = []
  make = train.make_train_step

  def on_device(completed):
    step = int(completed) + 1
    ran.append(step)
    if step == signal_at:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STEP_SECONDS)

  def slowed(*args):
    step_fn = make(*args)

    def run(state, batch):
      io_callback(on_device, None, state.step)
      return step_fn(state, batch)
    return run

  monkeypatch.setattr(train, 'make_train_step', slowed)
  return ran


def _saved_steps(workdir, subdir='checkpoints'):
  path = workdir / subdir
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def test_sigterm_saves_within_two_steps_of_the_step_running(data_dir, tmp_path, monkeypatch,
                                                            preemption, capsys):
  ran = _slow_steps(monkeypatch, signal_at=4)
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(_config(data_dir), str(tmp_path), data_dir)
  assert stop.value.code == 0
  saved = _saved_steps(tmp_path)
  assert len(saved) == 1 and 4 <= saved[0] <= 6, (saved, ran)
  assert max(ran) == saved[0]  # no step ran beyond the one saved
  assert f'Preemption requested: saved step {saved[0]}' in capsys.readouterr().out


def test_sigterm_during_an_evaluation_abandons_it_and_saves_its_step(data_dir, tmp_path,
                                                                     monkeypatch, preemption, capsys):
  _slow_steps(monkeypatch)
  make = input_lib.make_eval_iterator
  taken = []

  def signal_after_one_batch(*args, **kwargs):
    for i, batch in enumerate(make(*args, **kwargs)):
      taken.append(i)
      if i == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(input_lib, 'make_eval_iterator', signal_after_one_batch)
  config = _config(data_dir, '--config.train.eval_every=3', '--config.input.eval_batch_size=8')
  config.input.eval_clips = 2  # 9 videos x 2 clips x 3 crops: 7 batches of 8 views
  with pytest.raises(SystemExit) as stop:
    train.train_and_evaluate(config, str(tmp_path), data_dir)
  assert stop.value.code == 0
  assert len(taken) == 2  # abandoned at the batch where the signal came, not after all 7
  assert _saved_steps(tmp_path) == [3]
  assert _saved_steps(tmp_path, 'best') == []  # nothing evaluated, nothing kept as best
  out = capsys.readouterr().out
  assert 'during the evaluation of step 3' in out and 'eval step' not in out
