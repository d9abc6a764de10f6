"""The AVT objectives as pure functions of model outputs and batch labels, and `OBJECTIVE_TABLE`,
the one list of the objectives (name, the model pass that computes its outputs, its loss term, the
modalities it needs) that the model, the configs and the loss read.

Every loss takes an example mask [B] (1 = real, 0 = padding) so padded examples never count.
"""

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from avt_jax import data_format


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy of [B, C] logits against [B, C] (one-hot or soft) labels."""
  classes = labels.shape[-1]
  labels = labels * (1.0 - label_smoothing) + label_smoothing / classes
  return _masked_mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), labels), mask)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Multi-label binary cross-entropy, summed over classes, averaged over examples."""
  labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
  per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels), -1)
  return _masked_mean(per_example, mask)


def classification_loss(logits: Mapping[str, jax.Array], labels: Mapping[str, jax.Array],
                        mask: jax.Array, *, multi_label: bool = False,
                        label_smoothing: float = 0.0) -> jax.Array:
  """Softmax CE (or sigmoid BCE if `multi_label`), summed over label heads (e.g. verb + noun)."""
  fn = sigmoid_cross_entropy if multi_label else softmax_cross_entropy
  return sum(fn(logits[h], labels[h], mask, label_smoothing) for h in logits)


def info_nce(video: jax.Array, audio: jax.Array, logit_scale: jax.Array, mask: jax.Array
             ) -> jax.Array:
  """Symmetric InfoNCE over the (global) batch.

  Args:
    video: [B, P] unit vectors.
    audio: [B, P] unit vectors; (video[i], audio[i]) are the positive pairs.
    logit_scale: inverse temperature.
    mask: [B]; padded examples are neither anchors nor negatives.

  Returns:
    0.5 * (video->audio CE + audio->video CE), averaged over valid anchors.
  """
  logits = logit_scale * video.astype(jnp.float32) @ audio.astype(jnp.float32).T  # [B, B]
  valid = mask.astype(bool)
  logits = jnp.where(valid[None, :] & valid[:, None], logits, -1e9)
  targets = jnp.arange(logits.shape[0])
  v2a = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  a2v = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return 0.5 * (_masked_mean(v2a, mask) + _masked_mean(a2v, mask))


