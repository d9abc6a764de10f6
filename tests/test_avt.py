"""Tests for avt_jax.models.avt.AVT: outputs, determinism, dtypes, which parameters each objective
trains, zero-weight branches, and single-modality models.

One tiny model (width 16, 3 layers, fusion from layer 1) is compiled once, together with the Jacobian
of all objectives with respect to all parameters; most tests read that one result.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax import losses
from avt_jax.default_config import get_base_config
from avt_jax.models import OBJECTIVES, build
from conftest import fast_jit, random_params

BATCH, CLASSES = 4, 5
RNGS = {'masking': jax.random.key(1), 'dropout': jax.random.key(2)}



def _tiny_config(**model):
  c = get_base_config()
  c.model.update(size='tiny', hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32, fusion_layer=1,
                 video_patch=(2, 8, 8), audio_patch=(8, 8), decoder_width=16, decoder_depth=1,
                 decoder_heads=2, decoder_mlp_dim=32, contrastive_dim=8, segment_seconds=0.16,
                 num_segments=1, stochastic_depth=0.2)
  c.model.update(model)
  c.input.update(num_frames=4, image_size=16, audio_frames=32, n_mels=16)
  c.data.num_classes = {'class': CLASSES}
  return c


def _inputs(config, batch=BATCH, seed=0, **sizes):
  """Random video / audio of the configured shape (or `sizes` overriding config.input fields)."""
  config = config.copy_and_resolve_references()
  config.input.update(sizes)
  rng = np.random.default_rng(seed)
  inputs = build.example_inputs(config, batch)
  inputs['video'] = rng.normal(size=inputs['video'].shape).astype(np.float32)
  inputs['audio'] = rng.normal(size=inputs['audio'].shape).astype(np.float32)
  return inputs


def _labels(batch=BATCH):
  return {'labels/class': np.eye(CLASSES, dtype=np.float32)[np.arange(batch) % CLASSES],
          'mask': np.ones(batch, np.float32)}


def _param_shapes(model, inputs, objectives=OBJECTIVES):
  init = lambda: model.init({'params': jax.random.key(0), **RNGS}, inputs, objectives=objectives)
  return nn.meta.unbox(jax.eval_shape(init)['params'])


def _groups(params) -> dict[str, list]:
  """Parameter leaves per top-level module, with the encoder split into its blocks and parts."""
  groups = {}
  for name, subtree in params.items():
    parts = subtree.items() if name == 'encoder' else [(name, subtree)]
    for part, leaves in parts:
      groups[part] = jax.tree_util.tree_leaves(leaves)
  return groups


@pytest.fixture(scope='module')
def config():
  return _tiny_config()


@pytest.fixture(scope='module')
def model(config):
  return build.build_model(config)


@pytest.fixture(scope='module')
def inputs(config):
  return _inputs(config)


@pytest.fixture(scope='module')
def params(model, inputs):
  return random_params(_param_shapes(model, inputs))


@pytest.fixture(scope='module')
def run(model):
  """Jitted training forward pass (drop path on): all outputs, every objective's value, and the
  Jacobian of the objectives w.r.t. the parameters."""

  def run(params, inputs, labels, rngs):
    def objective_values(params):
      outputs = model.apply({'params': params}, inputs, train=True, objectives=OBJECTIVES,
                            rngs=rngs)
      _, terms = losses.total_loss(outputs, labels, {o: 1.0 for o in OBJECTIVES})
      return jnp.stack([terms[o] for o in OBJECTIVES]), outputs

    values, pullback, outputs = jax.vjp(objective_values, params, has_aux=True)
    (jacobian,) = jax.vmap(pullback)(jnp.eye(len(OBJECTIVES)))  # leaves: [objective, *shape]
    return outputs, values, jacobian

  return fast_jit(run)


@pytest.fixture(scope='module')
def result(run, params, inputs):
  return jax.tree_util.tree_map(np.asarray, run(params, inputs, _labels(), RNGS))


def _expected_output_shapes(video_grid, audio_grid, batch=BATCH):
  video_tokens, audio_tokens = int(np.prod(video_grid)), int(np.prod(audio_grid))
  video_patch, audio_patch = 2 * 8 * 8 * 3, 8 * 8
  return {
      'logits': {'class': (batch, CLASSES)},
      'modality_logits': {m: {'class': (batch, CLASSES)} for m in ('video', 'audio')},
      'contrastive': {'video': (batch, 8), 'audio': (batch, 8), 'logit_scale': ()},
      'matching': {'positive': (batch,), 'negative': (2 * batch,), 'negative_valid': (2 * batch,)},
      'masked_video': {'pred': (batch, video_tokens, video_patch),
                       'target': (batch, video_tokens, video_patch), 'mask': (batch, video_tokens)},
      'masked_audio': {'pred': (batch, audio_tokens, audio_patch),
                       'target': (batch, audio_tokens, audio_patch), 'mask': (batch, audio_tokens)},
      'masked_audio_segment': {'pred': (batch, audio_tokens, audio_patch),
                               'target': (batch, audio_tokens, audio_patch),
                               'mask': (batch, audio_tokens)},
      'features': {k: {'video': (batch, 16), 'audio': (batch, 16)}
                   for k in ('pre_fusion', 'pre_fusion_token', 'final')},
  }


def test_all_objectives_compile_and_give_documented_shapes(result):
  outputs, values, _ = result
  assert jax.tree_util.tree_map(np.shape, outputs) == _expected_output_shapes((2, 2, 2), (4, 2))
  assert np.all(np.isfinite(values))


@pytest.mark.parametrize('sizes,video_grid,audio_grid', [
    (dict(num_frames=8, image_size=24, audio_frames=48), (4, 3, 3), (6, 2)),
    (dict(num_frames=2, image_size=8, audio_frames=16, n_mels=8), (1, 1, 1), (2, 1)),
])
def test_other_input_sizes_resize_the_position_embeddings(model, params, config, sizes, video_grid,
                                                           audio_grid):
  inputs = _inputs(config, batch=2, **sizes)
  outputs = jax.eval_shape(lambda p: model.apply({'params': p}, inputs, train=True,
                                                 objectives=OBJECTIVES, rngs=RNGS), params)
  assert (jax.tree_util.tree_map(np.shape, outputs)
          == _expected_output_shapes(video_grid, audio_grid, batch=2))


def test_same_rng_gives_the_same_output_and_masks_follow_the_rng(run, params, inputs, result):
  again = run(params, inputs, _labels(), RNGS)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, result)

  other = run(params, inputs, _labels(), dict(RNGS, masking=jax.random.key(7)))[0]
  outputs = result[0]
  for name in ('masked_video', 'masked_audio', 'masked_audio_segment'):
    assert not np.array_equal(other[name]['mask'], outputs[name]['mask'])
  # Classification and contrastive outputs do not depend on the masking rng, but on drop path.
  np.testing.assert_array_equal(other['logits']['class'], outputs['logits']['class'])
  np.testing.assert_array_equal(other['contrastive']['video'], outputs['contrastive']['video'])
  other = run(params, inputs, _labels(), dict(RNGS, dropout=jax.random.key(8)))[0]
  assert not np.array_equal(other['logits']['class'], outputs['logits']['class'])


def test_masks_have_the_configured_ratios_and_segments(result):
  outputs = result[0]
  np.testing.assert_array_equal(outputs['masked_video']['mask'].sum(1), 8 - 1)  # 0.9 of 8, keep 1
  np.testing.assert_array_equal(outputs['masked_audio']['mask'].sum(1), 8 - 2)  # 0.75 of 8
  segment = np.asarray(outputs['masked_audio_segment']['mask']).reshape(BATCH, 4, 2)
  np.testing.assert_array_equal(segment.sum((1, 2)), 2 * 2)  # 0.16 s = 2 time patches x 2 freq
  np.testing.assert_array_equal(segment[..., 0], segment[..., 1])  # whole frequency range


def test_reconstruction_targets_are_the_input_patches(result, inputs):
  outputs = result[0]
  video, audio = inputs['video'], inputs['audio']
  # Token (t, h, w) = (1, 0, 1) of the 2x2x2 grid is video[:, 2:4, 0:8, 8:16].
  np.testing.assert_array_equal(outputs['masked_video']['target'][:, 5],
                                video[:, 2:4, 0:8, 8:16].reshape(BATCH, -1))
  # Token (time, freq) = (2, 1) of the 4x2 grid is audio[:, 16:24, 8:16].
  for name in ('masked_audio', 'masked_audio_segment'):
    np.testing.assert_array_equal(outputs[name]['target'][:, 5],
                                  audio[:, 16:24, 8:16].reshape(BATCH, -1))


def test_segment_pass_reuses_the_full_pass_video_stream(model, params, inputs):
  """With the full pass running, the segment pass takes the video stream's unimodal layers from it:
  same result as running the whole encoder on the segment-masked inputs (eval: no drop path), and
  the video block is traced once, not twice."""
  def forward(objectives):
    return lambda p, x: model.apply({'params': p}, x, train=False, objectives=objectives, rngs=RNGS)

  def video_block_products(objectives):
    """Matrix products traced inside the video stream's unimodal block (layer 0)."""
    jaxpr = jax.make_jaxpr(forward(objectives))(params, inputs)
    return sum(eqn.primitive.name == 'dot_general' and 'encoderblock_0_video' in str(
        eqn.source_info.name_stack) for eqn in _equations(jaxpr.jaxpr))

  both, alone = ('classification', 'masked_audio_segment'), ('masked_audio_segment',)
  shared = fast_jit(forward(both))(params, inputs)['masked_audio_segment']
  separate = fast_jit(forward(alone))(params, inputs)['masked_audio_segment']
  np.testing.assert_array_equal(shared['mask'], separate['mask'])
  np.testing.assert_allclose(shared['pred'], separate['pred'], rtol=1e-5, atol=1e-6)

  assert video_block_products(alone) == video_block_products(('classification',)) > 0
  assert video_block_products(both) == video_block_products(alone)


