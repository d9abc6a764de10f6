"""Calibrated late fusion: the modality weights of `LogitFusion`, fitted on held-out clips.

After training, each modality's logits on the validation split (clips the model never trained on,
`avt_jax.prep.holdout`) give the weights w [M], w >= 0, sum(w) = 1, of fused = sum_m w_m logits_m
that minimise the fused prediction's negative log-likelihood there (softmax cross-entropy, or sigmoid
for multi-label data, summed over label heads). Each modality alone and the equal mean are in the
search space, so on the held-out clips the fused NLL is never above the better modality's alone or
the mean's: a modality that does not generalise, however confident it is on its training clips,
cannot drag the fused prediction below the better one (our design; the held-out estimate of each
modality's worth follows the spirit of gradient blending, Wang et al. 2020).

Why the weights sum to 1 (no free temperature): when the fused prediction gets every held-out clip
right, a free scale drives the NLL to 0 along any separating ratio of weights, so the ratio, which is
all that decides the predicted class, came out arbitrary (it did on 10 of 18 suite runs, with the
worse modality weighted up to 4x the better one). On the simplex the NLL is convex with a finite
minimum.
"""

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.optimize

from avt_jax import evaluate, metrics

FUSION_PARAMS = ('logit_fusion', 'modality_weights')
CALIBRATION_FILE = 'calibration.json'


def fused_nll(weights: jax.Array, logits: jax.Array, labels: Mapping[str, jax.Array] | jax.Array,
              multi_label: bool = False) -> jax.Array:
  """Mean NLL of sum_m weights[m] * logits[m].

  Args:
    weights: [M].
    logits: [M, N, C] per-modality logits of N clips.
    labels: [N, C] one-hot (or multi-hot with `multi_label`).
    multi_label: sigmoid binary cross-entropy summed over classes instead of softmax CE.

  Returns:
    Scalar mean over the N clips.
  """
  fused = jnp.tensordot(weights, logits, axes=1)  # [N, C]
  if multi_label:
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(fused, labels), -1))
  return jnp.mean(optax.softmax_cross_entropy(fused, labels))


def fit_weights(logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                modalities: tuple[str, ...], multi_label: bool = False) -> np.ndarray:
  """Modality weights [M] on the simplex minimising the fused NLL summed over label heads (SLSQP).

  Args:
    logits: `<modality>/<head>` -> [N, C] view-averaged logits.
    labels: `<head>` -> [N, C].
    modalities: the M modalities, in the model's order.
    multi_label: sigmoid instead of softmax.

  Returns:
    float32 [M], >= 0, summing to 1: the best of the optimiser's result and its starts (the equal
    mean and each modality alone).
  """
  stacks = {h: jnp.stack([jnp.asarray(logits[f'{m}/{h}'], jnp.float32) for m in modalities])
            for h in labels}
  objective = jax.jit(jax.value_and_grad(lambda w: sum(
      fused_nll(w, stacks[h], jnp.asarray(labels[h], jnp.float32), multi_label) for h in stacks)))

  def value_and_grad(w):
    value, grad = objective(jnp.asarray(w, jnp.float32))
    return float(value), np.asarray(grad, np.float64)

  count = len(modalities)
  starts = [np.full(count, 1.0 / count)] + [np.eye(count)[i] for i in range(count)]
  best_value, best = min((value_and_grad(w)[0], i) for i, w in enumerate(starts))
  best = starts[best]
  found = scipy.optimize.minimize(
      value_and_grad, best, jac=True, method='SLSQP', bounds=[(0.0, 1.0)] * count,
      constraints=[{'type': 'eq', 'fun': lambda w: w.sum() - 1.0, 'jac': np.ones_like}])
  w = np.clip(found.x, 0.0, 1.0)
  w = w / w.sum()
  return np.asarray(w if value_and_grad(w)[0] < best_value else best, np.float32)


def modality_scorer(config: ml_collections.ConfigDict, model, mesh, data_dir: str, split: str):
  """Returns score(params) -> (`<modality>/<head>` -> [N, C] view-averaged logits, `<head>` -> [N, C]
  labels) on `split`, all hosts' videos in one order (`evaluate.make_scorer`, compiled once)."""
  scorer = evaluate.make_scorer(config, model, mesh, data_dir)

  def score(params):
    logits, labels = {}, {}
    for m, accumulator in scorer(params, split).modalities.items():
      _, own, labels = accumulator.videos()
      logits.update({f'{m}/{h}': v for h, v in own.items()})
    return logits, labels
  return score