def matching_loss(positive: jax.Array, negative: jax.Array, negative_valid: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """Binary cross-entropy: true pairs labelled 1, sampled hard negatives labelled 0.

  Args:
    positive: [B] logits of the true pairs.
    negative: [K] logits of negative pairs.
    negative_valid: [K] 1 for negatives that exist (valid example with a valid partner).
    mask: [B] valid examples.

  Returns:
    Mean BCE over all valid positive and negative pairs.
  """
  pos = optax.sigmoid_binary_cross_entropy(positive.astype(jnp.float32), jnp.ones_like(positive))
  neg = optax.sigmoid_binary_cross_entropy(negative.astype(jnp.float32), jnp.zeros_like(negative))
  total = jnp.sum(pos * mask) + jnp.sum(neg * negative_valid)
  return total / jnp.maximum(jnp.sum(mask) + jnp.sum(negative_valid), 1.0)


def masked_reconstruction_loss(pred: jax.Array, target: jax.Array, patch_mask: jax.Array,
                               mask: jax.Array, normalize_target: bool = True) -> jax.Array:
  """MSE on masked patches only (MAE), used for masked video, masked audio and masked segments.

  Args:
    pred: [B, N, P] predictions.
    target: [B, N, P] patch values.
    patch_mask: [B, N], 1 where the patch was masked (only those count).
    mask: [B] valid examples.
    normalize_target: normalise each target patch to zero mean, unit variance (eps 1e-6).

  Returns:
    Mean over masked patches of valid examples of the per-patch mean squared error.
  """
  target = target.astype(jnp.float32)
  if normalize_target:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # [B, N]
  weights = patch_mask * mask[:, None]
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def patch_mean_loss(target: jax.Array, patch_mask: jax.Array, mask: jax.Array,
                    normalize_target: bool = True) -> jax.Array:
  """`masked_reconstruction_loss` of the patch-mean baseline: predicting each masked patch's own
  mean value (an oracle that knows only each patch's brightness; with normalised targets the
  prediction is 0 and the loss var / (var + 1e-6), about 1). Shapes as there."""
  if normalize_target:
    pred = jnp.zeros_like(target, jnp.float32)
  else:
    pred = jnp.broadcast_to(jnp.mean(target.astype(jnp.float32), -1, keepdims=True), target.shape)
  return masked_reconstruction_loss(pred, target, patch_mask, mask, normalize_target)


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """The config's loss options that `total_loss` hands to every term (see there)."""
  multi_label: bool = False
  label_smoothing: float = 0.0
  normalize_target: bool = True
  modality_weight: float = 0.0


def _classification_term(outputs: Mapping, batch: Mapping[str, jax.Array], mask: jax.Array,
                         o: LossOptions) -> jax.Array:
  """The fused logits' loss, plus `modality_weight` x the mean of each modality's own loss."""
  labels = {h: batch[data_format.label_key(h)] for h in outputs['logits']}
  options = dict(multi_label=o.multi_label, label_smoothing=o.label_smoothing)
  loss = classification_loss(outputs['logits'], labels, mask, **options)
  per_modality = outputs.get('modality_logits', {})
  if o.modality_weight and len(per_modality) > 1:
    loss += o.modality_weight * sum(classification_loss(logits, labels, mask, **options)
                                    for logits in per_modality.values()) / len(per_modality)
  return loss


def _contrastive_term(outputs: Mapping, batch: Mapping[str, jax.Array], mask: jax.Array,
                      o: LossOptions) -> jax.Array:
  del batch, o
  c = outputs['contrastive']
  return info_nce(c['video'], c['audio'], c['logit_scale'], mask)


def _matching_term(outputs: Mapping, batch: Mapping[str, jax.Array], mask: jax.Array,
                   o: LossOptions) -> jax.Array:
  del batch, o
  m = outputs['matching']
  return matching_loss(m['positive'], m['negative'], m['negative_valid'], mask)


def _reconstruction_term(name: str) -> Callable[..., jax.Array]:
  def term(outputs: Mapping, batch: Mapping[str, jax.Array], mask: jax.Array,
           o: LossOptions) -> jax.Array:
    del batch
    r = outputs[name]
    return masked_reconstruction_loss(r['pred'], r['target'], r['mask'], mask, o.normalize_target)
  return term


@dataclasses.dataclass(frozen=True)
class Objective:
  """One row of `OBJECTIVE_TABLE` (our design).

  Attributes:
    name: the key in `config.loss.weights`, in the model's `objectives` and its outputs.
    model_pass: the `AVT` pass that computes its outputs: 'full' (all tokens), 'masked' (MAE-style
      on its modality) or 'segment' (masked audio segments from the fused tokens).
    term: (outputs, batch, example mask [B], LossOptions) -> the unweighted scalar loss.
    modalities: the modalities the model must have to compute it.
  """
  name: str
  model_pass: str
  term: Callable[[Mapping, Mapping[str, jax.Array], jax.Array, LossOptions], jax.Array]
  modalities: tuple[str, ...]


OBJECTIVE_TABLE = {o.name: o for o in (
    Objective('classification', 'full', _classification_term, ()),
    Objective('contrastive', 'full', _contrastive_term, ('video', 'audio')),
    Objective('matching', 'full', _matching_term, ('video', 'audio')),
    Objective('masked_video', 'masked', _reconstruction_term('masked_video'), ('video',)),
    Objective('masked_audio', 'masked', _reconstruction_term('masked_audio'), ('audio',)),
    Objective('masked_audio_segment', 'segment', _reconstruction_term('masked_audio_segment'),
              ('video', 'audio')),
)}
OBJECTIVES = tuple(OBJECTIVE_TABLE)
SELF_SUPERVISED = tuple(o for o in OBJECTIVES if o != 'classification')
RECONSTRUCTION = tuple(o.name for o in OBJECTIVE_TABLE.values() if o.model_pass != 'full')


def objective(name: str) -> Objective:
  """The table row of `name`.

  Raises:
    ValueError: `name` is not an objective (the message names it and the known ones).
  """
  if name not in OBJECTIVE_TABLE:
    raise ValueError(f'Unknown objective {name!r}; expected one of {OBJECTIVES}.')
  return OBJECTIVE_TABLE[name]


def total_loss(outputs: Mapping, batch: Mapping[str, jax.Array], weights: Mapping[str, float], *,
               multi_label: bool = False, label_smoothing: float = 0.0,
               normalize_target: bool = True, modality_weight: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the objectives present in `weights` with a non-zero weight.

  Args:
    outputs: `AVT` outputs computed for the objectives with non-zero weight.
    batch: `labels/<head>` [B, C] and `mask` [B].
    weights: objective -> weight.
    multi_label, label_smoothing: classification options.
    normalize_target: per-patch normalised reconstruction targets.
    modality_weight: the classification term adds `modality_weight` x the mean over modalities of
      each modality's own classification loss (`outputs['modality_logits']`), so that every
      modality must classify on its own and none is left to the other (our design: without it,
      fusing audio made VoiceDigits results worse than video alone, see README).

  Returns:
    (total, {objective: unweighted value}).

  Raises:
    ValueError: a name in `weights` is not in `OBJECTIVE_TABLE`.
  """
  mask = batch['mask'].astype(jnp.float32)
  options = LossOptions(multi_label, label_smoothing, normalize_target, modality_weight)
  rows = [objective(name) for name in weights]  # an unknown name raises, even with weight 0
  terms = {o.name: o.term(outputs, batch, mask, options) for o in rows if weights[o.name]}
  total = sum(weights[name] * value for name, value in terms.items())
  return total, terms
