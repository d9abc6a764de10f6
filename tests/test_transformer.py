"""Tests for avt_jax.models.transformer against flax's attention and an independent numpy block."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from avt_jax.models import transformer

from conftest import random_params

WIDTH, HEADS, MLP = 16, 2, 32


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _attention(x, p):
  """Multi-head self-attention: x [B, N, D], kernels [D, H, d] and out [H, d, D]."""
  q, k, v = (np.einsum('bnd,dhk->bnhk', x, p[n]['kernel']) + p[n]['bias']
             for n in ('query', 'key', 'value'))
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum('bhqs,bshk->bqhk', weights, v)
  return np.einsum('bqhk,hkd->bqd', y, p['out']['kernel']) + p['out']['bias']


def _numpy_block(x, p, attention_scale=1.0, mlp_scale=1.0):
  """Pre-LN block; the scales are the per-example drop-path factors (0 or 1/keep)."""
  x = x + attention_scale * _attention(_layer_norm(x, p['LayerNorm_0']),
                                       p['MultiHeadDotProductAttention_1'])
  mlp = p['MlpBlock_3']
  h = _gelu(_layer_norm(x, p['LayerNorm_2']) @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
  return x + mlp_scale * (h @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias'])


def test_attention_has_flax_parameter_layout_and_output():
  x = np.random.default_rng(0).normal(size=(2, 5, WIDTH)).astype(np.float32)
  ours = transformer.MultiHeadSelfAttention(HEADS)
  variables = random_params(jax.eval_shape(ours.init, jax.random.key(0), x))
  reference = nn.MultiHeadDotProductAttention(num_heads=HEADS)
  reference_shapes = jax.eval_shape(reference.init, jax.random.key(0), x)
  assert (jax.tree_util.tree_map(lambda a: a.shape, variables)
          == jax.tree_util.tree_map(lambda a: a.shape, reference_shapes))
  np.testing.assert_allclose(np.asarray(jax.jit(ours.apply)(variables, x)),
                             np.asarray(jax.jit(reference.apply)(variables, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tokens', [1, 7])
def test_encoder_block_matches_numpy_pre_layernorm_block(tokens):
  x = np.random.default_rng(tokens).normal(size=(3, tokens, WIDTH)).astype(np.float32)
  block = transformer.EncoderBlock(HEADS, MLP)
  variables = random_params(jax.eval_shape(block.init, jax.random.key(0), x))
  out = np.asarray(jax.jit(block.apply)(variables, x))
  assert out.shape == x.shape
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  np.testing.assert_allclose(out, _numpy_block(x, params), rtol=1e-4, atol=1e-4)


def test_drop_path_drops_whole_residual_branches_per_example():
  batch, droppath = 16, 0.5
  x = np.random.default_rng(1).normal(size=(batch, 4, WIDTH)).astype(np.float32)
  block = transformer.EncoderBlock(HEADS, MLP, droppath=droppath)
  variables = random_params(jax.eval_shape(block.init, jax.random.key(0), x))
  params = jax.tree_util.tree_map(np.asarray, variables['params'])

  apply = jax.jit(block.apply, static_argnames='deterministic')
  deterministic = np.asarray(apply(variables, x, deterministic=True))
  np.testing.assert_allclose(deterministic, _numpy_block(x, params), rtol=1e-4, atol=1e-4)

  out = np.asarray(apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(3)}))
  scales = [(a, m) for a in (0.0, 1.0 / droppath) for m in (0.0, 1.0 / droppath)]
  combos = []
  for b in range(batch):
    errors = [np.abs(out[b] - _numpy_block(x[b:b + 1], params, a, m)[0]).max() for a, m in scales]
    assert min(errors) < 1e-3, f'example {b} is no combination of kept / dropped branches'
    combos.append(int(np.argmin(errors)))
  assert len(set(combos)) > 1, 'every example made the same drop decision'


def test_attention_rejects_width_not_divisible_by_heads():
  x = np.zeros((1, 3, 10), np.float32)
  with pytest.raises(ValueError, match='num_heads=3'):
    jax.eval_shape(transformer.MultiHeadSelfAttention(3).init, jax.random.key(0), x)
