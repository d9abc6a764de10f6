"""Tests for avt_jax.pretrained: every checkpoint format, the ViT -> video / audio equivalences, the
report, errors, scanned layers, bfloat16 and sharded placement.

Fixtures are tiny ViTs (width 32, 2 heads, 2 layers, 8x8 patches on 32x32 images, a 7-class head and
pre_logits) written from one set of numpy weights in each format's real key layout.
"""

import importlib.util
import json
import math
import pathlib
import re
import zipfile

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from avt_jax import checkpointing, pretrained, sharding
from avt_jax.default_config import get_base_config
from avt_jax.models import build_model
from avt_jax.pretrained import PretrainedError
from avt_jax.train_step import TrainState, param_axes, setup
from tests.conftest import fast_jit, random_params, tiny_config

D, HEADS, LAYERS, MLP, PATCH, GRID, CLASSES = 32, 2, 2, 64, 8, 4, 7
DH = D // HEADS
ATT = 'MultiHeadDotProductAttention_1'


# ------------------------------------------------------------------------------------------------
# Fixture weights in each format's layout


def vit_release(seed: int = 0, width: int = D, patch: int = PATCH, heads: int = HEADS) -> dict:
  """A tiny ViT in the original release's .npz layout (google-research/vision_transformer)."""
  rng = np.random.default_rng(seed)

  def n(*shape, scale=0.2):
    return (rng.normal(size=shape) * scale).astype(np.float32)

  grid = 32 // patch
  w = {'embedding/kernel': n(patch, patch, 3, width, scale=0.05), 'embedding/bias': n(width),
       'cls': n(1, 1, width), 'Transformer/posembed_input/pos_embedding': n(1, 1 + grid * grid, width),
       'Transformer/encoder_norm/scale': 1 + n(width), 'Transformer/encoder_norm/bias': n(width),
       'head/kernel': n(width, CLASSES), 'head/bias': n(CLASSES),
       'pre_logits/kernel': n(width, width), 'pre_logits/bias': n(width)}
  for i in range(LAYERS):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      w[f'{b}{ln}/scale'], w[f'{b}{ln}/bias'] = 1 + n(width), n(width)
    for proj in ('query', 'key', 'value'):
      w[f'{b}{ATT}/{proj}/kernel'] = n(width, heads, width // heads)
      w[f'{b}{ATT}/{proj}/bias'] = n(heads, width // heads)
    w[f'{b}{ATT}/out/kernel'], w[f'{b}{ATT}/out/bias'] = n(heads, width // heads, width), n(width)
    w[f'{b}MlpBlock_3/Dense_0/kernel'], w[f'{b}MlpBlock_3/Dense_0/bias'] = n(width, MLP), n(MLP)
    w[f'{b}MlpBlock_3/Dense_1/kernel'], w[f'{b}MlpBlock_3/Dense_1/bias'] = n(MLP, width), n(width)
  return w


LINEN = {'LayerNorm_0': 'LayerNorm_0', 'LayerNorm_2': 'LayerNorm_1', ATT: 'MultiHeadDotProductAttention_0',
         'MlpBlock_3': 'MlpBlock_0'}


def linen_block(w: dict, prefix: str) -> dict:
  """Block `prefix` renamed to linen's per-type numbering (big_vision, Scenic)."""
  out = {}
  for key, value in w.items():
    if key.startswith(prefix):
      module, rest = key[len(prefix):].split('/', 1)
      out[f'{LINEN[module]}/{rest}'] = value
  return out


def big_vision(w: dict, scanned: bool = False) -> dict:
  """big_vision .npz: `params/`, posemb added before CLS (CLS position folded into `cls`)."""
  pe = w['Transformer/posembed_input/pos_embedding']
  out = {'embedding/kernel': w['embedding/kernel'], 'embedding/bias': w['embedding/bias'],
         'cls': w['cls'] + pe[:, :1], 'pos_embedding': pe[:, 1:],
         'Transformer/encoder_norm/scale': w['Transformer/encoder_norm/scale'],
         'Transformer/encoder_norm/bias': w['Transformer/encoder_norm/bias'],
         'head/kernel': w['head/kernel'], 'head/bias': w['head/bias']}
  blocks = [linen_block(w, f'Transformer/encoderblock_{i}/') for i in range(LAYERS)]
  if scanned:
    out.update({f'Transformer/encoderblock/{k}': np.stack([b[k] for b in blocks]) for k in blocks[0]})
  else:
    out.update({f'Transformer/encoderblock_{i}/{k}': v for i, b in enumerate(blocks) for k, v in b.items()})
  return {f'params/{k}': v for k, v in out.items()}


def timm(w: dict) -> dict:
  """timm VisionTransformer state_dict: PyTorch layouts, fused q/k/v."""
  t = lambda x: np.ascontiguousarray(x.T)
  out = {'patch_embed.proj.weight': np.ascontiguousarray(w['embedding/kernel'].transpose(3, 2, 0, 1)),
         'patch_embed.proj.bias': w['embedding/bias'], 'cls_token': w['cls'],
         'pos_embed': w['Transformer/posembed_input/pos_embedding'],
         'norm.weight': w['Transformer/encoder_norm/scale'], 'norm.bias': w['Transformer/encoder_norm/bias'],
         'head.weight': t(w['head/kernel']), 'head.bias': w['head/bias'],
         'pre_logits.fc.weight': t(w['pre_logits/kernel']), 'pre_logits.fc.bias': w['pre_logits/bias']}
  for i in range(LAYERS):
    b, f = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    out[f'{b}norm1.weight'], out[f'{b}norm1.bias'] = w[f'{f}LayerNorm_0/scale'], w[f'{f}LayerNorm_0/bias']
    out[f'{b}norm2.weight'], out[f'{b}norm2.bias'] = w[f'{f}LayerNorm_2/scale'], w[f'{f}LayerNorm_2/bias']
    out[f'{b}attn.qkv.weight'] = np.concatenate(
        [t(w[f'{f}{ATT}/{p}/kernel'].reshape(D, D)) for p in ('query', 'key', 'value')])
    out[f'{b}attn.qkv.bias'] = np.concatenate(
        [w[f'{f}{ATT}/{p}/bias'].reshape(D) for p in ('query', 'key', 'value')])
    out[f'{b}attn.proj.weight'] = t(w[f'{f}{ATT}/out/kernel'].reshape(D, D))
    out[f'{b}attn.proj.bias'] = w[f'{f}{ATT}/out/bias']
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[f'{b}mlp.{theirs}.weight'] = t(w[f'{f}MlpBlock_3/{ours}/kernel'])
      out[f'{b}mlp.{theirs}.bias'] = w[f'{f}MlpBlock_3/{ours}/bias']
  return out


def hf_vit(w: dict, prefix: str = 'vit.') -> dict:
  """Hugging Face ViTForImageClassification (prefix 'vit.') or ViTModel (prefix '')."""
  t = lambda x: np.ascontiguousarray(x.T)
  e = f'{prefix}embeddings.'
  out = {f'{e}patch_embeddings.projection.weight':
         np.ascontiguousarray(w['embedding/kernel'].transpose(3, 2, 0, 1)),
         f'{e}patch_embeddings.projection.bias': w['embedding/bias'], f'{e}cls_token': w['cls'],
         f'{e}position_embeddings': w['Transformer/posembed_input/pos_embedding'],
         f'{prefix}layernorm.weight': w['Transformer/encoder_norm/scale'],
         f'{prefix}layernorm.bias': w['Transformer/encoder_norm/bias'],
         f'{prefix}pooler.dense.weight': t(w['pre_logits/kernel']),
         f'{prefix}pooler.dense.bias': w['pre_logits/bias']}
  if prefix:
    out['classifier.weight'], out['classifier.bias'] = t(w['head/kernel']), w['head/bias']
  for i in range(LAYERS):
    b, f = f'{prefix}encoder.layer.{i}.', f'Transformer/encoderblock_{i}/'
    out[f'{b}layernorm_before.weight'] = w[f'{f}LayerNorm_0/scale']
    out[f'{b}layernorm_before.bias'] = w[f'{f}LayerNorm_0/bias']
    out[f'{b}layernorm_after.weight'] = w[f'{f}LayerNorm_2/scale']
    out[f'{b}layernorm_after.bias'] = w[f'{f}LayerNorm_2/bias']
    for p in ('query', 'key', 'value'):
      out[f'{b}attention.attention.{p}.weight'] = t(w[f'{f}{ATT}/{p}/kernel'].reshape(D, D))
      out[f'{b}attention.attention.{p}.bias'] = w[f'{f}{ATT}/{p}/bias'].reshape(D)
    out[f'{b}attention.output.dense.weight'] = t(w[f'{f}{ATT}/out/kernel'].reshape(D, D))
    out[f'{b}attention.output.dense.bias'] = w[f'{f}{ATT}/out/bias']
    out[f'{b}intermediate.dense.weight'] = t(w[f'{f}MlpBlock_3/Dense_0/kernel'])
    out[f'{b}intermediate.dense.bias'] = w[f'{f}MlpBlock_3/Dense_0/bias']
    out[f'{b}output.dense.weight'] = t(w[f'{f}MlpBlock_3/Dense_1/kernel'])
    out[f'{b}output.dense.bias'] = w[f'{f}MlpBlock_3/Dense_1/bias']
  return out


def layer_scales(seed: int = 11) -> dict:
  """LayerScale vectors {(layer, 1 | 2): [D]} as DINOv2 learns them (small, of either sign)."""
  rng = np.random.default_rng(seed)
  return {(i, j): rng.normal(0.3, 0.2, D).astype(np.float32) for i in range(LAYERS) for j in (1, 2)}


def hf_dinov2(w: dict, gammas: dict, prefix: str = '', registers: int = 0) -> dict:
  """Hugging Face Dinov2Model (prefix '') / Dinov2ForImageClassification ('dinov2.'): ViT names with
  norm1/norm2, mlp.fc1/fc2, layer_scale{1,2}.lambda1, a mask_token (and register_tokens)."""
  vit = hf_vit(w, prefix='')
  rename = {'layernorm_before': 'norm1', 'layernorm_after': 'norm2', 'intermediate.dense': 'mlp.fc1',
            'output.dense': 'mlp.fc2'}
  out = {}
  for key, value in vit.items():
    if key.startswith('pooler.'):
      continue
    for old, new in rename.items():
      key = re.sub(rf'(encoder\.layer\.\d+\.){re.escape(old)}\.', rf'\g<1>{new}.', key)
    out[prefix + key] = value
  for (i, j), gamma in gammas.items():
    out[f'{prefix}encoder.layer.{i}.layer_scale{j}.lambda1'] = gamma
  out[f'{prefix}embeddings.mask_token'] = np.zeros((1, D), np.float32)
  if registers:
    out[f'{prefix}embeddings.register_tokens'] = np.ones((1, registers, D), np.float32)
  if prefix:
    out['classifier.weight'] = np.zeros((CLASSES, 2 * D), np.float32)
    out['classifier.bias'] = np.zeros(CLASSES, np.float32)
  return out


def dinov2_original(w: dict, gammas: dict, registers: int = 0, chunks: int = 0) -> dict:
  """facebookresearch/dinov2 DinoVisionTransformer state_dict: timm names plus ls{1,2}.gamma,
  mask_token, register_tokens; with `chunks`, blocks nested as blocks.{chunk}.{i} (FSDP chunks)."""
  out = {k: v for k, v in timm(w).items() if not k.startswith(('head.', 'pre_logits.'))}
  if chunks:
    per = LAYERS // chunks
    out = {re.sub(r'^blocks\.(\d+)\.', lambda m: f'blocks.{int(m.group(1)) // per}.{m.group(1)}.', k): v
           for k, v in out.items()}
  for (i, j), gamma in gammas.items():
    block = f'blocks.{i // (LAYERS // chunks)}.{i}.' if chunks else f'blocks.{i}.'
    out[f'{block}ls{j}.gamma'] = gamma
  out['mask_token'] = np.zeros((1, D), np.float32)
  if registers:
    out['register_tokens'] = np.ones((1, registers, D), np.float32)
  return out


def nested(flat: dict) -> dict:
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def scenic_mbt(w_video: dict, w_audio: dict, n_bottlenecks: int, classes: int) -> dict:
  """A Scenic MBT train state (scenic/projects/mbt/model.py names): RGB 3D tubelet kernel, 1-channel
  spectrogram kernel, CLS classifier (bottleneck holds n + 1 tokens), one shared encoder_norm."""
  rng = np.random.default_rng(5)
  k2d = w_video['embedding/kernel']
  params = {'embedding/kernel': np.stack([np.zeros_like(k2d), k2d]),  # central-frame inflated
            'embedding/bias': w_video['embedding/bias'],
            'embedding_spectrogram/kernel': w_audio['embedding/kernel'].sum(2, keepdims=True),
            'embedding_spectrogram/bias': w_audio['embedding/bias'],
            'cls': w_video['cls'], 'clsspectrogram': w_audio['cls'],
            'bottleneck': rng.normal(size=(1, n_bottlenecks + 1, D)).astype(np.float32),
            'Transformer/posembed_input/pos_embedding':
                rng.normal(size=(1, 1 + 2 * 16, D)).astype(np.float32),
            'Transformer/posembed_input_spectrogram/pos_embedding':
                rng.normal(size=(1, 1 + 8 * 4, D)).astype(np.float32),
            'Transformer/encoder_norm/scale': w_video['Transformer/encoder_norm/scale'],
            'Transformer/encoder_norm/bias': w_video['Transformer/encoder_norm/bias'],
            'output_projection/kernel': rng.normal(size=(D, classes)).astype(np.float32),
            'output_projection/bias': np.zeros(classes, np.float32)}
  for i in range(LAYERS):
    for suffix, w in (('', w_video), ('_spectrogram', w_audio)):
      block = linen_block(w, f'Transformer/encoderblock_{i}/')
      params.update({f'Transformer/encoderblock_{i}{suffix}/{k}': v for k, v in block.items()})
  return {'global_step': 100, 'params': nested(params), 'model_state': {},
          'opt_state': nested({'0/mu/bottleneck': np.zeros((1, 3, D), np.float32)}),
          'rng': np.zeros(2, np.uint32)}


# ------------------------------------------------------------------------------------------------
# An independent numpy ViT (the original release's computation) for the equivalence tests


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x, exact=False):  # flax's nn.gelu: the tanh approximation (original ViT) or erf (PyTorch)
  if exact:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def vit_reference(w: dict, images: np.ndarray, gammas: dict | None = None,
                  exact_gelu: bool = False) -> np.ndarray:
  """Normalised CLS output [B, D] of the 2D ViT `w` (release layout) on square images [B, S, S, 3];
  `gammas` {(layer, 1 | 2): [D]} adds LayerScale to the attention (1) and MLP (2) branches."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  gammas = gammas or {}
  batch, size = images.shape[0], images.shape[1]
  patch = w['embedding/kernel'].shape[0]
  grid = size // patch
  patches = images.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(batch, grid * grid, -1) @ w['embedding/kernel'].reshape(-1, D) + w['embedding/bias']
  x = np.concatenate([np.broadcast_to(w['cls'], (batch, 1, D)), x], axis=1)
  x = x + w['Transformer/posembed_input/pos_embedding']
  for i in range(LAYERS):
    b = f'Transformer/encoderblock_{i}/'
    y = _layer_norm(x, w[f'{b}LayerNorm_0/scale'], w[f'{b}LayerNorm_0/bias'])
    q, k, v = (np.einsum('bnd,dhk->bnhk', y, w[f'{b}{ATT}/{p}/kernel']) + w[f'{b}{ATT}/{p}/bias']
               for p in ('query', 'key', 'value'))
    logits = np.einsum('bqhk,bnhk->bhqn', q, k) / np.sqrt(DH)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum('bhqn,bnhk->bqhk', weights, v)
    x = x + gammas.get((i, 1), 1.0) * (
        np.einsum('bqhk,hkd->bqd', attended, w[f'{b}{ATT}/out/kernel']) + w[f'{b}{ATT}/out/bias'])
    y = _layer_norm(x, w[f'{b}LayerNorm_2/scale'], w[f'{b}LayerNorm_2/bias'])
    y = _gelu(y @ w[f'{b}MlpBlock_3/Dense_0/kernel'] + w[f'{b}MlpBlock_3/Dense_0/bias'], exact_gelu)
    x = x + gammas.get((i, 2), 1.0) * (y @ w[f'{b}MlpBlock_3/Dense_1/kernel'] +
                                       w[f'{b}MlpBlock_3/Dense_1/bias'])
  x = _layer_norm(x, w['Transformer/encoder_norm/scale'], w['Transformer/encoder_norm/bias'])
  return x[:, 0]


# ------------------------------------------------------------------------------------------------
# Configs and helpers


def config_for(checkpoint='', **overrides) -> ml_collections.ConfigDict:
  """tiny_config with 8x8 patches: video grid (2, 4, 4), audio grid (8, 4) (the ViT's is 4x4)."""
  c = tiny_config(**{'model.video_patch': (2, PATCH, PATCH), 'model.audio_patch': (PATCH, PATCH),
                     **overrides})
  c.init.checkpoint = str(checkpoint)
  return c


def single_modality(modality: str, checkpoint: str, **overrides) -> ml_collections.ConfigDict:
  """A one-encoder model whose token grid equals the ViT's (4x4; video: one tubelet in time)."""
  c = config_for(checkpoint, **{'model.modalities': (modality,), 'input.num_frames': 2,
                                'input.audio_frames': 32, **overrides})
  c.loss.weights = ml_collections.ConfigDict({'classification': 1.0})
  return c


_ABSTRACT = {}


def abstract_params(config):
  """The model's abstract parameters (traced once per model config)."""
  key = config.model.to_json() + config.data.to_json() + config.input.to_json() + config.loss.to_json()
  if key not in _ABSTRACT:
    *_, init = setup(config)
    _ABSTRACT[key] = jax.eval_shape(init, jax.random.PRNGKey(0)).params
  return _ABSTRACT[key]


def mapped(config) -> pretrained.Prepared:
  return pretrained.prepare(config, abstract_params(config))


def write_npz(path, flat):
  np.savez(path, **flat)
  return path


@pytest.fixture(scope='module')
def weights():
  return vit_release()


@pytest.fixture(scope='module')
def files(tmp_path_factory, weights):
  """The same ViT in every format that holds a 2D ViT."""
  d = tmp_path_factory.mktemp('checkpoints')
  out = {'vit_npz': write_npz(d / 'vit.npz', weights),
         'big_vision': write_npz(d / 'bv.npz', big_vision(weights)),
         'big_vision_scanned': write_npz(d / 'bv_scan.npz', big_vision(weights, scanned=True)),
         'timm': d / 'timm.safetensors', 'hf_vit': d / 'hf.safetensors',
         'hf_vit_base': d / 'hf_base.safetensors'}
  safetensors.numpy.save_file(timm(weights), out['timm'])
  safetensors.numpy.save_file(hf_vit(weights), out['hf_vit'])
  safetensors.numpy.save_file(hf_vit(weights, prefix=''), out['hf_vit_base'])
  return out


# ------------------------------------------------------------------------------------------------
# Formats


def test_every_2d_vit_format_loads_to_identical_parameters_with_a_complete_report(files):
  config = config_for()
  params = abstract_params(config)
  results = {}
  for name, path in files.items():
    config.init.checkpoint = str(path)
    results[name] = pretrained.prepare(config, params)
    assert results[name].report['sources']['video']['format'] == name.split('_scanned')[0].replace(
        '_base', '')
  reference = results.pop('vit_npz')
  for name, result in results.items():
    assert sorted(result.values) == sorted(reference.values), name
    for key, value in reference.values.items():
      np.testing.assert_array_equal(result.values[key], value, err_msg=f'{name}: {key}')

  report = reference.report
  assert report['sources'] == {r: {'checkpoint': str(files['vit_npz']), 'format': 'vit_npz'}
                               for r in ('video', 'audio', 'shared')}
  assert report['inflated']['tokenizer_video/embedding/kernel'] == {
      'source': 'embedding/kernel', 'from': [8, 8, 3, D], 'to': [2, 8, 8, 3, D],
      'how': 'central over 2 frames, input normalisation minus_one_to_one folded in'}
  # [0, 1] pixels p into a checkpoint trained on 2p - 1: kernel x 2, bias - kernel sum.
  kernel = vit_release()['embedding/kernel']
  np.testing.assert_allclose(reference.values['tokenizer_video/embedding/kernel'][1], 2 * kernel)
  np.testing.assert_allclose(reference.values['tokenizer_video/embedding/bias'],
                             vit_release()['embedding/bias'] - kernel.sum((0, 1, 2)), rtol=1e-5)
  assert not reference.values['tokenizer_video/embedding/kernel'][0].any()
  assert report['transformed']['tokenizer_audio/embedding/kernel']['to'] == [8, 8, 1, D]
  audio_pos = report['resized']['posembed_audio/posembed_input']
  assert (audio_pos['from'], audio_pos['to']) == ([1, 16, D], [1, 8, 4, D])
  assert 'bilinear resize (4, 4) -> (8, 4)' in audio_pos['how']
  video_pos = report['resized']['posembed_video/posembed_input']
  assert video_pos['to'] == [1, 2, 4, 4, D] and 'repeated over 2 time steps' in video_pos['how']
  assert report['loaded']['cls_video'] == 'cls + Transformer/posembed_input/pos_embedding[0]'
  assert report['loaded']['encoder/encoderblock_1_audio/MlpBlock_3/Dense_0/kernel'] == (
      'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel')
  assert set(report['unused']) == {'head/kernel', 'head/bias', 'pre_logits/kernel', 'pre_logits/bias'}
  assert 'classifier/output_projection/kernel' in report['init']
  assert 'encoder/bottleneck' in report['init'] and report['excluded'] == []
  # Every parameter is in exactly one category.
  shapes, _ = pretrained.target_layout(params)
  listed = [n for c in ('loaded', 'inflated', 'transformed', 'resized', 'excluded', 'init')
            for n in report[c]]
  assert sorted(listed) == sorted(shapes)
  text = pretrained.format_report(report)
  assert 'inflated: tokenizer_video/embedding/kernel (8, 8, 3, 32) -> (2, 8, 8, 3, 32)' in text
  assert 'unused checkpoint entries: head/bias, head/kernel, pre_logits/bias, pre_logits/kernel' in text
  # The posemb values: the ViT grid (4x4) repeated over the two time steps.
  pe = vit_release()['Transformer/posembed_input/pos_embedding'][:, 1:].reshape(1, 4, 4, D)
  np.testing.assert_array_equal(reference.values['posembed_video/posembed_input'][:, 1], pe)


def test_hf_base_model_report_lists_its_pooler_as_unused(files):
  config = config_for(files['hf_vit_base'])
  report = mapped(config).report
  assert report['unused'] == ['pooler.dense.bias', 'pooler.dense.weight']


def test_static_video_through_the_inflated_encoder_equals_the_2d_vit(files, weights):
  """One tubelet in time (2 frames), so the token set is the image's; central and average
  inflation, float32 and bfloat16 compute."""
  rng = np.random.default_rng(1)
  frame = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  video = np.repeat(frame[:, None], 2, axis=1)  # [B, 2, 32, 32, 3], a static video
  normalized = {'minus_one_to_one': (frame - 0.5) / 0.5, 'none': frame,
                'imagenet': (frame - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])}
  for dtype, kernel, normalization, tolerance in (
      ('float32', 'central', 'minus_one_to_one', 2e-5), ('float32', 'average', 'imagenet', 2e-5),
      ('float32', 'central', 'none', 2e-5), ('bfloat16', 'average', 'minus_one_to_one', 6e-2)):
    config = single_modality('video', files['vit_npz'], **{
        'init.video_kernel': kernel, 'model.dtype': dtype, 'init.pixel_normalization': normalization})
    params = abstract_params(config)
    prepared = pretrained.prepare(config, params)
    assert prepared.report['init'] == ['classifier/output_projection/bias',
                                       'classifier/output_projection/kernel']
    values = {**dict(_flat(random_params(params))), **prepared.values}
    got = np.asarray(_forward(build_model(config), 'video')(_nested(values), video), np.float32)
    np.testing.assert_allclose(got, vit_reference(weights, normalized[normalization]), atol=tolerance,
                               rtol=tolerance, err_msg=f'{dtype} {kernel} {normalization}')


def test_spectrogram_through_the_audio_encoder_equals_the_2d_vit_on_it_as_an_image(files, weights):
  rng = np.random.default_rng(2)
  spectrogram = rng.normal(size=(2, 32, 32)).astype(np.float32)  # [B, time, mels]
  expected = vit_reference(weights, np.repeat(spectrogram[..., None], 3, axis=-1))
  config = single_modality('audio', files['timm'])
  prepared = mapped(config)
  assert prepared.report['transformed']['tokenizer_audio/embedding/kernel']['how'] == (
      'summed over input channels (AST)')
  values = {**dict(_flat(random_params(abstract_params(config)))), **prepared.values}
  got = np.asarray(_forward(build_model(config), 'audio')(_nested(values), spectrogram))
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


def _forward(model, modality):
  def run(params, x):
    return model.apply({'params': params}, {modality: x})['features']['final'][modality]
  return fast_jit(run)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _nested(flat):
  return jax.tree_util.tree_map(jnp.asarray, nested(flat))


def test_scenic_mbt_loads_both_streams_bottleneck_and_head(tmp_path, weights):
  w_audio = vit_release(seed=3)
  state = scenic_mbt(weights, w_audio, n_bottlenecks=2, classes=5)
  folder = tmp_path / 'mbt'
  folder.mkdir()
  (folder / 'checkpoint_100').write_bytes(flax.serialization.msgpack_serialize(state))
  prepared = mapped(config_for(folder, **{'init.pixel_normalization': 'none'}))
  v, report = prepared.values, prepared.report
  p = state['params']
  assert report['sources']['video']['format'] == 'scenic'
  np.testing.assert_array_equal(v['tokenizer_video/embedding/kernel'], p['embedding']['kernel'])
  np.testing.assert_array_equal(v['tokenizer_audio/embedding/kernel'],
                                p['embedding_spectrogram']['kernel'])
  np.testing.assert_array_equal(v['encoder/bottleneck'], p['bottleneck'][:, :2])
  assert report['resized']['encoder/bottleneck']['how'] == 'first 2 tokens'
  np.testing.assert_array_equal(v['classifier/output_projection/kernel'],
                                p['output_projection']['kernel'])
  pe = p['Transformer']['posembed_input_spectrogram']['pos_embedding']
  np.testing.assert_array_equal(v['posembed_audio/posembed_input'], pe[:, 1:].reshape(1, 8, 4, D))
  np.testing.assert_array_equal(v['cls_audio'], p['clsspectrogram'] + pe[:, :1])
  for m in ('video', 'audio'):
    np.testing.assert_array_equal(v[f'encoder/encoder_norm_{m}/scale'],
                                  weights['Transformer/encoder_norm/scale'])
  rgb_block, spec_block = 'Transformer/encoderblock_1/', 'Transformer/encoderblock_1_spectrogram/'
  np.testing.assert_array_equal(v[f'encoder/encoderblock_1_video/{ATT}/query/kernel'],
                                weights[f'{rgb_block}{ATT}/query/kernel'])
  np.testing.assert_array_equal(v['encoder/encoderblock_1_audio/MlpBlock_3/Dense_1/bias'],
                                w_audio[f'{rgb_block}MlpBlock_3/Dense_1/bias'])
  assert (report['loaded']['encoder/encoderblock_1_audio/LayerNorm_2/scale'] ==
          f'{spec_block}LayerNorm_1/scale')
  assert report['unused'] == ['global_step/... (1 entries outside the model parameters)',
                              'opt_state/... (1 entries outside the model parameters)',
                              'rng/... (1 entries outside the model parameters)']
  assert not any(n.startswith(('encoder/', 'tokenizer', 'posembed', 'cls', 'classifier'))
                 for n in report['init'])


def test_scenic_vivit_legacy_optimizer_checkpoint_loads_the_video_encoder(tmp_path, weights):
  """ViViT spatio-temporal (3D kernel, flat spatio-temporal posemb) in a flax.optim train state."""
  params = {k: v for k, v in weights.items() if not k.startswith('pre_logits')}
  params = {**{k: v for k, v in params.items() if 'encoderblock' not in k},
            **{f'Transformer/encoderblock_{i}/{k}': v for i in range(LAYERS)
               for k, v in linen_block(weights, f'Transformer/encoderblock_{i}/').items()}}
  params['embedding/kernel'] = np.stack([weights['embedding/kernel']] * 2) / 2
  params['Transformer/posembed_input/pos_embedding'] = np.random.default_rng(0).normal(
      size=(1, 1 + 2 * 16, D)).astype(np.float32)
  path = tmp_path / 'checkpoint_7'
  path.write_bytes(flax.serialization.msgpack_serialize(
      {'optimizer': {'target': nested(params), 'state': {'step': 7}}}))
  config = config_for(path, **{'init.modalities': ('video',), 'init.pixel_normalization': 'none'})
  prepared = mapped(config)
  np.testing.assert_array_equal(prepared.values['tokenizer_video/embedding/kernel'],
                                params['embedding/kernel'])
  pe = params['Transformer/posembed_input/pos_embedding']
  np.testing.assert_array_equal(prepared.values['posembed_video/posembed_input'],
                                pe[:, 1:].reshape(1, 2, 4, 4, D))
  assert prepared.report['sources'] == {'video': {'checkpoint': str(path), 'format': 'scenic'},
                                        'shared': {'checkpoint': str(path), 'format': 'scenic'}}
  assert not any(n.startswith(('tokenizer_audio', 'encoder/encoderblock_0_audio'))
                 for n in prepared.values)


def _save_own_checkpoint(workdir, config):
  model, tx, _, _ = setup(config)
  params = jax.tree_util.tree_map(jnp.asarray, random_params(abstract_params(config), seed=4))
  state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  with checkpointing.Checkpointer(workdir) as ckpt:
    ckpt.save(3, state, {'step': 3}, force=True)
  return params


def test_own_checkpoint_finetunes_with_exclude_for_the_heads(tmp_path):
  pretraining = tiny_config(**{'data.num_classes': {'class': 3}})
  saved = dict(_flat(jax.tree_util.tree_map(np.asarray, _save_own_checkpoint(tmp_path, pretraining))))
  config = tiny_config()
  config.init.checkpoint = str(tmp_path)
  with pytest.raises(PretrainedError, match=r"classifier/output_projection/kernel: the checkpoint's "
                     r'classifier/output_projection/kernel has shape \(32, 3\), the model needs '
                     r'\(32, 5\)[\s\S]*init.exclude'):
    mapped(config)
  config.init.exclude = ('^classifier/',)
  prepared = mapped(config)
  assert prepared.report['sources']['shared']['format'] == 'avt'
  assert prepared.report['excluded'] == ['classifier/output_projection/bias',
                                         'classifier/output_projection/kernel']
  assert prepared.report['init'] == [] and prepared.report['unused'] == []
  for name, value in saved.items():
    if not name.startswith('classifier/'):
      np.testing.assert_array_equal(prepared.values[name], value, err_msg=name)
  # The same checkpoint into the scanned layout: stacked layer by layer.
  config.model.scan_layers = True
  scanned = mapped(config).values
  np.testing.assert_array_equal(scanned['encoder/encoderblocks_fused/audio/LayerNorm_0/scale'][0],
                                saved['encoder/encoderblock_1_audio/LayerNorm_0/scale'])


def test_separate_checkpoint_per_modality(files, weights, tmp_path):
  other = vit_release(seed=9)
  config = config_for(files['vit_npz'])
  config.init.audio.checkpoint = str(write_npz(tmp_path / 'audio.npz', other))
  report = mapped(config)
  assert report.report['sources']['audio']['checkpoint'].endswith('audio.npz')
  assert report.report['sources']['video']['checkpoint'] == str(files['vit_npz'])
  np.testing.assert_array_equal(report.values['encoder/encoder_norm_audio/bias'],
                                other['Transformer/encoder_norm/bias'])
  np.testing.assert_array_equal(report.values['encoder/encoder_norm_video/bias'],
                                weights['Transformer/encoder_norm/bias'])
  video_only = config_for(files['vit_npz'], **{'init.modalities': ('video',)})
  assert not any('audio' in n for n in mapped(video_only).values)


@pytest.mark.parametrize('fmt', ['big_vision', 'hf_dinov2'])
def test_scanned_bfloat16_model_on_a_sharded_mesh_gets_its_shards(files, dinov2_files, fmt):
  """The train loop's sequence on a data=2 x fsdp=2 x model=2 mesh of 8 CPU devices; a 3-layer model
  (2 unimodal layers stacked) with layer 1 of video excluded and layer 2 absent from the 2-layer ViT."""
  checkpoint = {**files, **dinov2_files}[fmt]
  config = config_for(checkpoint, **{
      'model.scan_layers': True, 'model.dtype': 'bfloat16', 'model.num_layers': 3,
      'model.fusion_layer': 2, 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.model': 2,
      'init.exclude': ('encoderblock_1_video/',)})
  config.loss.weights = ml_collections.ConfigDict({'classification': 1.0})  # a smaller init to compile
  model, tx, _, init = setup(config)
  mesh = sharding.make_mesh(config.mesh)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(abstract, mesh, param_axes(config, model))
  prepared = pretrained.prepare(config, abstract.params)
  assert set(prepared.layer_masks) == {f'encoder/encoderblocks_video/{k}' for k in
                                       pretrained.layouts.BLOCK_KEYS}
  with jax.set_mesh(mesh):
    initial = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    before = jax.tree_util.tree_map(np.asarray, initial.params)
    state = pretrained.apply(prepared, initial, shardings, tx)
  params = dict(_flat(state.params))
  targets = dict(_flat(shardings.params))
  split = 0
  for name, leaf in params.items():
    assert leaf.sharding.is_equivalent_to(targets[name], leaf.ndim), name
    if not leaf.sharding.is_fully_replicated:
      split += 1
      assert all(s.data.size < leaf.size for s in leaf.addressable_shards), name
  assert split > 0
  unscanned = mapped(config_for(checkpoint, **{'model.num_layers': 3,
                                                       'model.fusion_layer': 2})).values
  stacked = 'encoder/encoderblocks_video/MlpBlock_3/Dense_0/kernel'
  got = np.asarray(params[stacked])
  np.testing.assert_array_equal(got[0], unscanned['encoder/encoderblock_0_video/MlpBlock_3/Dense_0/kernel'])
  np.testing.assert_array_equal(got[1], dict(_flat(before))[stacked][1])  # excluded: kept its init
  np.testing.assert_array_equal(
      np.asarray(params['encoder/encoderblocks_audio/LayerNorm_2/bias'])[1],
      unscanned['encoder/encoderblock_1_audio/LayerNorm_2/bias'])
  # The unsharded host path (probes, notebooks) gives the same parameters, masks included.
  host = dict(_flat(pretrained.load_into(config, before)))
  assert set(host) == set(params)
  for name, leaf in params.items():
    np.testing.assert_array_equal(host[name], np.asarray(leaf), err_msg=name)
  fused = 'encoder/encoderblocks_fused/video/LayerNorm_0/scale'
  np.testing.assert_array_equal(np.asarray(params[fused]), dict(_flat(before))[fused])
  assert 'encoder/encoderblock_2_video/LayerNorm_0/scale' in prepared.report['init']
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x: not np.any(np.asarray(x, np.float32)), state.opt_state[1][0].mu))


