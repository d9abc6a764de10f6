"""The train state, optimizer and the multi-objective train step (forward, backward, update).

Importable without TensorFlow: the training loop (`avt_jax.train`) adds the input pipeline,
checkpoints and logging around it.
"""

import functools
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avt_jax import losses, sharding
from avt_jax.models import build_model
from avt_jax.models.build import example_inputs, objectives as config_objectives


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the input position (`examples_seen` in the checkpoint's
  meta, see `avt_jax.train`)."""
  step: jax.Array  # [] int32, optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 base key; step keys are fold_in(rng, step)


def frozen_mask(pattern: str, params: Any) -> Any:
  """Tree of bools like `params`: True where the parameter's '/'-joined path (e.g.
  'encoder/encoderblock_3_video/MlpBlock_3/Dense_0/kernel') fully matches `pattern`
  (`config.optim.frozen`; '' freezes nothing). Our design; big_vision freezes by path pattern too.

  Raises:
    ValueError: `pattern` is not a regular expression, or it matches no parameter or all of them.
  """
  if not pattern:
    return jax.tree_util.tree_map(lambda _: False, params)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.optim.frozen: {pattern!r} is not a regular expression ({e}).') from e
  path = lambda p: jax.tree_util.keystr(p, simple=True, separator='/')
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.fullmatch(path(p))), params)
  flags = jax.tree_util.tree_leaves(mask)
  if not any(flags) or all(flags):
    first = jax.tree_util.tree_flatten_with_path(params)[0][0][0]
    raise ValueError(
        f'config.optim.frozen: {pattern!r} matches {sum(flags)} of the {len(flags)} parameters; '
        f"expected some but not all (paths look like '{path(first)}').")
  return mask


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW or SGD+momentum with linear warm-up, cosine decay and global-norm clipping.

  Weight decay applies to kernels only (not to norms, biases, position embeddings, CLS, bottleneck
  or mask tokens). Parameters matching `optim.frozen` (`frozen_mask`) are left unchanged and get no
  optimizer state.
  """
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1))
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)
  if optim.name == 'adamw':
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                     mask=decay_mask)
  elif optim.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=optim.momentum))
  else:
    raise ValueError(f"config.optim.name: expected 'adamw' or 'sgd', got {optim.name!r}.")
  if optim.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  if optim.get('frozen', ''):
    labels = lambda params: jax.tree_util.tree_map(
        lambda f: 'frozen' if f else 'trained', frozen_mask(optim.frozen, params))
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def _boxed_params(config: ml_collections.ConfigDict, model, params_rng: jax.Array,
                  masking_rng: jax.Array) -> Any:
  """`model.init`'s parameters (all branches of the configured objectives), the annotated ones
  still boxed with their logical axis names (`nn.LogicallyPartitioned`)."""
  inputs = example_inputs(config, batch=2)
  return model.init({'params': params_rng, 'masking': masking_rng}, inputs, train=False,
                    objectives=config_objectives(config) or ('classification',))['params']


def init_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Initialises parameters (plain arrays: unboxed here, once) and optimizer state."""
  params_rng, masking_rng, state_rng = jax.random.split(rng, 3)
  params = nn.meta.unbox(_boxed_params(config, model, params_rng, masking_rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def param_axes(config: ml_collections.ConfigDict, model) -> sharding.Axes:
  """Logical axis names of the model's parameters, for `sharding.tree_shardings` (traced
  abstractly, nothing computed)."""
  key = jax.random.key(0)
  return sharding.logical_axes(jax.eval_shape(lambda: _boxed_params(config, model, key, key)))


def make_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics), to be jitted with shardings.

  Objectives with weight 0 are not traced at all. With `optim.accumulation_steps = k`, the batch is
  split into k interleaved micro-batches whose gradients are averaged (contrastive negatives then
  come from each micro-batch). A step whose loss or gradients are not finite leaves parameters and
  optimizer state unchanged; `metrics['finite']` reports it so the loop can stop. Gradients of
  parameters frozen by `optim.frozen` are zero (so XLA never computes them) and left out of
  `grad_norm` and clipping.
  """
  objs = config_objectives(config)
  weights = {o: float(config.loss.weights[o]) for o in objs}
  modalities = tuple(config.model.modalities)
  accumulation = int(config.optim.accumulation_steps)

  def loss_fn(params, batch, rng):
    dropout_rng, masking_rng = jax.random.split(rng)
    inputs = {k: batch[k] for k in (*modalities, 'mask')}
    outputs = model.apply({'params': params}, inputs, train=True, objectives=objs,
                          rngs={'dropout': dropout_rng, 'masking': masking_rng})
    total, terms = losses.total_loss(
        outputs, batch, weights, multi_label=config.data.multi_label,
        label_smoothing=config.loss.label_smoothing, normalize_target=config.loss.normalize_target,
        modality_weight=config.loss.modality_weight)
    return total, terms

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(params, batch, rng):
    value, grads = value_and_grad(params, batch, rng)
    frozen = frozen_mask(config.optim.get('frozen', ''), grads)
    return value, jax.tree_util.tree_map(lambda f, g: jnp.zeros_like(g) if f else g, frozen, grads)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if accumulation == 1:
      (total, terms), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]),
                                 0, 1), batch)  # [k, B/k, ...], micro-batch j = examples j::k

      def accumulate(carry, inputs):
        i, micro_batch = inputs
        (t, tm), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (t, tm, g)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (total, terms, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accumulation), micro))
      total, terms, grads = jax.tree_util.tree_map(lambda x: x / accumulation, (total, terms, grads))
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    def apply(operands):
      params, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply, lambda operands: operands,
                                     (state.params, state.opt_state))
    metrics = {'loss': total, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
               'finite': finite, **{f'loss/{k}': v for k, v in terms.items()}}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or Inf; the message names the objective and the step."""


def check_finite(step: int, metrics: dict[str, np.ndarray]) -> None:
  """Raises NonFiniteLossError naming the first non-finite objective of `step`."""
  if bool(metrics['finite']):
    return
  bad = [k for k, v in metrics.items() if k.startswith('loss') and not np.isfinite(v)]
  name = bad[-1].removeprefix('loss/') if bad else 'gradients'
  raise NonFiniteLossError(
      f'Objective {name!r} became non-finite at step {step} ({ {k: float(metrics[k]) for k in bad} }); '
      'training stopped without applying that update; the last checkpoint is the last good state.')


def setup(config: ml_collections.ConfigDict):
  """Returns (model, optimizer, schedule, init) where init(rng) -> TrainState."""
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, int(config.train.steps))
  return model, tx, schedule, functools.partial(init_state, config, model, tx)
