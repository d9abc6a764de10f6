"""Tests for avt_jax.models.build: presets, validation errors naming the field, building the model."""

import re

import jax.numpy as jnp
import pytest

from avt_jax.default_config import get_base_config
from avt_jax.models import build


def _tiny_config():
  c = get_base_config()
  c.model.update(size='tiny', hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32, fusion_layer=1,
                 video_patch=(2, 8, 8), audio_patch=(8, 8), decoder_width=16, decoder_heads=2,
                 decoder_mlp_dim=32, segment_seconds=0.16, num_segments=1)
  c.input.update(num_frames=4, image_size=16, audio_frames=32, n_mels=16)
  c.data.num_classes = {'class': 5}
  return c


def _set(path: str, value):
  """A config edit: sets the dotted `path` (e.g. 'model.fusion_layer') to `value`."""
  def edit(config):
    *parents, leaf = path.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return edit


def _video_only_with(objective: str):
  def edit(config):
    config.model.modalities = ('video',)
    config.loss.weights = {'classification': 1.0, objective: 1.0}
  return edit


@pytest.mark.parametrize('edit,field', [
    (_set('model.fusion_layer', 4), 'model.fusion_layer'),  # past the depth of 3
    (_set('model.fusion_layer', -1), 'model.fusion_layer'),
    (_set('input.image_size', 20), 'model.video_patch'),  # 20 is not divisible by 8
    (_set('input.num_frames', 5), 'model.video_patch'),  # 5 frames, tubelets of 2
    (_set('input.audio_frames', 36), 'model.audio_patch'),
    (_set('input.n_mels', 4), 'model.audio_patch'),  # fewer mel bins than the patch
    (_set('model.n_bottlenecks', 0), 'model.n_bottlenecks'),
    (_set('model.modalities', ('video', 'text')), 'model.modalities'),
    (_set('model.modalities', ()), 'model.modalities'),
    (_set('model.modalities', ('audio', 'audio')), 'model.modalities'),
    (_set('loss.weights.masked_text', 1.0), 'loss.weights'),
    (_set('loss.weights.contrastive', -0.1), 'loss.weights.contrastive'),
    (_set('model.fusion', 'cross_attention'), 'model.fusion'),
    (_set('model.size', 'huge'), 'model.size'),
    (_set('model.num_heads', 3), 'model.num_heads'),
    (_set('model.decoder_heads', 3), 'model.decoder_heads'),
    (_set('model.dtype', 'float16'), 'model.dtype'),
    (_set('model.attention_implementation', 'flash'), 'model.attention_implementation'),
    (_set('model.remat_policy', 'some'), 'model.remat_policy'),
    (_set('model.mask_ratio_video', 1.0), 'model.mask_ratio_video'),
    (_set('model.mask_ratio_audio', -0.5), 'model.mask_ratio_audio'),
    (_set('model.dropout', 1.0), 'model.dropout'),
    (_set('model.stochastic_depth', 1.0), 'model.stochastic_depth'),
    (_set('model.audio_stride', (4, 8)), 'model.audio_stride'),  # masked audio needs stride == patch
    (_set('model.segment_seconds', 0.5), 'model.segment_seconds'),  # 6 time patches > 4
    (_set('model.num_segments', 0), 'model.num_segments'),
    (_set('model.contrastive_temperature', 2.0), 'model.contrastive_temperature'),  # above 1
    (_set('data.num_classes', {'class': 0}), 'data.num_classes'),
    (_video_only_with('contrastive'), 'loss.weights'),
    (_video_only_with('masked_audio'), 'loss.weights.masked_audio'),
])
def test_impossible_settings_raise_an_error_naming_the_field(edit, field):
  config = _tiny_config()
  edit(config)
  with pytest.raises(build.ConfigError, match=re.escape(f'config.{field}:')):
    build.build_model(config)


def test_zero_bottlenecks_are_fine_without_bottleneck_fusion():
  config = _tiny_config()
  config.model.update(n_bottlenecks=0, fusion='concat')
  assert build.build_model(config).n_bottlenecks == 0


def test_presets_and_explicit_overrides():
  config = get_base_config()
  assert build.encoder_size(config.model) == dict(hidden_size=768, num_layers=12, num_heads=12,
                                                  mlp_dim=3072)
  config.model.size = 'small'
  config.model.num_layers = 4
  assert build.encoder_size(config.model) == dict(hidden_size=384, num_layers=4, num_heads=6,
                                                  mlp_dim=1536)


def test_objectives_are_the_non_zero_weights_in_canonical_order():
  config = _tiny_config()
  config.loss.weights = {'masked_audio': 0.5, 'classification': 1.0, 'matching': 0.0}
  assert build.objectives(config) == ('classification', 'masked_audio')


def test_base_config_builds_the_paper_model():
  config = get_base_config()
  model = build.build_model(config)
  assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim) == (768, 12, 12, 3072)
  assert tuple(model.video_grid) == (16, 14, 14)  # 32 frames of 224x224 in 2x16x16 tubelets
  assert tuple(model.audio_grid) == (50, 8)  # 800 x 128 log-mel in 16x16 patches
  assert (model.fusion, model.fusion_layer, model.n_bottlenecks) == ('bottleneck', 8, 4)
  assert model.segment_patches == 4  # 0.64 s = 64 frames = 4 patches of 16 frames


def test_build_model_passes_the_config_through():
  config = _tiny_config()
  config.model.update(dtype='bfloat16', audio_stride=(4, 8), fusion='late')
  config.loss.weights = {'classification': 1.0}
  model = build.build_model(config)
  assert model.options.dtype == jnp.bfloat16
  assert tuple(model.audio_grid) == (7, 2)  # (32 - 8) / 4 + 1 overlapping time patches
  assert tuple(model.video_grid) == (2, 2, 2)
  assert model.fusion == 'late' and model.num_classes == {'class': 5}


def test_single_modality_configs_are_valid():
  for modality, objective in (('audio', 'masked_audio'), ('video', 'masked_video')):
    config = _tiny_config()
    config.model.modalities = (modality,)
    config.loss.weights = {'classification': 1.0, objective: 0.5}
    assert build.build_model(config).modalities == (modality,)


def test_example_inputs_have_the_configured_shapes():
  inputs = build.example_inputs(_tiny_config(), 3)
  assert inputs['video'].shape == (3, 4, 16, 16, 3)
  assert inputs['audio'].shape == (3, 32, 16)
  assert inputs['mask'].shape == (3,)
