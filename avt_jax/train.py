"""The training loop: resume, train with progress logging and checkpoints, then evaluate."""

import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from avt_jax import checkpointing, evaluate, input as input_lib, sharding
from avt_jax.train_step import check_finite, make_train_step, setup


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


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Parameters of a workdir's latest (or given) checkpoint, e.g. for analysis or export (adapted
  to `config` where it differs from the checkpoint's, see `checkpointing.restore_adapted`)."""
  *_, init = setup(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  state, _, _ = checkpointing.restore_adapted(ckpt, abstract, init=lambda: jax.jit(init)(rng),
                                              config=config, step=step, fresh_ok=('opt_state',))
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
    meta = {}
    if ckpt.latest_step() is None:
      state = jax.jit(init, out_shardings=state_shardings)(rng)
      print(f'Initialised {model.__class__.__name__}: '
            f'{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,} parameters.', flush=True)
    else:
      target = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
      # A config that differs from the checkpoint's is adapted to, or refused naming the field.
      state, meta, notes = checkpointing.restore_adapted(
          ckpt, target, init=lambda: jax.jit(init, out_shardings=state_shardings)(rng), config=config,
          fresh_ok=('opt_state',) if config.train.eval_only else ())
      position = {k: v for k, v in meta.items() if k in ('step', 'examples_seen')}
      print(f'Resumed from {workdir} at step {int(state.step)} ({position}).', flush=True)
      for note in notes:
        print(f'  restore: {note}', flush=True)

    start = int(state.step)
    summary = {'train': {}, 'steps': start, 'train_seconds': 0.0}
    if not config.train.eval_only and start < total_steps:
      summary['train'] = _train_loop(config, model, tx, schedule, mesh, state_shardings, state,
                                     ckpt, data_dir, workdir, start, meta)
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
                start: int, resumed_meta: dict) -> dict[str, Any]:
  total_steps = int(config.train.steps)
  batch_size = int(config.input.batch_size)
  step_fn = jax.jit(make_train_step(config, model, tx, schedule),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  # The input resumes after the examples consumed (also when the batch size changed); a change that
  # reorders the examples is refused.
  stream = input_lib.stream_identity(config, data_dir, seed=config.seed)
  try:
    input_lib.check_same_stream(resumed_meta.get('input_stream'), stream)
  except ValueError as e:
    raise checkpointing.IncompatibleCheckpointError(f'{workdir}: {e}') from None
  examples_seen = int(resumed_meta.get('examples_seen', start * batch_size))
  batches: Iterator[dict] = input_lib.make_train_iterator(config, data_dir, seed=config.seed,
                                                          start_example=examples_seen)
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
      ckpt.save(step, state, {'step': step,
                              'examples_seen': examples_seen + (step - start) * batch_size,
                              'input_stream': stream,
                              'config': checkpointing.config_snapshot(config)}, force=True)
    if preempted:
      ckpt.wait()
      print(f'Preemption requested: saved step {step}, exiting.', flush=True)
      raise SystemExit(0)
  writer.flush()
  return {**means, 'state': state, 'seconds': time.time() - t0}
