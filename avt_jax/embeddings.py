"""Per-clip embeddings for users: search audio by video and the reverse, cluster, probe.

    python -m avt_jax.predict --workdir=DIR --embeddings=embeddings.npz clips/

For every view the model computes (inference mode, our design):
  `contrastive_<modality>` [P]  the contrastive projection (unit vector; only for models trained with
                                 the contrastive or matching objective): dot products between a
                                 video's and an audio's are the similarities InfoNCE was trained on;
  `pre_fusion_<modality>` [D]   the mean of the modality's tokens at the input of the first fused layer;
  `final_<modality>` [D]        the fused representation the classifier reads (pooled per
                                 `model.classifier`; only for models with a classifier).
A file's embedding is the mean over its evaluation views (`input.eval_clips` x `input.eval_crops`,
as `evaluate` averages logits), the contrastive ones normalised to unit length again.

The .npz file holds `paths` [F] (str) and one [F, dim] float32 array per key above, rows in the order
of `paths` (files that failed to decode are left out).
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np


def make_embed_step(model, modalities: Sequence[str], params: Mapping[str, Any]
                    ) -> Callable[[Any, Mapping[str, np.ndarray]], dict[str, jax.Array]]:
  """Returns embed(params, inputs) -> key -> [views, dim] for the keys of the module docstring.

  Args:
    model: the run's AVT.
    modalities: the model's modalities.
    params: the model's parameters (which heads exist decides which keys are computed).

  Raises:
    ValueError: the model has neither contrastive projections nor a classifier.
  """
  has_contrastive = any(k.startswith('contrastive_projection_') for k in params)
  has_classifier = 'classifier' in params
  objectives = tuple(o for o, present in (('contrastive', has_contrastive),
                                          ('classification', has_classifier)) if present)
  if not objectives:
    raise ValueError('embeddings: the model has neither contrastive projections nor a classifier.')

  def embed(params, inputs):
    inputs = {k: inputs[k] for k in modalities}
    out = model.apply({'params': params}, inputs, train=False, objectives=objectives)
    found = {f'pre_fusion_{m}': v for m, v in out['features']['pre_fusion'].items()}
    found.update({f'final_{m}': v for m, v in out['features'].get('final', {}).items()})
    if 'contrastive' in out:
      found.update({f'contrastive_{m}': out['contrastive'][m] for m in modalities})
    return found

  return embed


def clip_embedding(views: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
  """key -> [views, dim] of one clip (`mask` [views], 1 = real view) -> key -> [dim] float32: the
  mean over real views, contrastive keys normalised to unit length."""
  keep = np.asarray(mask) > 0
  out = {}
  for key, value in views.items():
    mean = np.mean(np.asarray(value, np.float64)[keep], axis=0)
    if key.startswith('contrastive_'):
      mean = mean / max(np.linalg.norm(mean), 1e-12)
    out[key] = mean.astype(np.float32)
  return out


def save(path: str, paths: Sequence[str], embeddings: Sequence[Mapping[str, np.ndarray]]) -> None:
  """Writes the .npz file of the module docstring (`embeddings[i]` belongs to `paths[i]`)."""
  keys = sorted(embeddings[0]) if embeddings else []
  arrays = {k: np.stack([e[k] for e in embeddings]) for k in keys}
  with open(path, 'wb') as f:
    np.savez(f, paths=np.asarray(list(paths), dtype=str), **arrays)
