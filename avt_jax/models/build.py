"""Model sizes and building a validated `AVT` from an ml_collections config."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from avt_jax import data_format
from avt_jax.models.avt import AVT, CLASSIFIERS, MODALITIES, OBJECTIVES
from avt_jax.models.fusion import FUSIONS, REMAT_POLICIES
from avt_jax.models.transformer import ATTENTION_IMPLEMENTATIONS

# Encoder size per modality.
SIZES = {
    'tiny': dict(hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768),
    'small': dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    'base': dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),  # ViT-B/16
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration field holds an impossible value."""


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'config.{field}: {message}')


def encoder_size(model: ml_collections.ConfigDict) -> dict[str, int]:
  """The preset `model.size`, with any non-None explicit `model.<field>` overriding it."""
  _check(model.size in SIZES, 'model.size', f'expected one of {sorted(SIZES)}, got {model.size!r}')
  size = dict(SIZES[model.size])
  for key in size:
    if model.get(key) is not None:
      size[key] = int(model[key])
  return size


def objectives(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Objectives with a non-zero weight in `config.loss.weights`, in canonical order."""
  weights = dict(config.loss.weights)
  unknown = sorted(set(weights) - set(OBJECTIVES))
  _check(not unknown, 'loss.weights', f'unknown objectives {unknown}; expected names in {OBJECTIVES}')
  for name, w in weights.items():
    _check(w >= 0, f'loss.weights.{name}', f'must be >= 0, got {w}')
  return tuple(o for o in OBJECTIVES if weights.get(o, 0.0) > 0)


def token_grids(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Token grid per modality for the configured input size, checking divisibility by the patch."""
  m, inp = config.model, config.input
  grids = {}
  video_shape = (inp.num_frames, inp.image_size, inp.image_size)
  for axis, (size, patch) in enumerate(zip(video_shape, m.video_patch)):
    _check(patch > 0 and size % patch == 0, 'model.video_patch',
           f'input video {video_shape} (num_frames, image_size, image_size) is not divisible by '
           f'patch {tuple(m.video_patch)} along axis {axis}')
  grids['video'] = tuple(s // p for s, p in zip(video_shape, m.video_patch))
  audio_shape = (inp.audio_frames, inp.n_mels)
  stride = tuple(m.audio_stride or m.audio_patch)
  for axis, (size, patch, step) in enumerate(zip(audio_shape, m.audio_patch, stride)):
    _check(patch > 0 and step > 0 and size >= patch and (size - patch) % step == 0,
           'model.audio_patch', f'input audio {audio_shape} (audio_frames, n_mels) does not tile '
           f'with patch {tuple(m.audio_patch)} and stride {stride} along axis {axis}')
  grids['audio'] = tuple((s - p) // st + 1 for s, p, st in zip(audio_shape, m.audio_patch, stride))
  return grids


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field for impossible model / input / loss settings."""
  m = config.model
  size = encoder_size(m)
  mods = tuple(m.modalities)
  _check(len(mods) > 0 and len(set(mods)) == len(mods) and set(mods) <= set(MODALITIES),
         'model.modalities', f'expected a non-empty subset of {MODALITIES}, got {mods}')
  _check(m.fusion in FUSIONS, 'model.fusion', f'expected one of {FUSIONS}, got {m.fusion!r}')
  _check(m.classifier in CLASSIFIERS, 'model.classifier',
         f'expected one of {CLASSIFIERS}, got {m.classifier!r}')
  _check(0 <= m.fusion_layer <= size['num_layers'], 'model.fusion_layer',
         f'must be in [0, num_layers={size["num_layers"]}], got {m.fusion_layer}')
  if m.fusion == 'bottleneck':
    _check(m.n_bottlenecks >= 1, 'model.n_bottlenecks',
           f'bottleneck fusion needs at least 1 bottleneck token, got {m.n_bottlenecks}')
  _check(size['hidden_size'] % size['num_heads'] == 0, 'model.num_heads',
         f'hidden_size {size["hidden_size"]} is not divisible by num_heads {size["num_heads"]}')
  _check(m.decoder_width % m.decoder_heads == 0, 'model.decoder_heads',
         f'decoder_width {m.decoder_width} is not divisible by decoder_heads {m.decoder_heads}')
  _check(m.dtype in DTYPES, 'model.dtype', f'expected one of {sorted(DTYPES)}, got {m.dtype!r}')
  _check(m.attention_implementation in ATTENTION_IMPLEMENTATIONS, 'model.attention_implementation',
         f'expected one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention_implementation!r}')
  _check(m.remat_policy in REMAT_POLICIES, 'model.remat_policy',
         f'expected one of {sorted(REMAT_POLICIES)}, got {m.remat_policy!r}')
  _check(m.attention_implementation != 'cudnn' or m.dtype == 'bfloat16',
         'model.attention_implementation', f"'cudnn' needs model.dtype='bfloat16', got {m.dtype!r}")
  _check(m.attention_chunk_size >= 1, 'model.attention_chunk_size',
         f'must be >= 1, got {m.attention_chunk_size}')
  _check(0.0 <= m.mask_ratio_video < 1.0, 'model.mask_ratio_video', 'must be in [0, 1)')
  _check(0.0 <= m.mask_ratio_audio < 1.0, 'model.mask_ratio_audio', 'must be in [0, 1)')
  # A rate of 1 would divide by the keep probability 0 (NaN gradients).
  _check(0.0 <= m.dropout < 1.0, 'model.dropout', f'must be in [0, 1), got {m.dropout}')
  _check(0.0 <= m.stochastic_depth < 1.0, 'model.stochastic_depth',
         f'must be in [0, 1), got {m.stochastic_depth}')
  grids = token_grids(config)
  objs = objectives(config)
  needs_both = {'contrastive', 'matching', 'masked_audio_segment'} & set(objs)
  _check(not needs_both or len(mods) == 2, 'loss.weights',
         f'objectives {sorted(needs_both)} need both modalities, but model.modalities={mods}')
  for o in objs:
    if o.startswith('masked_'):
      modality = 'video' if o == 'masked_video' else 'audio'
      _check(modality in mods, f'loss.weights.{o}', f'needs the {modality} modality in model.modalities')
      if modality == 'audio':
        _check(m.audio_stride is None or tuple(m.audio_stride) == tuple(m.audio_patch),
               'model.audio_stride', f'{o} needs non-overlapping audio patches (stride == patch)')
  if 'masked_audio_segment' in objs:
    _check(1 <= segment_patches(config) <= grids['audio'][0], 'model.segment_seconds',
           f'gives {segment_patches(config)} time patches; the audio has {grids["audio"][0]}')
    _check(m.num_segments >= 1, 'model.num_segments', 'must be >= 1')
  heads = dict(config.data.num_classes)
  _check(len(heads) > 0 and all(c >= 1 for c in heads.values()), 'data.num_classes',
         f'expected label head -> number of classes >= 1, got {heads}')


def segment_patches(config: ml_collections.ConfigDict) -> int:
  """Masked audio segment length in time patches (`data_format.AUDIO_FRAMES_PER_SECOND`)."""
  frames = config.model.segment_seconds * data_format.AUDIO_FRAMES_PER_SECOND
  return max(1, int(round(frames / config.model.audio_patch[0])))


def build_model(config: ml_collections.ConfigDict) -> AVT:
  """Validates `config` and returns the AVT it describes (position embeddings sized to the input)."""
  validate(config)
  m = config.model
  grids = token_grids(config)
  return AVT(
      num_classes=dict(config.data.num_classes), modalities=tuple(m.modalities), **encoder_size(m),
      video_patch=tuple(m.video_patch), audio_patch=tuple(m.audio_patch),
      audio_stride=tuple(m.audio_stride) if m.audio_stride else None,
      video_grid=grids['video'], audio_grid=grids['audio'], fusion=m.fusion,
      fusion_layer=m.fusion_layer, n_bottlenecks=m.n_bottlenecks, contrastive_dim=m.contrastive_dim,
      decoder_width=m.decoder_width, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
      decoder_mlp_dim=m.decoder_mlp_dim, mask_ratio_video=m.mask_ratio_video,
      mask_ratio_audio=m.mask_ratio_audio, segment_patches=segment_patches(config),
      num_segments=m.num_segments, classifier=m.classifier, dropout=m.dropout,
      stochastic_depth=m.stochastic_depth,
      dtype=DTYPES[m.dtype], attention_implementation=m.attention_implementation,
      remat_policy=m.remat_policy, scan_layers=bool(m.scan_layers),
      attention_chunk_size=int(m.attention_chunk_size))


def example_inputs(config: ml_collections.ConfigDict, batch: int) -> dict[str, np.ndarray]:
  """Zero inputs of the configured shapes, e.g. for `model.init` and cost analysis."""
  inp = config.input
  return {
      'video': np.zeros((batch, inp.num_frames, inp.image_size, inp.image_size, 3), np.float32),
      'audio': np.zeros((batch, inp.audio_frames, inp.n_mels), np.float32),
      'mask': np.ones((batch,), np.float32),
  }
