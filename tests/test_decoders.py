"""Tests for avt_jax.models.decoders.MaskedDecoder: shapes, order restoration, mask tokens."""

import flax.linen as nn
import jax
import numpy as np

from avt_jax.models import decoders

ENCODER_WIDTH, WIDTH, PATCH_DIM = 16, 8, 12
GRID = (2, 3)  # 6 tokens
TOKENS = 6


def _decoder(depth: int, posemb_grid=GRID) -> decoders.MaskedDecoder:
  return decoders.MaskedDecoder(WIDTH, depth, num_heads=2, mlp_dim=16, patch_dim=PATCH_DIM,
                                posemb_grid=posemb_grid)


def _param_shapes(module, *args) -> dict:
  """Shapes of the parameters `module.init(rng, *args)` creates (traced abstractly; args static)."""
  return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args))['params'])


def _output_shape(module, params, *args):
  return jax.eval_shape(lambda p: module.apply({'params': p}, *args), params)


def _random_params(module, *args, seed: int = 0) -> dict:
  """Parameters of the shapes `module.init` creates, filled with N(0, 0.5)."""
  shapes = _param_shapes(module, *args)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: 0.5 * rng.normal(size=s.shape).astype(np.float32), shapes)


def _numpy_masking(batch: int, seed: int):
  """Independent per-example random shuffles [B, N] (visible first) and their ids_restore [B, N]."""
  rng = np.random.default_rng(seed)
  shuffle = np.stack([rng.permutation(TOKENS) for _ in range(batch)])
  return shuffle, np.argsort(shuffle, axis=1)


def test_output_shapes_and_parameters_with_and_without_mask_tokens():
  visible = np.zeros((3, 2, ENCODER_WIDTH), np.float32)
  restore = np.tile(np.arange(TOKENS), (3, 1))
  decoder = _decoder(depth=2)
  with_mask = _param_shapes(decoder, visible, GRID, restore)
  assert set(with_mask) == {'decoder_embed', 'mask_token', 'decoder_posembed', 'decoderblock_0',
                            'decoderblock_1', 'decoder_norm', 'decoder_pred'}
  assert with_mask['mask_token'].shape == (1, 1, WIDTH)
  assert with_mask['decoder_posembed']['posembed_input'].shape == (1, *GRID, WIDTH)
  out = _output_shape(decoder, with_mask, visible, GRID, restore)
  assert out.shape == (3, TOKENS, PATCH_DIM) and out.dtype == np.float32

  full = np.zeros((3, TOKENS, ENCODER_WIDTH), np.float32)
  without_mask = _param_shapes(decoder, full, GRID)
  assert 'mask_token' not in without_mask


def test_other_grid_resizes_the_position_embedding():
  decoder = _decoder(depth=1, posemb_grid=(2, 2))
  tokens = np.zeros((2, 15, ENCODER_WIDTH), np.float32)
  params = _param_shapes(decoder, tokens, (5, 3))
  assert params['decoder_posembed']['posembed_input'].shape == (1, 2, 2, WIDTH)
  assert _output_shape(decoder, params, tokens, (5, 3)).shape == (2, 15, PATCH_DIM)


def test_visible_tokens_return_to_their_position_and_mask_tokens_fill_the_rest():
  """Without decoder blocks every position is decoded on its own, so the order can be read off."""
  batch, keep = 4, 2
  shuffle, restore = _numpy_masking(batch, seed=0)
  table = np.random.default_rng(1).normal(size=(batch, TOKENS, ENCODER_WIDTH)).astype(np.float32)
  visible = np.take_along_axis(table, shuffle[:, :keep, None], axis=1)  # [B, keep, D_enc]
  decoder = _decoder(depth=0)
  params = _random_params(decoder, visible, GRID, restore)
  pred = np.asarray(jax.jit(decoder.apply, static_argnums=2)({'params': params}, visible, GRID,
                                                                  restore))

  p = jax.tree_util.tree_map(np.asarray, params)
  posemb = p['decoder_posembed']['posembed_input'].reshape(TOKENS, WIDTH)

  def head(x):  # LayerNorm then the prediction layer
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * p['decoder_norm']['scale'] + p['decoder_norm']['bias']
    return x @ p['decoder_pred']['kernel'] + p['decoder_pred']['bias']

  embedded = table @ p['decoder_embed']['kernel'] + p['decoder_embed']['bias']  # [B, N, W]
  for b in range(batch):
    for n in range(TOKENS):
      source = embedded[b, n] if n in shuffle[b, :keep] else p['mask_token'][0, 0]
      np.testing.assert_allclose(pred[b, n], head(source + posemb[n]), rtol=1e-4, atol=1e-4)


def test_output_does_not_depend_on_the_order_of_visible_tokens():
  batch, keep = 3, 3
  shuffle, restore = _numpy_masking(batch, seed=2)
  table = np.random.default_rng(3).normal(size=(batch, TOKENS, ENCODER_WIDTH)).astype(np.float32)
  decoder = _decoder(depth=2)
  apply = jax.jit(decoder.apply, static_argnums=2)

  def decode(order):
    visible = np.take_along_axis(table, order[:, :keep, None], axis=1)
    return np.asarray(apply({'params': params}, visible, GRID, np.argsort(order, axis=1)))

  params = _random_params(decoder, table[:, :keep], GRID, restore)
  reordered = np.concatenate([shuffle[:, :keep][:, ::-1], shuffle[:, keep:]], axis=1)
  np.testing.assert_allclose(decode(reordered), decode(shuffle), rtol=1e-4, atol=1e-5)
