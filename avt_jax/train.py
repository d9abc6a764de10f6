"""The training loop: resume, train with progress logging and checkpoints, then evaluate."""

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath

from avt_jax import (calibration, checkpoint_adaptation, checkpointing, dataset_stats, diagnosis,
                     evaluate, input as input_lib, pictures, pretrained, sharding,
                     workdir as workdir_lib)
from avt_jax.models.build import objectives as config_objectives
from avt_jax.train_step import check_finite, make_train_step, param_axes, setup


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

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the steps/s and ETA of the next report."""
    self.last_time += seconds


def _open_best(config: ml_collections.ConfigDict, workdir: str, metric: str, mode: str):
  """The run's BestCheckpointer when it evaluates during training or evaluates the best; else a
  context that yields None (eval_every = 0 keeps no best checkpoint)."""
  t = config.train
  if t.eval_only and t.eval_checkpoint == 'best':
    return checkpointing.BestCheckpointer(workdir, metric, mode, read_only=True)
  if t.eval_every > 0 and not t.eval_only:
    return checkpointing.BestCheckpointer(workdir, metric, mode)
  return contextlib.nullcontext()


def _with_best_params(state, best: checkpointing.BestCheckpointer, abstract, state_shardings):
  """`state` with the best checkpoint's parameters; and the step they are from."""
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract.params, state_shardings.params)
  params, meta = best.restore(target)
  print(f'Evaluating the best checkpoint: step {meta["step"]} ({meta["metric"]} '
        f'{meta["value"]:.4f} when it was saved).', flush=True)
  return state.replace(params=params), meta['step']


class Evaluation(NamedTuple):
  """One evaluation of the parameters (keys: `avt_jax.evaluate`'s module docstring).

  Attributes:
    metrics: on `data.eval_split`.
    train_metrics: on the first `eval.train_subset_size` training clips, with eval-mode views
      ({} when the size is 0).
    images: TensorBoard pictures (`avt_jax.pictures`; none with `train.eval_pictures` off).
  """
  metrics: dict[str, float]
  train_metrics: dict[str, float]
  images: dict[str, np.ndarray]


Evaluator = Callable[[Any], Evaluation]


def make_evaluator(config: ml_collections.ConfigDict, model, mesh, data_dir: str) -> Evaluator:
  """Returns evaluator(params) -> `Evaluation`, compiling the eval step once for both splits.

  Without records of `data.train_split` the training subset is not evaluated (a note says so). The
  pictures are drawn by process 0 only.
  """
  score = evaluate.make_scorer(config, model, mesh, data_dir)
  subset = int(config.eval.train_subset_size)
  if subset > 0:
    try:
      input_lib.pipeline.list_split_files(data_dir, config.data.train_split)
    except FileNotFoundError as e:  # e.g. eval_only on a folder holding the eval split only
      print(f'{e} The training-subset evaluation (config.eval.train_subset_size) is off.',
            flush=True)
      subset = 0
  draw = None
  if config.train.eval_pictures and jax.process_index() == 0 and evaluate.has_classifier(config):
    draw = pictures.make_eval_pictures(
        config, model, data_dir, config.data.eval_split,
        dataset_stats.class_names(config, input_lib.load_stats(data_dir)))

  def run(params):
    scored = score(params, config.data.eval_split)
    train_metrics = score(params, config.data.train_split, subset).metrics if subset > 0 else {}
    return Evaluation(scored.metrics, train_metrics, draw(params, scored.videos) if draw else {})

  return run


def _write_evaluation(writer: metric_writers.MetricWriter, step: int, evaluation: Evaluation
                      ) -> None:
  """TensorBoard: `eval/<key>`, `train_eval/<key>` and the pictures."""
  scalars = {f'eval/{k}': v for k, v in evaluation.metrics.items()}
  scalars.update({f'train_eval/{k}': v for k, v in evaluation.train_metrics.items()})
  writer.write_scalars(step, scalars)
  writer.write_images(step, evaluation.images)


