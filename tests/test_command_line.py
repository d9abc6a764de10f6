"""Tests for avt_jax.command_line: the entry points' flags, help, usage errors and quiet logs."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from avt_jax import command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _define(fv):
  flags.DEFINE_list('files', None, 'files', flag_values=fv)
  flags.DEFINE_integer('top_k', 5, 'classes', flag_values=fv)
  flags.mark_flag_as_required('files', flag_values=fv)


def test_flags_lists_and_positional_arguments():
  fv, rest = command_line.parse('prog', 'usage', _define, ['--files', 'a,b', 'x', '--top_k=3'],
                                positional='PATH')
  assert (fv.files, fv.top_k, rest) == (['a', 'b'], 3, ['x'])


@pytest.mark.parametrize('argv, message', [
    (['--files=a', '--topk=3'], "Unknown command line flag 'topk'"),
    (['--files=a', '--top_k=three'], '--top_k'),
    (['--top_k=3'], '--files must have a value'),
    (['--files', 'a', 'b'], "unexpected arguments ['b'] (lists are comma-separated"),
])
def test_bad_input_is_one_error_line_and_status_2(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    command_line.parse('prog', 'usage', _define, argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith('prog: error: ') and error.count('\n') == 1 and message in error, error


@pytest.mark.parametrize('help_flag', command_line.HELP_FLAGS)
def test_every_help_flag_prints_usage_and_the_flags(help_flag, capsys):
  with pytest.raises(SystemExit) as exit_info:
    command_line.parse('prog', 'What it does.', _define, [help_flag], positional='PATH')
  out = capsys.readouterr().out
  assert exit_info.value.code == 0
  assert out.startswith('usage: prog [flags] PATH [PATH ...]\n\nWhat it does.') and '--top_k' in out


def test_predict_help_prints_no_line_the_user_did_not_ask_for():
  """TensorFlow 2.21 prints its oneDNN line and absl's InitializeLog warning on import, whatever
  TF_CPP_MIN_LOG_LEVEL says; the entry points set TF_ENABLE_ONEDNN_OPTS=0 before it loads."""
  env = {k: v for k, v in os.environ.items() if k not in command_line.QUIET_ENVIRONMENT}
  result = subprocess.run([sys.executable, '-m', 'avt_jax.predict', '--help'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and '--workdir' in result.stdout
  assert result.stderr == ''


def _define_config(fv):
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv)


@pytest.mark.parametrize('argv, message', [
    (['--config=configs/manifest.py:bogus'], "unknown variant ['bogus']"),
    (['--config=configs/demo.py', '--config.train.nope=1'], "Unknown command line flag 'config.train.nope'"),
])
def test_a_bad_config_flag_is_one_error_line_with_the_configs_own_message(argv, message, capsys):
  """The config file's ValueError arrives as a traceback inside absl's error; one line keeps the
  flag and the config's message."""
  with pytest.raises(SystemExit) as exit_info:
    command_line.parse('prog', 'usage', _define_config, argv)
  error = capsys.readouterr().err
  assert exit_info.value.code == 2 and error.count('\n') == 1 and message in error, error


@pytest.mark.parametrize('argv, status, stream, text', [
    (['--config=configs/demo.py', '--workdir=/tmp/unused', '--nope'], 2, 'stderr',
     "python -m avt_jax.main: error: Unknown command line flag 'nope'\n"),
    (['--config=configs/demo.py', '--workdir=/tmp/unused', '--num_processes=2'], 2, 'stderr',
     'python -m avt_jax.main: error: --num_processes given without --multihost.\n'),
    (['--config=configs/demo.py', '--workdir=/tmp/unused', '--config.nope=1'], 2, 'stderr',
     "python -m avt_jax.main: error: a --config.<field> override names no field of the config: 'nope'\n"),
    (['--helpshort'], 0, 'stdout', '--workdir'),
])
def test_main_follows_the_convention(argv, status, stream, text):
  result = subprocess.run([sys.executable, '-m', 'avt_jax.main', *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == status, result.stderr[-2000:]
  assert (result.stderr == text) if stream == 'stderr' else text in result.stdout, result.stderr[-2000:]
