"""Checkpoints of the train state with orbax, and preemption handling.

A checkpoint step holds two items under `<workdir>/checkpoints/<step>/`:

- `state`: the train state, any pytree of `jax.Array`s (params, optimiser state,
  step counter, PRNG keys), written with `ocp.args.StandardSave`;
- `meta`: a small JSON dict (input position, the config, ...), written with
  `ocp.args.JsonSave`.

`BestCheckpointer` keeps, apart from these, the parameters of the step with the
best evaluation metric under `<workdir>/best/<step>/` (same two items).

This module imports nothing from the project; restoring into a changed config
(which knows the model's parameter layout) is `avt_jax.checkpoint_adaptation`.

Facts checked against orbax-checkpoint 0.12.8 (the pinned version):

- Typed PRNG keys (`jax.random.key`, any impl) and raw `uint32` keys
  (`jax.random.PRNGKey`) both round-trip; a typed key comes back typed with its
  impl. The state may hold either.
- Writes are atomic: a step is written to a temporary directory and renamed
  only once complete (on GCS, where renames are not atomic, a
  `commit_success.txt` marker plays that role), so a crashed save never
  becomes the latest step. A `Checkpointer` deletes left-over temporary
  directories in the background after opening the directory (finished before
  its first save).
- Saving is asynchronous: `save` returns once the arrays are copied off the
  devices and the files are written in a background thread. Call `wait()` (or
  `close()`) before the process exits. A write that fails in the background
  (full disk, file-size limit, lost permission) is kept by orbax's
  `CheckpointManager` and raised by its `wait_until_finished`; the
  `check_for_errors()` here asks for it without blocking once the write has
  ended (`is_saving_in_progress()`), so the train loop stops one step after
  the failure with `CheckpointWriteError` (one line: the step's path and the
  OS error). The failed step is never renamed into place, and older steps
  are deleted only after a newer one is complete, so the previous checkpoint
  stays usable.
- `read_only=True` opens a directory another process may be writing (eval,
  predict, export next to a training run): it never deletes the temporary
  directories of writes in flight.
- Restoring takes an abstract template (`jax.ShapeDtypeStruct` leaves with
  `.sharding`), so each array is read directly into its target sharding, which
  may be a different mesh from the one that saved it.

Preemption: Cloud TPU VMs (and most schedulers) announce preemption with SIGTERM.
`install_preemption_handler()` turns SIGTERM into a flag; the train loop polls
`preemption_requested(step)` after every step, and when it is true saves with
`force=True`, calls `wait()` and exits with status 0. Work that does not poll
(an evaluation) runs inside `stop_on_preemption()`, where the signal raises
`Preempted` at once instead (single process). In a multi-process job
(after `jax.distributed.initialize()`) JAX's own preemption service already
catches SIGTERM and agrees on a step at which every process saves; there
`preemption_requested` asks that service instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
from typing import Any, Iterator

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any

_STATE = 'state'
_META = 'meta'

_preemption_flag = threading.Event()
_raise_on_signal = threading.Event()  # set inside `stop_on_preemption()`


class Preempted(Exception):
  """Raised inside `stop_on_preemption()` when a preemption signal arrives."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message is one line: the path and the cause."""


def _jax_preemption_service_active() -> bool:
  """JAX's preemption service runs (and owns SIGTERM) after distributed init."""
  return jax.distributed.is_initialized()


def install_preemption_handler(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM,),
) -> None:
  """Makes `signals` set the preemption flag instead of killing the process.

  Must be called from the main thread. After `jax.distributed.initialize()`
  (multi-process jobs) this does nothing: JAX's preemption service owns SIGTERM
  there (see `preemption_requested`).

  Args:
    signals: the signals that announce preemption.
  """
  if _jax_preemption_service_active():
    logging.info('jax.distributed is initialised: JAX\'s preemption service '
                 'detects preemption; no signal handler installed.')
    return

  def _on_signal(signum: int, frame: Any) -> None:
    del frame
    logging.warning('Received signal %d: will checkpoint and stop.', signum)
    _preemption_flag.set()
    if _raise_on_signal.is_set():
      _raise_on_signal.clear()
      raise Preempted(f'signal {signum}')

  for sig in signals:
    signal.signal(sig, _on_signal)


