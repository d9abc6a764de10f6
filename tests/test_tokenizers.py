"""Tests for avt_jax.models.tokenizers: shapes, patch order, position-embedding resizing, inflation."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from avt_jax.models import tokenizers

WIDTH = 16


def _random_variables(module: nn.Module, x: np.ndarray, seed: int = 0) -> dict:
  """Parameters of the shapes `module.init` creates (checked abstractly), filled with N(0, 1)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _init_apply(module: nn.Module, x: np.ndarray, seed: int = 0):
  variables = _random_variables(module, x, seed)
  return variables, np.asarray(jax.jit(module.apply)(variables, x))


def _numpy_patches(x: np.ndarray, patch, stride=None) -> np.ndarray:
  """[B, *spatial, C] -> [B, tokens, prod(patch) * C] by explicit loops over the token grid."""
  stride = stride or patch
  spatial = x.shape[1:-1]
  grid = [(s - p) // st + 1 for s, p, st in zip(spatial, patch, stride)]
  tokens = []
  for index in np.ndindex(*grid):
    window = tuple(slice(i * st, i * st + p) for i, p, st in zip(index, patch, stride))
    tokens.append(x[(slice(None),) + window].reshape(x.shape[0], -1))
  return np.stack(tokens, axis=1)


def _numpy_linear_resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Upsampling along one axis: half-pixel centres, linear weights, coordinates clamped at edges."""
  old = x.shape[axis]
  coords = np.clip((np.arange(size) + 0.5) * old / size - 0.5, 0, old - 1)
  low = np.floor(coords).astype(int)
  high = np.minimum(low + 1, old - 1)
  frac = (coords - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def _numpy_resize(posemb: np.ndarray, grid) -> np.ndarray:
  for axis, size in enumerate(grid, start=1):
    posemb = _numpy_linear_resize_axis(posemb, axis, size)
  return posemb


@pytest.mark.parametrize('video_shape,patch', [
    ((4, 16, 16), (2, 8, 8)),
    ((6, 16, 24), (2, 8, 8)),
    ((4, 16, 16), (4, 16, 16)),
])
def test_tubelet_tokens_are_the_linear_map_of_their_patch(video_shape, patch):
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, *video_shape, 3)).astype(np.float32)
  variables, tokens = _init_apply(tokenizers.TubeletEmbedding(WIDTH, patch), video)
  grid = tuple(s // p for s, p in zip(video_shape, patch))
  assert tokens.shape == (2, *grid, WIDTH)
  kernel = np.asarray(variables['params']['embedding']['kernel'])
  bias = np.asarray(variables['params']['embedding']['bias'])
  assert kernel.shape == (*patch, 3, WIDTH)
  expected = _numpy_patches(video, patch) @ kernel.reshape(-1, WIDTH) + bias
  np.testing.assert_allclose(tokens.reshape(2, -1, WIDTH), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('spec_shape,patch,stride', [
    ((32, 16), (8, 8), None),
    ((40, 16), (16, 16), (8, 8)),  # overlapping patches along time
    ((48, 24), (16, 8), (16, 4)),
])
def test_spectrogram_tokens_are_the_linear_map_of_their_patch(spec_shape, patch, stride):
  rng = np.random.default_rng(1)
  spec = rng.normal(size=(2, *spec_shape)).astype(np.float32)
  variables, tokens = _init_apply(tokenizers.SpectrogramPatchEmbedding(WIDTH, patch, stride), spec)
  step = stride or patch
  grid = tuple((s - p) // st + 1 for s, p, st in zip(spec_shape, patch, step))
  assert tokens.shape == (2, *grid, WIDTH)
  kernel = np.asarray(variables['params']['embedding']['kernel'])
  bias = np.asarray(variables['params']['embedding']['bias'])
  expected = _numpy_patches(spec[..., None], patch, step) @ kernel.reshape(-1, WIDTH) + bias
  np.testing.assert_allclose(tokens.reshape(2, -1, WIDTH), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,patch', [
    ((2, 4, 16, 24, 3), (2, 8, 8)),  # video: patch n is the target of tubelet token n
    ((3, 32, 16, 1), (8, 8)),  # spectrogram with its channel axis
])
def test_patchify_matches_numpy_patches_in_token_order(shape, patch):
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(tokenizers.patchify(x, patch)), _numpy_patches(x, patch))


def test_resize_posemb_keeps_the_embedding_when_the_grid_matches():
  posemb = np.random.default_rng(3).normal(size=(1, 2, 3, 4, WIDTH)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(tokenizers.resize_posemb(posemb, (2, 3, 4))), posemb)


@pytest.mark.parametrize('old_grid,new_grid', [
    ((2, 3), (4, 5)),
    ((2, 2, 2), (4, 3, 2)),
    ((3, 2), (3, 7)),
])
def test_resize_posemb_upsamples_linearly(old_grid, new_grid):
  posemb = np.random.default_rng(4).normal(size=(1, *old_grid, WIDTH)).astype(np.float32)
  resized = np.asarray(tokenizers.resize_posemb(posemb, new_grid))
  assert resized.shape == (1, *new_grid, WIDTH)
  np.testing.assert_allclose(resized, _numpy_resize(posemb, new_grid), rtol=1e-5, atol=1e-5)


def test_resize_posemb_of_a_constant_is_constant_when_downsampling():
  posemb = np.full((1, 8, 6, WIDTH), 0.5, np.float32)
  np.testing.assert_allclose(np.asarray(tokenizers.resize_posemb(posemb, (3, 2))), 0.5, atol=1e-6)


def test_position_embedding_adds_the_embedding_resized_to_the_input_grid():
  module = tokenizers.PositionEmbedding(grid=(2, 2, 2))
  rng = np.random.default_rng(5)
  same = rng.normal(size=(3, 2, 2, 2, WIDTH)).astype(np.float32)
  bigger = rng.normal(size=(3, 4, 3, 2, WIDTH)).astype(np.float32)
  variables = _random_variables(module, same)
  posemb = np.asarray(variables['params']['posembed_input'])
  assert posemb.shape == (1, 2, 2, 2, WIDTH)

  out = np.asarray(module.apply(variables, same))
  np.testing.assert_allclose(out, (same + posemb).reshape(3, 8, WIDTH), rtol=1e-6, atol=1e-6)
  out = np.asarray(module.apply(variables, bigger))
  expected = (bigger + _numpy_resize(posemb, (4, 3, 2))).reshape(3, 24, WIDTH)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _image_embedding(patch: int, seed: int):
  """A 2D patch embedding (ViT-style) and its parameters."""
  conv = nn.Conv(WIDTH, (patch, patch), strides=(patch, patch), padding='VALID')
  image = np.zeros((1, 2 * patch, 3 * patch, 3), np.float32)
  return conv, _random_variables(conv, image, seed)['params']


@pytest.mark.parametrize('method', ['central_frame', 'average'])
@pytest.mark.parametrize('frames', [2, 3])
def test_inflated_model_on_a_repeated_image_equals_the_2d_embedding(method, frames):
  patch = 8
  conv, params = _image_embedding(patch, seed=frames)
  images = np.random.default_rng(6).normal(size=(2, 2 * patch, 3 * patch, 3)).astype(np.float32)
  expected = np.asarray(conv.apply({'params': params}, images))  # [2, 2, 3, D]

  num_frames = 2 * frames
  video = np.repeat(images[:, None], num_frames, axis=1)  # [2, num_frames, H, W, 3]
  kernel = tokenizers.inflate_2d_kernel(np.asarray(params['kernel']), frames, method)
  assert kernel.shape == (frames, patch, patch, 3, WIDTH)
  tubelet = tokenizers.TubeletEmbedding(WIDTH, (frames, patch, patch))
  video_params = {'embedding': {'kernel': kernel, 'bias': np.asarray(params['bias'])}}
  tokens = np.asarray(tubelet.apply({'params': video_params}, video))  # [2, 2, 2, 3, D]
  for t in range(tokens.shape[1]):
    np.testing.assert_allclose(tokens[:, t], expected, rtol=1e-4, atol=1e-4)


def test_central_frame_inflation_sees_only_the_central_frame_of_each_tubelet():
  patch, frames = 8, 3
  conv, params = _image_embedding(patch, seed=0)
  video = np.random.default_rng(7).normal(size=(1, 2 * frames, patch, 2 * patch, 3)).astype(np.float32)
  kernel = tokenizers.inflate_2d_kernel(np.asarray(params['kernel']), frames)
  video_params = {'embedding': {'kernel': kernel, 'bias': np.asarray(params['bias'])}}
  tokens = np.asarray(tokenizers.TubeletEmbedding(WIDTH, (frames, patch, patch)).apply(
      {'params': video_params}, video))
  for t in range(2):
    central = video[:, t * frames + frames // 2]
    np.testing.assert_allclose(tokens[:, t], np.asarray(conv.apply({'params': params}, central)),
                               rtol=1e-4, atol=1e-4)


def test_inflate_2d_kernel_rejects_an_unknown_method():
  with pytest.raises(ValueError, match='central_frame'):
    tokenizers.inflate_2d_kernel(np.zeros((2, 2, 3, 4), np.float32), 2, method='repeat')
