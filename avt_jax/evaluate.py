"""Multi-view evaluation: every view of every video through the model, logits averaged per video."""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from avt_jax import data_format, input as input_lib, metrics, sharding


def metric_kind(config: ml_collections.ConfigDict) -> str:
  """'multi_head' (e.g. EPIC verb+noun), 'multi_label' (sigmoid) or 'single_label'."""
  if len(config.data.label_heads) > 1:
    return 'multi_head'
  return 'multi_label' if config.data.multi_label else 'single_label'


def fused_logits(outputs: dict) -> dict:
  """The model's fused logits: head -> [B, C]."""
  return outputs['logits']


def make_eval_step(model, modalities, select: Callable[[dict], dict] = fused_logits):
  def eval_step(params, batch):
    inputs = {k: batch[k] for k in (*modalities, 'mask')}
    return select(model.apply({'params': params}, inputs, train=False,
                              objectives=('classification',)))
  return eval_step


def score_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The scores `evaluate` returns for this config (besides 'num_videos'); the first is the headline."""
  return metrics.SCORES[metric_kind(config)]


def make_evaluator(config: ml_collections.ConfigDict, model, mesh, data_dir: str, split: str
                   ) -> Callable[[Any], dict[str, float]]:
  """Returns evaluate(params) -> metrics on `split`, compiling the eval step once for all calls.

  Training evaluates every `train.eval_every` steps; a fresh `jax.jit` per call would compile the
  model again each time.
  """
  score = make_video_scorer(config, model, mesh, data_dir, split)
  kind = metric_kind(config)
  return lambda params: score(params).result(kind)


def make_video_scorer(config: ml_collections.ConfigDict, model, mesh, data_dir: str, split: str,
                      select: Callable[[dict], dict] = fused_logits
                      ) -> Callable[[Any], metrics.MultiViewAccumulator]:
  """Returns score(params) -> the accumulator holding every video's view-averaged logits and labels
  (`MultiViewAccumulator.videos`; on several hosts, of all hosts), compiling the eval step once.

  `select` picks the scored logits (name -> [B, C]) from the model's outputs; every name is scored
  against the labels of the head its last `/`-separated part names (e.g. `video/class`)."""
  modalities = tuple(config.model.modalities)
  step = jax.jit(make_eval_step(model, modalities, select),
                 in_shardings=(None, sharding.batch_sharding(mesh)))

  def run(params: Any) -> metrics.MultiViewAccumulator:
    accumulator = metrics.MultiViewAccumulator()
    views = input_lib.make_eval_iterator(config, data_dir, split)
    nproc = jax.process_count()
    template = None
    while True:
      batch = next(views, None)
      if nproc > 1:
        if not multihost_utils.process_allgather(np.asarray(batch is not None)).any():
          break
        if batch is None:
          batch = {k: np.zeros_like(v) for k, v in template.items()}
          batch['index'] = np.full_like(template['index'], -1)
      elif batch is None:
        break
      template = batch
      logits = step(params, sharding.global_batch({k: batch[k] for k in (*modalities, 'mask')}, mesh))
      head_labels = data_format.batch_labels(batch)
      labels = {name: head_labels[name.rsplit('/', 1)[-1]] for name in logits}
      local = (labels, batch['index'], batch['mask'])  # indices are unique across processes
      if nproc > 1:
        logits, local = multihost_utils.process_allgather((logits, local), tiled=True)
      else:
        logits = jax.device_get(logits)
      accumulator.add(logits, *local)
    return accumulator

  return run


def evaluate(config: ml_collections.ConfigDict, model, params: Any, mesh, data_dir: str,
             split: str) -> dict[str, float]:
  """Evaluates `params` on all views (`input.eval_clips` x `input.eval_crops`) of `split`.

  Padded examples (mask 0) are never counted; on several hosts, hosts that run out of views feed
  fully padded batches until all are done.
  """
  return make_evaluator(config, model, mesh, data_dir, split)(params)