def _format_scores(results: dict[str, float]) -> str:
  """'top1 0.5000 ... (N videos)' for the progress line."""
  scores = ' '.join(f'{k} {v:.4f}' for k, v in results.items() if k != 'num_videos')
  return f'{scores} ({results["num_videos"]} videos)'


def _evaluate_during_training(step: int, params, evaluator: Evaluator,
                              best: checkpointing.BestCheckpointer,
                              writer: metric_writers.MetricWriter, progress: ProgressLog
                              ) -> tuple[Evaluation, float]:
  """Evaluates `params`, logs `eval/<metric>` and `train_eval/<metric>` at `step`, keeps them if
  best; returns the evaluation (without pictures) and the seconds it took (left out of the
  progress log's steps/s)."""
  t0 = time.time()
  evaluation = evaluator(params)
  _write_evaluation(writer, step, evaluation)
  new = best.update(step, params, evaluation.metrics)
  seconds = time.time() - t0
  progress.exclude(seconds)
  train_part = (f' | train subset {_format_scores(evaluation.train_metrics)}'
                if evaluation.train_metrics else '')
  print(f'eval step {step}/{progress.total} | {_format_scores(evaluation.metrics)}{train_part} | '
        f'best {best.metric} {best.value:.4f} at step {best.step}{" (new)" if new else ""} | '
        f'{seconds:.1f} s', flush=True)
  return evaluation._replace(images={}), seconds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str, *,
                       prepared_init: pretrained.Prepared | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

  With `train.eval_only` it only reads the workdir's checkpoints (read-only, so it may run next to
  the run training there). `prepared_init`: `config.init`'s checkpoints already read by
  `preflight.check_run` (else read here).

  With `train.eval_every` > 0 it also evaluates every that many steps and at the last step, and
  keeps the best checkpoint by `train.best_metric` in `<workdir>/best` (see `_train_loop`).

  Returns:
    {'train': last logged means, 'eval': evaluation metrics, 'train_eval': the same on the
     training subset (`config.eval.train_subset_size`), 'diagnosis': sentences on fit and on each
     modality (`avt_jax.diagnosis`), 'steps': final (or evaluated best) step, 'train_seconds':
     wall time of this run's training without evaluations, 'eval_seconds': of the evaluations
     during training, and with a best checkpoint 'best': {'metric', 'mode', 'step', 'value'}}.
  """
  model, tx, schedule, init = setup(config)
  best_metric, best_mode = workdir_lib.check_eval_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  total_steps = int(config.train.steps)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  state_shardings = sharding.tree_shardings(abstract, mesh, param_axes(config, model))
  eval_only = bool(config.train.eval_only)
  # Leaving the `with` (also through an error) waits for checkpoint writes in flight.
  with checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                  save_every=config.train.checkpoint_every,
                                  read_only=eval_only) as ckpt, \
       _open_best(config, workdir, best_metric, best_mode) as best, \
       jax.set_mesh(mesh):
    state, meta = _initial_state(config, model, init, rng, abstract, state_shardings, tx, ckpt,
                                 workdir, prepared_init)
    # After the start succeeded (a refused restore leaves the workdir's config as it was); an
    # evaluation keeps the training run's.
    saved = (epath.Path(workdir) / workdir_lib.CONFIG_FILE).exists()
    if jax.process_index() == 0 and not (eval_only and saved):
      workdir_lib.save_run(config, workdir, data_dir)
    start = int(state.step)
    summary = {'train': {}, 'steps': start, 'train_seconds': 0.0, 'eval_seconds': 0.0,
               **pretrained.saved_report(workdir)}
    evaluator = make_evaluator(config, model, mesh, data_dir)
    if config.train.eval_only and config.train.eval_checkpoint == 'best':
      state, summary['steps'] = _with_best_params(state, best, abstract, state_shardings)
    last_eval = None
    if not config.train.eval_only and start < total_steps:
      run = LoopSetup(config, model, tx, schedule, mesh, state_shardings, ckpt, data_dir, workdir,
                      evaluator, best)
      result = _train_loop(run, state, meta)
      state, last_eval = result.state, result.last_eval
      summary.update(train=result.means, train_seconds=result.train_seconds,
                     eval_seconds=result.eval_seconds, steps=int(state.step))
    try:
      with checkpointing.stop_on_preemption() if not eval_only else contextlib.nullcontext():
        state, calibrated = _calibrated(config, model, mesh, data_dir, workdir, state, summary)
        if calibrated:
          last_eval = None  # the fused logits changed: evaluate again
        evaluation, reused = _final_evaluation(config, evaluator, state, best, summary, last_eval)
    except checkpointing.Preempted:  # the last step is saved: a resumed run only evaluates
      ckpt.wait()
      print(f'Preemption requested during the final evaluation: step {summary["steps"]} is saved, '
            'exiting.', flush=True)
      raise SystemExit(0) from None
    if best is not None and best.summary() is not None:
      summary['best'] = best.summary()
  if jax.process_index() == 0 and not reused:
    writer = metric_writers.SummaryWriter(workdir)
    _write_evaluation(writer, summary['steps'], evaluation)
    writer.close()
  summary['diagnosis'] = diagnosis.diagnose(config, summary['eval'], summary['train_eval'],
                                            summary['steps'])
  return summary


def _initial_state(config, model, init, rng, abstract, state_shardings, tx, ckpt, workdir: str,
                   prepared_init: pretrained.Prepared | None = None):
  """The run's starting TrainState: a fresh init (plus `config.init`'s pretrained values) when the
  workdir holds no checkpoint, else the latest checkpoint adapted to `config`.

  Returns:
    (state, meta): `meta` is the checkpoint's metadata (empty for a fresh run).
  """
  if ckpt.latest_step() is None:
    init_from = prepared_init or pretrained.prepare(config, abstract.params)  # read, map; no compile
    state = jax.jit(init, out_shardings=state_shardings)(rng)
    state = _start_from_pretrained(init_from, state, state_shardings, tx, workdir)
    print(f'Initialised {model.__class__.__name__}: '
          f'{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,} parameters.', flush=True)
    return state, {}
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  # A config that differs from the checkpoint's is adapted to, or refused naming the field.
  state, meta, notes = checkpoint_adaptation.restore_adapted(
      ckpt, target, init=lambda: jax.jit(init, out_shardings=state_shardings)(rng), config=config,
      fresh_ok=('opt_state',) if config.train.eval_only else ())
  position = {k: v for k, v in meta.items() if k in ('step', 'examples_seen')}
  print(f'Resumed from {workdir} at step {int(state.step)} ({position}).', flush=True)
  for note in notes:
    print(f'  restore: {note}', flush=True)
  return state, meta


def calibration_problem(config: ml_collections.ConfigDict, data_dir: str) -> str | None:
  """Why the run's fusion is not calibrated (`avt_jax.calibration`), or None when it is."""
  split = config.data.get('calibration_split', '')
  if len(config.model.modalities) < 2 or 'classification' not in config_objectives(config):
    return 'not an audio-video classifier'
  if not split:
    return 'config.data.calibration_split is empty'
  if split in (config.data.eval_split, config.data.train_split):
    return f'config.data.calibration_split {split!r} is also the eval or train split'
  if not input_lib.load_stats(data_dir)['num_clips'].get(split):
    return (f'the data has no {split!r} split (prepare holds one out with --val_fraction; '
            'the fused logits stay the mean of the modalities\')')
  return None


