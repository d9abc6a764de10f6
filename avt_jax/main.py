"""Trains and evaluates AVT.

    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo
    python -m avt_jax.main --config=configs/kinetics_sounds.py --workdir=gs://bucket/ks \
        --config.data.data_dir=/data/ks_records
    # evaluate the latest checkpoint of a workdir only, or its best (kept when train.eval_every > 0):
    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo --config.train.eval_only
    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo --config.train.eval_only \
        --config.train.eval_checkpoint=best

A workdir that already holds checkpoints resumes from the latest one. One training run at a time
uses a workdir (`avt_jax.workdir_lock`): a second one stops at once naming the first (host, pid);
`eval_only` (like `predict` and `export`) only reads and may run while the workdir trains.

Every check of the config and of the files it names runs before anything is written or compiled
(`avt_jax.preflight`). A failure a user can cause (config, data files, a checkpoint that cannot be
written, a workdir in use) prints one `Error:` line; the full traceback goes to
`<workdir>/error.log` when the run had started there, and to the console with --verbose.

On several hosts pass
--multihost on every host: TPU VMs, SLURM and Open MPI jobs are detected by JAX; on other clusters
(plain multi-node GPU or CPU) also give the coordinator and this process's place:

    python -m avt_jax.main --config=... --workdir=... --multihost \
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

import os
import sys
import time
import traceback

from avt_jax import command_line  # before TensorFlow and JAX load

command_line.quiet_native_logs()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
PROG = 'python -m avt_jax.main'
config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and results (local or gs://).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (one process per host); '
                  'without the flags below JAX detects the cluster (TPU VMs, SLURM, Open MPI).')
flags.DEFINE_string('coordinator_address', None, 'With --multihost: host:port of process 0, which '
                    'runs the coordination service (the same on every process).')
flags.DEFINE_integer('num_processes', None, 'With --multihost: number of processes in the job.')
flags.DEFINE_integer('process_id', None, 'With --multihost: this process\'s index in '
                     '[0, num_processes).')
flags.DEFINE_list('local_device_ids', None, 'With --multihost: comma-separated ids of the local '
                  'devices this process uses (default: all; e.g. one process per GPU).')
flags.DEFINE_bool('verbose', False, 'Print the full traceback of errors (kept in <workdir>/error.log '
                  'otherwise, once the run has started there).')
flags.mark_flags_as_required(['config', 'workdir'])

ERROR_LOG = 'error.log'  # in the workdir: the traceback behind an `Error:` line
_started = False  # whether this run has begun writing into the workdir (it owns it)


def _mark_started() -> None:
  global _started
  _started = True


def distributed_args(*, multihost: bool, coordinator_address: str | None,
                     num_processes: int | None, process_id: int | None,
                     local_device_ids: list[str] | None) -> dict | None:
  """Keyword arguments for `jax.distributed.initialize`, or None without --multihost (our design).

  Arguments left unset are detected by JAX.

  Raises:
    ValueError: naming the flag, when one is given without --multihost, or a value is out of range.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id, 'local_device_ids': local_device_ids}
  if not multihost:
    extra = [f'--{name}' for name, value in given.items() if value is not None]
    if extra:
      raise ValueError(f'{", ".join(extra)} given without --multihost.')
    return None
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num_processes}.')
  if process_id is not None and (process_id < 0 or process_id >= (num_processes or float('inf'))):
    raise ValueError(f'--process_id must be in [0, --num_processes={num_processes}), got '
                     f'{process_id}.')
  if local_device_ids is not None:
    try:
      given['local_device_ids'] = [int(i) for i in local_device_ids]
    except ValueError:
      raise ValueError('--local_device_ids: expected comma-separated integers, got '
                       f'{",".join(local_device_ids)!r}.') from None
  return {name: value for name, value in given.items() if value is not None}


def _user_errors() -> tuple[type[BaseException], ...]:
  """Failures a user can cause and fix, reported as one line (their messages name field or file)."""
  # pylint: disable=g-import-not-at-top
  from avt_jax import data_format, dataset_stats, record_files, workdir_lock
  from avt_jax.models import ConfigError
  errors = [ConfigError, data_format.StatsError, dataset_stats.DatasetStatsError, FileNotFoundError,
            record_files.RecordFileError, workdir_lock.WorkdirInUseError]
  for module, names in (('avt_jax.checkpointing', ('CheckpointWriteError',)),
                        ('avt_jax.checkpoint_adaptation', ('IncompatibleCheckpointError',)),
                        ('avt_jax.input.pipeline', ('BadRecordError',))):
    if module in sys.modules:  # raised only once imported; importing costs seconds
      errors += [getattr(sys.modules[module], name) for name in names]
  return tuple(errors)


def _log_traceback(workdir: str) -> str | None:
  """Appends the current exception's traceback to `<workdir>/error.log` once the run has started
  writing there (a failed start leaves the workdir as it was); returns the log's path, or None."""
  try:
    if not _started or not os.path.isdir(workdir):
      return None
    path = os.path.join(workdir, ERROR_LOG)
    with open(path, 'a') as f:
      f.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} pid {os.getpid()}\n'
              + traceback.format_exc())
    return path
  except OSError:  # e.g. the full disk that failed the checkpoint
    return None


def _quiet_background_errors() -> None:
  """Without --verbose: the tracebacks that orbax's and tensorstore's background threads print
  after a failed checkpoint write (dozens, one per array) stay off the console; the train loop
  reports the failure once (`checkpointing.CheckpointWriteError`), its traceback in the error log."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _NoBackgroundTracebacks(std_logging.Filter):
    def filter(self, record):
      return not (record.exc_info or (record.levelno >= std_logging.ERROR and
                                      f'{os.sep}orbax{os.sep}' in record.pathname))

  logging.get_absl_handler().addFilter(_NoBackgroundTracebacks())
  previous = sys.unraisablehook

  def unraisablehook(unraisable):  # tensorstore callbacks into orbax's closed event loop
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous(unraisable)

  sys.unraisablehook = unraisablehook


def main(argv):
  del argv
  if not FLAGS.verbose:
    _quiet_background_errors()
  try:
    distributed = distributed_args(
        multihost=FLAGS.multihost, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
        local_device_ids=FLAGS.local_device_ids)
  except ValueError as e:
    command_line.usage_error(PROG, str(e))
  try:
    from avt_jax import launch  # pylint: disable=g-import-not-at-top  # after the flags are checked
    launch.run(FLAGS.config, FLAGS.workdir, distributed, on_start=_mark_started)
  except _user_errors() as e:
    if FLAGS.verbose:
      traceback.print_exc()
    log = None if '://' in FLAGS.workdir else _log_traceback(FLAGS.workdir)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'Error: {first}' + (f' (traceback in {log})' if log else ''), file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing with the project's convention (`avt_jax.command_line`): a bad flag is one line
  `python -m avt_jax.main: error: ...` and exit status 2 (absl's own: a FATAL line, status 1), and
  the help exits 0 (absl's: 1)."""
  try:
    return FLAGS(argv)
  except command_line.FLAG_ERRORS as e:
    command_line.usage_error(PROG, command_line.flag_error_message(e))
  except SystemExit:
    if set(command_line.HELP_FLAGS) & set(argv[1:]):
      raise SystemExit(0) from None
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
