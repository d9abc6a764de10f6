"""Tests for avt_jax.models.heads against numpy, and the hard-negative sampler's guarantees."""

import jax
import numpy as np
import pytest

from avt_jax.models import heads

WIDTH = 16


def _random_params(module, *args, seed: int = 0) -> dict:
  """Parameters of the shapes `module.init` creates (checked abstractly), filled with N(0, 0.5)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: 0.5 * rng.normal(size=s.shape).astype(np.float32), shapes)


def _gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_classifier_is_shared_across_modalities_and_averages_their_logits():
  rng = np.random.default_rng(0)
  features = {'video': rng.normal(size=(3, WIDTH)).astype(np.float32),
              'audio': rng.normal(size=(3, WIDTH)).astype(np.float32)}
  module = heads.ClassificationHead({'verb': 4, 'noun': 6})
  params = _random_params(module, features)
  assert set(params) == {'output_projection_verb', 'output_projection_noun'}
  logits = jax.jit(module.apply)({'params': params}, features)
  for head, classes in (('verb', 4), ('noun', 6)):
    p = params[f'output_projection_{head}']
    expected = np.mean([f @ p['kernel'] + p['bias'] for f in features.values()], axis=0)
    assert logits[head].shape == (3, classes)
    np.testing.assert_allclose(logits[head], expected, rtol=1e-5, atol=1e-5)


def test_single_head_is_named_output_projection_and_starts_at_zero():
  features = {'video': np.ones((2, WIDTH), np.float32)}
  module = heads.ClassificationHead({'class': 5})
  variables = module.init(jax.random.key(0), features)
  assert set(variables['params']) == {'output_projection'}
  np.testing.assert_array_equal(module.apply(variables, features)['class'], np.zeros((2, 5)))


def test_contrastive_projection_is_layernorm_dense_l2_normalised():
  x = np.random.default_rng(1).normal(size=(4, WIDTH)).astype(np.float32)
  module = heads.ContrastiveProjection(8)
  params = _random_params(module, x)
  out = np.asarray(jax.jit(module.apply)({'params': params}, x))
  ln, dense = params['LayerNorm_0'], params['Dense_0']
  normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y = (normed * ln['scale'] + ln['bias']) @ dense['kernel'] + dense['bias']
  np.testing.assert_allclose(out, y / np.linalg.norm(y, axis=-1, keepdims=True), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped():
  module = heads.LogitScale()
  variables = module.init(jax.random.key(0))
  np.testing.assert_allclose(module.apply(variables), 1.0 / heads.TEMPERATURE_INIT, rtol=1e-5)
  warm = heads.LogitScale(init_temperature=0.5)
  np.testing.assert_allclose(warm.apply(warm.init(jax.random.key(0))), 2.0, rtol=1e-5)
  low, high = heads.TEMPERATURE_RANGE
  for log_scale, expected in ((10.0, 1.0 / low), (-3.0, 1.0 / high), (np.log(20.0), 20.0)):
    params = {'params': {'log_inverse_temperature': np.float32(log_scale)}}
    np.testing.assert_allclose(module.apply(params), expected, rtol=1e-5)


def test_matching_head_is_a_two_layer_mlp_with_one_logit():
  fused = np.random.default_rng(2).normal(size=(5, 2 * WIDTH)).astype(np.float32)
  module = heads.MatchingHead()
  params = _random_params(module, fused)
  out = np.asarray(jax.jit(module.apply)({'params': params}, fused))
  hidden = _gelu(fused @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  assert params['Dense_0']['kernel'].shape == (2 * WIDTH, WIDTH)
  expected = (hidden @ params['Dense_1']['kernel'] + params['Dense_1']['bias'])[:, 0]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def negative_samples():
  """4000 draws of the sampler on one batch of 6 with a padded example (index 2)."""
  logits = np.random.default_rng(3).normal(size=(6, 6)).astype(np.float32) * 2.0
  valid = np.array([1, 1, 0, 1, 1, 1], np.float32)
  keys = jax.random.split(jax.random.key(0), 4000)
  sample = jax.jit(jax.vmap(lambda k: heads.sample_hard_negatives(k, logits, valid)))
  audio_for_video, video_for_audio, has_negative = (np.asarray(a) for a in sample(keys))
  return logits, valid, audio_for_video, video_for_audio, has_negative


def test_negatives_are_never_the_positive_nor_padding(negative_samples):
  _, valid, audio_for_video, video_for_audio, has_negative = negative_samples
  real = valid.astype(bool)
  np.testing.assert_array_equal(has_negative, np.broadcast_to(real, has_negative.shape))
  for sampled in (audio_for_video, video_for_audio):
    assert not np.any(sampled[:, real] == np.arange(6)[real])
    assert np.all(valid[sampled[:, real]] == 1)
    np.testing.assert_array_equal(sampled[:, ~real], 2)  # padding falls back to itself, unused


def test_negatives_follow_the_softmax_of_the_similarity(negative_samples):
  logits, valid, audio_for_video, video_for_audio, _ = negative_samples
  for i in (0, 4):
    allowed = (valid == 1) & (np.arange(6) != i)
    for sampled, row in ((audio_for_video[:, i], logits[i]), (video_for_audio[:, i], logits[:, i])):
      expected = np.zeros(6)
      expected[allowed] = _softmax(row[allowed])
      observed = np.bincount(sampled, minlength=6) / len(sampled)
      np.testing.assert_allclose(observed, expected, atol=0.03)


def test_an_example_without_other_valid_examples_has_no_negative():
  logits = np.zeros((3, 3), np.float32)
  valid = np.array([0, 1, 0], np.float32)
  audio_for_video, video_for_audio, has_negative = heads.sample_hard_negatives(
      jax.random.key(0), logits, valid)
  np.testing.assert_array_equal(has_negative, [False, False, False])
  np.testing.assert_array_equal(audio_for_video, [0, 1, 2])
  np.testing.assert_array_equal(video_for_audio, [0, 1, 2])