def preemption_requested(step: int | None = None) -> bool:
  """Returns whether the train loop should save a checkpoint and stop now.

  Single process: true once a signal registered by `install_preemption_handler`
  arrived. After `jax.distributed.initialize()`: true at the step on which all
  processes agreed to save after any of them was told of preemption (JAX's
  preemption service, which needs the default `jax_enable_preemption_service`);
  every process must then call this at every step, with the same `step`.

  Args:
    step: the train step just finished; required after distributed init.

  Raises:
    ValueError: `step` is None after distributed init.
  """
  if not _jax_preemption_service_active():
    return _preemption_flag.is_set()
  if step is None:
    raise ValueError('preemption_requested(step): `step` is required after '
                     'jax.distributed.initialize() (processes agree on a step '
                     'to save).')
  return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def stop_on_preemption() -> Iterator[None]:
  """Within this context a preemption signal raises `Preempted` in the main thread (our design).

  For work that cannot poll `preemption_requested` between steps (an evaluation of thousands of
  batches): it is abandoned at once, where it is, so the caller can save and exit within the grace
  period. Raises `Preempted` on entry when preemption was already requested. Single process only:
  after `jax.distributed.initialize()` JAX's preemption service owns the signal and processes must
  agree on a step, so there this context does nothing.
  """
  if _jax_preemption_service_active():
    yield
    return
  if _preemption_flag.is_set():
    raise Preempted('requested before')
  _raise_on_signal.set()
  try:
    yield
  finally:
    _raise_on_signal.clear()


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception of `error`'s cause/context chain, preferring an OSError."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  return next((e for e in chain if isinstance(e, OSError)), chain[-1])


def _write_error(directory: epath.Path, step: int | None, error: BaseException
                 ) -> CheckpointWriteError:
  cause = _root_cause(error)
  text = str(cause).splitlines()[0] if str(cause) else ''
  code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's errors carry the OS error
  if isinstance(cause, OSError) and cause.strerror:
    what = f'{cause.strerror}' + (f' (writing {cause.filename})' if cause.filename else '')
  elif code:
    file = re.search(r'Failed writing: "([^"]+)"', text)
    what = os.strerror(int(code.group(1))) + (f' (writing {file.group(1)})' if file else '')
  else:
    what = f'{type(cause).__name__}: {text}'
  where = directory / str(step) if step is not None else directory
  return CheckpointWriteError(
      f'Could not write the checkpoint {where}: {what}. Earlier complete steps in {directory} are '
      'intact; free space or fix the folder, then rerun to resume.')


def _check_json_meta(meta: dict[str, Any]) -> None:
  """Raises a TypeError naming the first field of `meta` that is not JSON."""
  if not isinstance(meta, dict):
    raise TypeError(f'checkpoint meta: expected a dict, got {type(meta)}.')
  for key, value in meta.items():
    try:
      json.dumps(value)
    except TypeError as e:
      raise TypeError(
          f'checkpoint meta field {key!r}: expected a JSON value (int, float, '
          f'str, bool, None, list, dict), got {type(value).__name__} '
          f'({e}). Convert arrays with .tolist() and numpy scalars with int() '
          'or float().') from e


@contextlib.contextmanager
def _quiet_orbax(quiet: bool) -> Iterator[None]:
  """Within: with `quiet`, orbax's warnings are not logged (errors are)."""
  if not quiet:
    yield
    return
  orbax_logger = logging.getLogger('absl')  # orbax logs through absl's logger
  level = orbax_logger.level
  orbax_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    orbax_logger.setLevel(level)


