"""The run contract: what a training run leaves in its workdir for the commands that use it.

`<workdir>/config.json` and a copy of the data's `stats.json` (`save_run` / `load_run`), the
parameters of its latest, given or best checkpoint (`restore_params`), and the evaluation fields
that decide which best checkpoint it keeps (`check_eval_config`). `predict`, `export` and the
benchmarks read a workdir through this module without importing the training loop (our design).
"""

import json
from typing import Any

import jax
import ml_collections
from etils import epath

from avt_jax import (calibration, checkpoint_adaptation, checkpointing, data_format, evaluate,
                     input as input_lib)
from avt_jax.train_step import setup

CONFIG_FILE = 'config.json'  # in the workdir: the run's config (what `load_run` rebuilds)


def save_run(config: ml_collections.ConfigDict, workdir: str, data_dir: str) -> None:
  """Writes `<workdir>/config.json` (the config as JSON) and a copy of the data's `stats.json`
  (class names, frame rate, frame size, mel bins, log-mel normalisation): what `load_run` needs to use
  the model on new videos without the training data (`avt_jax.predict`, `avt_jax.export`)."""
  stats = input_lib.load_stats(data_dir)  # first: a bad data folder leaves the workdir untouched
  config_json = json.dumps(checkpoint_adaptation.config_snapshot(config), indent=2)
  (epath.Path(workdir) / CONFIG_FILE).write_text(config_json)
  data_format.write_stats(workdir, stats)


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, dataset stats) saved by `save_run` in `workdir`.

  Raises:
    FileNotFoundError: naming the missing file (workdirs of runs that predate `save_run` lack them:
      write the config with `checkpoint_adaptation.config_snapshot` and copy the records'
      stats.json).
    data_format.StatsError: the stats.json lacks a key every reader needs.
  """
  for name in (CONFIG_FILE, data_format.STATS_FILE):
    path = epath.Path(workdir) / name
    if not path.exists():
      raise FileNotFoundError(f'{path} not found: training writes it into the workdir (runs that '
                              'predate this: the config as JSON, and a copy of the records\' '
                              'stats.json).')
  config = json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())
  return ml_collections.ConfigDict(config), data_format.read_stats(workdir)


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                   checkpoint: str = 'latest'):
  """Parameters of a workdir's latest (or given) checkpoint, or with checkpoint='best' of its best
  checkpoint (`<workdir>/best`), e.g. for analysis or export (adapted to `config` where it differs
  from the checkpoint's, see `checkpoint_adaptation.restore_adapted`)."""
  *_, init = setup(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  if checkpoint == 'best':
    with checkpointing.BestCheckpointer(workdir, *check_eval_config(config), read_only=True) as best:
      return best.restore(abstract.params)[0]
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints, read_only=True)
  state, _, _ = checkpoint_adaptation.restore_adapted(
      ckpt, abstract, init=lambda: jax.jit(init)(rng), config=config, step=step,
      fresh_ok=('opt_state',))
  ckpt.close()
  return calibration.load_into(state.params, workdir)[0]


def check_eval_config(config: ml_collections.ConfigDict, workdir: str | None = None
                      ) -> tuple[str, str]:
  """Checks the evaluation fields of `config.train` and `config.eval`; returns (best metric, best
  mode) with '' resolved.

  With `workdir`, also checks that `eval_only` with `eval_checkpoint='best'` has a best checkpoint.

  Raises:
    ValueError: naming the field, what it holds and what it may hold.
  """
  t = config.train
  if not isinstance(t.eval_every, int) or t.eval_every < 0:
    raise ValueError('config.train.eval_every: expected an integer >= 0 (steps between evaluations; '
                     f'0 evaluates only at the end), got {t.eval_every!r}.')
  subset = config.eval.train_subset_size
  if not isinstance(subset, int) or subset < 0:
    raise ValueError('config.eval.train_subset_size: expected an integer >= 0 (training clips scored '
                     f'at every evaluation; 0 turns it off), got {subset!r}.')
  scores = evaluate.score_names(config)
  if not scores:  # e.g. matching alone
    if t.eval_every > 0:
      raise ValueError('config.train.eval_every: the run has nothing to evaluate (no classification, '
                       f'contrastive or masked objective in config.loss.weights); expected 0, got '
                       f'{t.eval_every}.')
    return t.best_metric, t.best_mode or 'max'
  metric = t.best_metric or scores[0]
  if metric not in scores:
    raise ValueError(f'config.train.best_metric: {metric!r} is not among the evaluation metrics of '
                     f'{evaluate.metric_kind(config)} labels {scores} (or \'\' for {scores[0]!r}).')
  mode = t.best_mode or checkpointing.infer_best_mode(metric)
  if mode not in ('max', 'min'):
    raise ValueError("config.train.best_mode: expected 'max', 'min' or '' (inferred from the metric "
                     f'name), got {t.best_mode!r}.')
  if t.eval_checkpoint not in ('latest', 'best'):
    raise ValueError("config.train.eval_checkpoint: expected 'latest' or 'best', got "
                     f'{t.eval_checkpoint!r}.')
  if workdir is not None and t.eval_only and t.eval_checkpoint == 'best':
    if not _saved_steps(workdir, checkpointing.BEST_SUBDIR):
      latest = _saved_steps(workdir, 'checkpoints')
      exists = (f"its latest checkpoints are steps {latest}: use config.train.eval_checkpoint='latest'"
                if latest else 'it has no checkpoints at all')
      raise ValueError(
          f"config.train.eval_checkpoint='best': there is no best checkpoint in "
          f'{epath.Path(workdir) / checkpointing.BEST_SUBDIR} (training keeps one when '
          f'config.train.eval_every > 0); {exists}.')
  return metric, mode


def _saved_steps(workdir: str, subdir: str) -> list[int]:
  """The complete steps in `<workdir>/<subdir>`, without creating the folder."""
  if not (epath.Path(workdir) / subdir).exists():
    return []
  with checkpointing.Checkpointer(workdir, subdir=subdir, read_only=True) as ckpt:
    return ckpt.all_steps()