# ------------------------------------------------------------------------------------------------
# Errors


def test_pickles_are_refused_with_conversion_instructions(tmp_path, weights):
  pth = tmp_path / 'model.pth'
  pth.write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(PretrainedError, match=r'model\.pth: PyTorch pickle .* safetensors'):
    pretrained.read(pth)
  torch_zip = tmp_path / 'looks_like.npz'
  with zipfile.ZipFile(torch_zip, 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02.')
  with pytest.raises(PretrainedError, match='pickle'):
    pretrained.read(torch_zip)
  with pytest.raises(PretrainedError, match='pickle'):
    pretrained.read(write_npz(tmp_path / 'objects.npz', {'a': np.array([{'x': 1}], dtype=object)}))


@pytest.mark.parametrize('content, message', [
    (b'not a checkpoint at all', r'junk\.npz: not a readable \.npz'),
    (None, r'no such file or directory'),
])
def test_unreadable_files_name_the_file(tmp_path, content, message):
  path = tmp_path / 'junk.npz'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(PretrainedError, match=message):
    pretrained.read(path)


def test_truncated_and_unknown_files(tmp_path, files):
  data = files['vit_npz'].read_bytes()
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(PretrainedError, match=r'cut\.npz: not a readable \.npz'):
    pretrained.read(cut)
  other = tmp_path / 'weights.dat'
  other.write_bytes(bytes(range(7, 200)))
  with pytest.raises(PretrainedError, match=r'weights\.dat: not a checkpoint this project reads'):
    pretrained.read(other)
  with pytest.raises(PretrainedError, match='Cannot tell the checkpoint format'):
    pretrained.detect('npz', {'some/array': np.zeros(3)})


def test_missing_entries_are_named(tmp_path, weights):
  missing = dict(weights)
  del missing['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel']
  config = config_for(write_npz(tmp_path / 'missing.npz', missing))
  with pytest.raises(PretrainedError, match=r"missing\.npz.*lacks \['encoderblock_1/MlpBlock_3/Dense_0/"
                     r"kernel'\]"):
    mapped(config)
  flat = timm(weights)
  del flat['norm.weight']
  path = tmp_path / 'timm_missing.safetensors'
  safetensors.numpy.save_file(flat, path)
  with pytest.raises(PretrainedError, match=r"timm_missing\.safetensors: missing checkpoint entry "
                     r"'norm\.weight'"):
    mapped(config_for(path))


def test_shapes_that_cannot_be_mapped_stop_with_name_and_both_shapes(tmp_path):
  heads4 = write_npz(tmp_path / 'h4.npz', vit_release(heads=4))
  with pytest.raises(PretrainedError, match=r'4 attention heads, the model 2 \(set model.num_heads=4\)'):
    mapped(config_for(heads4))
  wide = write_npz(tmp_path / 'wide.npz', vit_release(width=48))
  with pytest.raises(PretrainedError, match=r'shape \(1, 17, 48\)|has width 48'):
    mapped(config_for(wide))


def test_unsupported_variants_and_bad_config_fields(tmp_path, weights, files):
  flat = timm(weights)
  flat['blocks.0.mlp.w12.weight'] = np.ones((2 * MLP, D), np.float32)
  path = tmp_path / 'vitg.safetensors'
  safetensors.numpy.save_file(flat, path)
  with pytest.raises(PretrainedError, match=r"'blocks\.0\.mlp\.w12\.weight'.*SwiGLU MLP"):
    mapped(config_for(path))
  for field, value, message in (('format', 'torch', r'config\.init\.format: expected auto'),
                                ('video_kernel', 'middle', r'config\.init\.video_kernel'),
                                ('pixel_normalization', 'unit', r'config\.init\.pixel_normalization'),
                                ('exclude', ('[',), r'config\.init\.exclude: .\[. is not a regular'),
                                ('modalities', ('text',), r'config\.init\.modalities')):
    config = config_for(files['vit_npz'], **{f'init.{field}': value})
    with pytest.raises(PretrainedError, match=message):
      pretrained.validate(config)


def test_report_is_saved_for_results(tmp_path, files):
  report = mapped(config_for(files['vit_npz'])).report
  assert pretrained.saved_report(str(tmp_path)) == {}
  pretrained.save_report(report, str(tmp_path))
  assert pretrained.saved_report(str(tmp_path)) == {'init': report}


@pytest.mark.parametrize('name, warmup', [('kinetics_sounds', 897), ('vggsound', 6640),
                                          ('epic_kitchens_100', 2615)])
def test_paper_configs_use_the_imagenet21k_finetuning_recipe(name, warmup):
  spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / 'configs' /
                                                f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  pretrained.validate(c)
  assert (c.optim.name, c.optim.learning_rate, c.optim.warmup_steps) == ('adamw', 1e-4, warmup)
  assert (c.init.video_kernel, tuple(c.init.modalities)) == ('central', ('video', 'audio'))
  assert 'ViT-B_16.npz' in module.__doc__ and '--config.init.checkpoint=' in module.__doc__
  smoke = module.get_config('smoke')
  assert smoke.loss.label_smoothing == get_base_config().loss.label_smoothing  # smoke runs unchanged


# ------------------------------------------------------------------------------------------------
# DINOv2 layouts: LayerScale folded, extra tokens unused


@pytest.fixture(scope='module')
def dinov2_files(tmp_path_factory, weights):
  d = tmp_path_factory.mktemp('dinov2')
  gammas = layer_scales()
  out = {'hf_dinov2': (d / 'hf_dinov2.safetensors', hf_dinov2(weights, gammas)),
         'hf_dinov2_classifier': (d / 'hf_cls.safetensors', hf_dinov2(weights, gammas, 'dinov2.')),
         'hf_dinov2_registers': (d / 'hf_reg.safetensors', hf_dinov2(weights, gammas, registers=4)),
         'dinov2': (d / 'dinov2.safetensors', dinov2_original(weights, gammas)),
         'dinov2_chunked_registers': (d / 'dinov2_reg.safetensors',
                                      dinov2_original(weights, gammas, registers=4, chunks=2))}
  for path, flat in out.values():
    safetensors.numpy.save_file(flat, path)
  return {name: path for name, (path, _) in out.items()}


def test_dinov2_layouts_load_alike_with_layer_scale_folded_and_tokens_reported_unused(dinov2_files):
  gammas = layer_scales()
  config = single_modality('video', '', **{'init.pixel_normalization': 'none'})
  results = {}
  for name, path in dinov2_files.items():
    config.init.checkpoint = str(path)
    results[name] = mapped(config)
    assert results[name].report['sources']['video']['format'] == name.split('_')[0] + (
        '_dinov2' if name.startswith('hf') else ''), name
  reference = results['hf_dinov2']
  for name, result in results.items():
    for key, value in reference.values.items():
      np.testing.assert_allclose(result.values[key], value, rtol=1e-6, err_msg=f'{name}: {key}')
  out = 'encoder/encoderblock_1_video/MultiHeadDotProductAttention_1/out'
  np.testing.assert_allclose(
      reference.values[f'{out}/bias'],
      vit_release()[f'Transformer/encoderblock_1/{ATT}/out/bias'] * gammas[(1, 1)], rtol=1e-6)
  assert reference.report['loaded'][f'{out}/kernel'] == (
      'encoder.layer.1.attention.output.dense.weight x encoder.layer.1.layer_scale1.lambda1')
  assert results['dinov2'].report['loaded']['encoder/encoderblock_0_video/MlpBlock_3/Dense_1/bias'] == (
      'blocks.0.mlp.fc2.bias x blocks.0.ls2.gamma')
  unused = {name: r.report['unused'] for name, r in results.items()}
  assert unused['hf_dinov2'] == ['embeddings.mask_token']
  assert unused['hf_dinov2_classifier'] == ['classifier.bias', 'classifier.weight',
                                            'dinov2.embeddings.mask_token']
  assert unused['hf_dinov2_registers'] == ['embeddings.mask_token', 'embeddings.register_tokens']
  assert unused['dinov2_chunked_registers'] == ['mask_token', 'register_tokens']


def test_static_video_through_a_dinov2_encoder_equals_the_2d_model_with_layer_scale(dinov2_files,
                                                                                    weights):
  """Exact GELU (`model.gelu_approximate=False`, DINOv2's) and LayerScale in the numpy reference."""
  rng = np.random.default_rng(3)
  frame = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  normalized = (frame - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  expected = vit_reference(weights, normalized, layer_scales(), exact_gelu=True)
  for scan in (False, True):
    config = single_modality('video', dinov2_files['dinov2'], **{
        'model.gelu_approximate': False, 'init.pixel_normalization': 'imagenet',
        'model.scan_layers': scan})
    params = abstract_params(config)
    values = {**dict(_flat(random_params(params))), **mapped(config).values}
    got = np.asarray(_forward(build_model(config), 'video')(_nested(values),
                                                           np.repeat(frame[:, None], 2, axis=1)))
    np.testing.assert_allclose(got, expected, atol=3e-5, rtol=3e-5, err_msg=f'scan_layers={scan}')
  approximate = single_modality('video', dinov2_files['dinov2'], **{
      'init.pixel_normalization': 'imagenet'})
  values = {**dict(_flat(random_params(abstract_params(approximate)))), **mapped(approximate).values}
  got = np.asarray(_forward(build_model(approximate), 'video')(_nested(values),
                                                               np.repeat(frame[:, None], 2, axis=1)))
  assert np.abs(got - expected).max() > 1e-4  # the tanh GELU is another function


# ------------------------------------------------------------------------------------------------
# Patch sizes: FlexiViT resampling, or the model at the checkpoint's patch size


@pytest.mark.parametrize('old, new', [((8, 8), (12, 12)), ((14, 14), (16, 16)), ((16, 16), (16, 8))])
def test_resampled_kernel_keeps_tokens_of_resized_patches(old, new):
  """<resize(x), w_hat> = <x, w> for every patch x when upsampling; least squares otherwise."""
  from avt_jax.pretrained import patch_resize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
  patches = rng.normal(size=(500, *old, 3)).astype(np.float32)
  resized = np.asarray(jax.image.resize(patches, (500, *new, 3), 'bilinear'))
  new_kernel = patch_resize.resample_kernel(kernel, new)
  assert new_kernel.shape == (*new, 3, 5)
  want = np.einsum('bhwc,hwcd->bd', patches, kernel)
  got = np.einsum('bhwc,hwcd->bd', resized, new_kernel)
  if new[0] >= old[0] and new[1] >= old[1]:
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  else:  # downsampling loses detail: the least-squares optimum beats resizing the kernel (FlexiViT)
    naive = np.asarray(jax.image.resize(kernel, (*new, 3, 5), 'bilinear')) * (
        math.prod(old) / math.prod(new))
    plain = np.einsum('bhwc,hwcd->bd', resized, naive)
    assert ((got - want) ** 2).mean() < ((plain - want) ** 2).mean()
  tubelet = patch_resize.resample_kernel(np.stack([kernel, 2 * kernel]), new)
  np.testing.assert_allclose(tubelet[1], 2 * new_kernel, rtol=1e-5)


def test_other_patch_sizes_are_resampled_in_every_format_and_reported(tmp_path, weights):
  patch16 = write_npz(tmp_path / 'p16.npz', vit_release(patch=16))  # a 2x2 grid of 16 px patches
  report = mapped(config_for(patch16)).report
  video = report['inflated']['tokenizer_video/embedding/kernel']
  assert (video['from'], video['to']) == ([16, 16, 3, D], [2, 8, 8, 3, D])
  assert video['how'] == ('central over 2 frames, input normalisation minus_one_to_one folded in, '
                          'patch 16x16 -> 8x8 (FlexiViT pseudo-inverse resize, least squares: '
                          'downsampling)')
  audio = report['transformed']['tokenizer_audio/embedding/kernel']
  assert audio['to'] == [8, 8, 1, D] and 'patch 16x16 -> 8x8' in audio['how']
  # An AVT checkpoint (kind 'avt') with 8 px patches into a model with 16 px patches.
  c8 = config_for()
  saved = dict(_flat(jax.tree_util.tree_map(np.asarray, _save_own_checkpoint(tmp_path / 'own', c8))))
  c16 = config_for(tmp_path / 'own', **{'model.video_patch': (2, 16, 16), 'model.audio_patch': (16, 16),
                                        'init.exclude': ('decoder',)})  # pixel targets: other sizes
  prepared = mapped(c16)
  entry = prepared.report['transformed']['tokenizer_video/embedding/kernel']
  assert entry['how'] == 'patch 8x8 -> 16x16 (FlexiViT pseudo-inverse resize, exact on bilinearly resized patches)'
  from avt_jax.pretrained import patch_resize  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(prepared.values['tokenizer_video/embedding/kernel'],
                             patch_resize.resample_kernel(saved['tokenizer_video/embedding/kernel'],
                                                          (16, 16)), rtol=1e-6)


def test_model_built_at_the_checkpoints_patch_size(tmp_path):
  """A 14 px DINOv2 checkpoint into video_patch (2, 14, 14) / audio_patch (14, 14) on 28 px frames
  and 56 x 28 spectrograms: kernels inflated / summed, never resampled; static video = 2D model."""
  w14 = vit_release(patch=14)  # 32 // 14 = 2: a 2x2 grid
  path = tmp_path / 'dinov2_14.safetensors'
  safetensors.numpy.save_file(dinov2_original(w14, layer_scales()), path)
  config = config_for(path, **{'model.video_patch': (2, 14, 14), 'model.audio_patch': (14, 14),
                               'input.image_size': 28, 'input.audio_frames': 56, 'input.n_mels': 28,
                               'init.pixel_normalization': 'none', 'model.gelu_approximate': False})
  report = mapped(config).report
  assert report['inflated']['tokenizer_video/embedding/kernel']['how'] == 'central over 2 frames'
  assert report['transformed']['tokenizer_audio/embedding/kernel']['to'] == [14, 14, 1, D]
  assert report['resized']['posembed_audio/posembed_input']['to'] == [1, 4, 2, D]
  video_only = single_modality('video', path, **{
      'model.video_patch': (2, 14, 14), 'input.image_size': 28, 'init.pixel_normalization': 'none',
      'model.gelu_approximate': False})
  frame = np.random.default_rng(4).normal(size=(2, 28, 28, 3)).astype(np.float32)
  values = {**dict(_flat(random_params(abstract_params(video_only)))), **mapped(video_only).values}
  got = np.asarray(_forward(build_model(video_only), 'video')(_nested(values),
                                                             np.repeat(frame[:, None], 2, axis=1)))
  np.testing.assert_allclose(got, vit_reference(w14, frame, layer_scales(), exact_gelu=True),
                             atol=3e-5, rtol=3e-5)


# ------------------------------------------------------------------------------------------------
# Position-embedding layouts: prefix rows from what the file says, rectangular grids (issue 23.3)


def _timm_audio(tmp_path, name, rows, cls=True, registers=0, side=None):
  """The tiny ViT in timm's layout with pos_embed row r = r (row 0 = 0), for reading the split."""
  flat = timm(vit_release())
  flat['pos_embed'] = np.broadcast_to(np.arange(rows, dtype=np.float32)[None, :, None],
                                      (1, rows, D)).copy()
  flat['cls_token'] = np.full((1, 1, D), 0.5, np.float32)
  if not cls:
    del flat['cls_token']
  if registers:
    flat['reg_token'] = np.zeros((1, registers, D), np.float32)
  folder = tmp_path / name
  folder.mkdir()
  safetensors.numpy.save_file(flat, folder / 'model.safetensors')
  if side is not None:
    (folder / 'config.json').write_text(json.dumps(side))
  return folder / 'model.safetensors'


def _audio_only(path, grid, **overrides):
  return single_modality('audio', path, **{'input.audio_frames': grid[0] * PATCH,
                                          'input.n_mels': grid[1] * PATCH, **overrides})


@pytest.mark.parametrize('grid', [(4, 2), (2, 2), (8, 1)])
def test_timm_rectangular_grids_split_the_cls_row_by_the_models_grid(tmp_path, grid):
  """4x2: 9 rows (a square count) are still 1 CLS + 8 patches; 2x2: 5 rows; 8x1: 9 rows."""
  n = grid[0] * grid[1]
  prepared = mapped(_audio_only(_timm_audio(tmp_path, 'f', 1 + n), grid))
  np.testing.assert_array_equal(prepared.values['posembed_audio/posembed_input'][..., 0],
                                np.arange(1, n + 1, dtype=np.float32).reshape(1, *grid))
  np.testing.assert_array_equal(prepared.values['cls_audio'], np.full((1, 1, D), 0.5))
  how = prepared.report['resized']['posembed_audio/posembed_input']['how']
  assert how == f"1 prefix rows (the model's patch grid), laid out on a {grid} grid"
  assert prepared.report['loaded']['cls_audio'] == 'cls_token + pos_embed[0]'


def test_timm_prefix_rows_from_config_json_and_from_config_init(tmp_path):
  # no_embed_class (its config.json says so): 8 patch rows, the CLS token keeps its value.
  path = _timm_audio(tmp_path, 'noembed', 8, side={'architecture': 'deit3_small_patch8',
                                                    'model_args': {'no_embed_class': True}})
  prepared = mapped(_audio_only(path, (4, 2)))
  np.testing.assert_array_equal(prepared.values['posembed_audio/posembed_input'][0, ..., 0],
                                np.arange(8, dtype=np.float32).reshape(4, 2))
  np.testing.assert_array_equal(prepared.values['cls_audio'], np.full((1, 1, D), 0.5))
  assert prepared.report['resized']['posembed_audio/posembed_input']['how'].startswith(
      '0 prefix rows (the timm layout)')
  # 1 CLS + 4 registers + 4 patches (2x2), or no prefix rows and 9 patches (3x3): both square, the
  # model's grids (4x4 video, 8x4 audio) match neither, and the file does not say: stop.
  ambiguous = _timm_audio(tmp_path, 'reg', 9, registers=4)
  with pytest.raises(PretrainedError, match=r"reg/model\.safetensors \(timm\): cannot tell the layout of "
                     r"pos_embed \(9 rows: 5 prefix rows \+ 4 patches, 0 prefix rows \+ 9 patches\)"
                     r".*config\.init\.posemb_grid"):
    mapped(config_for(ambiguous))
  stated = mapped(config_for(ambiguous, **{'init.posemb_grid': (2, 2)}))
  assert stated.report['resized']['posembed_video/posembed_input']['how'].startswith(
      '5 prefix rows (the stated patch grid (2, 2)), laid out on a (2, 2) grid, bilinear resize')
  assert 'pos_embed[1:5]' in stated.report['unused'] and 'reg_token' in stated.report['unused']
  np.testing.assert_array_equal(stated.values['cls_video'], np.full((1, 1, D), 0.5))  # 0.5 + row 0
  # timm's pretrained_cfg states the input size: a rectangular 16 x 64 px image of 8 px patches.
  wide = _timm_audio(tmp_path, 'wide', 17, side={'pretrained_cfg': {'input_size': [3, 16, 64]}})
  how = mapped(config_for(wide)).report['resized']['posembed_video/posembed_input']['how']
  assert how.startswith('1 prefix rows (the stated patch grid (2, 8)), laid out on a (2, 8) grid, '
                        'bilinear resize (2, 8) -> (4, 4)')
  with pytest.raises(PretrainedError, match=r'config\.init\.audio\.posemb_grid: expected \(\) or two'):
    pretrained.validate(config_for(wide, **{'init.audio.posemb_grid': (0, 3)}))


def test_hugging_face_config_json_states_a_rectangular_grid(tmp_path, weights):
  folder = tmp_path / 'hf'
  folder.mkdir()
  safetensors.numpy.save_file(hf_vit(weights), folder / 'model.safetensors')
  (folder / 'config.json').write_text(json.dumps({'image_size': [16, 64], 'patch_size': 8}))
  prepared = mapped(single_modality('video', folder / 'model.safetensors'))
  how = prepared.report['resized']['posembed_video/posembed_input']['how']
  assert how == ('1 prefix rows (the stated patch grid (2, 8)), laid out on a (2, 8) grid, '
                 'bilinear resize (2, 8) -> (4, 4), repeated over 1 time steps')
  (folder / 'config.json').write_text('{"image_size": 32,')
  with pytest.raises(PretrainedError, match=r'hf/config\.json: not readable JSON'):
    mapped(single_modality('video', folder / 'model.safetensors'))


def test_bicubic_posemb_resize_is_cubic_convolution():
  """Keys' cubic convolution (half-pixel centres, clamped edges): the identity at equal sizes,
  constants kept, and with Keys' a = -0.5 (the only a whose kernel reproduces linear functions) ramps
  kept away from the clamped edges; PyTorch's a = -0.75 against onnxruntime's Resize on DINOv2's real
  37x37 grid in tests/test_pretrained_dinov2.py."""
  from avt_jax.pretrained import mapping  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(mapping._cubic_matrix(7, 7), np.eye(7), atol=1e-12)
  np.testing.assert_allclose(mapping._cubic_matrix(37, 16).sum(1), 1.0, atol=1e-12)
  ramp = np.arange(37, dtype=np.float64)
  centres = (np.arange(16) + 0.5) * 37 / 16 - 0.5
  np.testing.assert_allclose((mapping._cubic_matrix(37, 16, a=-0.5) @ ramp)[2:-2], centres[2:-2],
                             atol=1e-9)
  assert np.abs(mapping._cubic_matrix(37, 16) @ ramp - centres)[2:-2].max() > 1e-3
  grid = np.full((1, 37, 37, 2), 0.25, np.float32)
  np.testing.assert_allclose(mapping.resize_bicubic(grid, (16, 8)), np.full((1, 16, 8, 2), 0.25),
                             rtol=1e-6)


def test_a_frozen_pattern_that_matches_nothing_stops_before_training(files):
  from avt_jax import preflight  # pylint: disable=g-import-not-at-top
  from avt_jax.models import ConfigError  # pylint: disable=g-import-not-at-top
  config = config_for(files['vit_npz'], **{'optim.frozen': 'encoder/encoderblock_7_video/.*'})
  with pytest.raises(ConfigError, match=r"^config\.optim\.frozen: 'encoder/encoderblock_7_video/\.\*' "
                                        r'matches 0 of the \d+ parameters'):
    preflight._read_init(config)  # pylint: disable=protected-access
  config.optim.frozen = 'encoder/encoderblock_0_video/.*'
  assert preflight._read_init(config) is not None  # pylint: disable=protected-access
