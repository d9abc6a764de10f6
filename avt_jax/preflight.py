"""Every check of a training config and of the files it names, before anything is written (our design).

`python -m avt_jax.main` calls `check_config` (no data needed) and `check_run` after
`models.validate` and before it writes into the workdir or compiles: the mesh against the devices, `config.input` against the data's stats.json and
record files (batch sizes, sharding, record files cut short), evaluation settings, resuming (the
input stream of the workdir's checkpoint), `config.init`'s checkpoints (exist, readable, mapped
onto the model) and `config.optim.frozen` (only with a checkpoint; matches some parameters). A problem is a `ConfigError` whose message starts with the field it is about, so a
failed start prints one `Error:` line and leaves the workdir as it was.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from etils import epath

from avt_jax import (checkpoint_adaptation, checkpointing, data_format, input as input_lib,
                     pretrained, record_files, sharding)
from avt_jax.input import pipeline
from avt_jax.models import ConfigError
from avt_jax.prep import holdout

_INIT_PATHS = ('checkpoint', 'video.checkpoint', 'audio.checkpoint')


def _as_config_error(error: Exception, field: str) -> ConfigError:
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  return ConfigError(message if message.startswith('config.') else f'config.{field}: {message}')


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The evaluation settings (and the best checkpoint `eval_only` asks for), the mesh, and the batch
  sizes against the mesh.

  Raises:
    ConfigError: one line starting with the config field at fault.
  """
  from avt_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    workdir_lib.check_eval_config(config, workdir)
  except ValueError as e:
    raise _as_config_error(e, 'train') from e
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise _as_config_error(e, 'mesh') from e
  if config.optim.get('frozen') and not pretrained.requested(config):
    raise ConfigError(f'config.optim.frozen: {config.optim.frozen!r} freezes parameters of a randomly '
                      'initialised model; set config.init.checkpoint (e.g. DINOv2 for '
                      "configs/manifest.py:pretrained) or config.optim.frozen=''.")
  split = 1
  for axis in sharding.BATCH_AXES:
    split *= mesh.shape[axis]
  for field in ('batch_size', 'eval_batch_size'):
    if int(config.input[field]) % split:
      raise ConfigError(f'config.input.{field}: {config.input[field]} is not a multiple of the '
                        f'{split} devices the batch is split over (config.mesh '
                        f'{" x ".join(sharding.BATCH_AXES)}).')


def check_run(config: ml_collections.ConfigDict, data_dir: str, workdir: str
              ) -> pretrained.Prepared | None:
  """`check_config`, then the checks of the data, of resuming and of `config.init` (see above).

  Returns:
    `config.init`'s checkpoints read and mapped (`pretrained.prepare`) for a run that starts afresh,
    else None: pass it on to `train.train_and_evaluate` so the files are read once.

  Raises:
    ConfigError: one line starting with the config field (or naming the file) at fault.
  """
  check_config(config, workdir)  # again: `data.from_stats` may have changed fields
  fields = ['eval_split'] if config.train.eval_only else ['train_split', 'eval_split']
  _check_splits_prepared(config, data_dir, fields)
  splits = [config.data[field] for field in fields]
  try:
    pipeline.check_config(config, data_dir, splits)
  except (record_files.RecordFileError, data_format.StatsError):
    raise  # about a file, and naming it
  except ValueError as e:
    raise _as_config_error(e, 'input') from e
  resuming = (epath.Path(workdir) / 'checkpoints').exists() and _has_checkpoint(workdir)
  if resuming:
    if not config.train.eval_only:
      _check_resumable(config, data_dir, workdir)
    return None
  return _read_init(config)


def _check_splits_prepared(config: ml_collections.ConfigDict, data_dir: str,
                           fields: list[str]) -> None:
  """Each `config.data.<field>` split is among those stats.json counts (`num_clips`); a folder
  without a readable stats.json is left to `pipeline.check_config`, which names the file."""
  try:
    prepared = sorted(input_lib.load_stats(data_dir).get('num_clips') or {})
  except (OSError, ValueError):
    return
  for field in fields:
    split = config.data[field]
    if prepared and split not in prepared:
      hint = (' (or prepare with --test_fraction=0.2 to hold out a fifth of the `train` '
              'clips, whole groups at a time)' if split == holdout.TEST_SPLIT else '')
      raise ConfigError(f'config.data.{field}: the prepared data {data_dir} has no {split!r} split '
                        f'(it has {", ".join(prepared)}); give the annotations (manifest `split` '
                        f'column) rows with split {split!r} and prepare again{hint}, or set '
                        f'--config.data.{field} to one of those.')


def _has_checkpoint(workdir: str) -> bool:
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step() is not None


def _check_resumable(config: ml_collections.ConfigDict, data_dir: str, workdir: str) -> None:
  """The workdir's latest checkpoint continues the same stream of training examples."""
  with checkpointing.Checkpointer(workdir, read_only=True) as ckpt:
    meta = ckpt.restore_meta()
  try:
    input_lib.check_same_stream(meta.get('input_stream'),
                                input_lib.stream_identity(config, data_dir, seed=config.seed))
  except ValueError as e:
    raise checkpoint_adaptation.IncompatibleCheckpointError(f'{workdir}: {e}') from None


def _read_init(config: ml_collections.ConfigDict) -> pretrained.Prepared | None:
  """`config.init`'s checkpoints, read and mapped onto the model's shapes (nothing compiled)."""
  if not pretrained.requested(config):
    return None
  for field in _INIT_PATHS:
    path = config.init
    for key in field.split('.'):
      path = path[key]
    if path and not epath.Path(path).exists():
      raise ConfigError(f'config.init.{field}: {path} does not exist.')
  from avt_jax.train_step import setup  # pylint: disable=g-import-not-at-top
  *_, init = setup(config)
  try:
    abstract: Any = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  except ValueError as e:
    if str(e).startswith('config.optim.frozen'):  # matched against the model's parameters
      raise ConfigError(str(e)) from None
    raise
  try:
    return pretrained.prepare(config, abstract.params)
  except pretrained.PretrainedError as e:
    raise _as_config_error(e, 'init.checkpoint') from e
