"""Memory and speed controls give the results of the plain path.

- bfloat16 compute (float32 parameters): losses within 3% and gradients with cosine similarity > 0.99
  and norms within 5% of float32. bfloat16 keeps 8 significant bits (relative rounding 2^-9 per
  operation); through a few layers and softmaxes the errors add up to about 1%.
- remat (`dots`, `full`): the recomputed forward pass is the same program, so two train steps give
  bit-identical losses and parameters.
- `scan_layers`: after converting the unrolled parameters with `unrolled_to_scanned`, two train steps
  give the unrolled path's losses and (converted back) parameters to float32 round-off.
- `chunked` attention: equal to `xla` attention (and to `jax.nn.dot_product_attention`) to float32
  round-off, in values and gradients (of the whole model's loss, too), and it needs less memory for
  long sequences.
Gradient accumulation is tested in tests/test_train_step.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avt_jax import losses, train_step
from avt_jax.models import build_model, scan, transformer
from avt_jax.models.build import objectives as config_objectives
from avt_jax.models.fusion import FusionEncoder
from avt_jax.models.options import EncoderOptions
from conftest import fast_jit, tiny_config

STEPS = 2
CLASSIFICATION_ONLY = {'loss.weights': {'classification': 1.0}}



def _config(**overrides):
  """The tiny test config, classification only (the train-step comparisons)."""
  return tiny_config(**CLASSIFICATION_ONLY, **overrides)


def _batches(config, steps=STEPS, seed=0):
  rng = np.random.default_rng(seed)
  b, inp = config.input.batch_size, config.input
  return [{'video': rng.normal(size=(b, inp.num_frames, inp.image_size, inp.image_size, 3)).astype('f4'),
           'audio': rng.normal(size=(b, inp.audio_frames, inp.n_mels)).astype('f4'),
           'labels/class': np.eye(5, dtype=np.float32)[rng.integers(0, 5, b)],
           'mask': np.ones((b,), np.float32)} for _ in range(steps)]


def _random_params(config, seed=0):
  """Parameters of the model's shapes with N(0, 1/fan_in) kernels and non-trivial norms and biases.
  (Unlike the real init, the classifier is not zero, so the first step trains the encoder.)"""
  _, _, _, init = train_step.setup(config)
  return _fill(jax.eval_shape(init, jax.random.PRNGKey(0)).params, seed)


def _fill(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.normal(size=leaf.shape)
    name = path[-1].key
    if name == 'kernel':
      x = x / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x = 1.0 + 0.1 * x if name == 'scale' else 0.1 * x
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _train(config, params, batches):
  """Runs the jitted train step from `params`; returns (per-step metrics, final params)."""
  model, tx, schedule, init = train_step.setup(config)
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(1))
  step = fast_jit(train_step.make_train_step(config, model, tx, schedule))
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params)


@pytest.fixture(scope='module')
def plain_run():
  config = _config()
  batches = _batches(config)
  params = _random_params(config)
  return config, batches, params, _train(config, params, batches)


@pytest.mark.parametrize('policy', ['dots', 'full'])
def test_remat_train_steps_match_the_plain_steps(plain_run, policy):
  """Bit-identical on CPU; on GPUs, where XLA autotunes each compiled program's matrix-product
  algorithms separately, to float32 round-off."""
  config, batches, params, (history, final) = plain_run
  remat_history, remat_final = _train(_config(**{'model.remat_policy': policy}), params, batches)
  if jax.default_backend() == 'cpu':
    same = np.testing.assert_array_equal
  else:
    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for ref, got in zip(history, remat_history):
    same(got['loss'], ref['loss'])
  jax.tree_util.tree_map(same, remat_final, final)


def test_scanned_train_steps_match_unrolled_after_conversion(plain_run):
  config, batches, params, (history, final) = plain_run
  scanned_config = _config(**{'model.scan_layers': True})
  fusion_start = config.model.fusion_layer
  scanned_params = scan.unrolled_to_scanned(params, fusion_start)
  assert 'encoderblock_0_video' not in scanned_params['encoder']
  assert scanned_params['encoder']['encoderblocks_video']['MlpBlock_3']['Dense_0']['kernel'].shape \
      == (fusion_start, 32, 64)
  scanned_history, scanned_final = _train(scanned_config, scanned_params, batches)
  for ref, got in zip(history, scanned_history):
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         scan.scanned_to_unrolled(scanned_final), final)


@pytest.mark.parametrize('fusion,fusion_layer,objectives', [
    ('bottleneck', 1, 'all'), ('bottleneck', 0, None), ('bottleneck', 2, None),
    ('concat', 1, 'classification'), ('late', 1, None)])
def test_scan_layout_and_conversion_for_every_fusion(fusion, fusion_layer, objectives):
  """The converted tree has exactly the scanned model's parameter shapes and the round trip is exact;
  where `objectives` is given, the forward passes agree."""
  overrides = {'model.fusion': fusion, 'model.fusion_layer': fusion_layer}
  if objectives == 'classification':
    overrides.update(CLASSIFICATION_ONLY)
  config = tiny_config(**overrides)
  scanned = build_model(tiny_config(**overrides, **{'model.scan_layers': True}))
  model = build_model(config)
  inputs = {k: v for k, v in _batches(config, 1)[0].items() if k in ('video', 'audio', 'mask')}
  objs = config_objectives(config)
  rngs = {'params': jax.random.key(0), 'masking': jax.random.key(1)}
  init = lambda m: nn.meta.unbox(jax.eval_shape(lambda: m.init(rngs, inputs, objectives=objs)))
  params, expected = _fill(init(model)['params']), init(scanned)['params']
  fusion_start = model.num_layers if fusion == 'late' else fusion_layer
  converted = scan.unrolled_to_scanned(params, fusion_start)
  assert (jax.tree_util.tree_map(np.shape, converted)
          == jax.tree_util.tree_map(lambda x: x.shape, expected))
  jax.tree_util.tree_map(np.testing.assert_array_equal, scan.scanned_to_unrolled(converted), params)
  if objectives:
    forward = lambda m: fast_jit(lambda p: m.apply({'params': p}, inputs, objectives=objs,
                                               rngs={'masking': jax.random.key(2)}))
    out, scanned_out = forward(model)(params), forward(scanned)(converted)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                           scanned_out, out)


def test_scan_conversion_converts_optimizer_states_and_names_missing_layers():
  block = {'kernel': np.ones((2, 3), np.float32)}
  unrolled = {'encoder': {'encoderblock_0_video': block, 'encoderblock_1_video': block,
                          'encoder_norm_video': {'scale': np.ones(3, np.float32)}}}
  adam_like = (train_step.TrainState(step=0, params=unrolled, opt_state=[unrolled], rng=None),)
  converted = scan.unrolled_to_scanned(adam_like, fusion_start=2)[0]
  for tree in (converted.params, converted.opt_state[0]):
    assert set(tree['encoder']) == {'encoderblocks_video', 'encoder_norm_video'}
    assert tree['encoder']['encoderblocks_video']['kernel'].shape == (2, 2, 3)
  broken = {'encoder': {'encoderblock_0_video': block, 'encoderblock_2_video': block}}
  with pytest.raises(ValueError, match='encoderblock_1_video'):
    scan.unrolled_to_scanned(broken, fusion_start=3)
  with pytest.raises(ValueError, match='fusion_start'):
    scan.unrolled_to_scanned(unrolled, fusion_start=3)


def test_scanned_stochastic_depth_uses_per_layer_rates():
  """Layer 0 has rate 0 (never dropped); the last layer's rate is `stochastic_depth`."""
  tokens = {'audio': np.tile(np.random.default_rng(0).normal(size=(1, 3, 16)), (64, 1, 1))
            .astype(np.float32)}
  module = lambda layers, rate: FusionEncoder(
      ('audio',), 16, layers, 2, 32, 'late', layers,
      options=EncoderOptions(stochastic_depth=rate, scan_layers=True))
  rngs = {'dropout': jax.random.key(5)}
  one = module(1, 0.9)
  params = one.init(jax.random.key(0), tokens)
  trained = one.apply(params, tokens, False, rngs=rngs)['audio']
  np.testing.assert_allclose(trained, one.apply(params, tokens, True)['audio'], rtol=1e-6, atol=1e-6)
  two = module(2, 0.5)
  params = two.init(jax.random.key(0), tokens)
  trained = np.asarray(two.apply(params, tokens, False, rngs=rngs)['audio'])
  distinct = {tuple(np.round(x.ravel(), 4)) for x in trained}
  assert 2 <= len(distinct) <= 4  # kept / dropped attention and MLP branches of layer 1


