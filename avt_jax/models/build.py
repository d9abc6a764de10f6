"""Model sizes and building a validated `AVT` from an ml_collections config."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np

from avt_jax import data_format
from avt_jax.default_config import ENCODER_SIZES, MODEL_PRESETS
from avt_jax.models.avt import AVT, OBJECTIVES, objective_problems
from avt_jax.models.options import EncoderOptions, raise_first
from avt_jax.models.tokenizers import token_grid

# Encoder size per modality: `model.size` -> its preset (`default_config.MODEL_PRESETS`).
SIZES = {name: MODEL_PRESETS[name] for name in ENCODER_SIZES}
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
  """Token grid per modality for the configured input size (`tokenizers.token_grid`).

  Raises:
    ConfigError: the patches (and audio stride) do not tile the configured input exactly.
  """
  m, inp = config.model, config.input
  inputs = {'video': ((inp.num_frames, inp.image_size, inp.image_size),
                      '(num_frames, image_size, image_size)', tuple(m.video_patch), None),
            'audio': ((inp.audio_frames, inp.n_mels), '(audio_frames, n_mels)',
                      tuple(m.audio_patch), m.audio_stride)}
  grids = {}
  for modality, (shape, names, patch, stride) in inputs.items():
    stride = tuple(stride or patch)
    field = f'model.{modality}_patch'
    _check(min(patch + stride) > 0, field, f'patch {patch} and stride {stride} must be positive')
    grids[modality] = token_grid(shape, patch, stride)
    for axis, (size, p, step, n) in enumerate(zip(shape, patch, stride, grids[modality])):
      _check(n >= 1 and (n - 1) * step + p == size, field,
             f'input {modality} {shape} {names} does not tile with patch {patch} and stride '
             f'{stride} along axis {axis}')
  return grids


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field for impossible model / input / loss settings.

  The model's own settings are checked by `AVT.problems` (one place for each check); this adds
  what only the config knows: the size preset, dtype name, input size, objectives and labels.
  """
  m = config.model
  raise_first('config.model', _model(config).problems(), ConfigError)
  mods = tuple(m.modalities)
  objs = objectives(config)
  raise_first('config.loss', objective_problems(objs, mods), ConfigError)
  for o in ('masked_audio', 'masked_audio_segment'):
    if o in objs:
      _check(m.audio_stride is None or tuple(m.audio_stride) == tuple(m.audio_patch),
             'model.audio_stride', f'{o} needs non-overlapping audio patches (stride == patch)')
  if 'masked_audio_segment' in objs:
    time_patches = token_grids(config)['audio'][0]
    _check(1 <= segment_patches(config) <= time_patches, 'model.segment_seconds',
           f'gives {segment_patches(config)} time patches; the audio has {time_patches}')
    _check(m.num_segments >= 1, 'model.num_segments', 'must be >= 1')
  heads = dict(config.data.num_classes)
  _check(len(heads) > 0 and all(c >= 1 for c in heads.values()), 'data.num_classes',
         f'expected label head -> number of classes >= 1, got {heads}')
  _check_training(config)


def _check_training(config: ml_collections.ConfigDict) -> None:
  """`config.optim` and `config.train`'s cadence: what the optimizer, the checkpointer and the loop
  would otherwise refuse only after the workdir is written."""
  o, t = config.optim, config.train
  _check(o.name in ('adamw', 'sgd'), 'optim.name', f"expected 'adamw' or 'sgd', got {o.name!r}")
  for field in ('learning_rate', 'weight_decay', 'warmup_steps'):
    _check(isinstance(o[field], (int, float)) and o[field] >= 0, f'optim.{field}',
           f'expected a number >= 0, got {o[field]!r}')
  _check(not o.grad_clip_norm or o.grad_clip_norm > 0, 'optim.grad_clip_norm',
         f'expected > 0 (or 0 for no clipping), got {o.grad_clip_norm!r}')
  _check(isinstance(o.get('accumulation_steps', 1), int) and o.get('accumulation_steps', 1) >= 1,
         'optim.accumulation_steps', f'expected an integer >= 1, got {o.get("accumulation_steps")!r}')
  for field in ('steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if field == 'steps' and t.get('epochs'):  # set from the data's size (`dataset_stats`)
      continue
    _check(isinstance(t[field], int) and t[field] >= 1, f'train.{field}',
           f'expected an integer >= 1, got {t[field]!r}')


def segment_patches(config: ml_collections.ConfigDict) -> int:
  """Masked audio segment length in time patches (`data_format.AUDIO_FRAMES_PER_SECOND`)."""
  frames = config.model.segment_seconds * data_format.AUDIO_FRAMES_PER_SECOND
  return max(1, int(round(frames / config.model.audio_patch[0])))


# config.model fields that are AVT attributes of the same name and value.
_AVT_FIELDS = ('fusion', 'fusion_layer', 'n_bottlenecks', 'contrastive_dim',
               'contrastive_temperature', 'decoder_width',
               'decoder_depth', 'decoder_heads', 'decoder_mlp_dim', 'mask_ratio_video',
               'mask_ratio_audio', 'num_segments', 'classifier', 'contrastive_pool',
               'posemb_init_std')


def _model(config: ml_collections.ConfigDict) -> AVT:
  """The AVT that `config` describes, unchecked except for what building it needs (size preset,
  dtype name, token grids)."""
  m = config.model
  _check(m.dtype in DTYPES, 'model.dtype', f'expected one of {sorted(DTYPES)}, got {m.dtype!r}')
  options = {f.name: m.get(f.name, f.default) for f in dataclasses.fields(EncoderOptions)}
  grids = token_grids(config)
  return AVT(
      num_classes=dict(config.data.num_classes), modalities=tuple(m.modalities), **encoder_size(m),
      video_patch=tuple(m.video_patch), audio_patch=tuple(m.audio_patch),
      audio_stride=tuple(m.audio_stride) if m.audio_stride else None, video_grid=grids['video'],
      audio_grid=grids['audio'], segment_patches=segment_patches(config),
      options=EncoderOptions(**dict(options, dtype=DTYPES[m.dtype])),
      **{f: m[f] for f in _AVT_FIELDS})


def build_model(config: ml_collections.ConfigDict) -> AVT:
  """Validates `config` and returns the AVT it describes (position embeddings sized to the input)."""
  validate(config)
  return _model(config)


def example_inputs(config: ml_collections.ConfigDict, batch: int) -> dict[str, np.ndarray]:
  """Zero inputs of the configured shapes, e.g. for `model.init` and cost analysis."""
  inp = config.input
  return {
      'video': np.zeros((batch, inp.num_frames, inp.image_size, inp.image_size, 3), np.float32),
      'audio': np.zeros((batch, inp.audio_frames, inp.n_mels), np.float32),
      'mask': np.ones((batch,), np.float32),
  }
