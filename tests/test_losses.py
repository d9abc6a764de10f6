"""Tests for avt_jax.losses: every objective against an independent numpy computation.

Which parameters each objective trains is tested on the model, in test_avt.py.
"""

import numpy as np
import pytest

from avt_jax import losses


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_softmax_cross_entropy_with_label_smoothing_and_padding(rng, smoothing):
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.eye(4, dtype=np.float32)[[0, 3, 1, 1, 2]]
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  target = labels * (1 - smoothing) + smoothing / 4
  per_example = -(target * _log_softmax(logits)).sum(-1)
  expected = per_example[mask == 1].mean()
  value = losses.softmax_cross_entropy(logits, labels, mask, smoothing)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_sigmoid_cross_entropy_sums_classes_and_averages_examples(rng):
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], np.float32)
  mask = np.array([1, 0, 1, 1], np.float32)
  target = labels * 0.8 + 0.5 * 0.2
  per_class = -(target * _log_sigmoid(logits) + (1 - target) * _log_sigmoid(-logits))
  expected = per_class.sum(-1)[mask == 1].mean()
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(logits, labels, mask, 0.2), expected,
                             rtol=1e-5)


def test_classification_loss_sums_label_heads(rng):
  logits = {'verb': rng.normal(size=(3, 4)).astype(np.float32),
            'noun': rng.normal(size=(3, 6)).astype(np.float32)}
  labels = {'verb': np.eye(4, dtype=np.float32)[[0, 1, 2]],
            'noun': np.eye(6, dtype=np.float32)[[5, 0, 0]]}
  mask = np.ones(3, np.float32)
  expected = sum(-(labels[h] * _log_softmax(logits[h])).sum(-1).mean() for h in logits)
  np.testing.assert_allclose(losses.classification_loss(logits, labels, mask), expected, rtol=1e-5)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_matches_symmetric_cross_entropy_over_valid_examples(rng):
  video = _unit(rng.normal(size=(6, 8))).astype(np.float32)
  audio = _unit(rng.normal(size=(6, 8))).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1, 0], np.float32)
  scale = 1 / 0.07
  valid = mask == 1
  logits = scale * video[valid] @ audio[valid].T  # padding is neither anchor nor negative
  video_to_audio = -np.diag(_log_softmax(logits, axis=1)).mean()
  audio_to_video = -np.diag(_log_softmax(logits, axis=0)).mean()
  expected = 0.5 * (video_to_audio + audio_to_video)
  np.testing.assert_allclose(losses.info_nce(video, audio, np.float32(scale), mask), expected,
                             rtol=1e-5)


def test_info_nce_is_small_for_matching_pairs_and_large_for_shuffled_ones(rng):
  video = _unit(rng.normal(size=(8, 16))).astype(np.float32)
  mask = np.ones(8, np.float32)
  aligned = losses.info_nce(video, video, np.float32(100.0), mask)
  shuffled = losses.info_nce(video, video[::-1], np.float32(100.0), mask)
  assert aligned < 1e-3 < np.log(8) < shuffled


def test_matching_loss_is_binary_cross_entropy_over_valid_pairs(rng):
  positive = rng.normal(size=4).astype(np.float32)
  negative = rng.normal(size=8).astype(np.float32)
  mask = np.array([1, 1, 1, 0], np.float32)
  negative_valid = np.array([1, 1, 0, 0, 1, 1, 1, 0], np.float32)
  terms = np.concatenate([-_log_sigmoid(positive[mask == 1]),
                          -_log_sigmoid(-negative[negative_valid == 1])])
  value = losses.matching_loss(positive, negative, negative_valid, mask)
  np.testing.assert_allclose(value, terms.mean(), rtol=1e-5)


def _numpy_reconstruction(pred, target, patch_mask, mask, normalize):
  if normalize:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  errors = [((pred[b, n] - target[b, n]) ** 2).mean()
            for b in range(pred.shape[0]) if mask[b]
            for n in range(pred.shape[1]) if patch_mask[b, n]]
  return np.mean(errors)


@pytest.mark.parametrize('normalize', [True, False])
def test_masked_mse_counts_only_masked_patches_of_valid_examples(rng, normalize):
  pred = rng.normal(size=(3, 5, 4)).astype(np.float32)
  target = rng.normal(size=(3, 5, 4)).astype(np.float32) * 3 + 1
  patch_mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], np.float32)
  mask = np.array([1, 1, 0], np.float32)
  value = losses.masked_reconstruction_loss(pred, target, patch_mask, mask, normalize)
  np.testing.assert_allclose(value, _numpy_reconstruction(pred, target, patch_mask, mask, normalize),
                             rtol=1e-5)
  # Nothing outside the masked patches of valid examples matters.
  changed = pred.copy()
  changed[patch_mask * mask[:, None] == 0] += 100.0
  np.testing.assert_allclose(losses.masked_reconstruction_loss(changed, target, patch_mask, mask,
                                                               normalize), value, rtol=1e-6)