def test_droppath_argument_overrides_the_attribute():
  x = np.random.default_rng(0).normal(size=(32, 4, 16)).astype(np.float32)
  fixed = transformer.EncoderBlock(2, 32, droppath=0.3)
  params = fixed.init(jax.random.key(0), x)
  rngs = {'dropout': jax.random.key(7)}
  expected = fixed.apply(params, x, False, rngs=rngs)
  traced = jax.jit(lambda r: transformer.EncoderBlock(2, 32).apply(params, x, False, r, rngs=rngs))
  np.testing.assert_allclose(traced(jnp.float32(0.3)), expected, rtol=1e-5, atol=1e-5)


def _loss_and_grads(config, params, batch):
  model = build_model(config)
  objs = config_objectives(config)
  weights = {o: float(config.loss.weights[o]) for o in objs}

  def loss(p):
    outputs = model.apply({'params': p}, {k: batch[k] for k in ('video', 'audio', 'mask')},
                          train=True, objectives=objs,
                          rngs={'masking': jax.random.key(3), 'dropout': jax.random.key(4)})
    return losses.total_loss(outputs, batch, weights)[0]

  return fast_jit(jax.value_and_grad(loss))(params)


def test_bfloat16_compute_matches_float32_within_tolerance(plain_run):
  config, batches, params, _ = plain_run
  bf16_config = _config(**{'model.dtype': 'bfloat16'})
  loss, grads = _loss_and_grads(config, params, batches[0])
  bf16_loss, bf16_grads = _loss_and_grads(bf16_config, params, batches[0])
  assert float(bf16_loss) != float(loss)  # the computation really ran in bfloat16
  np.testing.assert_allclose(bf16_loss, loss, rtol=0.03)
  flat, bf16_flat = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)])
                     for t in (grads, bf16_grads))
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(bf16_grads))
  cosine = flat @ bf16_flat / np.linalg.norm(flat) / np.linalg.norm(bf16_flat)
  assert cosine > 0.99
  np.testing.assert_allclose(np.linalg.norm(bf16_flat), np.linalg.norm(flat), rtol=0.05)
  history, final = _train(bf16_config, params, batches[:1])
  assert all(np.isfinite(h['loss']) for h in history)
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(final))