def _calibrated(config, model, mesh, data_dir: str, workdir: str, state, summary: dict):
  """Fits the fusion weights on the held-out split, or loads those of an earlier run of this
  workdir; puts the report in `summary['calibration']`. Returns (state, whether params changed)."""
  problem = calibration_problem(config, data_dir)
  if problem:
    summary['calibration'] = {'skipped': problem}
    return state, False
  if config.train.eval_only:
    params, report = calibration.load_into(state.params, workdir)
  else:
    scorer = calibration.modality_scorer(config, model, mesh, data_dir, config.data.calibration_split)
    params, report = calibration.calibrate(config, state.params, scorer)
    if jax.process_index() == 0:
      calibration.save(report, workdir)
  if report is None:
    return state, False
  print(calibration.format_report(report), flush=True)
  summary['calibration'] = report
  return state.replace(params=params), True


def _final_evaluation(config, evaluator, state, best, summary: dict, last_eval
                      ) -> tuple[Evaluation | None, bool]:
  """Puts the evaluation of the final (or chosen best) state into `summary['eval']` and
  `summary['train_eval']`.

  Reuses the training loop's evaluation of the same step when there is one; a run without a
  classification, contrastive or masked objective has nothing to evaluate.

  Returns:
    (the evaluation to log, reused): `reused` is True when nothing new was evaluated (nothing to
    log).
  """
  if last_eval is not None and last_eval[0] == summary['steps']:  # evaluated (and logged) already
    summary['eval'], summary['train_eval'] = last_eval[1].metrics, last_eval[1].train_metrics
    return None, True
  if not evaluate.score_names(config):  # e.g. matching alone: nothing to score
    print('No classification, contrastive or masked objective (config.loss.weights): the run has '
          'nothing to evaluate; fine-tune from this workdir with config.init.', flush=True)
    summary['eval'], summary['train_eval'] = {}, {}
    return None, True
  evaluation = evaluator(state.params)
  summary['eval'], summary['train_eval'] = evaluation.metrics, evaluation.train_metrics
  if best is not None and not config.train.eval_only:
    best.update(summary['steps'], state.params, summary['eval'])
  return evaluation, False


