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


def test_scanned_layers_keep_their_layer_axis_replicated_and_shard_the_rest():
  """Stacked (scan_layers) kernels have a leading 'layers' axis: the rules shard the axes after it,
  exactly as the unrolled model shards each layer; optimizer moments follow their parameters."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from avt_jax import train_step  # pylint: disable=g-import-not-at-top
  from avt_jax.models import build_model  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, model=2))
  specs = {}
  for scan in (False, True):
    config = tiny_config()
    config.model.scan_layers = scan
    model = build_model(config)
    tx, _ = train_step.make_optimizer(config.optim, 10)
    state = jax.eval_shape(lambda: train_step.init_state(config, model, tx, jax.random.key(0)))
    shardings = sharding.tree_shardings(state, mesh, train_step.param_axes(config, model))
    specs[scan] = jax.tree.map(lambda s: s.spec, shardings)
  unrolled = specs[False].params['encoder']['encoderblock_0_video']
  scanned = specs[True].params['encoder']['encoderblocks_video']  # layers [0, fusion_layer=1)
  for module, name in (('MultiHeadDotProductAttention_1', 'query'),
                       ('MultiHeadDotProductAttention_1', 'out'), ('MlpBlock_3', 'Dense_0'),
                       ('MlpBlock_3', 'Dense_1')):
    assert unrolled[module][name]['kernel'] != P()
    assert scanned[module][name]['kernel'] == P(None, *unrolled[module][name]['kernel'])
  moment_specs = jax.tree.leaves(specs[True].opt_state, is_leaf=lambda x: isinstance(x, P))
  assert scanned['MlpBlock_3']['Dense_0']['kernel'] in moment_specs
