"""Tests for avt_jax.preflight: every config check runs before the workdir is written, one line
naming the field (and `python -m avt_jax.main` leaves the workdir empty)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from avt_jax import preflight
from avt_jax.models import ConfigError, validate
from avt_jax.prep import demo_data
from conftest import TINY_MAIN_FLAGS, demo_main_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp('cache')), train_per_class=2,
                                    test_per_class=1)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('init')
  (folder / 'not_a_checkpoint.npz').write_bytes(b'this is text, not a zip archive')
  np.savez(folder / 'unrelated.npz', weights=np.zeros(3))
  return folder


def _check(data_dir, workdir, *flags):
  config = demo_main_config(*flags)
  config.data.data_dir = data_dir
  validate(config)
  preflight.check_run(config, data_dir, str(workdir))


@pytest.mark.parametrize('flag, field', [
    ('--config.init.checkpoint={files}/missing.npz', 'config.init.checkpoint: '),
    ('--config.init.checkpoint={files}/not_a_checkpoint.npz', 'config.init'),
    ('--config.init.video.checkpoint={files}/missing.npz', 'config.init.video.checkpoint: '),
    ('--config.mesh.model=3', 'config.mesh'),
    ('--config.input.n_mels=48', 'config.input.n_mels'),
    ('--config.input.eval_batch_size=7', 'config.input.eval_batch_size'),
    ('--config.train.best_metric=accuracy', 'config.train.best_metric'),
    ('--config.data.eval_split=validation', 'config.data.eval_split: '),
    ('--config.data.train_split=training', 'config.data.train_split: '),
])
def test_late_problems_are_found_before_anything_is_written(data_dir, files, tmp_path, flag, field):
  workdir = tmp_path / 'run'
  with pytest.raises((ConfigError, FileNotFoundError)) as error:
    _check(data_dir, workdir, flag.format(files=files))
  assert field in str(error.value) and '\n' not in str(error.value)
  assert not workdir.exists()


def test_a_split_the_data_lacks_is_named_with_the_splits_it_has(data_dir, tmp_path):
  """A manifest without `test` rows prepares no `test` split: the run says so and what to do."""
  with pytest.raises(ConfigError) as error:
    _check(data_dir, tmp_path / 'run', '--config.data.eval_split=validation')
  assert f"the prepared data {data_dir} has no 'validation' split (it has test, train)" in str(error.value)
  assert "rows with split 'validation'" in str(error.value)
  assert '--test_fraction' not in str(error.value)  # only `test` can be held out that way


def test_a_missing_test_split_suggests_holding_one_out(data_dir, tmp_path):
  """The same data prepared from `train` rows only (stats.json counts no `test`)."""
  train_only = tmp_path / 'train_only'
  shutil.copytree(data_dir, train_only)
  stats = json.loads((train_only / 'stats.json').read_text())
  del stats['num_clips']['test']
  (train_only / 'stats.json').write_text(json.dumps(stats))
  with pytest.raises(ConfigError) as error:
    _check(str(train_only), tmp_path / 'run')
  assert str(error.value).startswith(f"config.data.eval_split: the prepared data {train_only} has no "
                                     "'test' split (it has train)")
  assert 'prepare with --test_fraction=0.2' in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('flag, field', [
    ('--config.optim.name=lamb', 'config.optim.name'),
    ('--config.optim.learning_rate=-1', 'config.optim.learning_rate'),
    ('--config.train.keep_checkpoints=0', 'config.train.keep_checkpoints'),
    ('--config.train.checkpoint_every=0', 'config.train.checkpoint_every'),
])
def test_optimizer_and_loop_settings_are_validated(flag, field):
  with pytest.raises(ConfigError, match=field):
    validate(demo_main_config(flag))


def test_main_with_a_bad_init_checkpoint_prints_one_line_and_leaves_the_workdir_empty(
    data_dir, files, tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'avt_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', *TINY_MAIN_FLAGS,
       f'--config.init.checkpoint={files}/not_a_checkpoint.npz'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
  assert len(errors) == 1 and 'config.init' in errors[0] and 'not_a_checkpoint.npz' in errors[0]
  assert not workdir.exists() or not list(workdir.iterdir())
