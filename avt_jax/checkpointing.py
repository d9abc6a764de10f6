"""Checkpoints of the train state with orbax, and preemption handling.

A checkpoint step holds two items under `<workdir>/checkpoints/<step>/`:

- `state`: the train state, any pytree of `jax.Array`s (params, optimiser state,
  step counter, PRNG keys), written with `ocp.args.StandardSave`;
- `meta`: a small JSON dict (input position, the config, ...), written with
  `ocp.args.JsonSave`.

`BestCheckpointer` keeps, apart from these, the parameters of the step with the
best evaluation metric under `<workdir>/best/<step>/` (same two items).

`restore_adapted` restores into a config that differs from the checkpoint's:
it resizes position embeddings, converts scanned <-> unrolled layers, drops or
initialises the branches of objectives switched off or on, and otherwise stops
with one line naming the config field that differs (`IncompatibleCheckpointError`).

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
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import threading
from typing import Any, Callable, Iterator

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
    step = self._check_step(step)
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

  def _check_step(self, step: int | None) -> int:
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
    step = self._check_step(step)
    return self._manager.restore(
        step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

  def saved_structure(self, step: int | None = None) -> PyTree:
    """The saved state as a tree of `jax.ShapeDtypeStruct`s (no sharding), read from metadata.

    Containers are as orbax stores them: dicts (also for dataclasses and named tuples, keyed by
    field name) and lists; typed PRNG keys appear as their uint32 key data.
    """
    step = self._check_step(step)
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
  """'min' for metric names that end in 'loss' or 'error', else 'max'."""
  return 'min' if metric.lower().endswith(('loss', 'error')) else 'max'


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


# --- Restoring into a changed config ----------------------------------------------------------------

# Config fields that give the train state a shape that restoring cannot adapt (the token grids,
# `model.scan_layers` and the objectives' weights are adapted), for the parameters and for the
# optimizer state.
_PARAM_FIELDS = tuple(f'model.{name}' for name in (
    'size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'modalities', 'video_patch',
    'audio_patch', 'audio_stride', 'fusion', 'fusion_layer', 'n_bottlenecks', 'contrastive_dim',
    'decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_dim')) + (
        'data.num_classes', 'data.label_heads')
_OPTIMIZER_FIELDS = ('optim.name', 'optim.grad_clip_norm', 'optim.momentum')


class IncompatibleCheckpointError(ValueError):
  """A checkpoint cannot be used with this config; the message is one line naming the field."""


def config_snapshot(config: Any) -> dict[str, Any]:
  """The config as JSON values, to store in a checkpoint's meta (`meta['config']`)."""
  return json.loads(config.to_json_best_effort())


def _flat_config(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flat_config(value, f'{prefix}{key}.'))
  return flat


def _config_changes(saved: dict[str, Any] | None, config: Any,
                    fields: tuple[str, ...]) -> list[str]:
  """'config.x is A in the checkpoint and B now' for the `fields` (or fields under them) that differ."""
  if not saved or config is None:
    return []
  before, now = _flat_config(saved), _flat_config(config_snapshot(config))
  return [f'config.{key} is {before.get(key)!r} in the checkpoint and {now.get(key)!r} now'
          for key in sorted(set(before) | set(now))
          if key.startswith(fields) and before.get(key) != now.get(key)]


def _key_name(entry: Any) -> Any:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return str(entry)


