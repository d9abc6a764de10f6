"""Train step: sharded == single device, accumulation == plain, NaN safety, optimizer, imports."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avt_jax import sharding, train_step
from avt_jax.models import build_model
from conftest import tiny_config

STEPS = 3


def make_batches(config, steps, seed=0):
  rng = np.random.default_rng(seed)
  b, inp = config.input.batch_size, config.input
  out = []
  for _ in range(steps):
    labels = rng.integers(0, 5, b)
    out.append({
        'video': rng.normal(size=(b, inp.num_frames, inp.image_size, inp.image_size, 3)).astype('f4'),
        'audio': rng.normal(size=(b, inp.audio_frames, inp.n_mels)).astype('f4'),
        'labels/class': np.eye(5, dtype=np.float32)[labels],
        'mask': np.ones((b,), np.float32),
    })
  return out


def run_steps(config, mesh_shape, batches, devices=None, with_initial=False):
  """Runs the jitted, sharded train step; returns (per-step metrics, final params as numpy), and
  with `with_initial` the initial params as numpy too (read before the first step)."""
  model = build_model(config)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_shape), devices)
  tx, schedule = train_step.make_optimizer(config.optim, config.train.steps)
  init = functools.partial(train_step.init_state, config, model, tx)
  rng = jax.random.PRNGKey(0)
  shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh,
                                      train_step.param_axes(config, model))
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(rng)
    # A copy: the step donates the state's buffers, which a zero-copy view would share.
    initial = jax.tree_util.tree_map(np.array, state.params) if with_initial else None
    step = jax.jit(train_step.make_train_step(config, model, tx, schedule),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    history = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      history.append(jax.device_get(metrics))
  final = jax.device_get(state.params)
  return (history, final, initial) if with_initial else (history, final)


def equivalence_config():
  """All objectives, SGD: parameter differences stay proportional to gradient round-off.

  (AdamW normalises each gradient by its running RMS, so a near-zero gradient whose sign differs by
  round-off becomes a full learning-rate step of the opposite sign: which one depends on the CPU's
  summation order, e.g. Intel vs AMD. The optimizers themselves are optax's, tested there.)
  """
  return tiny_config(**{'optim.name': 'sgd', 'optim.learning_rate': 0.1})


@pytest.fixture(scope='module')
def single_device_run():
  config = equivalence_config()
  batches = make_batches(config, STEPS)
  return config, batches, run_steps(config, dict(data=1, fsdp=1, model=1), batches,
                                    devices=jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [
    dict(data=8, fsdp=1, model=1),
    dict(data=4, fsdp=1, model=2),
    dict(data=2, fsdp=4, model=1),
])
def test_sharded_steps_match_single_device(single_device_run, mesh_shape):
  """All six objectives, 3 SGD steps: losses, gradient norms and parameters agree to round-off."""
  config, batches, (ref_history, ref_params) = single_device_run
  history, params = run_steps(config, mesh_shape, batches)
  for ref, got in zip(ref_history, history):
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=1e-5, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, ref_params)
  assert set(ref_history[0]) >= {'loss/classification', 'loss/contrastive', 'loss/matching',
                                 'loss/masked_video', 'loss/masked_audio',
                                 'loss/masked_audio_segment', 'grad_norm', 'learning_rate'}


def test_gradient_accumulation_matches_plain_step():
  weights = {k: 0.0 for k in tiny_config().loss.weights}
  weights['classification'] = 1.0
  plain = tiny_config(**{'loss.weights': weights})
  accumulated = tiny_config(**{'loss.weights': weights, 'optim.accumulation_steps': 2})
  batches = make_batches(plain, 2)
  devices = jax.devices()[:1]
  one = dict(data=1, fsdp=1, model=1)
  h1, p1 = run_steps(plain, one, batches, devices)
  h2, p2 = run_steps(accumulated, one, batches, devices)
  np.testing.assert_allclose([h['loss'] for h in h2], [h['loss'] for h in h1], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p2, p1)


def test_non_finite_loss_skips_update_and_names_objective():
  config = tiny_config()
  batches = make_batches(config, 1)
  batches[0]['audio'][0, 0, 0] = np.nan
  devices = jax.devices()[:1]
  history, params, initial = run_steps(config, dict(data=1, fsdp=1, model=1), batches, devices,
                                       with_initial=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, initial)
  with pytest.raises(train_step.NonFiniteLossError, match=r"step 7"):
    train_step.check_finite(7, history[0])
  assert not history[0]['finite']


def test_weight_decay_only_on_kernels():
  optim = tiny_config().optim
  optim.learning_rate, optim.warmup_steps, optim.weight_decay, optim.grad_clip_norm = 1.0, 0, 0.5, 0.0
  tx, _ = train_step.make_optimizer(optim, total_steps=10)
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))},
            'posembed_video': {'posembed_input': jnp.ones((1, 2, 2))}, 'bottleneck': jnp.ones((1, 2))}
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates['dense']['kernel']).max()) > 0
  for leaf in (updates['dense']['bias'], updates['posembed_video']['posembed_input'],
               updates['bottleneck']):
    assert float(jnp.abs(leaf).max()) == 0.0


def test_schedule_warms_up_then_decays():
  optim = tiny_config().optim
  optim.learning_rate, optim.warmup_steps = 1.0, 4
  _, schedule = train_step.make_optimizer(optim, total_steps=20)
  lrs = np.array([schedule(i) for i in range(21)])
  np.testing.assert_allclose(lrs[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
  assert np.all(np.diff(lrs[4:]) <= 1e-7) and lrs[-1] < 1e-6


def test_unknown_optimizer_is_rejected():
  optim = tiny_config().optim
  optim.name = 'lamb'
  with pytest.raises(ValueError, match='config.optim.name'):
    train_step.make_optimizer(optim, 10)


def test_train_step_imports_without_tensorflow():
  """Accelerator images without tf.data can run the step (and the benchmark built on it)."""
  code = ('import sys; import avt_jax.train_step, avt_jax.benchmark.cli; '
          "print(sorted(m for m in ('tensorflow', 'clu') if m in sys.modules))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


FROZEN = 'encoder/encoderblock_0_.*'  # the first block of each modality


def test_frozen_parameters_keep_their_values_and_the_rest_train_as_without_freezing():
  """One SGD step without clipping: the frozen block is exactly its initial value, every other
  parameter equals the unfrozen run's (its gradient does not depend on what is frozen)."""
  def config(frozen):
    return tiny_config(**{'optim.name': 'sgd', 'optim.learning_rate': 0.1,
                          'optim.warmup_steps': 0, 'optim.grad_clip_norm': 0.0,
                          'optim.frozen': frozen})
  batches = make_batches(config(''), 1)
  one, devices = dict(data=1, fsdp=1, model=1), jax.devices()[:1]
  (plain,), plain_params, initial = run_steps(config(''), one, batches, devices, with_initial=True)
  (frozen,), frozen_params, frozen_initial = run_steps(config(FROZEN), one, batches, devices,
                                                       with_initial=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_initial, initial)  # same start
  mask = train_step.frozen_mask(FROZEN, initial)
  assert 0 < sum(jax.tree_util.tree_leaves(mask)) < len(jax.tree_util.tree_leaves(mask))

  def check(is_frozen, got, unfrozen, init):
    if is_frozen:
      np.testing.assert_array_equal(got, init)
      assert np.abs(unfrozen - init).max() > 0  # it would have trained
    else:
      np.testing.assert_allclose(got, unfrozen, rtol=1e-5, atol=1e-7)
  jax.tree_util.tree_map(check, mask, frozen_params, plain_params, initial)
  np.testing.assert_allclose(frozen['loss'], plain['loss'], rtol=1e-6)
  assert frozen['grad_norm'] < plain['grad_norm']  # the frozen block's gradients are left out


def test_frozen_parameters_get_no_optimizer_state():
  params = {'encoder': {'encoderblock_0_video': {'kernel': jnp.ones((3, 3))},
                        'encoderblock_1_video': {'kernel': jnp.ones((2, 2))}}}

  def state_size(frozen):
    optim = tiny_config().optim
    optim.frozen = frozen
    tx, _ = train_step.make_optimizer(optim, 10)
    return sum(x.size for x in jax.tree_util.tree_leaves(tx.init(params)))
  assert state_size('') - state_size(FROZEN) == 2 * 9  # AdamW's two moments of the 3x3 kernel


@pytest.mark.parametrize('pattern, message', [
    ('encoder/(', 'not a regular expression'),
    ('decoder/.*', 'matches 0 of the 2 parameters'),
    ('.*', 'matches 2 of the 2 parameters'),
])
def test_bad_frozen_pattern_names_the_field(pattern, message):
  optim = tiny_config().optim
  optim.frozen = pattern
  tx, _ = train_step.make_optimizer(optim, 10)
  params = {'encoder': {'encoderblock_0_video': {'kernel': jnp.ones((3, 3))},
                        'encoderblock_1_video': {'kernel': jnp.ones((2, 2))}}}
  with pytest.raises(ValueError, match=rf'config\.optim\.frozen: .*{message}'):
    tx.init(params)