def _start_from_pretrained(init_from, state, state_shardings, tx, workdir: str):
  """Puts `config.init`'s mapped checkpoint values into the fresh state; prints and saves the report
  (listed under 'init' in results.json, also for runs that later resume)."""
  if init_from is None:
    return state
  state = pretrained.apply(init_from, state, state_shardings, tx)
  if jax.process_index() == 0:
    print(pretrained.format_report(init_from.report), flush=True)
  pretrained.save_report(init_from.report, workdir)
  return state


@dataclasses.dataclass(frozen=True)
class LoopSetup:
  """What `_train_loop` trains with: the run's parts, built once by `train_and_evaluate`."""
  config: ml_collections.ConfigDict
  model: Any  # the AVT module
  tx: Any  # optax.GradientTransformation
  schedule: Callable[[int], float]  # step -> learning rate
  mesh: jax.sharding.Mesh
  state_shardings: Any  # TrainState of NamedShardings
  ckpt: checkpointing.Checkpointer
  data_dir: str
  workdir: str
  evaluator: Evaluator | None = None  # with train.eval_every > 0
  best: checkpointing.BestCheckpointer | None = None  # where improvements are saved


@dataclasses.dataclass(frozen=True)
class LoopResult:
  """What `_train_loop` hands back."""
  state: Any  # the TrainState after the last step
  means: dict[str, float]  # the last logged means ('loss', 'loss/<objective>', ...)
  train_seconds: float  # wall time of the training, without the evaluations
  eval_seconds: float  # wall time of the evaluations during training
  last_eval: tuple[int, Evaluation] | None  # (step, evaluation) of the last one, if any


