"""Evaluation metrics (pure numpy) and multi-view aggregation per video.

Conventions, chosen here and used by every function below:

- Top-k ties are counted against the label: a sample is correct when fewer than
  k *other* classes score at least as high as the label, so a constant score row
  is never counted correct (k >= number of classes is always correct).
- Mean average precision is the mean, over the classes that have at least one
  positive, of the average precision as scikit-learn defines it (step-wise
  area under the precision-recall curve, tied scores form one threshold).
  Classes without positives have no defined AP and are left out.
- Multi-view evaluation averages the *logits* of a video's views (clips x
  crops), then scores the averaged logits. For softmax heads this equals
  averaging log-probabilities up to a per-video constant (top-k unchanged).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

KINDS = ('single_label', 'multi_label', 'multi_head')
JOINT = 'action'  # the multi-head joint score: every head right (EPIC-Kitchens' "action")


def score_names(kind: str, heads: Sequence[str] = ('class',)) -> tuple[str, ...]:
  """The scores `MultiViewAccumulator.result` returns for `kind` (besides 'num_videos').

  The first is the kind's headline number (the default `config.train.best_metric`): 'top1', 'mAP',
  or for multi-head labels 'action_top1' (all heads right), then `<head>_top1`, `<head>_top5` per
  head in the given order.
  """
  if kind not in KINDS:
    raise ValueError(f'kind: expected one of {KINDS}, got {kind!r}.')
  if kind == 'multi_head':
    return (f'{JOINT}_top1', *(f'{h}_top{k}' for h in heads for k in (1, 5)))
  return ('top1', 'top5', 'mAP') if kind == 'single_label' else ('mAP',)


def modality_score_names(kind: str, heads: Sequence[str] = ('class',)) -> tuple[str, ...]:
  """The scores reported for each modality's own logits (as `modality_<score>/<modality>`): the
  top-1 scores of `kind` ('top1'; 'mAP' for multi-label; the joint and each head's top-1)."""
  if kind == 'multi_label':
    return ('mAP',)
  return tuple(s for s in score_names(kind, heads) if s.endswith('top1'))


def _as_2d(name: str, array: np.ndarray, dims: str = 'N, C') -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f'{name}: expected shape [{dims}], got {array.shape}.')
  return array


