"""The `:smoke` variant of every dataset config runs train + eval end to end through main."""

import json
import os
import subprocess
import sys

import pytest

from avt_jax import command_line
from avt_jax.losses import OBJECTIVES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k not in command_line.QUIET_ENVIRONMENT}
ENV['XLA_FLAGS'] = ENV['XLA_FLAGS'].replace('device_count=8', 'device_count=2')
# What a normal run prints on stderr: the progress of generating its data (once per cache).
OWN_STDERR_PREFIXES = ('smoke: ', 'prepare: ')


@pytest.mark.parametrize('config, metrics', [
    ('kinetics_sounds', {'top1', 'top5'}),
    ('vggsound', {'top1', 'top5'}),
    ('epic_kitchens_100', {'verb_top1', 'noun_top1', 'action_top1'}),
])
def test_smoke_config_trains_and_evaluates(tmp_path, config, metrics):
  result = subprocess.run(
      [sys.executable, '-m', 'avt_jax.main', f'--config=configs/{config}.py:smoke',
       f'--workdir={tmp_path / "work"}', f'--config.data.cache_dir={tmp_path / "cache"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  # No line the user did not ask for (TensorFlow's oneDNN and absl InitializeLog lines, warnings).
  unasked = [line for line in result.stderr.splitlines() if not line.startswith(OWN_STDERR_PREFIXES)]
  assert not unasked, unasked
  results = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert results['steps'] == 4
  assert metrics <= set(results['eval'])
  assert results['eval']['num_videos'] > 0
  scores = {k: v for k, v in results['eval'].items()
            if k != 'num_videos' and not k.startswith('reconstruction/')}
  assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
  # The paper configs train the masked objectives: their held-out losses are reported too.
  masked = {k: v for k, v in results['eval'].items() if k.startswith('reconstruction/')}
  assert masked and all(v > 0 for v in masked.values()), masked
  assert all(f'loss/{o}' in results['train'] for o in OBJECTIVES)