def _flatten(tree: PyTree) -> dict[tuple, Any]:
  """{path: leaf} in flattening order, paths as tuples of dict keys / field names / indices whatever
  the containers (a dataclass or named-tuple field and the dict key orbax stores it under agree)."""
  return {tuple(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape orbax stores for `leaf` (a typed PRNG key: that of its uint32 key data)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape)


def _fusion_start(params: PyTree) -> int | None:
  """Layers before fusion in the scanned layout of `params`, or None for the unrolled layout."""
  stacks = {path[i]: leaf for path, leaf in _flatten(params).items()
            for i in range(len(path)) if str(path[i]).startswith('encoderblocks_')}
  if not stacks:
    return None
  unimodal = [leaf for name, leaf in stacks.items()
              if name not in ('encoderblocks_fused', 'encoderblocks_shared')]
  return unimodal[0].shape[0] if unimodal else 0


def _ends_with(path: tuple, param_paths: set[tuple]) -> bool:
  """Whether `path` (e.g. of an optimizer moment) ends with one of `param_paths`."""
  return any(path[i:] in param_paths for i in range(1, len(path)))


def _read_as(template_leaf: Any, saved_leaf: jax.ShapeDtypeStruct,
             replicated: jax.sharding.Sharding) -> Any:
  """How to read one saved array: like the template's leaf where it fits, else replicated."""
  if template_leaf is not None and _stored_shape(template_leaf) == tuple(saved_leaf.shape):
    if getattr(template_leaf, 'sharding', None) is not None:
      return template_leaf
    return jax.ShapeDtypeStruct(template_leaf.shape, template_leaf.dtype, sharding=replicated)
  return jax.ShapeDtypeStruct(saved_leaf.shape, saved_leaf.dtype, sharding=replicated)


def restore_adapted(ckpt: Checkpointer, state_template: PyTree, *,
                    init: Callable[[], PyTree], config: Any = None, step: int | None = None,
                    fresh_ok: tuple[str, ...] = ()) -> tuple[PyTree, dict[str, Any], list[str]]:
  """Restores a step into `state_template`, adapting a checkpoint written with another config.

  When the saved arrays have the template's structure and shapes this is `Checkpointer.restore`.
  Otherwise, comparing both sides in the unrolled layer layout:

  - scanned (`model.scan_layers=True`) <-> unrolled encoder layers are converted
    (`avt_jax.models.scan`), for the parameters and the optimizer moments alike;
  - position embeddings (`posembed_input`, [1, *grid, width]) on another token grid (other
    `input.num_frames`, `image_size`, `audio_frames`, `n_mels`) are resized by linear
    interpolation, as `PositionEmbedding` does for inputs on another grid;
  - parameters only in the checkpoint (a head or decoder whose objective now has weight 0) are
    dropped; parameters only in the template (a branch newly switched on) come from `init()`, and
    so do the optimizer moments of new and resized parameters;
  - anything else that differs stops with `IncompatibleCheckpointError`, one line naming the config
    fields that differ and both values (from `meta['config']`, which `train.py` writes), or the
    first differing array for checkpoints without it.

  Matching arrays are read straight into the template's sharding; arrays that need adapting are
  read replicated, adapted, then placed with the template's sharding.

  Args:
    ckpt: the workdir's checkpointer.
    state_template: abstract train state of this config (`jax.ShapeDtypeStruct`s with shardings).
    init: returns a freshly initialised state of this config (called only when needed).
    config: this run's config, to name the fields that differ from `meta['config']`.
    step: the step to read; None for the latest.
    fresh_ok: top-level fields of the state (e.g. 'opt_state' when only evaluating) taken from
      `init()` where they differ, instead of stopping.

  Returns:
    (state, meta, notes); `notes` says what was adapted (empty when nothing was).

  Raises:
    FileNotFoundError: no checkpoint (at `step`).
    IncompatibleCheckpointError: the checkpoint cannot be adapted to this config.
  """
  from avt_jax.models import scan  # pylint: disable=g-import-not-at-top

  step = ckpt._check_step(step)  # pylint: disable=protected-access
  saved_tree = ckpt.saved_structure(step)
  saved, target = _flatten(saved_tree), _flatten(state_template)
  if saved.keys() == target.keys() and all(
      tuple(saved[path].shape) == _stored_shape(target[path]) for path in target):
    state, meta = ckpt.restore(state_template, step)
    return state, meta, []

  meta = ckpt.restore_meta(step)
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('all',)), jax.sharding.PartitionSpec())
  read_template = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _read_as(target.get(tuple(_key_name(k) for k in path)), leaf, replicated),
      saved_tree)
  restored, _ = ckpt.restore(read_template, step)

  saved_fusion_start = _fusion_start(restored.get('params', {}))
  target_fusion_start = _fusion_start(getattr(state_template, 'params', {}))
  notes = []
  if (saved_fusion_start is None) != (target_fusion_start is None):
    notes.append('converted the encoder layers from the '
                 f'{"unrolled" if saved_fusion_start is None else "scanned"} layout')
  have = _flatten(scan.scanned_to_unrolled(restored))
  want_tree = jax.eval_shape(scan.scanned_to_unrolled, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_template))
  want = _flatten(want_tree)
  changes = _ParamChanges.between(have, want)
  leaves, renewed, unfit = _adapted_leaves(
      have, want, changes, fresh_ok, lambda: _flatten(scan.scanned_to_unrolled(init())))
  if unfit:
    raise _incompatible(ckpt.directory, step, unfit, have, want, meta.get('config'), config)
  notes += changes.notes(have, want, renewed)

  state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(want_tree), leaves)
  if target_fusion_start is not None:
    state = scan.unrolled_to_scanned(state, target_fusion_start)
  state = jax.tree.map(
      lambda x, t: jax.device_put(x, t.sharding) if getattr(t, 'sharding', None) is not None else x,
      state, state_template)
  return state, meta, notes


