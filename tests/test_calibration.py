"""Calibrated late fusion: the fitted weights, the fused logits and the held-out split."""

import collections
import dataclasses
import zlib

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
  specs, notes = holdout.hold_out_splits(_specs(), val_fraction=0.15)
  val = [s for s in specs if s.split == 'val']
  train_groups = {s.group for s in specs if s.split == 'train'}
  assert len(val) == 10  # two speakers: the least number of whole groups reaching 15% of 60
  assert not {s.group for s in val} & train_groups
  assert all(s.split == 'test' for s in specs if s.clip_id.startswith('t'))
  assert len(notes) == 1 and notes[0].startswith("held out 10 of 60 'train' clips (2 of 12 groups) "
                                                 "as split 'val'")
  assert holdout.hold_out_splits(_specs(), val_fraction=0.15)[0] == specs  # deterministic


def test_hold_out_validation_leaves_given_splits_alone():
  given = _specs()
  given[0] = ClipSpec('v', 'v.mp4', {'class': [0]}, split='val')
  assert holdout.hold_out_splits(given, val_fraction=0.15) == (given, [])
  assert holdout.hold_out_splits(_specs(), val_fraction=0.0) == (_specs(), [])
  with pytest.raises(ValueError, match='^val_fraction: '):
    holdout.hold_out_splits(_specs(), val_fraction=1.0)


def _train_only(grouped=True):
  """`_specs()` without its test rows: 12 speakers x 5 clips, all in train (each clip its own group
  without `grouped`)."""
  return [s if grouped else dataclasses.replace(s, group=None)
          for s in _specs() if s.split == 'train']


def _hash_order(groups):
  """The documented hold-out order: by CRC-32 of the group name."""
  return sorted(groups, key=lambda g: (zlib.crc32(g.encode()), g))


def test_hold_out_test_then_val_by_whole_groups():
  specs, notes = holdout.hold_out_splits(_train_only(), test_fraction=0.2, val_fraction=0.15)
  by_split = {split: {s.group for s in specs if s.split == split} for split in ('train', 'val', 'test')}
  counts = collections.Counter(s.split for s in specs)
  # By hand: test needs >= 0.2 x 60 = 12 clips -> 3 speakers (15 clips); val then needs
  # >= 0.15 x 45 = 6.75 of the 45 left -> 2 speakers (10 clips); 35 stay in train.
  assert counts == {'test': 15, 'val': 10, 'train': 35}
  assert not by_split['test'] & by_split['val']
  assert not (by_split['test'] | by_split['val']) & by_split['train']
  order = _hash_order(f'spk{g}' for g in range(12))
  assert by_split['test'] == set(order[:3]) and by_split['val'] == set(order[3:5])
  assert [n.split(' for ')[0] for n in notes] == [
      "held out 15 of 60 'train' clips (3 of 12 groups) as split 'test'",
      "held out 10 of 45 'train' clips (2 of 9 groups) as split 'val'"]
  assert 'test_fraction=0.2' in notes[0] and "rows with split 'test' to choose them" in notes[0]
  assert holdout.hold_out_splits(_train_only(), test_fraction=0.2, val_fraction=0.15) == (specs, notes)


def test_hold_out_test_single_clips_without_groups():
  specs, notes = holdout.hold_out_splits(_train_only(grouped=False), test_fraction=0.25)
  test = [s.clip_id for s in specs if s.split == 'test']
  assert len(test) == 15 and len(notes) == 1  # exactly 0.25 x 60 clips, one per group
  assert set(test) == set(_hash_order(s.clip_id for s in _train_only())[:15])


def test_an_existing_test_split_means_nothing_moves_to_test():
  assert holdout.hold_out_splits(_specs(), test_fraction=0.2) == (_specs(), [])
  assert (holdout.hold_out_splits(_specs(), test_fraction=0.2, val_fraction=0.15)
          == holdout.hold_out_splits(_specs(), val_fraction=0.15))
  assert holdout.hold_out_splits(_train_only(), test_fraction=0.0) == (_train_only(), [])


@pytest.mark.parametrize('fraction', [1.0, -0.1, float('nan')])
def test_a_bad_test_fraction_is_one_line_naming_it(fraction):
  with pytest.raises(ValueError, match=r'^test_fraction: expected a number in \[0, 1\), got ') as error:
    holdout.hold_out_splits(_train_only(), test_fraction=fraction)
  assert '\n' not in str(error.value)


def test_a_test_split_cannot_come_from_a_single_group():
  one_speaker = [dataclasses.replace(s, group='spk') for s in _train_only()]
  with pytest.raises(ValueError, match="^test_fraction: the 'train' clips form fewer than two groups"):
    holdout.hold_out_splits(one_speaker, test_fraction=0.2)
