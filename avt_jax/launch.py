"""One training (or evaluation) run in a workdir, what `python -m avt_jax.main` calls: every check
first (`avt_jax.preflight`), the workdir lock, the data (generated or prepared), then
`train.train_and_evaluate`, `results.json` and the summary table with its diagnosis.
"""

import contextlib
import json
import time
from typing import Callable

import ml_collections
from absl import logging


def run(config: ml_collections.ConfigDict, workdir: str, distributed: dict | None = None, *,
        on_start: Callable[[], None] = lambda: None) -> None:
  """Validates `config`, prepares or finds its data, trains and evaluates in `workdir`, then writes
  `<workdir>/results.json` and prints the summary table (process 0).

  Args:
    config: the run's config.
    workdir: local or gs:// folder of the checkpoints, events and results.
    distributed: keyword arguments of `jax.distributed.initialize`, or None for one process.
    on_start: called once every check has passed, just before the run first writes into `workdir`
      (from then on the run owns it: `main` keeps error tracebacks there).

  Raises:
    The failures a user can cause (`ConfigError`, `FileNotFoundError`, `WorkdirInUseError`, ...;
    see `avt_jax.main`), each naming the field or file.
  """
  from avt_jax.models import validate  # pylint: disable=g-import-not-at-top

  validate(config)  # fail on impossible settings before heavy imports, data work or compilation
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from avt_jax import preflight, train, workdir_lock  # pylint: disable=g-import-not-at-top
  from avt_jax.prep import generated  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress is printed
  if distributed is not None:
    jax.distributed.initialize(**distributed)
  preflight.check_config(config, workdir)  # before data work; after distributed init (orbax)
  workdir = epath.Path(workdir)
  # Training owns the workdir (process 0 for the job); evaluating only reads it.
  owner = workdir_lock.WorkdirLock(workdir) if (
      jax.process_index() == 0 and not config.train.eval_only) else contextlib.nullcontext()
  with owner:
    if getattr(owner, 'took_over', None):
      print(f'Took over the stale lock of a run that is gone: {owner.took_over}.', flush=True)
    start = time.time()
    data_dir = generated.resolve_data_dir(config)
    if config.data.from_stats or config.train.epochs:
      from avt_jax import data_format, dataset_stats  # pylint: disable=g-import-not-at-top
      fields = dataset_stats.apply_stats(config, data_dir)
      validate(config)
      print('From ' + data_format.stats_path(data_dir) + ': ' +
            ', '.join(f'{k}={v}' for k, v in fields.items()), flush=True)
    prepared_init = preflight.check_run(config, data_dir, str(workdir))  # before any write
    on_start()
    workdir.mkdir(parents=True, exist_ok=True)
    summary = train.train_and_evaluate(config, str(workdir), data_dir, prepared_init=prepared_init)
  summary['total_seconds'] = time.time() - start
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(summary, indent=2, default=float))
    print('\n' + summary_table(config, summary) + '\n\nTotal time '
          f'{summary["total_seconds"]:.0f} s; results in {workdir / "results.json"}', flush=True)


def summary_table(config, summary: dict) -> str:
  """A short markdown table of the run, then its diagnosis (`avt_jax.diagnosis`), if any."""
  rows = [('config', config.data.name), ('steps', summary['steps']),
          ('train time', f'{summary["train_seconds"]:.0f} s')]
  rows += [(f'train {k}', f'{v:.4f}') for k, v in summary['train'].items() if k.startswith('loss')]
  for part in ('eval', 'train_eval'):
    rows += [(f'{part} {k}', f'{v:.4f}' if isinstance(v, float) else v)
             for k, v in summary.get(part, {}).items()]
  if 'best' in summary:
    rows.append((f'best {summary["best"]["metric"]}',
                 f'{summary["best"]["value"]:.4f} (step {summary["best"]["step"]})'))
  width = max(len(str(k)) for k, _ in rows)
  lines = [f'| {"":{width}} | value |', f'|{"-" * (width + 2)}|-------|']
  table = '\n'.join(lines + [f'| {str(k):{width}} | {v} |' for k, v in rows])
  notes = summary.get('diagnosis') or []
  return table + ''.join(f'\n\nDiagnosis: {note}' for note in notes)