def _equations(jaxpr):
  """All equations of a jaxpr, those of nested jaxprs (pjit, custom_vjp, remat) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _equations(inner)


def test_padding_never_becomes_a_hard_negative(run, params, inputs):
  labels = _labels()
  labels_mask = np.array([1, 1, 0, 1], np.float32)
  outputs = run(params, dict(inputs, mask=labels_mask), dict(labels, mask=labels_mask), RNGS)[0]
  np.testing.assert_array_equal(outputs['matching']['negative_valid'], np.tile(labels_mask, 2))


STEM = {'tokenizer_video', 'tokenizer_audio', 'posembed_video', 'posembed_audio', 'cls_video',
        'cls_audio'}
ENCODER = {f'encoderblock_{i}_{m}' for i in range(3) for m in ('video', 'audio')} | {
    'bottleneck', 'encoder_norm_video', 'encoder_norm_audio'}
# With 3 layers fused from layer 1, the bottleneck update of the last layer reaches nobody: the
# video output does not depend on the audio stream's last block or norm, and vice versa.
ONLY_VIDEO_OUTPUT = ENCODER - {'encoderblock_2_audio', 'encoder_norm_audio'}
ONLY_AUDIO_OUTPUT = ENCODER - {'encoderblock_2_video', 'encoder_norm_video'}
TRAINED_BY = {
    'classification': STEM | ENCODER | {'classifier'},
    # Pre-fusion representation: the unimodal block 0; CLS reaches the other tokens through it.
    'contrastive': STEM | {'encoderblock_0_video', 'encoderblock_0_audio',
                           'contrastive_projection_video', 'contrastive_projection_audio',
                           'contrastive_temperature'},
    # Negatives are sampled under stop_gradient: the contrastive heads get nothing from matching.
    'matching': STEM | ENCODER | {'matching_head'},
    'masked_video': STEM | ONLY_VIDEO_OUTPUT | {'decoder_video'},
    'masked_audio': STEM | ONLY_AUDIO_OUTPUT | {'decoder_audio'},
    'masked_audio_segment': STEM | ONLY_AUDIO_OUTPUT | {'segment_mask_token', 'segment_decoder'},
}


@pytest.mark.parametrize('objective', OBJECTIVES)
def test_each_objective_trains_exactly_its_parameters(result, objective):
  jacobian = result[2]
  index = OBJECTIVES.index(objective)
  groups = _groups(jax.tree_util.tree_map(lambda j: j[index], jacobian))
  moved = {name for name, leaves in groups.items() if any(np.any(g != 0) for g in leaves)}
  assert all(np.all(np.isfinite(g)) for leaves in groups.values() for g in leaves)
  assert moved == TRAINED_BY[objective], (
      f'unexpected: {sorted(moved - TRAINED_BY[objective])}, '
      f'missing: {sorted(TRAINED_BY[objective] - moved)}')


def test_bfloat16_forward_matches_float32(model, config, params, inputs, result):
  """Same parameters, computation in bfloat16: within 5% of the output scale (bf16 has 8 bits)."""
  bf16 = build.build_model(_tiny_config(dtype='bfloat16'))
  forward = lambda p, x: bf16.apply({'params': p}, x, train=True, rngs=RNGS,
                                    objectives=('classification', 'contrastive'))
  outputs = fast_jit(forward)(params, inputs)  # same drop-path decisions as the float32 run
  reference = result[0]
  pairs = [(outputs['logits']['class'], reference['logits']['class']),
           (outputs['contrastive']['video'], reference['contrastive']['video']),
           (outputs['contrastive']['audio'], reference['contrastive']['audio'])]
  pairs += [(outputs['features']['final'][m], reference['features']['final'][m])
            for m in ('video', 'audio')]
  for low, high in pairs:
    high = np.asarray(high)
    np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.05 * np.abs(high).max())
  assert outputs['features']['final']['video'].dtype == jnp.bfloat16
  assert outputs['logits']['class'].dtype == jnp.float32  # heads compute in float32


def _loss_cost(model, params, inputs, weights):
  """FLOPs (XLA cost analysis) of the weighted loss as lowered for XLA: what the step computes."""
  objectives = tuple(o for o in OBJECTIVES if weights.get(o, 0) > 0)

  def loss(params):
    outputs = model.apply({'params': params}, inputs, train=True, objectives=objectives, rngs=RNGS)
    return losses.total_loss(outputs, _labels(), weights)[0]

  return jax.jit(loss).lower(params).cost_analysis()['flops']


@pytest.fixture(scope='module')
def all_objectives_flops(model, params, inputs):
  return _loss_cost(model, params, inputs, {o: 1.0 for o in OBJECTIVES})


@pytest.mark.parametrize('objective', OBJECTIVES)
def test_zero_weight_branch_is_not_computed(model, config, params, inputs, all_objectives_flops,
                                            objective):
  """With one weight 0, the program handed to XLA has fewer FLOPs: the branch is not even traced.

  (The forward pass is measured here, six times over; the compiled training step with and without a
  branch is compared in test_single_modality_model_trains_with_the_same_code.)
  """
  config = config.copy_and_resolve_references()
  config.loss.weights = {o: 1.0 for o in OBJECTIVES}
  config.loss.weights[objective] = 0.0
  assert objective not in build.objectives(config)
  assert _loss_cost(model, params, inputs, dict(config.loss.weights)) < all_objectives_flops


@pytest.mark.parametrize('modality', ['audio', 'video'])
def test_single_modality_model_trains_with_the_same_code(modality):
  """Audio-only / video-only: classification + masked modelling. The train step (value and
  gradient) has fewer FLOPs, and the decoder no gradient, when the masked-modelling weight is 0."""
  other = 'video' if modality == 'audio' else 'audio'
  config = _tiny_config(modalities=(modality,))
  config.loss.weights = {'classification': 1.0, f'masked_{modality}': 0.5}
  model = build.build_model(config)
  inputs = {k: v for k, v in _inputs(config).items() if k != other}
  params = random_params(_param_shapes(model, inputs, ('classification', f'masked_{modality}')))
  assert not any(other in name for name in params)
  assert set(params['encoder']) == {f'encoderblock_{i}_{modality}' for i in range(3)} | {
      f'encoder_norm_{modality}'}

  flops = {}
  for weight in (0.0, 0.5):
    config.loss.weights = {'classification': 1.0, f'masked_{modality}': weight}
    objectives = build.objectives(config)

    def loss(p):
      outputs = model.apply({'params': p}, inputs, train=True, objectives=objectives, rngs=RNGS)
      assert set(outputs) - {'features'} == ({'logits', 'modality_logits'}
                                             | {f'masked_{modality}'} & set(objectives))
      return losses.total_loss(outputs, _labels(), dict(config.loss.weights))

    lowered = fast_jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
    flops[weight] = lowered.cost_analysis()['flops']  # the program as traced, on any backend
    (total, terms), grads = lowered.compile()(params)
    assert set(terms) == set(objectives) and np.isfinite(total)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    decoder_moved = any(np.any(g != 0) for g in jax.tree_util.tree_leaves(
        grads[f'decoder_{modality}']))
    assert decoder_moved == (weight > 0)
  assert flops[0.0] < flops[0.5]


def test_logits_are_the_fusion_weighted_sum_of_the_shared_classifier_on_each_modality(result, params):
  outputs = result[0]
  per = outputs['modality_logits']
  w = np.asarray(params['logit_fusion']['modality_weights'])  # [video, audio]
  np.testing.assert_allclose(outputs['logits']['class'],
                             w[0] * per['video']['class'] + w[1] * per['audio']['class'],
                             rtol=1e-5, atol=1e-6)
  head = params['classifier']['output_projection']
  for m in ('video', 'audio'):  # one classifier, applied to each modality's final feature
    np.testing.assert_allclose(per[m]['class'], outputs['features']['final'][m] @ head['kernel']
                               + head['bias'], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_classifier_reads_the_cls_token_or_the_mean_of_the_other_tokens(classifier):
  tokens = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)  # [B, 1 + N, D]
  pooled = build.AVT(num_classes={'class': 2}, classifier=classifier)._pool(jnp.asarray(tokens))
  expected = tokens[:, 0] if classifier == 'token' else tokens[:, 1:].mean(axis=1)
  np.testing.assert_allclose(pooled, expected, rtol=1e-6)


def test_unknown_classifier_names_the_field():
  config = _tiny_config(classifier='cls')
  with pytest.raises(build.ConfigError, match='model.classifier'):
    build.build_model(config)


@pytest.mark.parametrize('objective, match', [
    ('matching', "objectives \\['matching'\\] need both modalities"),
    ('masked_audio', 'needs the audio modality'),
])
def test_module_used_directly_refuses_objectives_its_modalities_cannot_serve(objective, match):
  """The same check as the config's (`build.validate`), for users of the module on its own."""
  model = build.AVT(num_classes={'class': 2}, modalities=('video',), hidden_size=16, num_layers=1,
                    num_heads=2, mlp_dim=32, fusion_layer=1, video_grid=(1, 2, 2))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), {'video': jnp.zeros((1, 2, 32, 32, 3))},
                                      objectives=(objective,)))