def _train_loop(run: LoopSetup, state, resumed_meta: dict) -> LoopResult:
  """Trains from the step of `state` to `train.steps`; with `train.eval_every` > 0 evaluates every
  that many steps and at the last one (`run.evaluator`), and saves improvements to `run.best`.

  Evaluation reads only the parameters: the training batches, PRNG keys and updates are the same
  with or without it.

  Preemption (SIGTERM) saves and exits within about two step times plus the save: at most two steps
  are in flight on the devices (the loop waits for step s-1 before it goes on after dispatching
  step s), a step where preemption is requested is saved but not evaluated, and a signal during an
  evaluation abandons it at once (`checkpointing.stop_on_preemption`) and saves its step; the
  resumed run evaluates at its next evaluation step. A checkpoint write that fails in the
  background stops the loop at the next step (`checkpointing.CheckpointWriteError`).
  """
  config, ckpt, best, data_dir, workdir = run.config, run.ckpt, run.best, run.data_dir, run.workdir
  mesh, state_shardings, start = run.mesh, run.state_shardings, int(state.step)
  total_steps = int(config.train.steps)
  batch_size = int(config.input.batch_size)
  eval_every = int(config.train.eval_every)
  last_eval, eval_seconds = None, 0.0
  step_fn = jax.jit(make_train_step(config, run.model, run.tx, run.schedule),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  # The input resumes after the examples consumed (also when the batch size changed); a change that
  # reorders the examples is refused.
  stream = input_lib.stream_identity(config, data_dir, seed=config.seed)
  try:
    input_lib.check_same_stream(resumed_meta.get('input_stream'), stream)
  except ValueError as e:
    raise checkpoint_adaptation.IncompatibleCheckpointError(f'{workdir}: {e}') from None
  examples_seen = int(resumed_meta.get('examples_seen', start * batch_size))
  batches: Iterator[dict] = input_lib.make_train_iterator(config, data_dir, seed=config.seed,
                                                          start_example=examples_seen)
  writer = metric_writers.SummaryWriter(workdir) if jax.process_index() == 0 else \
      metric_writers.MultiWriter([])
  progress = ProgressLog(writer, total_steps, start)
  checkpointing.install_preemption_handler()

  def interruptible(params):  # an evaluation stops at once on preemption (raises Preempted)
    with checkpointing.stop_on_preemption():
      return run.evaluator(params)

  pending: list[tuple[int, dict]] = []
  means: dict[str, float] = {}
  saved_once, last_save = False, None

  def save(step: int) -> None:
    nonlocal saved_once, last_save
    last_save = step
    meta = {'step': step, 'examples_seen': examples_seen + (step - start) * batch_size,
            'input_stream': stream, 'config': checkpoint_adaptation.config_snapshot(config)}
    started = ckpt.save(step, state, meta, force=True)
    if started and not saved_once:  # an unwritable folder (permissions, quota, size limit) stops
      ckpt.wait()                   # the run here; later writes overlap training, checked each step
      saved_once = True

  t0 = time.time()
  for step in range(start + 1, total_steps + 1):
    state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
    pending.append((step, metrics))
    if len(pending) >= 2:  # at most two steps in flight: a preemption save waits for <= 2 steps
      jax.block_until_ready(pending[-2][1])
    if step - 1 == last_save:  # the write of the previous step overlapped this step only: a failed
      ckpt.wait()              # write stops training here, before this step is logged or saved
    else:
      ckpt.check_for_errors()
    if best is not None:
      best.check_for_errors()
    preempted = checkpointing.preemption_requested(step)
    save_due = step % config.train.checkpoint_every == 0 or step == total_steps or preempted
    eval_due = eval_every > 0 and (step % eval_every == 0 or step == total_steps) and not preempted
    if save_due or eval_due or step % config.train.log_every == 0:
      history = []
      for s, m in pending:  # Check every step since the last report before anything is saved.
        m = jax.device_get(m)
        check_finite(s, m)
        history.append(m)
      pending = []
      means = progress.report(step, history)
    if save_due:
      save(step)
    if eval_due:
      try:
        evaluation, seconds = _evaluate_during_training(step, state.params, interruptible, best,
                                                        writer, progress)
        last_eval, eval_seconds = (step, evaluation), eval_seconds + seconds
      except checkpointing.Preempted:
        print(f'Preemption requested during the evaluation of step {step}: evaluation abandoned.',
              flush=True)
        save(step)
        preempted = True
    if preempted:
      ckpt.wait()
      print(f'Preemption requested: saved step {step}, exiting.', flush=True)
      raise SystemExit(0)
  writer.flush()
  return LoopResult(state, means, time.time() - t0 - eval_seconds, eval_seconds, last_eval)
