"""Multi-view evaluation: every view of every video through the model, logits averaged per video;
each modality's own logits scored the same way; cross-modal retrieval of the contrastive space.

Score names (keys of the metrics dicts, TensorBoard `eval/<key>` and `train_eval/<key>`, and
results.json's `eval` and `train_eval`; our design):

- the fused classifier's scores (`metrics.score_names`): `top1`, `top5`, `mAP`; `mAP` (multi-label);
  `action_top1`, `<head>_top1`, `<head>_top5` (several label heads);
- each modality's own classifier output (the model's `modality_logits`), view-averaged like the
  fused logits: `modality_<score>/<modality>` for the top-1 scores (`metrics.modality_score_names`),
  e.g. `modality_top1/video`, `modality_verb_top1/audio`, `modality_mAP/audio`;
- with the contrastive objective trained (both modalities): `retrieval/v2a_R@<k>` and
  `retrieval/a2v_R@<k>` for k in `RECALL_KS` (see `make_scorer`'s retrieval protocol);
- with a masked objective trained (`masked_video`, `masked_audio`, `masked_audio_segment`):
  `reconstruction/<objective>`, its loss on the split's held-out clips (one view per clip, fixed
  masks), next to `reconstruction/<objective>_patch_mean`, the patch-mean baseline's loss on the
  same masked patches (`losses.patch_mean_loss`); a decoder that learned something is below it;
- `num_videos`.
"""

import math
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from avt_jax import data_format, input as input_lib, losses, metrics, sharding
from avt_jax.models.build import objectives as config_objectives

RECALL_KS = (1, 5, 10)
DIRECTIONS = {'v2a': ('video', 'audio'), 'a2v': ('audio', 'video')}  # name -> (query, gallery)


def metric_kind(config: ml_collections.ConfigDict) -> str:
  """'multi_head' (e.g. EPIC verb+noun), 'multi_label' (sigmoid) or 'single_label'."""
  if len(config.data.label_heads) > 1:
    return 'multi_head'
  return 'multi_label' if config.data.multi_label else 'single_label'


def make_eval_step(model, modalities):
  def eval_step(params, batch):
    inputs = {k: batch[k] for k in (*modalities, 'mask')}
    return model.apply({'params': params}, inputs, train=False, objectives=('classification',))['logits']
  return eval_step


def has_classifier(config: ml_collections.ConfigDict) -> bool:
  """Whether the model has a classifier to evaluate (a classification weight > 0; a config
  without any objective initialises one too, see `train_step`)."""
  objectives = config_objectives(config)
  return 'classification' in objectives or not objectives


def has_retrieval(config: ml_collections.ConfigDict) -> bool:
  """Whether evaluation reports retrieval: the contrastive objective is trained (weight > 0, which
  needs both modalities)."""
  return ('contrastive' in config_objectives(config)
          and {'video', 'audio'} <= set(config.model.modalities))


