"""avt_jax.diagnosis: which sentences an evaluation's numbers produce, at the thresholds."""

import pytest

from avt_jax import diagnosis
from conftest import tiny_config


def config(**overrides):
  return tiny_config(**{'train.steps': 100, **overrides})


def scores(top1, video, audio, videos=256):
  return {'top1': top1, 'modality_top1/video': video, 'modality_top1/audio': audio,
          'num_videos': videos}


def test_a_run_that_fits_with_balanced_modalities_has_no_notes():
  assert diagnosis.diagnose(config(), scores(0.8, 0.75, 0.7), scores(0.9, 0.85, 0.8), 100) == []


def test_not_fit_after_most_of_the_schedule_names_the_score_and_what_to_try():
  notes = diagnosis.diagnose(config(), scores(0.3, 0.3, 0.3), scores(0.4, 0.4, 0.4, 64), 80)
  assert len(notes) == 1
  assert notes[0].startswith('The model has not fit its training data: top1 0.400 on the first 64 '
                             'training clips after 80% of the schedule (step 80/100)')
  assert 'config.optim.learning_rate' in notes[0] and 'config.model.video_patch' in notes[0]
  # Early in the schedule, or without a training subset, it says nothing about fit.
  assert diagnosis.diagnose(config(), scores(0.3, 0.3, 0.3), scores(0.4, 0.4, 0.4), 70) == []
  assert diagnosis.diagnose(config(), scores(0.3, 0.3, 0.3), {}, 100) == []


def test_a_weak_branch_and_fusion_that_loses_are_named_per_split():
  # Eval split: video far below the fused (0.8 - 0.6 > 0.15), fused below audio (0.85 > 0.82).
  notes = diagnosis.diagnose(config(), scores(0.8, 0.6, 0.85), scores(0.92, 0.88, 0.9), 100)
  assert len(notes) == 2, notes
  assert notes[0].startswith("On test, the video branch's own predictions (top1 0.600) are far "
                             'below the fused ones (0.800)')
  assert notes[1].startswith('On test, fusion loses to audio alone: fused top1 0.800, audio 0.850')
  assert "config.model.fusion='late'" in notes[1]
  # Within the margins nothing is said: a gap of 0.14, fused 0.01 under the better modality.
  assert diagnosis.diagnose(config(), scores(0.7, 0.56, 0.71), {}, 100) == []


def test_a_model_under_the_fit_threshold_is_told_to_fit_first_not_to_regularise():
  # VoiceDigits video only at 60 epochs: 0.80 of the training clips, 0.61 of the test clips. The
  # gap is over GAP, but the advice is the longer schedule (150 epochs: 1.00 / 0.80), not more
  # regularisation.
  notes = diagnosis.diagnose(config(), scores(0.61, 0.61, 0.61), scores(0.8, 0.8, 0.8), 100)
  assert len(notes) == 1 and notes[0].startswith(
      'The model has not fit its training data: top1 0.800'), notes
  assert 'config.train.epochs' in notes[0] and 'does not generalise' not in notes[0]
  # At the threshold the model fits, and the same gap is named as one.
  notes = diagnosis.diagnose(config(), scores(0.7, 0.7, 0.7), scores(0.9, 0.9, 0.9), 100)
  assert len(notes) == 1 and notes[0].startswith('The model fits its training data but does not '
                                                 'generalise: top1 0.900'), notes


def test_a_model_that_does_not_generalise_is_named():
  notes = diagnosis.diagnose(config(), scores(0.5, 0.45, 0.45), scores(1.0, 0.95, 0.95), 100)
  assert len(notes) == 1 and notes[0].startswith(
      'The model fits its training data but does not generalise: top1 1.000 on training clips, '
      '0.500 on test') and notes[0].endswith('a pretrained start (config.init.checkpoint; '
                                               'configs/manifest.py:pretrained).')
  pretrained = config(**{'init.checkpoint': '/ckpt/dinov2.safetensors'})
  notes = diagnosis.diagnose(pretrained, scores(0.5, 0.45, 0.45), scores(1.0, 0.95, 0.95), 100)
  assert notes[0].endswith('fewer trained blocks of the pretrained encoder (config.optim.frozen).')


@pytest.mark.parametrize('modalities', [('video',), ('audio',)])
def test_one_modality_has_no_fusion_notes(modalities):
  c = config(**{'model.modalities': modalities})
  m = modalities[0]
  results = {'top1': 0.9, f'modality_top1/{m}': 0.9, 'num_videos': 10}
  assert diagnosis.diagnose(c, results, results, 100) == []


def test_multi_head_runs_are_judged_by_the_joint_score():
  c = config(**{'data.num_classes': {'colour': 3, 'shape': 4}})
  c.data.label_heads = ('colour', 'shape')
  train = {'action_top1': 0.2, 'modality_action_top1/video': 0.2,
           'modality_action_top1/audio': 0.2, 'num_videos': 32}
  notes = diagnosis.diagnose(c, {}, train, 100)
  assert len(notes) == 1 and 'action_top1 0.200 on the first 32 training clips' in notes[0]
