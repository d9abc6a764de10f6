"""Output heads: shared classifier, contrastive projections, audio-video matching."""

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Learnable contrastive temperature: initialised at 0.07 (CLIP) unless set, clamped to [0.01, 1].
TEMPERATURE_INIT = 0.07
TEMPERATURE_RANGE = (0.01, 1.0)


class ClassificationHead(nn.Module):
  """One linear classifier per label head, shared across modalities; logits averaged over modalities.

  Attributes:
    num_classes: label head -> number of classes, e.g. {'class': 309} or {'verb': 97, 'noun': 300}.
      The single head 'class' is named `output_projection`, others `output_projection_{head}`.
  """
  num_classes: Mapping[str, int]

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """modality -> [batch, D] in, head -> [batch, classes] float32 logits out."""
    logits = {}
    for head, classes in dict(self.num_classes).items():
      name = 'output_projection' if head == 'class' else f'output_projection_{head}'
      dense = nn.Dense(classes, kernel_init=nn.initializers.zeros, name=name)
      logits[head] = jnp.mean(jnp.stack(
          [dense(f.astype(jnp.float32)) for f in features.values()]), axis=0)
    return logits


class LogitFusion(nn.Module):
  """Late fusion of per-modality logits with calibrated, non-trained modality weights.

  fused[head] = sum_m w_m * logits[m][head], w = `modality_weights` [M] (order of the input dict).
  The weights start equal (1/M: the mean of the modalities' logits, as MBT averages them) and are
  never changed by gradients (stop_gradient; they carry no weight decay either, being 1-D). After
  training, `avt_jax.calibration` sets them by minimising the negative log-likelihood of the fused
  prediction on held-out clips (the `val` split), so a modality that does not generalise, however
  confident on its training clips, gets a small weight (our design; cf. the held-out estimates of
  gradient blending, Wang et al. 2020, "What makes training multi-modal classification networks hard?").

  Attributes:
    num_modalities: M.
  """
  num_modalities: int

  @nn.compact
  def __call__(self, logits: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """modality -> head -> [batch, classes] in, head -> [batch, classes] float32 out."""
    weights = jax.lax.stop_gradient(self.param(
        'modality_weights', nn.initializers.constant(1.0 / self.num_modalities),
        (self.num_modalities,)))
    modalities = list(logits)
    if len(modalities) != self.num_modalities:
      raise ValueError(f'LogitFusion: expected {self.num_modalities} modalities, got {modalities}.')
    heads = logits[modalities[0]]
    return {h: sum(weights[i] * logits[m][h].astype(jnp.float32) for i, m in enumerate(modalities))
            for h in heads}


class ContrastiveProjection(nn.Module):
  """LayerNorm -> Dense -> L2 normalisation: [batch, D] -> [batch, dim] unit vectors."""
  dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.LayerNorm()(x.astype(jnp.float32))
    x = nn.Dense(self.dim)(x)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class LogitScale(nn.Module):
  """Learnable inverse temperature exp(p), clamped so the temperature stays in TEMPERATURE_RANGE.

  Attributes:
    init_temperature: the temperature at initialisation (in TEMPERATURE_RANGE).
  """
  init_temperature: float = TEMPERATURE_INIT

  @nn.compact
  def __call__(self) -> jax.Array:
    p = self.param('log_inverse_temperature',
                   nn.initializers.constant(-np.log(self.init_temperature)), ())
    low, high = TEMPERATURE_RANGE
    return jnp.exp(jnp.clip(p, -np.log(high), -np.log(low)))


class MatchingHead(nn.Module):
  """Binary audio-video correspondence score from fused features: [batch, 2D] -> [batch] logits."""

  @nn.compact
  def __call__(self, fused: jax.Array) -> jax.Array:
    x = nn.Dense(fused.shape[-1] // 2)(fused.astype(jnp.float32))
    x = nn.gelu(x)
    return nn.Dense(1)(x)[:, 0]


def sample_hard_negatives(rng: jax.Array, logits: jax.Array, valid: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Samples one hard negative per example and direction from contrastive similarity logits.

  Negatives are drawn with probability softmax(logits) over the other valid examples; an example is
  never its own negative.

  Args:
    rng: PRNG key.
    logits: [B, B] similarity logits, rows = video, columns = audio.
    valid: [B] 1 for real examples, 0 for padding.

  Returns:
    audio_for_video: [B] index of the negative audio for each video.
    video_for_audio: [B] index of the negative video for each audio.
    has_negative: [B] bool, the example is valid and had at least one other valid example.
  """
  batch = logits.shape[0]
  valid = valid.astype(bool)
  allowed = valid[None, :] & ~jnp.eye(batch, dtype=bool)  # [B, B]
  k1, k2 = jax.random.split(rng)
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  audio_for_video = jax.random.categorical(k1, jnp.where(allowed, logits, -jnp.inf), axis=1)
  video_for_audio = jax.random.categorical(k2, jnp.where(allowed, logits.T, -jnp.inf), axis=1)
  has_negative = valid & jnp.any(allowed, axis=1)
  idx = jnp.arange(batch)
  # Rows without candidates fall back to themselves and are excluded through `has_negative`.
  audio_for_video = jnp.where(has_negative, audio_for_video, idx)
  video_for_audio = jnp.where(has_negative, video_for_audio, idx)
  return audio_for_video, video_for_audio, has_negative
