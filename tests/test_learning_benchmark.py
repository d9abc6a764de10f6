"""A reduced VoiceDigits benchmark: configs/manifest.py learns real recorded media beyond a linear floor.

Real speech from the Debian package `hedgewars-data` (installed by `.ci/run`; the test is skipped,
saying so, where it is absent) and scikit-learn's handwritten digits. Four classes, 96 training and
24 test clips (unseen voices and digit scans); the audio-only recipe of `configs/manifest.py` is
trained through `python -m avt_jax.main` and must beat logistic regression on log-mel features.
"""

import json
import os
import subprocess
import sys

import pytest

from avt_jax import learning_benchmark
from avt_jax.prep import voice_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  voice_digits.voices_dir()
  VOICES = None
except FileNotFoundError as e:
  VOICES = str(e)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  if VOICES:
    pytest.skip(VOICES)
  return voice_digits.ensure_voice_digits('clean', str(tmp_path_factory.mktemp('cache')),
                                          num_classes=4, train_repeats=2, test_repeats=2,
                                          progress=False)


def test_reduced_benchmark_holds_unseen_voices_and_real_media(data_dir):
  assert voice_digits.speakers(data_dir, 'test') == sorted(voice_digits.TEST_PACKS)
  assert not set(voice_digits.speakers(data_dir, 'train')) & set(voice_digits.TEST_PACKS)
  with open(os.path.join(data_dir, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['num_clips'] == {'train': 96, 'test': 24}
  assert stats['label_names']['class'] == ['0_hello', '1_byebye', '2_incoming', '3_victory']


def test_audio_recipe_beats_the_linear_floor(data_dir, tmp_path):
  floor = learning_benchmark.linear_floors(data_dir)['audio']
  workdir = tmp_path / 'audio'
  # One CPU device and no persistent compilation cache, as a user's run on this machine: with the
  # suite's 8 simulated devices and shared cache the run's train step aborted (SIGABRT) now and then.
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS')}
  subprocess.run([sys.executable, '-m', 'avt_jax.main', '--config=configs/manifest.py:audio',
                  f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                  '--config.train.epochs=100', '--config.train.log_every=100'],
                 cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  with open(workdir / 'results.json') as f:
    top1 = json.load(f)['eval']['top1']
  assert top1 > floor, (top1, floor)


@pytest.mark.parametrize('num_classes', [4, 10])
def test_complementary_classes_need_both_modalities(num_classes):
  content = [voice_digits.class_content('complementary', num_classes, k) for k in range(num_classes)]
  assert len(set(content)) == num_classes  # (digit, phrase) names the class
  digits, phrases = zip(*content)
  # Every digit and every phrase is shared by at least two classes: neither names the class alone.
  assert min(digits.count(d) for d in digits) >= 2
  assert min(phrases.count(p) for p in phrases) >= 2
  assert voice_digits.class_names('complementary', 4) == ['0_oops', '1_oops', '0_nooo', '1_nooo']
  assert voice_digits.class_names('clean', 2) == ['0_hello', '1_byebye']
