"""configs/manifest.py takes its data-dependent fields from stats.json (avt_jax.dataset_stats)."""

import importlib.util
import json
import math
import os

import pytest

from avt_jax import dataset_stats
from avt_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = {
    'num_classes': {'class': 7}, 'num_clips': {'train': 250, 'test': 40}, 'fps': 12.0,
    'clip_seconds': 3.0, 'short_side': 72, 'n_mels': 48, 'logmel_mean': -5.0, 'logmel_std': 2.0,
}


def manifest_config(arg=None):
  spec = importlib.util.spec_from_file_location('manifest_config',
                                                os.path.join(ROOT, 'configs/manifest.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def write_stats(folder, **changes):
  stats = dict(STATS, **changes)
  with open(os.path.join(folder, 'stats.json'), 'w') as f:
    json.dump({k: v for k, v in stats.items() if v is not None}, f)
  return str(folder)


def test_every_data_field_comes_from_stats(tmp_path):
  config = manifest_config()
  fields = dataset_stats.apply_stats(config, write_stats(tmp_path))
  assert dict(config.data.num_classes) == {'class': 7} and tuple(config.data.label_heads) == ('class',)
  assert config.input.n_mels == 48 and config.input.min_resize == 72
  # 3 s at 12 fps = 36 stored frames over num_frames=10 -> stride round(3.6) = 4 (the window's 40
  # frames pass the clip's end: its last frame repeats); audio covers the clip's 3 s in whole 16-frame
  # patches: 300 // 16 * 16 = 288.
  assert config.input.num_frames == 10
  assert config.input.frame_stride == 4 and config.input.audio_frames == 288
  # image size: the configured cap 64 (< short side 72) in whole 16-pixel patches.
  assert config.input.image_size == 64
  # epochs -> steps: ceil(epochs * 250 / 32); warm-up in epochs.
  per_epoch = 250 / config.input.batch_size
  assert config.train.steps == math.ceil(config.train.epochs * per_epoch)
  assert config.optim.warmup_steps == round(config.optim.warmup_epochs * per_epoch)
  assert fields['input.audio_frames'] == 288
  model = build_model(config)  # the filled config is a valid model
  assert model.num_classes == {'class': 7}


@pytest.mark.parametrize('variant', [None, 'pretrained'])
def test_a_few_dozen_clips_get_at_least_min_steps(tmp_path, variant):
  """36 training clips (10% of a small set): the epoch schedule (scratch 60 epochs = 68 steps,
  pretrained 20 = 23) is stretched to train.min_steps, warm-up in proportion."""
  config = manifest_config(variant)
  min_steps, epochs = config.train.min_steps, config.train.epochs
  assert math.ceil(epochs * 36 / config.input.batch_size) < min_steps
  dataset_stats.apply_stats(config, write_stats(tmp_path, num_clips={'train': 36, 'test': 20}))
  assert config.train.steps == min_steps
  assert config.optim.warmup_steps == round(config.optim.warmup_epochs / epochs * min_steps)
  assert config.optim.warmup_steps > 0


def test_small_frames_shrink_the_image_size_to_whole_patches(tmp_path):
  config = manifest_config('video')
  dataset_stats.apply_stats(config, write_stats(tmp_path, short_side=44))
  assert config.input.image_size == 32 and config.input.min_resize == 44  # 44 // 16 * 16
  assert config.model.modalities == ('video',)


def test_not_a_prepared_folder_is_named(tmp_path):
  with pytest.raises(dataset_stats.DatasetStatsError, match=r'is not a prepared dataset.*prepare'):
    dataset_stats.apply_stats(manifest_config(), str(tmp_path))


def test_missing_field_and_empty_training_split_are_named(tmp_path):
  with pytest.raises(dataset_stats.DatasetStatsError, match="no 'fps'"):
    dataset_stats.apply_stats(manifest_config(), write_stats(tmp_path, fps=None))
  with pytest.raises(dataset_stats.DatasetStatsError, match="training split 'train'"):
    dataset_stats.apply_stats(manifest_config(), write_stats(tmp_path, num_clips={'test': 3}))


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match=':video'):
    manifest_config('both')


def test_learning_benchmark_builds_a_run_config_like_main(tmp_path):
  from avt_jax import learning_benchmark  # pylint: disable=g-import-not-at-top
  config = learning_benchmark.load_config(
      os.path.join(ROOT, 'configs/manifest.py:video'), write_stats(tmp_path),
      ['--config.train.epochs=3', '--config.train.min_steps=0', '--config.model.fusion=bottleneck',
       "--config.init.exclude=('^classifier/',)"])
  assert config.model.modalities == ('video',) and config.model.fusion == 'bottleneck'
  assert config.init.exclude == ('^classifier/',)
  assert config.train.steps == math.ceil(3 * 250 / config.input.batch_size)
  assert dict(config.data.num_classes) == {'class': 7}


def test_video_and_audio_variants_exclude_each_other():
  with pytest.raises(ValueError, match="exclude each other"):
    manifest_config('video:audio')


def test_pretrained_variant_trains_only_the_top_blocks_norms_and_heads(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from avt_jax import train_step  # pylint: disable=g-import-not-at-top
  config = manifest_config('pretrained:video')
  dataset_stats.apply_stats(config, write_stats(tmp_path))
  assert config.model.modalities == ('video',) and config.model.hidden_size == 384
  *_, init = train_step.setup(config)
  params = jax.eval_shape(init, jax.random.PRNGKey(0)).params
  mask = train_step.frozen_mask(config.optim.frozen, params)
  trained = {'/'.join(k.key for k in path[:2]) for path, frozen in
             jax.tree_util.tree_flatten_with_path(mask)[0] if not frozen}
  assert trained == {'encoder/encoderblock_10_video', 'encoder/encoderblock_11_video',
                     'encoder/encoder_norm_video', 'classifier/output_projection'}


def test_frozen_parameters_need_a_checkpoint(tmp_path):
  from avt_jax import preflight  # pylint: disable=g-import-not-at-top
  from avt_jax.models import ConfigError  # pylint: disable=g-import-not-at-top
  config = manifest_config('pretrained')
  dataset_stats.apply_stats(config, write_stats(tmp_path))
  with pytest.raises(ConfigError, match=r'^config\.optim\.frozen: .* config\.init\.checkpoint'):
    preflight.check_config(config, str(tmp_path / 'work'))
