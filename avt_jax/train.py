"""Train state, optimizer, the sharded multi-objective train step, and the training loop."""

import functools
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers

from avt_jax import checkpointing, evaluate, input as input_lib, losses, sharding
from avt_jax.models import build_model
from avt_jax.models.build import example_inputs, objectives as config_objectives


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the input position (which is `step` batches)."""
  step: jax.Array  # [] int32, optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 base key; step keys are fold_in(rng, step)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW or SGD+momentum with linear warm-up, cosine decay and global-norm clipping.

  Weight decay applies to kernels only (not to norms, biases, position embeddings, CLS, bottleneck
  or mask tokens).
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
  return tx, schedule


def init_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Initialises parameters (all branches of the configured objectives) and optimizer state."""
  params_rng, masking_rng, state_rng = jax.random.split(rng, 3)
  inputs = example_inputs(config, batch=2)
  params = model.init({'params': params_rng, 'masking': masking_rng}, inputs, train=False,
                      objectives=config_objectives(config) or ('classification',))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def make_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics), to be jitted with shardings.

  Objectives with weight 0 are not traced at all. With `optim.accumulation_steps = k`, the batch is
  split into k interleaved micro-batches whose gradients are averaged (contrastive negatives then
  come from each micro-batch). A step whose loss or gradients are not finite leaves parameters and
  optimizer state unchanged; `metrics['finite']` reports it so the loop can stop.
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
        label_smoothing=config.loss.label_smoothing, normalize_target=config.loss.normalize_target)
    return total, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


class ProgressLog:
  """Console summary and TensorBoard scalars of the steps since the last report."""

  def __init__(self, writer: metric_writers.MetricWriter, total_steps: int, start_step: int):
    self.writer = writer
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.time()

  def report(self, step: int, history: list[dict[str, np.ndarray]]) -> dict[str, float]:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    means = {k: float(np.mean([h[k] for h in history])) for k in history[-1] if k != 'finite'}
    eta = (self.total - step) / max(rate, 1e-9)
    self.writer.write_scalars(step, {**means, 'steps_per_sec': rate, 'eta_seconds': eta})
    terms = ' '.join(f'{k.removeprefix("loss/")}={v:.3f}' for k, v in means.items()
                     if k.startswith('loss/'))
    print(f'step {step}/{self.total} | loss {means["loss"]:.4f} ({terms}) | '
          f'lr {means["learning_rate"]:.2e} | grad_norm {means["grad_norm"]:.2f} | '
          f'{rate:.2f} steps/s | ETA {_format_seconds(eta)}', flush=True)
    return means


def setup(config: ml_collections.ConfigDict):
  """Returns (model, optimizer, schedule, init) where init(rng) -> TrainState."""
  model = build_model(config)
  tx, schedule = make_optimizer(config.optim, int(config.train.steps))
  return model, tx, schedule, functools.partial(init_state, config, model, tx)


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Parameters of a workdir's latest (or given) checkpoint, e.g. for analysis or export."""
  *_, init = setup(config)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  state, _ = ckpt.restore(abstract, step)
  ckpt.close()
  return state.params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str
                       ) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

  Returns:
    {'train': last logged means, 'eval': evaluation metrics, 'steps': final step,
     'train_seconds': wall time of this run's training}.
  """
  model, tx, schedule, init = setup(config)
  mesh = sharding.make_mesh(config.mesh)
  total_steps = int(config.train.steps)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  state_shardings = sharding.tree_shardings(abstract, mesh)
  # Leaving the `with` (also through an error) waits for checkpoint writes in flight.
  with checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                  save_every=config.train.checkpoint_every) as ckpt, \
       jax.set_mesh(mesh):
    if ckpt.latest_step() is None:
      state = jax.jit(init, out_shardings=state_shardings)(rng)
      print(f'Initialised {model.__class__.__name__}: '
            f'{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,} parameters.', flush=True)
    else:
      target = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
      state, meta = ckpt.restore(target)
      print(f'Resumed from {workdir} at step {int(state.step)} ({meta}).', flush=True)

    start = int(state.step)
    summary = {'train': {}, 'steps': start, 'train_seconds': 0.0}
    if not config.train.eval_only and start < total_steps:
      summary['train'] = _train_loop(config, model, tx, schedule, mesh, state_shardings, state,
                                     ckpt, data_dir, workdir, start)
      state = summary['train'].pop('state')
      summary['train_seconds'] = summary['train'].pop('seconds')
      summary['steps'] = int(state.step)
    summary['eval'] = evaluate.evaluate(config, model, state.params, mesh, data_dir,
                                        config.data.eval_split)
  if jax.process_index() == 0:
    writer = metric_writers.SummaryWriter(workdir)
    writer.write_scalars(summary['steps'], {f'eval/{k}': v for k, v in summary['eval'].items()})
    writer.close()
  return summary


def _train_loop(config, model, tx, schedule, mesh, state_shardings, state, ckpt, data_dir, workdir,
                start: int) -> dict[str, Any]:
  total_steps = int(config.train.steps)
  step_fn = jax.jit(make_train_step(config, model, tx, schedule),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  batches: Iterator[dict] = input_lib.make_train_iterator(config, data_dir, seed=config.seed,
                                                          start_step=start)
  writer = metric_writers.SummaryWriter(workdir) if jax.process_index() == 0 else \
      metric_writers.MultiWriter([])
  progress = ProgressLog(writer, total_steps, start)
  checkpointing.install_preemption_handler()
  pending: list[tuple[int, dict]] = []
  means: dict[str, float] = {}
  t0 = time.time()
  for step in range(start + 1, total_steps + 1):
    state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
    pending.append((step, metrics))
    preempted = checkpointing.preemption_requested(step)
    save_due = step % config.train.checkpoint_every == 0 or step == total_steps or preempted
    if save_due or step % config.train.log_every == 0:
      history = []
      for s, m in pending:  # Check every step since the last report before anything is saved.
        m = jax.device_get(m)
        check_finite(s, m)
        history.append(m)
      pending = []
      means = progress.report(step, history)
    if save_due:
      ckpt.save(step, state, {'step': step, 'examples_seen': step * config.input.batch_size},
                force=True)
    if preempted:
      ckpt.wait()
      print(f'Preemption requested: saved step {step}, exiting.', flush=True)
      raise SystemExit(0)
  writer.flush()
  return {**means, 'state': state, 'seconds': time.time() - t0}