def reconstruction_objectives(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The trained masked objectives, whose held-out losses evaluation reports."""
  return tuple(o for o in config_objectives(config) if o in losses.RECONSTRUCTION)


def score_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The scores evaluation returns for this config (besides 'num_videos'); the first is the
  headline (the classifier's, or v2a R@1 for a run without a classifier)."""
  names = ()
  if has_classifier(config):
    kind, heads = metric_kind(config), tuple(config.data.label_heads)
    names = metrics.score_names(kind, heads) + tuple(
        f'modality_{score}/{m}' for m in config.model.modalities
        for score in metrics.modality_score_names(kind, heads))
  if has_retrieval(config):
    names += tuple(f'retrieval/{d}_R@{k}' for d in DIRECTIONS for k in RECALL_KS)
  for o in reconstruction_objectives(config):
    names += (f'reconstruction/{o}', f'reconstruction/{o}_patch_mean')
  return names


class Scored(NamedTuple):
  """What one evaluation pass over a split holds.

  Attributes:
    videos: the fused logits averaged over each video's views (None without a classifier).
    modalities: modality -> the same for that modality's own logits (`modality_logits`).
    metrics: every score of `score_names` for this pass, plus 'num_videos'.
  """
  videos: metrics.MultiViewAccumulator | None
  modalities: dict[str, metrics.MultiViewAccumulator]
  metrics: dict[str, float]


def make_scoring_step(model, modalities, objectives):
  """eval step(params, batch) -> `logits` and `modality_logits` (with classification) and the
  contrastive projections `video`, `audio` [B, P] (with contrastive), in one compiled function."""
  def step(params, batch):
    inputs = {k: batch[k] for k in (*modalities, 'mask')}
    out = model.apply({'params': params}, inputs, train=False, objectives=objectives)
    result = {k: out[k] for k in ('logits', 'modality_logits') if k in out}
    if 'contrastive' in out:
      result['embeddings'] = {m: out['contrastive'][m] for m in modalities}
    return result
  return step


def make_reconstruction_step(model, modalities, objectives, normalize_target: bool):
  """step(params, batch, rng) -> objective -> [3] (summed loss, summed patch-mean baseline loss,
  number of masked patches of valid clips); masks drawn from `rng`."""
  def step(params, batch, rng):
    inputs = {k: batch[k] for k in (*modalities, 'mask')}
    out = model.apply({'params': params}, inputs, train=False, objectives=objectives,
                      rngs={'masking': rng})
    mask = batch['mask'].astype(jnp.float32)
    result = {}
    for o in objectives:
      r = out[o]
      count = jnp.sum(r['mask'] * mask[:, None])
      loss = losses.masked_reconstruction_loss(r['pred'], r['target'], r['mask'], mask,
                                               normalize_target)
      baseline = losses.patch_mean_loss(r['target'], r['mask'], mask, normalize_target)
      result[o] = jnp.stack([loss * count, baseline * count, count])
    return result
  return step


def _single_view(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with one view per clip: the centre clip (window start max_start // 2), centre crop."""
  single = config.copy_and_resolve_references()
  with single.unlocked():
    single.input.eval_clips, single.input.eval_crops = 1, 1
  return single


def make_scorer(config: ml_collections.ConfigDict, model, mesh, data_dir: str
                ) -> Callable[..., Scored]:
  """Returns score(params, split, max_videos=0) -> `Scored`, compiling one eval step for all calls
  and splits (training evaluates every `train.eval_every` steps on two splits).

  Classification: every view (`input.eval_clips` x `input.eval_crops`) through the model; the fused
  and each modality's logits are averaged over a video's views, then scored (`metrics`).

  Retrieval (when `has_retrieval`; protocol of CAV-MAE's audio-video retrieval, our choice of view):
  one view per clip, the centre clip and centre crop (as with eval_clips = eval_crops = 1; a second
  pass over the split when the config evaluates more views); the model's contrastive projections
  (unit vectors of the pre-fusion features) of every clip in the split, gathered over batches and
  hosts; video->audio queries each video against the audio of all clips of the split (gallery) and
  finds the rank of its own clip's audio, audio->video the reverse; ties count against the query
  (`metrics.retrieval_recall`). Padded examples (mask 0) are never queries nor in the gallery.

  `max_videos` > 0 scores only the first `max_videos` videos of the split in the reader's order
  (deterministic; on P hosts the first ceil(max_videos / P) of each host's share).

  Every host returns the metrics of all hosts' videos: hosts that run out of views feed fully padded
  batches until all are done, and the outputs are gathered with `process_allgather`.
  """
  modalities = tuple(config.model.modalities)
  classify, retrieve = has_classifier(config), has_retrieval(config)
  objectives = ('classification',) * classify + ('contrastive',) * retrieve
  step = jax.jit(make_scoring_step(model, modalities, objectives),
                 in_shardings=(None, sharding.batch_sharding(mesh)))
  kind, heads = metric_kind(config), tuple(config.data.label_heads)
  single = _single_view(config)
  views_per_clip = int(config.input.eval_clips) * int(config.input.eval_crops)
  masked = reconstruction_objectives(config)
  masked_step = jax.jit(make_reconstruction_step(model, modalities, masked,
                                                 bool(config.loss.normalize_target)),
                        in_shardings=(None, sharding.batch_sharding(mesh), None))

  def reconstruction(params, split, max_videos) -> dict[str, float]:
    """Held-out masked losses and their patch-mean baselines (one view per clip; batch i's masks
    from PRNGKey(0) folded with i, the same at every evaluation)."""
    totals = {o: np.zeros(3) for o in masked}
    for i, batch in enumerate(_host_batches(single, data_dir, split, max_videos)):
      out = masked_step(params, sharding.global_batch({k: batch[k] for k in (*modalities, 'mask')},
                                                      mesh),
                        jax.random.fold_in(jax.random.PRNGKey(0), i))
      out = multihost_utils.process_allgather(out) if jax.process_count() > 1 else out
      for o in masked:
        totals[o] += np.asarray(jax.device_get(out[o]), np.float64).reshape(-1, 3)[0]
    results = {}
    for o, (loss, baseline, count) in totals.items():
      results[f'reconstruction/{o}'] = float(loss / max(count, 1.0))
      results[f'reconstruction/{o}_patch_mean'] = float(baseline / max(count, 1.0))
    return results

  def outputs(params, view_config, split, max_videos) -> Iterator[tuple[dict, dict, np.ndarray,
                                                                        np.ndarray]]:
    for batch in _host_batches(view_config, data_dir, split, max_videos):
      out = step(params, sharding.global_batch({k: batch[k] for k in (*modalities, 'mask')}, mesh))
      local = (data_format.batch_labels(batch), batch['index'], batch['mask'])
      if jax.process_count() > 1:  # indices are unique across processes
        out, local = multihost_utils.process_allgather((out, local), tiled=True)
      else:
        out = jax.device_get(out)
      yield (out, *local)

  def score(params: Any, split: str, max_videos: int = 0) -> Scored:
    videos, per_modality, results, embeddings = None, {}, {}, None
    if classify:
      videos = metrics.MultiViewAccumulator()
      per_modality = {m: metrics.MultiViewAccumulator() for m in modalities}
      embeddings = _Embeddings() if retrieve and views_per_clip == 1 else None
      for out, labels, index, mask in outputs(params, config, split, max_videos):
        videos.add(out['logits'], labels, index, mask)
        for m in modalities:
          per_modality[m].add(out['modality_logits'][m], labels, index, mask)
        if embeddings is not None:
          embeddings.add(out['embeddings'], index, mask)
      results = videos.result(kind)
      for m, accumulator in per_modality.items():
        own = accumulator.result(kind)
        results.update({f'modality_{s}/{m}': own[s]
                        for s in metrics.modality_score_names(kind, heads)})
    if retrieve:
      if embeddings is None:
        embeddings = _Embeddings()
        for out, _, index, mask in outputs(params, single, split, max_videos):
          embeddings.add(out['embeddings'], index, mask)
      results.update(embeddings.recall())
      results.setdefault('num_videos', embeddings.num_videos)
    if masked:
      results.update(reconstruction(params, split, max_videos))
    return Scored(videos, per_modality, results)

  return score


class _Embeddings:
  """Collects each clip's contrastive projections (one row per clip) for retrieval recall."""

  def __init__(self):
    self._rows: dict[str, list[np.ndarray]] = {}
    self._index: list[np.ndarray] = []

  def add(self, embeddings: dict[str, np.ndarray], index: np.ndarray, mask: np.ndarray) -> None:
    keep = np.asarray(mask).astype(bool)
    self._index.append(np.asarray(index)[keep])
    for m, rows in embeddings.items():
      self._rows.setdefault(m, []).append(np.asarray(rows, np.float32)[keep])

  @property
  def num_videos(self) -> int:
    return int(sum(len(i) for i in self._index))

  def recall(self) -> dict[str, float]:
    """`retrieval/<direction>_R@<k>` over all clips added, in the order of their index."""
    order = np.argsort(np.concatenate(self._index), kind='stable')
    if len(np.unique(np.concatenate(self._index))) != len(order):
      raise ValueError('retrieval: a clip was added twice (expected one view per clip).')
    rows = {m: np.concatenate(r)[order] for m, r in self._rows.items()}
    results = {}
    for name, (query, gallery) in DIRECTIONS.items():
      recall = metrics.retrieval_recall(rows[query], rows[gallery], RECALL_KS)
      results.update({f'retrieval/{name}_{k}': v for k, v in recall.items()})
    return results


def _host_batches(config: ml_collections.ConfigDict, data_dir: str, split: str,
                  max_videos: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's eval batches of `split`; with several hosts, all hosts yield the same number of
  batches (fully padded ones after their own run out). `max_videos` > 0 keeps the first
  ceil(max_videos / hosts) videos of this host (later views masked out, reading stops)."""
  views = input_lib.make_eval_iterator(config, data_dir, split)
  nproc = jax.process_count()
  limit = math.ceil(max_videos / nproc) if max_videos > 0 else None
  kept: set[int] = set()
  template, done = None, False
  while True:
    batch = None if done else next(views, None)
    if nproc > 1:
      if not multihost_utils.process_allgather(np.asarray(batch is not None)).any():
        return
      if batch is None:
        batch = {k: np.zeros_like(v) for k, v in template.items()}
        batch['index'] = np.full_like(template['index'], -1)
    elif batch is None:
      return
    template = batch
    if limit is not None:
      batch, done = _first_videos(batch, kept, limit)
    yield batch


def _first_videos(batch: dict[str, np.ndarray], kept: set[int], limit: int
                  ) -> tuple[dict[str, np.ndarray], bool]:
  """Masks out the views of videos after the first `limit` (`kept` holds those seen so far, in
  stream order); returns (batch, whether a later video appeared: nothing after it is needed)."""
  mask = batch['mask'].copy()
  beyond = False
  for row, (video, real) in enumerate(zip(batch['index'].tolist(), mask.tolist())):
    if not real:
      continue
    if video not in kept and len(kept) >= limit:
      mask[row], beyond = 0, True
    else:
      kept.add(video)
  return {**batch, 'mask': mask}, beyond


def make_video_scorer(config: ml_collections.ConfigDict, model, mesh, data_dir: str, split: str
                      ) -> Callable[[Any], metrics.MultiViewAccumulator]:
  """Returns score(params) -> the accumulator holding every video's view-averaged logits and labels
  (`MultiViewAccumulator.videos`; on several hosts, of all hosts), compiling the eval step once."""
  score = make_scorer(config, model, mesh, data_dir)
  return lambda params: score(params, split).videos


def evaluate(config: ml_collections.ConfigDict, model, params: Any, mesh, data_dir: str,
             split: str) -> dict[str, float]:
  """Evaluates `params` once on all views (`input.eval_clips` x `input.eval_crops`) of `split`
  (`make_scorer`; the training loop's repeated evaluation is `avt_jax.train.make_evaluator`).

  Padded examples (mask 0) are never counted; on several hosts, hosts that run out of views feed
  fully padded batches until all are done.
  """
  return make_scorer(config, model, mesh, data_dir)(params, split).metrics
