"""Mesh construction and parameter placement rules."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from avt_jax import sharding
from avt_jax.models.transformer import EncoderBlock


def mesh_config(data=-1, fsdp=1, model=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_make_mesh_fills_minus_one():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(mesh_config(data=-1, model=2))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'model': 2}


@pytest.mark.parametrize('cfg, match', [
    (dict(data=3, fsdp=1, model=1), 'needs 3 devices'),
    (dict(data=-1, fsdp=-1, model=1), 'at most one axis'),
    (dict(data=-1, fsdp=3, model=1), 'not divisible'),
])
def test_make_mesh_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(mesh_config(**cfg))


def test_rules_shard_attention_and_mlp_and_skip_indivisible():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, model=2))
  tree = {'encoderblock_0_video': {
      'MultiHeadDotProductAttention_1': {
          'query': {'kernel': np.zeros((8, 4, 2)), 'bias': np.zeros((4, 2))},
          'out': {'kernel': np.zeros((4, 2, 8))}},
      'MlpBlock_3': {'Dense_0': {'kernel': np.zeros((8, 6)), 'bias': np.zeros((6,))},
                     'Dense_1': {'kernel': np.zeros((6, 7))}},
      'LayerNorm_0': {'scale': np.zeros((8,))}}}
  # The axes an encoder block annotates (width 8, 4 heads, MLP 6), placed within a larger tree.
  block = jax.eval_shape(EncoderBlock(num_heads=4, mlp_dim=6).init, jax.random.key(0),
                         np.zeros((1, 2, 8), np.float32))['params']
  s = sharding.tree_shardings(tree, mesh, sharding.logical_axes(block))['encoderblock_0_video']
  attn = s['MultiHeadDotProductAttention_1']
  assert attn['query']['kernel'].spec == P('fsdp', 'model', None)
  assert attn['query']['bias'].spec == P('model', None)
  assert attn['out']['kernel'].spec == P('model', None, 'fsdp')
  assert s['MlpBlock_3']['Dense_0']['kernel'].spec == P('fsdp', 'model')
  assert s['MlpBlock_3']['Dense_1']['kernel'].spec == P('model', None)  # 7 is not divisible by 2
  assert s['LayerNorm_0']['scale'].spec == P(None)


def test_global_batch_is_split_over_data_axes():
  mesh = sharding.make_mesh(mesh_config(data=4, fsdp=2, model=1))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = sharding.global_batch({'x': x}, mesh)['x']
  np.testing.assert_array_equal(np.asarray(g), x)
  assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