@pytest.mark.parametrize('normalize', [True, False])
def test_patch_mean_baseline_is_the_mean_patch_variance(rng, normalize):
  target = rng.normal(size=(3, 5, 4)).astype(np.float32) * 3 + 1
  patch_mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], np.float32)
  mask = np.array([1, 1, 0], np.float32)
  variances = target.var(-1)  # predicting a patch's mean leaves its (population) variance
  if normalize:
    variances = variances / (variances + 1e-6)
  want = variances[(patch_mask * mask[:, None]) > 0].mean()
  np.testing.assert_allclose(losses.patch_mean_loss(target, patch_mask, mask, normalize), want,
                             rtol=1e-5)


def test_segment_loss_is_the_mse_over_the_masked_time_segments(rng):
  """A [time 4 x freq 2] patch grid with segments over whole frequency ranges."""
  time_mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  patch_mask = np.repeat(time_mask, 2, axis=1)  # row-major (time, freq) token order
  pred = rng.normal(size=(2, 8, 6)).astype(np.float32)
  target = rng.normal(size=(2, 8, 6)).astype(np.float32)
  outputs = {'masked_audio_segment': {'pred': pred, 'target': target, 'mask': patch_mask}}
  batch = {'mask': np.ones(2, np.float32)}
  total, terms = losses.total_loss(outputs, batch, {'masked_audio_segment': 0.5})
  expected = _numpy_reconstruction(pred, target, patch_mask, np.ones(2), normalize=True)
  np.testing.assert_allclose(terms['masked_audio_segment'], expected, rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * expected, rtol=1e-5)


def test_total_loss_weights_terms_and_skips_zero_weights(rng):
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
  video = _unit(rng.normal(size=(4, 8))).astype(np.float32)
  audio = _unit(rng.normal(size=(4, 8))).astype(np.float32)
  outputs = {'logits': {'class': logits},
             'contrastive': {'video': video, 'audio': audio, 'logit_scale': np.float32(10.0)}}
  batch = {'labels/class': labels, 'mask': np.ones(4, np.float32)}
  # Zero-weight objectives have no outputs: they must not be looked up.
  weights = {'classification': 1.0, 'contrastive': 0.25, 'matching': 0.0, 'masked_video': 0.0}
  total, terms = losses.total_loss(outputs, batch, weights, label_smoothing=0.1)
  assert set(terms) == {'classification', 'contrastive'}
  classification = losses.softmax_cross_entropy(logits, labels, batch['mask'], 0.1)
  contrastive = losses.info_nce(video, audio, np.float32(10.0), batch['mask'])
  np.testing.assert_allclose(terms['classification'], classification, rtol=1e-6)
  np.testing.assert_allclose(terms['contrastive'], contrastive, rtol=1e-6)
  np.testing.assert_allclose(total, classification + 0.25 * contrastive, rtol=1e-6)


def test_modality_weight_adds_each_modalitys_own_cross_entropy(rng):
  """CE(mean logits) + w * mean over modalities of CE(modality logits), by hand with numpy."""
  per = {m: rng.normal(size=(4, 3)).astype(np.float32) for m in ('video', 'audio')}
  labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
  outputs = {'logits': {'class': (per['video'] + per['audio']) / 2},
             'modality_logits': {m: {'class': x} for m, x in per.items()}}
  batch = {'labels/class': labels, 'mask': np.ones(4, np.float32)}

  def ce(logits):
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-(labels * log_p).sum(-1).mean())

  _, plain = losses.total_loss(outputs, batch, {'classification': 1.0})
  _, terms = losses.total_loss(outputs, batch, {'classification': 1.0}, modality_weight=0.5)
  np.testing.assert_allclose(plain['classification'], ce(outputs['logits']['class']), rtol=1e-5)
  expected = ce(outputs['logits']['class']) + 0.5 * (ce(per['video']) + ce(per['audio'])) / 2
  np.testing.assert_allclose(terms['classification'], expected, rtol=1e-5)


def test_an_unknown_objective_is_an_error_naming_it_and_the_known_ones():
  batch = {'mask': np.ones(2, np.float32)}
  with pytest.raises(ValueError, match=r"'masked_text'.*'classification', 'contrastive'"):
    losses.total_loss({}, batch, {'masked_text': 0.0})  # even with weight 0: a typo never passes


def test_the_objective_table_is_the_one_list_of_objectives():
  """The config's weights, the single-modality variants and the self-supervised list follow it."""
  from avt_jax import default_config  # pylint: disable=g-import-not-at-top
  assert set(default_config.get_base_config().loss.weights) == set(losses.OBJECTIVES)
  assert set(losses.SELF_SUPERVISED) == set(losses.OBJECTIVES) - {'classification'}
  for modality, other in (('video', 'audio'), ('audio', 'video')):
    weights = default_config.single_modality(default_config.get_base_config(), modality).loss.weights
    off = {o for o, w in weights.items() if w == 0.0}
    assert off == {'contrastive', 'matching', 'masked_audio_segment', f'masked_{other}'}