def test_chunked_attention_gives_the_gradients_of_xla_attention(plain_run):
  config, batches, params, _ = plain_run
  chunked = _config(**{'model.attention_implementation': 'chunked',
                       'model.attention_chunk_size': 5})  # 9 video tokens -> 2 chunks
  loss, grads = _loss_and_grads(config, params, batches[0])
  chunked_loss, chunked_grads = _loss_and_grads(chunked, params, batches[0])
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         chunked_grads, grads)


@pytest.mark.parametrize('implementation,chunk_size', [('xla', 0), ('chunked', 64), ('chunked', 7),
                                                       ('chunked', 37)])
def test_attention_matches_jax_nn_in_values_and_gradients(implementation, chunk_size):
  rng = np.random.default_rng(0)
  q, k, v, grad = (rng.normal(size=(2, 37, 3, 8)).astype(np.float32) for _ in range(4))
  attention = lambda q, k, v: transformer.dot_product_attention(q, k, v, implementation,
                                                               chunk_size or 512)
  out, vjp = jax.vjp(attention, q, k, v)
  expected, expected_vjp = jax.vjp(jax.nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  for got, want in zip(vjp(grad), expected_vjp(grad)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  low = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), expected, atol=0.05)


def test_chunked_attention_needs_less_memory():
  shape = jax.ShapeDtypeStruct((1, 2048, 2, 16), jnp.float32)

  def temp_bytes(implementation):
    loss = lambda q, k, v: transformer.dot_product_attention(q, k, v, implementation, 128).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  attention_matrix = 2 * 2048 * 2048 * 4  # heads x tokens^2 float32
  assert temp_bytes('xla') >= attention_matrix
  assert temp_bytes('chunked') < attention_matrix / 2


def test_padded_attention_equals_attention_over_the_real_tokens():
  """The padding that cuDNN needs (odd token counts such as 1 + 16 x 14 x 14) changes nothing."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 8)), jnp.float32) for _ in range(3))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.arange(8.0))
  padded = lambda q, k, v: transformer.padded_attention(q, k, v, 16, 'xla')  # 37 -> 48 tokens
  plain = lambda q, k, v: transformer.dot_product_attention(q, k, v, 'xla')
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v),
                       jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
@pytest.mark.parametrize('tokens', [128, 197])
def test_cudnn_attention_matches_xla_on_gpu(tokens):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, tokens, 4, 64)), jnp.bfloat16) for _ in range(3))
  loss = lambda impl: lambda q, k, v: jnp.sum(
      transformer.dot_product_attention(q, k, v, impl).astype(jnp.float32) * jnp.arange(64.0))
  out = transformer.dot_product_attention(q, k, v, 'cudnn')
  expected = transformer.dot_product_attention(q, k, v, 'xla')
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                             atol=2e-2)
  for got, want in zip(jax.grad(loss('cudnn'), (0, 1, 2))(q, k, v),
                       jax.grad(loss('xla'), (0, 1, 2))(q, k, v)):
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want,
                               atol=0.05 * np.abs(want).max())
