"""Evaluation pictures: bottleneck attention maps (`AVT.attention_maps`), confused pairs, per-class
accuracy. That training writes them to TensorBoard: test_main and test_predict."""

import jax
import numpy as np
import pytest

from avt_jax import pictures
from avt_jax.models import build_model, scan
from avt_jax.models.build import example_inputs
from conftest import random_params, tiny_config


def _model_and_params(**overrides):
  config = tiny_config(**{'model.num_layers': 3, **overrides})
  model = build_model(config)
  inputs = example_inputs(config, 2)
  rng = np.random.default_rng(0)
  inputs = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in inputs.items() if k != 'mask'}
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs)['params'])
  return model, random_params(shapes), inputs


@pytest.fixture(scope='module')
def maps():
  """Attention maps of a 3-layer tiny AVT fused from layer 1 (2 fused layers, 2 bottleneck tokens)."""
  model, params, inputs = _model_and_params()
  return model, params, inputs, jax.device_get(jax.jit(model.attention_maps)(params, inputs))


def test_a_bottleneck_tokens_attention_sums_to_one_over_its_keys(maps):
  model, _, inputs, result = maps
  grids = {'video': (2, 2, 2), 'audio': (4, 2)}  # 4x32x32 video in 2x16x16, 64x32 audio in 16x16
  for m, grid in grids.items():
    weights = result[m]['weights']
    tokens = int(np.prod(grid))
    assert weights.shape == (2, 2, 2, 2, 1 + tokens + 2)  # batch, fused layers, heads, bottlenecks, keys
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
    assert model.token_grid(m, inputs[m].shape) == grid
    np.testing.assert_array_equal(result[m]['grid'].reshape(2, 2, 2, 2, tokens),
                                  weights[..., 1:1 + tokens])


def test_scanned_layers_give_the_same_maps(maps):
  _, params, inputs, result = maps
  scanned, _, _ = _model_and_params(**{'model.scan_layers': True})
  scanned_maps = jax.jit(scanned.attention_maps)(scan.unrolled_to_scanned(params, fusion_start=1),
                                                 inputs)
  for m in ('video', 'audio'):
    np.testing.assert_allclose(scanned_maps[m]['weights'], result[m]['weights'], atol=1e-6)


def test_attention_maps_need_bottleneck_fused_layers():
  model, params, inputs = _model_and_params(**{'model.fusion': 'concat'})
  with pytest.raises(ValueError, match="needs bottleneck-fused layers; this model has fusion='concat'"):
    model.attention_maps(params, inputs)


def test_most_confused_pairs_and_per_class_accuracy():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
  predictions = np.array([0, 1, 1, 1, 0, 1, 1, 1, 2, 3])
  matrix = np.zeros((5, 5), int)
  np.add.at(matrix, (labels, predictions), 1)
  assert pictures.most_confused_pairs(matrix, 2) == [(2, 1, 3), (0, 1, 2)]
  assert pictures.most_confused_pairs(matrix, 10) == [(2, 1, 3), (0, 1, 2), (1, 0, 1)]
  np.testing.assert_allclose(pictures.per_class_accuracy(labels, predictions, 5),
                             [1 / 3, 1 / 2, 1 / 4, 1.0, np.nan])


@pytest.mark.parametrize('num_classes', [4, pictures.MAX_MATRIX_CLASSES + 10])
def test_pictures_are_rgb_images(num_classes):
  rng = np.random.default_rng(0)
  labels, predictions = rng.integers(0, num_classes, (2, 200))
  names = [f'class {i}' for i in range(num_classes)]
  for image in (pictures.confusion_image(labels, predictions, names),
                pictures.per_class_accuracy_image(labels, predictions, names)):
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.std() > 0


def test_unpatchify_inverts_patchify_and_panels_keep_visible_patches():
  from avt_jax.models import patchify  # pylint: disable=g-import-not-at-top
  video = np.random.default_rng(0).normal(size=(1, 4, 8, 12, 3)).astype(np.float32)
  patches = np.asarray(patchify(video, (2, 4, 4)))[0]  # [2 * 2 * 3, 96]
  np.testing.assert_array_equal(pictures.unpatchify(patches, (2, 2, 3), (2, 4, 4), 3), video[0])
  mask = np.zeros(len(patches))
  mask[[1, 4]] = 1
  masked, predicted, target = pictures.reconstruction_panels(np.zeros_like(patches), patches, mask,
                                                             normalized=True)
  assert np.all(masked[[1, 4]] == 0) and np.array_equal(masked[0], patches[0])
  # a zero prediction of normalised targets is each patch's mean
  np.testing.assert_allclose(predicted[1], np.full(96, patches[1].mean()), rtol=1e-6)
  np.testing.assert_array_equal(predicted[0], patches[0])
  assert pictures.reconstruction_image('video', [pictures.unpatchify(
      p, (2, 2, 3), (2, 4, 4), 3) for p in (masked, predicted, target)]).dtype == np.uint8
