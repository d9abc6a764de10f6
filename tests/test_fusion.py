"""Tests for avt_jax.models.fusion: what each fusion lets the video tokens see of the audio tokens.

The dependence of the final video tokens on the audio tokens fed to `FusionEncoder` is measured by
the Jacobian J = d video_out / d audio_in, a [video tokens * D, audio tokens * D] matrix:

- `late`, and every layer before `fusion_layer`: J is exactly zero.
- `bottleneck`: the video stream of layer i sees the audio only through the bottleneck b_i, the mean
  of the modalities' bottleneck outputs of layer i - 1. The update after the last layer reaches
  nobody, so the audio reaches the video through b_{f+1}, ..., b_{L-1}: (L - 1 - f) * n_bottlenecks
  tokens. Each enters the video tokens only as keys and values of LayerNorm(b), and a LayerNorm output
  is invariant to shifting and scaling its input, which removes 2 directions per token: rank(J) <=
  (L - 1 - f) * n_bottlenecks * (D - 2) (with equality for generic weights), far below full rank,
  and J = 0 when f = L - 1.
- `concat`: the video tokens attend to every normalised audio token directly: rank(J) >=
  audio tokens * (D - 2).
"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from avt_jax.models import fusion as fusion_lib
from avt_jax.models import options as options_lib
from avt_jax.models.options import EncoderOptions
from conftest import fast_jit, random_params

WIDTH, HEADS, MLP, LAYERS = 16, 2, 32, 2
VIDEO_TOKENS, AUDIO_TOKENS = 6, 5
MODALITIES = ('video', 'audio')



@pytest.fixture(scope='module')
def tokens():
  rng = np.random.default_rng(0)
  return {'video': rng.normal(size=(1, VIDEO_TOKENS, WIDTH)).astype(np.float32),
          'audio': rng.normal(size=(1, AUDIO_TOKENS, WIDTH)).astype(np.float32)}


OPTION_FIELDS = {f.name for f in dataclasses.fields(EncoderOptions)}


def _module(fusion: str, fusion_layer: int = 1, n_bottlenecks: int = 1, **options):
  return fusion_lib.FusionEncoder(MODALITIES, WIDTH, LAYERS, HEADS, MLP, fusion, fusion_layer,
                                     n_bottlenecks, options=EncoderOptions(**options))


def _jacobian(module, tokens, source='audio', target='video', method=None) -> np.ndarray:
  """d module(tokens)[target] / d tokens[source] as a [target numel, source numel] matrix."""
  variables = random_params(jax.eval_shape(module.init, jax.random.key(0), tokens), seed=1)

  def target_of(x):
    out = module.apply(variables, dict(tokens, **{source: x}), method=method)
    return out[target]

  jac = np.asarray(fast_jit(jax.jacfwd(target_of))(tokens[source]))
  return jac.reshape(tokens[target].size, tokens[source].size)


def _rank(jac: np.ndarray) -> int:
  singular = np.linalg.svd(jac, compute_uv=False)
  return int(np.sum(singular > 1e-6 * singular[0])) if singular[0] > 0 else 0


@pytest.mark.parametrize('fusion', fusion_lib.FUSIONS)
def test_shapes_and_parameter_names(fusion, tokens):
  module = _module(fusion, fusion_layer=1, n_bottlenecks=3)
  params = jax.eval_shape(module.init, jax.random.key(0), tokens)['params']
  for batch, video_tokens, audio_tokens in ((1, VIDEO_TOKENS, AUDIO_TOKENS), (3, 1, 40)):
    inputs = {'video': jax.ShapeDtypeStruct((batch, video_tokens, WIDTH), np.float32),
              'audio': jax.ShapeDtypeStruct((batch, audio_tokens, WIDTH), np.float32)}
    out = jax.eval_shape(module.apply, {'params': params}, inputs)
    assert {m: x.shape for m, x in out.items()} == {m: x.shape for m, x in inputs.items()}

  expected = {f'encoder_norm_{m}' for m in MODALITIES}
  expected |= {f'encoderblock_0_{m}' for m in MODALITIES}
  if fusion == 'concat':
    expected.add('encoderblock_1')  # one block shared by both modalities
  else:
    expected |= {f'encoderblock_1_{m}' for m in MODALITIES}
  if fusion == 'bottleneck':
    expected.add('bottleneck')
    assert params['bottleneck'].shape == (1, 3, WIDTH)
  assert set(params) == expected


@pytest.mark.parametrize('field,value', [
    ('fusion', 'cross'), ('fusion_layer', -1), ('fusion_layer', LAYERS + 1), ('n_bottlenecks', 0),
    ('remat_policy', 'some')])
def test_impossible_attributes_raise_an_error_naming_them(tokens, field, value):
  module = (_module('bottleneck', **{field: value}) if field in OPTION_FIELDS
            else _module('bottleneck').clone(**{field: value}))
  with pytest.raises(ValueError, match=f'FusionEncoder.{field}:'):
    jax.eval_shape(module.init, jax.random.key(0), tokens)


def test_single_modality_has_no_bottleneck_and_keeps_shapes(tokens):
  module = fusion_lib.FusionEncoder(('audio',), WIDTH, LAYERS, HEADS, MLP, 'bottleneck', 1, 4)
  audio = {'audio': tokens['audio']}
  params = jax.eval_shape(module.init, jax.random.key(0), audio)['params']
  assert set(params) == {'encoderblock_0_audio', 'encoderblock_1_audio', 'encoder_norm_audio'}
  out = jax.eval_shape(module.apply, {'params': params}, audio)
  assert out['audio'].shape == tokens['audio'].shape


def test_layers_before_fusion_layer_do_not_mix_modalities(tokens):
  module = _module('bottleneck', fusion_layer=1)
  jac = _jacobian(module, tokens, method=fusion_lib.FusionEncoder.unimodal)
  assert np.all(jac == 0.0)


def test_late_fusion_video_output_does_not_depend_on_audio(tokens):
  jac = _jacobian(_module('late'), tokens)
  assert np.all(jac == 0.0)


@pytest.mark.parametrize('source,target', [('audio', 'video'), ('video', 'audio')])
def test_bottleneck_update_of_the_last_layer_reaches_no_modality(tokens, source, target):
  jac = _jacobian(_module('bottleneck', fusion_layer=LAYERS - 1, n_bottlenecks=2), tokens, source,
                  target)
  assert np.all(jac == 0.0)


@pytest.mark.parametrize('fusion_layer,n_bottlenecks', [(0, 1), (0, 3)])
def test_bottleneck_fusion_passes_audio_to_video_only_through_the_bottleneck(
    tokens, fusion_layer, n_bottlenecks):
  jac = _jacobian(_module('bottleneck', fusion_layer, n_bottlenecks), tokens)
  exchanges = LAYERS - 1 - fusion_layer  # bottleneck updates that reach a later layer
  # Equality: every bottleneck token carries audio information, and nothing else does.
  assert _rank(jac) == exchanges * n_bottlenecks * (WIDTH - 2)
  assert exchanges * n_bottlenecks * WIDTH < min(jac.shape)  # far from full rank


def test_concat_fusion_passes_every_audio_token_to_video(tokens):
  jac = _jacobian(_module('concat', fusion_layer=LAYERS - 1), tokens)
  assert _rank(jac) >= AUDIO_TOKENS * (WIDTH - 2)


def _training_forward(module, params, tokens):
  """The training path: deterministic=False, with a drop-path rng."""
  return module.apply(params, tokens, False, rngs={'dropout': jax.random.key(3)})


@pytest.fixture(scope='module')
def reference_training_output(tokens):
  reference = _module('bottleneck', stochastic_depth=0.1)
  params = random_params(jax.eval_shape(reference.init, jax.random.key(0), tokens), seed=1)
  return params, fast_jit(lambda p: _training_forward(reference, p, tokens))(params)


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_policy_wraps_every_block_and_keeps_parameters_and_outputs(
    tokens, reference_training_output, policy):
  params, expected = reference_training_output
  remat = _module('bottleneck', stochastic_depth=0.1, remat_policy=policy)
  remat_shapes = nn.meta.unbox(jax.eval_shape(remat.init, jax.random.key(0), tokens))
  assert (jax.tree_util.tree_map(np.shape, remat_shapes)
          == jax.tree_util.tree_map(np.shape, params))
  forward = lambda p: _training_forward(remat, p, tokens)

  jaxpr = jax.make_jaxpr(forward)(params).jaxpr
  policies = [e.params['policy'] for e in jaxpr.eqns if 'policy' in e.params]
  assert len(policies) == LAYERS * len(MODALITIES)
  assert all(p is options_lib.REMAT_POLICIES[policy] for p in policies)
  jax.eval_shape(jax.grad(lambda p: sum(x.sum() for x in forward(p).values())), params)
  out = fast_jit(forward)(params)
  for m in MODALITIES:
    np.testing.assert_allclose(out[m], expected[m], rtol=1e-5, atol=1e-5)


def test_stochastic_depth_grows_linearly_to_the_last_layer(tokens):
  module = fusion_lib.FusionEncoder(MODALITIES, WIDTH, 5, HEADS, MLP, fusion_layer=2,
                                       options=EncoderOptions(stochastic_depth=0.2))
  bound = module.bind(random_params(jax.eval_shape(module.init, jax.random.key(0), tokens), seed=1))
  for m in MODALITIES:
    rates = [block.droppath for block in bound.blocks[m]]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])