class _NoSaveWaitWarning(logging.Filter):
  """Drops orbax's `Waiting for previous save to complete took N seconds ...` warning: a save waits
  for the write before it by design (writes overlap training, one at a time), so the line only
  alarms users of a normal run; slow writes show in the steps/s of the progress log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Waiting for previous save to complete')


@contextlib.contextmanager
def _no_save_wait_warning() -> Iterator[None]:
  orbax_logger = logging.getLogger('absl')  # orbax logs through absl's logger
  quiet = _NoSaveWaitWarning()
  orbax_logger.addFilter(quiet)
  try:
    yield
  finally:
    orbax_logger.removeFilter(quiet)


class Checkpointer:
  """Periodic, keep-N, atomic, asynchronous checkpoints of a train state.

  Usage in a train loop:

      ckpt = Checkpointer(workdir, keep=3, save_every=1000)
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state)
      for step in ...:
        state = train_step(state, batch)
        stop = preemption_requested(step)
        ckpt.save(step, state, meta, force=stop or step == last_step)
        if stop:
          break
      ckpt.close()  # waits for the last write

  Every process of a multi-process job must make the same calls.
  """

  def __init__(
      self,
      workdir: epath.PathLike,
      *,
      keep: int = 3,
      save_every: int | None = None,
      subdir: str = 'checkpoints',
      read_only: bool = False,
  ):
    """Opens (and creates, unless `read_only`) `<workdir>/<subdir>`.

    Args:
      workdir: the run's directory; local path or `gs://...`.
      keep: how many of the most recent steps to keep; older ones are deleted
        after each save.
      save_every: `save` writes when `step % save_every == 0`; None writes only
        when forced (and when JAX's multi-process preemption service asks).
      subdir: the folder under `workdir` ('best' holds `BestCheckpointer`'s).
      read_only: only read (restore, list steps): leaves the temporary folders of another
        process's writes in flight alone and creates nothing; `save` is refused.

    Raises:
      ValueError: `keep` < 1 or `save_every` < 1.
    """
    if keep < 1:
      raise ValueError(f'Checkpointer keep: expected >= 1, got {keep}.')
    if save_every is not None and save_every < 1:
      raise ValueError(
          f'Checkpointer save_every: expected >= 1 or None, got {save_every}.')
    self.directory = epath.Path(workdir) / subdir
    policies = [checkpoint_managers.PreemptionCheckpointingPolicy()]
    if save_every is not None:
      policies.append(checkpoint_managers.FixedIntervalPolicy(save_every))
    self._last_save: int | None = None
    self._read_only = read_only
    # Handlers named up front (not only through the save/restore args), so that the metadata of a
    # directory's existing steps can be read before restoring (`saved_structure`).
    with _quiet_orbax(read_only):  # it warns that a read-only manager will not save
      options = ocp.CheckpointManagerOptions(
          save_decision_policy=checkpoint_managers.AnySavePolicy(policies),
          preservation_policy=checkpoint_managers.LatestN(keep),
          cleanup_tmp_directories=not read_only,
          enable_async_checkpointing=True,
          read_only=read_only,
          create=not read_only,
      )
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                         _META: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """Returns the newest saved step, or None if there is none.

    A step whose asynchronous write this process started counts at once; on
    opening a directory only completely written steps are found.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the saved steps (see `latest_step`), oldest first."""
    return sorted(self._manager.all_steps())

  def save(
      self,
      step: int,
      state: PyTree,
      meta: dict[str, Any],
      *,
      force: bool = False,
  ) -> bool:
    """Starts writing `state` and `meta` as `step` if the save policy says so.

    Args:
      step: the train step the state belongs to.
      state: pytree of `jax.Array`s (typed or raw PRNG keys allowed).
      meta: JSON-serialisable dict stored next to the state.
      force: write regardless of `save_every` (final / preemption save).

    Returns:
      Whether a write was started. A step that already exists is never
      rewritten (returns False), so a forced final save after a periodic save
      of the same step is harmless.

    Raises:
      TypeError: a field of `meta` is not JSON-serialisable.
      CheckpointWriteError: this write could not start, or the previous one failed.
      ValueError: the checkpointer is read-only.
    """
    if self._read_only:
      raise ValueError(f'{self.directory} was opened read-only: cannot save step {step}.')
    _check_json_meta(meta)
    if step in self._manager.all_steps():
      return False
    try:
      with _no_save_wait_warning():
        started = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(meta),
            }),
            force=force,
        )
    except Exception as e:  # the previous write's error surfaces here too
      raise _write_error(self.directory, step if self._last_save is None else self._last_save,
                         e) from e
    if started:
      self._last_save = step
    return started

  def check_for_errors(self) -> None:
    """Raises the error of a finished asynchronous write, without waiting for one in flight.

    Raises:
      CheckpointWriteError: the last write failed (one line: its path and the cause).
    """
    if self._last_save is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def restore(
      self,
      state_template: PyTree,
      step: int | None = None,
  ) -> tuple[PyTree, dict[str, Any]]:
    """Reads a step into the structure, dtypes and shardings of a template.

    Args:
      state_template: pytree with the saved structure whose leaves are arrays
        or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); a leaf's
        `.sharding` is where that array is placed, on any mesh. A leaf without
        a sharding is replicated on all devices (orbax itself would refuse it
        when the checkpoint was written on other devices).
      step: the step to read; None reads the latest.

    Returns:
      (state, meta) as saved.

    Raises:
      FileNotFoundError: there is no checkpoint, or no checkpoint at `step`.
    """
    step = self.resolve_step(step)
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(jax.devices(), ('all',)), jax.sharding.PartitionSpec())
    state_template = jax.tree.map(
        lambda x: x if getattr(x, 'sharding', None) is not None else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        state_template)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(state_template),
            _META: ocp.args.JsonRestore(),
        }),
    )
    return restored[_STATE], restored[_META]

  def resolve_step(self, step: int | None) -> int:
    """`step`, or the latest step for None.

    Raises:
      FileNotFoundError: there is no complete step, or none at `step` (the message lists them).
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(
          f'No checkpoint to restore in {self.directory}: the directory has no '
          'complete step.')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available '
          f'steps: {steps}.')
    return step

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the `meta` dict of a step (None: the latest)."""
    step = self.resolve_step(step)
    return self._manager.restore(
        step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

  def saved_structure(self, step: int | None = None) -> PyTree:
    """The saved state as a tree of `jax.ShapeDtypeStruct`s (no sharding), read from metadata.

    Containers are as orbax stores them: dicts (also for dataclasses and named tuples, keyed by
    field name) and lists; typed PRNG keys appear as their uint32 key data.
    """
    step = self.resolve_step(step)
    metadata = self._manager.item_metadata(step)[_STATE]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        metadata.tree)

  def wait(self) -> None:
    """Blocks until every started write is complete on disk.

    Raises:
      CheckpointWriteError: the write failed (one line: its path and the cause).
    """
    step, self._last_save = self._last_save, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise _write_error(self.directory, step, e) from e

  def close(self) -> None:
    """Waits for pending writes and releases orbax's background resources.

    Raises:
      CheckpointWriteError: the last write failed.
    """
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


BEST_SUBDIR = 'best'


def infer_best_mode(metric: str) -> str:
  """'min' for losses (metric names that end in 'loss' or 'error', and the held-out
  `reconstruction/...` losses), else 'max'."""
  lower = metric.lower()
  return 'min' if lower.endswith(('loss', 'error')) or lower.startswith('reconstruction/') else 'max'


class BestCheckpointer:
  """The single best checkpoint by an evaluation metric, in `<workdir>/best/<step>/`.

  A second orbax CheckpointManager (a `Checkpointer` keeping 1 step) next to the
  latest checkpoints' one, rather than orbax's best-N preservation options on a
  single manager: those would need every evaluated step saved in the latest
  rotation (with its own schedule and keep count) and steps without metrics
  handled apart. Here the latest checkpoints' schedule and keep-N rotation are
  untouched and cannot reach the best one, which lives in another directory; a
  step is written there only when an evaluation improves on the best so far
  (ties keep the earlier step), and orbax then deletes the previous best. The
  best step is the only complete step in that directory; its JSON meta records
  `{'metric', 'mode', 'step', 'value', 'metrics'}` (all evaluation metrics of
  that step), from which a resumed run takes the best value to beat.

  It holds parameters only: what evaluation and export need (with AdamW, a third
  of the train state).

  Every process of a multi-process job must make the same calls with the same
  metrics.
  """

  def __init__(self, workdir: epath.PathLike, metric: str, mode: str, *, read_only: bool = False):
    """Opens (and creates, unless `read_only`) `<workdir>/best` and reads the best so far.

    Args:
      workdir: the run's directory; local path or `gs://...`.
      metric: the evaluation metric that decides, e.g. 'top1'.
      mode: 'max' (higher is better) or 'min'.
      read_only: only read the best (see `Checkpointer`).

    Raises:
      ValueError: `mode` is not 'max' or 'min', or the saved best has no value
        for `metric`.
    """
    if mode not in ('max', 'min'):
      raise ValueError(f"BestCheckpointer mode: expected 'max' or 'min', got {mode!r}.")
    self.metric, self.mode = metric, mode
    self._ckpt = Checkpointer(workdir, keep=1, subdir=BEST_SUBDIR, read_only=read_only)
    self.directory = self._ckpt.directory
    self.step: int | None = None
    self.value: float | None = None
    self.metrics: dict[str, Any] = {}
    step = self._ckpt.latest_step()
    if step is not None:
      meta = self._ckpt.restore_meta(step)
      if metric not in meta['metrics']:
        raise ValueError(
            f'best metric {metric!r}: the best checkpoint in {self.directory} '
            f'(step {step}) has no value for it; it has {sorted(meta["metrics"])}.')
      if (meta['metric'], meta['mode']) != (metric, mode):
        logging.warning(
            'The best checkpoint in %s (step %d) was chosen by %s (%s); '
            'comparing by %s (%s) from now on, starting from its %s = %s.',
            self.directory, step, meta['metric'], meta['mode'], metric, mode,
            metric, meta['metrics'][metric])
      self.step, self.metrics = step, meta['metrics']
      self.value = float(meta['metrics'][metric])

  def improves(self, value: float) -> bool:
    """Whether `value` is strictly better than the best so far."""
    if self.value is None:
      return True
    return value > self.value if self.mode == 'max' else value < self.value

  def update(self, step: int, params: PyTree, metrics: dict[str, Any]) -> bool:
    """Saves `params` as the new best if `metrics[metric]` improves on the best.

    A step at or before the saved best step is never saved: it was already
    compared (a run resumed from a latest checkpoint older than the best).

    Args:
      step: the train step `params` belong to.
      params: pytree of `jax.Array`s.
      metrics: the evaluation metrics of `params` (JSON numbers).

    Returns:
      Whether `step` became the best (its write has started).

    Raises:
      ValueError: `metrics` has no value for the metric.
    """
    if self.metric not in metrics:
      raise ValueError(f'best metric {self.metric!r}: not among the evaluation '
                       f'metrics {sorted(metrics)}.')
    value = float(metrics[self.metric])
    if (self.step is not None and step <= self.step) or not self.improves(value):
      return False
    metrics = {k: (int(v) if isinstance(v, int) else float(v)) for k, v in metrics.items()}
    self._ckpt.save(step, params, {'metric': self.metric, 'mode': self.mode, 'step': step,
                                   'value': value, 'metrics': metrics}, force=True)
    self.step, self.value, self.metrics = step, value, metrics
    return True

  def summary(self) -> dict[str, Any] | None:
    """{'metric', 'mode', 'step', 'value'} of the best so far; None before the first."""
    if self.step is None:
      return None
    return {'metric': self.metric, 'mode': self.mode, 'step': self.step, 'value': self.value}

  def restore(self, params_template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Reads the best parameters into a template (see `Checkpointer.restore`).

    Returns:
      (params, meta).

    Raises:
      FileNotFoundError: there is no best checkpoint yet.
    """
    if self.step is None:
      raise FileNotFoundError(f'No best checkpoint in {self.directory}.')
    return self._ckpt.restore(params_template, self.step)

  def wait(self) -> None:
    """Blocks until the best checkpoint's write is complete on disk (see `Checkpointer.wait`)."""
    self._ckpt.wait()

  def check_for_errors(self) -> None:
    """See `Checkpointer.check_for_errors`."""
    self._ckpt.check_for_errors()

  def close(self) -> None:
    self._ckpt.close()

  def __enter__(self) -> BestCheckpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