@dataclasses.dataclass(frozen=True)
class _ParamChanges:
  """Parameter paths (without the leading 'params') that differ between a checkpoint and a config:
  only in the config (`added`), only in the checkpoint (`dropped`), position embeddings on another
  token grid (`resized`)."""
  added: frozenset
  dropped: frozenset
  resized: frozenset

  @classmethod
  def between(cls, have: dict, want: dict) -> '_ParamChanges':
    params = lambda paths: {path[1:] for path in paths if path[0] == 'params'}

    def resizable(path):
      old, new = have[('params',) + path], want[('params',) + path]
      return (path[-1] == 'posembed_input' and _stored_shape(old) != _stored_shape(new)
              and len(old.shape) == len(new.shape) and old.shape[0] == 1
              and old.shape[-1] == new.shape[-1])

    return cls(frozenset(params(want) - params(have)), frozenset(params(have) - params(want)),
               frozenset(p for p in params(want) & params(have) if resizable(p)))

  @property
  def explained(self) -> frozenset:
    return self.added | self.dropped | self.resized

  def notes(self, have: dict, want: dict, renewed: set) -> list[str]:
    """One line per kind of adaptation, for the restore report."""
    notes = [f'resized {"/".join(path)} from a {have[("params",) + path].shape[1:-1]} to a '
             f'{want[("params",) + path].shape[1:-1]} token grid' for path in sorted(self.resized)]
    for verb, paths, where in (('dropped', self.dropped, 'config'),
                               ('initialised', self.added, 'checkpoint')):
      if paths:
        notes.append(f'{verb} the parameters not in the {where}: '
                     f'{", ".join(sorted({str(path[0]) for path in paths}))}')
    if renewed:
      notes.append(f'initialised {", ".join(sorted(renewed))} afresh')
    return notes


def _adapted_leaves(have: dict, want: dict, changes: _ParamChanges, fresh_ok: tuple[str, ...],
                    fresh_state: Callable[[], dict]) -> tuple[list, set, list]:
  """The leaves of the wanted (unrolled, flattened) state, each kept, cast, resized or fresh.

  Returns:
    (leaves in `want`'s order, top-level fields renewed only because of `fresh_ok`, the paths that
    could not be adapted).
  """
  from avt_jax.models.tokenizers import resize_posemb  # pylint: disable=g-import-not-at-top
  fresh = functools.cache(fresh_state)  # called only when some leaf needs it
  explained = changes.explained
  leaves, renewed, unfit = [], set(), []
  for path, new in want.items():
    if path in have and _stored_shape(have[path]) == _stored_shape(new):
      old = have[path]
      keep_dtype = jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) or old.dtype == new.dtype
      leaves.append(old if keep_dtype else old.astype(new.dtype))
    elif path[0] == 'params' and path[1:] in changes.resized:
      leaves.append(resize_posemb(have[path], new.shape[1:-1]).astype(new.dtype))
    elif path[0] == 'params' and path[1:] in changes.added:
      leaves.append(fresh()[path])
    elif path[0] != 'params' and (_ends_with(path, explained) or path[0] in fresh_ok):
      leaves.append(fresh()[path])
      if not _ends_with(path, explained):
        renewed.add(path[0])
    else:
      unfit.append(path)
  unfit += [path for path in have if path not in want and path[0] != 'params'
            and not _ends_with(path, explained) and path[0] not in fresh_ok]
  return leaves, renewed, unfit


def _incompatible(directory: str, step: int, unfit: list, have: dict, want: dict,
                  saved_config: Any, config: Any) -> 'IncompatibleCheckpointError':
  """The error for arrays that cannot be adapted: the config fields that differ, one example."""
  example = unfit[0]
  shape = lambda tree: (f'{_stored_shape(tree[example])}' if example in tree else 'absent')
  first = f'{"/".join(map(str, example))}: {shape(have)} in the checkpoint, {shape(want)} now'
  fields = _PARAM_FIELDS if any(path[0] == 'params' for path in unfit) else _OPTIMIZER_FIELDS
  changes = _config_changes(saved_config, config, fields)
  return IncompatibleCheckpointError(
      f'Cannot restore {directory} step {step} into this config: '
      + ('; '.join(changes) if changes else 'the saved state differs') +
      f' ({len(unfit)} arrays differ, e.g. {first}). Use the checkpoint\'s values or a new '
      'workdir.')
