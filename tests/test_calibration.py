"""Calibrated late fusion: the fitted weights, the fused logits and the held-out split."""

import numpy as np
import pytest

from avt_jax import calibration
from avt_jax.prep import holdout
from avt_jax.prep.annotations import ClipSpec


def _nll(logits, labels):
  """Softmax cross-entropy by hand: mean over rows of -log p(label)."""
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(-(log_p * labels).sum(-1).mean())


def _two_modalities(seed=0, n=200, classes=5):
  """`good` predicts the label with margin 2; `bad` is confidently (margin 8) random."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  labels = np.eye(classes)[y]
  good = rng.normal(size=(n, classes)) + 2.0 * labels
  bad = 8.0 * np.eye(classes)[rng.integers(0, classes, n)]
  return {'video/class': good, 'audio/class': bad}, {'class': labels}


def test_fused_nll_matches_hand_computation():
  logits, labels = _two_modalities()
  w = np.array([0.7, 0.2], np.float32)
  fused = 0.7 * logits['video/class'] + 0.2 * logits['audio/class']
  stacked = np.stack([logits['video/class'], logits['audio/class']])
  got = float(calibration.fused_nll(w, stacked.astype(np.float32), labels['class'].astype(np.float32)))
  assert got == pytest.approx(_nll(fused, labels['class']), rel=1e-5)


def test_fit_weights_silences_a_confident_but_wrong_modality():
  logits, labels = _two_modalities()
  w = calibration.fit_weights(logits, labels, ('video', 'audio'))
  assert w[1] < 0.05 * w[0]
  fitted = _nll(w[0] * logits['video/class'] + w[1] * logits['audio/class'], labels['class'])
  equal = _nll(0.5 * logits['video/class'] + 0.5 * logits['audio/class'], labels['class'])
  alone = _nll(logits['video/class'], labels['class'])
  assert fitted <= alone + 1e-6 and fitted < equal - 0.5


def test_fit_weights_keeps_both_when_both_carry_information():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 4, 400)
  labels = np.eye(4)[y]
  a = rng.normal(size=(400, 4)) + 1.0 * labels   # independent noise: both views help
  b = rng.normal(size=(400, 4)) + 1.0 * labels
  w = calibration.fit_weights({'video/class': a, 'audio/class': b}, {'class': labels},
                              ('video', 'audio'))
  assert 0.5 < w[0] / w[1] < 2.0
  assert _nll(w[0] * a + w[1] * b, labels) < min(_nll(w.sum() * a, labels), _nll(w.sum() * b, labels))


def test_weights_on_held_out_clips_that_fusion_gets_all_right_are_the_best_mix_not_a_blow_up():
  """Every held-out clip is right under the equal mean (as on the suite's in-distribution `val`
  clips): the video is right on all with margin 3, the audio right with margin 6 and wrong on a
  fifth with margin 2. The weights sum to 1 and are the best mix of a 1001-point grid (by hand); video
  gets the larger one. (A free scale sent both weights towards the bound, with the audio's larger.)"""
  rng = np.random.default_rng(3)
  n, classes = 100, 6
  y = rng.integers(0, classes, n)
  labels = np.eye(classes)[y]
  video = 3.0 * labels + 0.1 * rng.normal(size=(n, classes))
  wrong = np.eye(classes)[(y + 1) % classes]
  audio = np.where(rng.random(n)[:, None] < 0.2, 2.0 * wrong, 6.0 * labels)
  assert ((0.5 * video + 0.5 * audio).argmax(-1) == y).all()
  w = calibration.fit_weights({'video/class': video, 'audio/class': audio}, {'class': labels},
                              ('video', 'audio'))
  assert w.sum() == pytest.approx(1.0, abs=1e-6) and (w >= 0).all() and w[0] > w[1]
  grid = np.linspace(0.0, 1.0, 1001)
  best = min(_nll(p * video + (1 - p) * audio, labels) for p in grid)
  assert _nll(w[0] * video + w[1] * audio, labels) <= best + 1e-4


def test_with_weights_replaces_only_the_fusion_weights():
  params = {'logit_fusion': {'modality_weights': np.full(2, 0.5, np.float32)},
            'classifier': {'kernel': np.ones(3)}}
  out = calibration.with_weights(params, np.array([1.0, 0.0], np.float32))
  np.testing.assert_array_equal(out['logit_fusion']['modality_weights'], [1.0, 0.0])
  np.testing.assert_array_equal(params['logit_fusion']['modality_weights'], [0.5, 0.5])
  with pytest.raises(ValueError, match='expected \\(2,\\) weights'):
    calibration.with_weights(params, np.ones(3, np.float32))
  with pytest.raises(ValueError, match='not an audio-video model'):
    calibration.with_weights({'classifier': {}}, np.ones(2, np.float32))


def _specs():
  """12 speakers x 5 clips in train, 2 speakers in test."""
  specs = [ClipSpec(f'{g}_{i}', f'{g}_{i}.mp4', {'class': [i]}, split='train', group=f'spk{g}')
           for g in range(12) for i in range(5)]
  return specs + [ClipSpec(f't{g}_{i}', f't{g}_{i}.mp4', {'class': [i]}, split='test')
                  for g in range(2) for i in range(5)]


def test_hold_out_validation_moves_whole_groups():
  specs, note = holdout.hold_out_validation(_specs(), 0.15)
  val = [s for s in specs if s.split == 'val']
  train_groups = {s.group for s in specs if s.split == 'train'}
  assert len(val) == 10  # two speakers: the least number of whole groups reaching 15% of 60
  assert not {s.group for s in val} & train_groups
  assert all(s.split == 'test' for s in specs if s.clip_id.startswith('t'))
  assert 'held out 10 of 60' in note
  assert holdout.hold_out_validation(_specs(), 0.15)[0] == specs  # deterministic


def test_hold_out_validation_leaves_given_splits_alone():
  given = _specs()
  given[0] = ClipSpec('v', 'v.mp4', {'class': [0]}, split='val')
  assert holdout.hold_out_validation(given, 0.15) == (given, None)
  assert holdout.hold_out_validation(_specs(), 0.0) == (_specs(), None)
  with pytest.raises(ValueError, match='val_fraction'):
    holdout.hold_out_validation(_specs(), 1.0)
