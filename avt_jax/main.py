"""Trains and evaluates AVT.

    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo
    python -m avt_jax.main --config=configs/kinetics_sounds.py --workdir=gs://bucket/ks \
        --config.data.data_dir=/data/ks_records
    # evaluate the latest checkpoint of a workdir only, or its best (kept when train.eval_every > 0):
    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo --config.train.eval_only
    python -m avt_jax.main --config=configs/demo.py --workdir=/tmp/avt_demo --config.train.eval_only \
        --config.train.eval_checkpoint=best

A workdir that already holds checkpoints resumes from the latest one. On several hosts (TPU pod
slices, multi-node GPU) pass --multihost on every host.
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and results (local or gs://).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (one process per host).')
flags.mark_flags_as_required(['config', 'workdir'])


def resolve_data_dir(config) -> str:
  """Prepared-records folder: generated and cached for synthetic data, else `data.data_dir`.

  `data.synthetic` is 'demo' (configs/demo.py) or '<dataset>_smoke' (the `:smoke` variants of the
  dataset configs, small generated clips in that dataset's own annotation format).
  """
  name = config.data.synthetic
  cache_dir = config.data.cache_dir or None
  if name == 'demo':
    from avt_jax.prep import demo_data  # pylint: disable=g-import-not-at-top
    return demo_data.ensure_demo_data(cache_dir)
  if name.endswith('_smoke'):
    from avt_jax.prep import smoke_data  # pylint: disable=g-import-not-at-top
    return smoke_data.ensure_smoke_data(name.removesuffix('_smoke'), cache_dir)
  if name:
    raise ValueError(f"config.data.synthetic: unknown generated dataset {name!r}; expected 'demo', "
                     "'<dataset>_smoke' or ''.")
  if not config.data.data_dir:
    raise ValueError('config.data.data_dir is empty: set --config.data.data_dir to the folder written '
                     'by `python -m avt_jax.prepare`.')
  return config.data.data_dir


def summary_table(config, summary: dict) -> str:
  """A short markdown table of the run."""
  rows = [('config', config.data.name), ('steps', summary['steps']),
          ('train time', f'{summary["train_seconds"]:.0f} s')]
  rows += [(f'train {k}', f'{v:.4f}') for k, v in summary['train'].items() if k.startswith('loss')]
  rows += [(f'eval {k}', f'{v:.4f}' if isinstance(v, float) else v) for k, v in summary['eval'].items()]
  if 'best' in summary:
    rows.append((f'best {summary["best"]["metric"]}',
                 f'{summary["best"]["value"]:.4f} (step {summary["best"]["step"]})'))
  width = max(len(str(k)) for k, _ in rows)
  lines = [f'| {"":{width}} | value |', f'|{"-" * (width + 2)}|-------|']
  return '\n'.join(lines + [f'| {str(k):{width}} | {v} |' for k, v in rows])


def main(argv):
  del argv
  from avt_jax.models import validate  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  validate(config)  # fail on impossible settings before heavy imports, data work or compilation
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from avt_jax import checkpointing, train  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress is printed
  if FLAGS.multihost:
    jax.distributed.initialize()
  train.check_eval_config(config, FLAGS.workdir)  # before data work; after distributed init (orbax)
  start = time.time()
  data_dir = resolve_data_dir(config)
  if config.data.from_stats or config.train.epochs:
    from avt_jax import dataset_stats  # pylint: disable=g-import-not-at-top
    fields = dataset_stats.apply_stats(config, data_dir)
    validate(config)
    print('From ' + os.path.join(data_dir, 'stats.json') + ': ' +
          ', '.join(f'{k}={v}' for k, v in fields.items()), flush=True)
  workdir = epath.Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    summary = train.train_and_evaluate(config, str(workdir), data_dir)
  except checkpointing.IncompatibleCheckpointError as e:  # one line naming the config field
    raise SystemExit(f'Error: {e}') from None
  summary['total_seconds'] = time.time() - start
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(summary, indent=2, default=float))
    print('\n' + summary_table(config, summary) + f'\n\nTotal time {summary["total_seconds"]:.0f} s; '
          f'results in {workdir / "results.json"}', flush=True)


if __name__ == '__main__':
  app.run(main)