def _top_k_correct(logits: np.ndarray, labels: np.ndarray, k: int,
                   names: tuple[str, str] = ('logits', 'labels')) -> np.ndarray:
  """[N] bool: fewer than k other classes score at least as high as the label.

  `names` are the argument names that error messages use.
  """
  logits_name, labels_name = names
  logits = _as_2d(logits_name, logits)
  labels = np.asarray(labels)
  num, num_classes = logits.shape
  if labels.shape != (num,):
    raise ValueError(f'{labels_name}: expected shape [{num}] to match '
                     f'{logits_name} {logits.shape}, got {labels.shape}.')
  if num == 0:
    raise ValueError(f'{logits_name}: expected at least one sample, got N = 0.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{labels_name}: expected integer class ids, got '
                     f'{labels.dtype}.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'{labels_name}: expected class ids in [0, {num_classes}),'
                     f' got range [{labels.min()}, {labels.max()}].')
  if k < 1:
    raise ValueError(f'k: expected >= 1, got {k}.')
  label_scores = logits[np.arange(num), labels][:, None]  # [N, 1]
  rivals = (logits >= label_scores).sum(axis=1) - 1  # [N]
  return rivals < k


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of samples whose label is among the k highest scores.

  Args:
    logits: [N, C] scores (logits or probabilities).
    labels: [N] integer class ids in [0, C).
    k: how many top classes count as correct, >= 1.

  Returns:
    Accuracy in [0, 1]; ties count against the label (see module docstring).
  """
  return float(np.mean(_top_k_correct(logits, labels, k)))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """Average precision of one class (scikit-learn's definition).

  Args:
    scores: [N] scores; higher means more likely positive.
    targets: [N] 0/1 (or bool) ground truth with at least one positive.

  Returns:
    sum over distinct score thresholds t (high to low) of
    precision(t) * (recall(t) - recall(previous t)).
  """
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets).astype(bool)
  num_positives = targets.sum()
  if num_positives == 0:
    raise ValueError('targets: average precision needs at least one positive.')
  order = np.argsort(-scores, kind='stable')
  sorted_scores, sorted_targets = scores[order], targets[order]
  true_positives = np.cumsum(sorted_targets)  # [N]
  # Last position of each run of equal scores: one threshold per run.
  run_ends = np.flatnonzero(np.diff(sorted_scores, append=-np.inf) != 0)
  true_positives = true_positives[run_ends]
  precision = true_positives / (run_ends + 1)
  recall_gain = np.diff(true_positives, prepend=0) / num_positives
  return float(np.sum(precision * recall_gain))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """Mean AP over the classes that have at least one positive.

  Args:
    scores: [N, C] scores (logits or probabilities).
    targets: [N, C] multi-hot 0/1 ground truth.

  Returns:
    The mean of `average_precision` over classes with a positive.
  """
  scores = _as_2d('scores', scores)
  targets = _as_2d('targets', targets)
  if scores.shape != targets.shape:
    raise ValueError(f'targets: expected shape {scores.shape} to match scores, '
                     f'got {targets.shape}.')
  if not np.isin(targets, (0, 1)).all():
    raise ValueError('targets: expected multi-hot values in {0, 1}.')
  classes = np.flatnonzero(targets.sum(axis=0) > 0)
  if classes.size == 0:
    raise ValueError('targets: no class has a positive; mAP is undefined.')
  return float(np.mean(
      [average_precision(scores[:, c], targets[:, c]) for c in classes]))


def multi_head_accuracies(logits: Mapping[str, np.ndarray],
                          labels: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-head accuracies and the joint one, for any two or more heads (e.g. EPIC verb + noun).

  Args:
    logits: head -> [N, C_head] scores.
    labels: head -> [N] class ids, the same heads.

  Returns:
    `<head>_top1` and `<head>_top5` per head, and `action_top1`: the fraction of samples whose
    top-1 is right on every head (EPIC-Kitchens' action accuracy for verb + noun).

  Raises:
    ValueError: fewer than two heads, different heads in `labels`, or bad shapes (naming them).
  """
  if len(logits) < 2 or set(labels) != set(logits):
    raise ValueError(f'labels: expected the same two or more heads as logits {sorted(logits)}, '
                     f'got {sorted(labels)}.')
  results, joint = {}, None
  for head, head_logits in logits.items():
    names = (f'logits[{head!r}]', f'labels[{head!r}]')
    right = _top_k_correct(head_logits, labels[head], 1, names)  # [N]
    if joint is not None and len(right) != len(joint):
      raise ValueError(f'{names[0]}: expected {len(joint)} rows like the other heads, got '
                       f'{len(right)}.')
    joint = right if joint is None else joint & right
    results[f'{head}_top1'] = float(np.mean(right))
    results[f'{head}_top5'] = float(np.mean(_top_k_correct(head_logits, labels[head], 5, names)))
  return {f'{JOINT}_top1': float(np.mean(joint)), **results}


_RETRIEVAL_CHUNK = 1024  # queries scored at once


def retrieval_recall(queries: np.ndarray, gallery: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k of cross-modal retrieval where query i's true partner is gallery item i.

  Protocol (as CAV-MAE reports audio-video retrieval; the gallery is every item of the other
  modality): each query is scored against all N gallery items by dot product (cosine similarity
  for unit vectors); its rank is the number of *other* gallery items that score at least as high as
  its partner, so ties count against the query (a constant similarity row never retrieves).
  R@k is the fraction of queries with rank < k.

  Args:
    queries: [N, P] embeddings of one modality.
    gallery: [N, P] embeddings of the other modality, row i the partner of query i.
    ks: the k of each recall, >= 1 (k >= N always retrieves).

  Returns:
    {'R@<k>': recall in [0, 1]} for each k.

  Raises:
    ValueError: shapes that are not two [N, P] arrays with N >= 1, or k < 1.
  """
  queries, gallery = _as_2d('queries', queries, 'N, P'), _as_2d('gallery', gallery, 'N, P')
  if queries.shape != gallery.shape or len(queries) == 0:
    raise ValueError(f'gallery: expected shape {queries.shape} like queries (N >= 1), got '
                     f'{gallery.shape}.')
  if min(ks) < 1:
    raise ValueError(f'ks: expected values >= 1, got {tuple(ks)}.')
  queries, gallery = queries.astype(np.float64), gallery.astype(np.float64)
  ranks = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), _RETRIEVAL_CHUNK):  # bounds memory to chunk x N
    rows = np.arange(start, min(start + _RETRIEVAL_CHUNK, len(queries)))
    similarity = queries[rows] @ gallery.T  # [chunk, N]
    # The partner's score from the same product (a separate dot product may differ in the last bit).
    partner = similarity[np.arange(len(rows)), rows][:, None]  # [chunk, 1]
    ranks[rows] = (similarity >= partner).sum(axis=1) - 1
  return {f'R@{k}': float(np.mean(ranks < k)) for k in ks}


def _one_hot_to_ids(head: str, labels: np.ndarray) -> np.ndarray:
  """[V, C] one-hot -> [V] class ids; raises if a row is not one-hot."""
  if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
    raise ValueError(f'labels[{head!r}]: expected one-hot rows for a '
                     'single-label metric.')
  return labels.argmax(axis=1)


class MultiViewAccumulator:
  """Averages the logits of each video's views and scores the videos.

  Evaluation feeds every view (temporal clip x spatial crop) of a video as a
  separate row, tagged with the video's index; padding rows carry mask 0 and
  are ignored. Memory grows with the number of videos, not views.

  Example:
      acc = MultiViewAccumulator()
      for batch in eval_batches:
        acc.add({'class': logits}, {'class': batch['label']},
                batch['video_index'], batch['mask'])
      acc.result('single_label')  # {'top1': ..., 'top5': ..., 'num_videos': ...}
  """

  def __init__(self):
    self._slot_of_video: dict[int, int] = {}
    self._num_classes: dict[str, int] | None = None
    self._logit_sums: dict[str, np.ndarray] = {}  # head -> [capacity, C]
    self._labels: dict[str, np.ndarray] = {}  # head -> [capacity, C]
    self._view_counts = np.zeros(0, np.int64)  # [capacity]

  @property
  def num_videos(self) -> int:
    return len(self._slot_of_video)

  def add(
      self,
      logits: Mapping[str, np.ndarray],
      labels: Mapping[str, np.ndarray],
      index: np.ndarray,
      mask: np.ndarray,
  ) -> None:
    """Adds a batch of views.

    Args:
      logits: head name -> [B, C] logits of each view.
      labels: head name -> [B, C] one-hot (single label) or multi-hot labels.
      index: [B] integer id of the video each view belongs to.
      mask: [B] 1 for real views, 0 for padding (skipped).

    Raises:
      ValueError: inconsistent heads or shapes, or a video whose views carry
        different labels; no view of a rejected batch is added.
    """
    index, mask = np.asarray(index), np.asarray(mask)
    if index.ndim != 1 or mask.shape != index.shape:
      raise ValueError(f'index, mask: expected two [B] vectors, got '
                       f'{index.shape} and {mask.shape}.')
    if not np.issubdtype(index.dtype, np.integer):
      raise ValueError(f'index: expected integer video ids, got {index.dtype}.')
    logits = {h: np.asarray(v, np.float64) for h, v in logits.items()}
    labels = {h: np.asarray(v) for h, v in labels.items()}
    self._check_heads(logits, labels, len(index))

    keep = np.flatnonzero(mask.astype(bool))
    videos, first, inverse = np.unique(
        index[keep], return_index=True, return_inverse=True)  # [U], [U], [K]
    slots = np.array([self._slot_of_video.get(v, -1) for v in videos.tolist()],
                     np.int64)  # [U], -1 for videos not seen before
    seen = slots >= 0
    for head in logits:
      head_labels = labels[head][keep]  # [K, C]
      reference = head_labels[first]  # [U, C]
      reference[seen] = self._labels[head][slots[seen]]
      wrong = np.flatnonzero((reference[inverse] != head_labels).any(axis=1))
      if wrong.size:
        raise ValueError(
            f'labels[{head!r}]: video {index[keep][wrong[0]]} has views with '
            'different labels.')

    new_slots = np.arange(self.num_videos, self.num_videos + (~seen).sum())
    slots[~seen] = new_slots
    self._slot_of_video.update(zip(videos[~seen].tolist(), new_slots.tolist()))
    self._grow(self.num_videos)
    for head in logits:
      self._labels[head][new_slots] = labels[head][keep][first[~seen]]
      np.add.at(self._logit_sums[head], slots[inverse], logits[head][keep])
    np.add.at(self._view_counts, slots[inverse], 1)

  def result(self, kind: str) -> dict[str, float]:
    """Scores the view-averaged logits of every video seen so far.

    Args:
      kind: 'single_label' (one head: top1, top5, mAP), 'multi_label' (one head:
        mAP) or 'multi_head' (two or more heads: `multi_head_accuracies`).

    Returns:
      The metrics plus 'num_videos'.
    """
    if kind not in KINDS:
      raise ValueError(f'kind: expected one of {KINDS}, got {kind!r}.')
    _, mean_logits, labels = self.videos()
    count = self.num_videos
    if kind == 'multi_head':
      if len(mean_logits) < 2:
        raise ValueError(f"kind 'multi_head': expected two or more heads, got "
                         f'{sorted(mean_logits)}.')
      results = multi_head_accuracies(
          mean_logits, {h: _one_hot_to_ids(h, labels[h]) for h in mean_logits})
    else:
      if len(mean_logits) != 1:
        raise ValueError(f'kind {kind!r}: expected one head, got '
                         f'{sorted(mean_logits)}.')
      (head, head_logits), = mean_logits.items()
      if kind == 'single_label':
        ids = _one_hot_to_ids(head, labels[head])
        # mAP over the one-hot targets ranks videos by their class logit (VGGSound reports it).
        results = {'top1': top_k_accuracy(head_logits, ids, 1),
                   'top5': top_k_accuracy(head_logits, ids, 5),
                   'mAP': mean_average_precision(head_logits, labels[head])}
      else:
        results = {'mAP': mean_average_precision(head_logits, labels[head])}
    results['num_videos'] = count
    return results

  def videos(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The videos seen so far in the order they were first added.

    Returns:
      (index [videos] as given to `add`, head -> [videos, C] view-averaged logits, head -> [videos, C]
      labels).

    Raises:
      ValueError: no (unmasked) view was added.
    """
    if not self._slot_of_video:
      raise ValueError('MultiViewAccumulator: no (unmasked) views were added.')
    count = self.num_videos
    index = np.zeros(count, np.int64)
    index[list(self._slot_of_video.values())] = list(self._slot_of_video)
    mean_logits = {h: s[:count] / self._view_counts[:count, None] for h, s in self._logit_sums.items()}
    return index, mean_logits, {h: l[:count] for h, l in self._labels.items()}

  def _check_heads(self, logits: Mapping[str, np.ndarray],
                   labels: Mapping[str, np.ndarray], batch: int) -> None:
    """Validates shapes and that heads / classes match earlier batches."""
    if not logits:
      raise ValueError('logits: expected at least one head.')
    if set(labels) != set(logits):
      raise ValueError(f'labels: expected the heads of logits {sorted(logits)}, '
                       f'got {sorted(labels)}.')
    for head, head_logits in logits.items():
      if head_logits.ndim != 2 or head_logits.shape[0] != batch:
        raise ValueError(f'logits[{head!r}]: expected shape [{batch}, C], got '
                         f'{head_logits.shape}.')
      if labels[head].shape != head_logits.shape:
        raise ValueError(f'labels[{head!r}]: expected shape '
                         f'{head_logits.shape} like the logits, got '
                         f'{labels[head].shape}.')
    num_classes = {h: v.shape[1] for h, v in logits.items()}
    if self._num_classes is None:
      self._num_classes = num_classes
      for head, classes in num_classes.items():
        self._logit_sums[head] = np.zeros((0, classes), np.float64)
        self._labels[head] = np.zeros((0, classes), np.float32)
    elif num_classes != self._num_classes:
      raise ValueError(f'logits: expected heads/classes {self._num_classes} '
                       f'as in earlier batches, got {num_classes}.')

  def _grow(self, needed: int) -> None:
    """Makes the running arrays hold at least `needed` videos."""
    capacity = len(self._view_counts)
    if needed <= capacity:
      return
    new_capacity = max(needed, 2 * capacity, 64)
    extra = new_capacity - capacity
    self._view_counts = np.concatenate(
        [self._view_counts, np.zeros(extra, np.int64)])
    for head in self._logit_sums:
      self._logit_sums[head] = np.pad(self._logit_sums[head], ((0, extra), (0, 0)))
      self._labels[head] = np.pad(self._labels[head], ((0, extra), (0, 0)))