def calibrate(config: ml_collections.ConfigDict, params: Any, scorer) -> tuple[Any, dict[str, Any]]:
  """Fits the fusion weights on the held-out split; returns (params with them, report).

  Args:
    config: the run's config (`model.modalities`, `data.multi_label`).
    params: the trained parameters (with `logit_fusion/modality_weights`).
    scorer: `modality_scorer(...)` on the held-out split.

  Returns:
    (params, report): report = {'split', 'num_videos', 'weights': {modality: w}, and on the held-out
    clips `nll/<name>` and `top1/<name>` of each modality, the fused prediction before
    (`fused_equal`) and after (`fused`) calibration (top-1 of the first label head)}.
  """
  modalities = tuple(config.model.modalities)
  logits, head_labels = scorer(params)
  heads = sorted(head_labels)
  multi_label = bool(config.data.multi_label)
  weights = fit_weights(logits, head_labels, modalities, multi_label)
  report = {'split': config.data.calibration_split, 'num_videos': int(len(head_labels[heads[0]])),
            'weights': {m: float(w) for m, w in zip(modalities, weights)}}
  candidates = {m: np.eye(len(modalities))[i] for i, m in enumerate(modalities)}
  candidates.update(fused_equal=np.full(len(modalities), 1.0 / len(modalities)), fused=weights)
  stacks = {h: np.stack([logits[f'{m}/{h}'] for m in modalities]) for h in heads}  # [M, N, C]
  for name, w in candidates.items():
    report[f'nll/{name}'] = float(sum(fused_nll(jnp.asarray(w, jnp.float32), stacks[h],
                                                head_labels[h], multi_label) for h in heads))
    fused = np.tensordot(w, stacks[heads[0]], axes=1)
    report[f'top1/{name}'] = metrics.top_k_accuracy(fused, head_labels[heads[0]].argmax(-1), 1)
  return with_weights(params, weights), report


def with_weights(params: Any, weights: np.ndarray) -> Any:
  """A copy of the `params` tree whose `logit_fusion/modality_weights` are `weights` [M].

  Raises:
    ValueError: `params` has no such entry of M values.
  """
  params = jax.tree_util.tree_map(lambda x: x, params)  # a new tree; the arrays are shared
  node = params
  for key in FUSION_PARAMS[:-1]:
    node = node.get(key) if isinstance(node, Mapping) else None
    if node is None:
      raise ValueError(f'The parameters have no {"/".join(FUSION_PARAMS)}: not an audio-video model.')
  old = node[FUSION_PARAMS[-1]]
  if np.shape(old) != np.shape(weights):
    raise ValueError(f'{"/".join(FUSION_PARAMS)}: expected {np.shape(old)} weights, got '
                     f'{np.shape(weights)}.')
  node[FUSION_PARAMS[-1]] = jnp.asarray(weights, old.dtype)
  return params


def save(report: Mapping[str, Any], workdir: str) -> None:
  """Writes `report` as `<workdir>/calibration.json` (atomically)."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(dict(report), f, indent=2)
  os.replace(path + '.tmp', path)


def load_into(params: Any, workdir: str) -> tuple[Any, dict[str, Any] | None]:
  """`params` with the fusion weights of `<workdir>/calibration.json` when the run has one.

  Returns:
    (params, the saved report or None).
  """
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.exists(path):
    return params, None
  with open(path) as f:
    report = json.load(f)
  return with_weights(params, np.asarray(list(report['weights'].values()), np.float32)), report


def format_report(report: Mapping[str, Any]) -> str:
  """One line: the fitted weights and the held-out top-1 / NLL of each modality and of the fusion."""
  weights = ', '.join(f'{m} {w:.3f}' for m, w in report['weights'].items())
  names = [*report['weights'], 'fused_equal', 'fused']
  scores = ', '.join(f'{n} {report[f"top1/{n}"]:.3f} (NLL {report[f"nll/{n}"]:.3f})' for n in names)
  return (f'Fusion calibrated on {report["num_videos"]} held-out {report["split"]!r} clips: weights '
          f'{weights}; held-out top-1 {scores}.')
