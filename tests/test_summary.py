"""Tests for avt_jax.models.summary at a tiny size: parameter counts and FLOPs against hand formulas."""

import functools

import pytest

from avt_jax import command_line
from avt_jax.default_config import get_base_config
from avt_jax.models import summary

WIDTH, MLP, LAYERS, FUSION_LAYER, BOTTLENECKS, CLASSES = 32, 128, 3, 1, 2, 7
VIDEO_PATCHES, AUDIO_PATCHES = 2 * 4 * 4, 8 * 2  # 4x32x32 video in 2x8x8, 64x16 audio in 8x8
VIDEO_PATCH_DIM, AUDIO_PATCH_DIM = 2 * 8 * 8 * 3, 8 * 8


def _config(fusion: str = 'bottleneck'):
  c = get_base_config()
  c.model.update(size='tiny', hidden_size=WIDTH, num_layers=LAYERS, num_heads=2, mlp_dim=MLP,
                 fusion=fusion, fusion_layer=FUSION_LAYER, n_bottlenecks=BOTTLENECKS,
                 video_patch=(2, 8, 8), audio_patch=(8, 8), decoder_width=16, decoder_heads=2,
                 decoder_mlp_dim=32, segment_seconds=0.16, num_segments=1)
  c.input.update(num_frames=4, image_size=32, audio_frames=64, n_mels=16)
  c.data.num_classes = {'class': CLASSES}
  return c


def _block_params(d: int, mlp: int) -> int:
  attention = 4 * (d * d + d)  # query, key, value, out: kernels and biases
  layer_norms = 2 * 2 * d
  return attention + layer_norms + (d * mlp + mlp) + (mlp * d + d)


@pytest.mark.parametrize('fusion', ['bottleneck', 'concat', 'late'])
def test_parameter_counts_match_the_hand_formula(fusion):
  counts = summary.summarize(_config(fusion), passes=())['params']
  blocks = 2 * LAYERS  # one stack per modality
  if fusion == 'concat':
    blocks = 2 * FUSION_LAYER + (LAYERS - FUSION_LAYER)  # fused layers: one block for both
  bottleneck = BOTTLENECKS * WIDTH if fusion == 'bottleneck' else 0
  assert counts['encoder'] == blocks * _block_params(WIDTH, MLP) + 2 * 2 * WIDTH + bottleneck
  assert counts['tokenizer_video'] == VIDEO_PATCH_DIM * WIDTH + WIDTH
  assert counts['posembed_audio'] == AUDIO_PATCHES * WIDTH
  assert counts['classifier'] == WIDTH * CLASSES + CLASSES
  assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')


def test_inference_uses_only_the_classification_parameters():
  result = summary.summarize(_config(), passes=())
  counts = result['params']
  inference = ('tokenizer_video', 'tokenizer_audio', 'posembed_video', 'posembed_audio', 'cls_video',
               'cls_audio', 'encoder', 'classifier', 'logit_fusion')
  assert result['inference_params'] == sum(counts[name] for name in inference)
  assert result['inference_params'] < counts['total']


def test_inference_flops_per_clip_match_the_matmul_count():
  """XLA counts a multiply-add as 2 FLOPs and also counts the elementwise work (norms, softmax,
  GELU), so it must lie a little above the count of matrix products."""
  result = summary.summarize(_config(), batch=2, passes=('inference',))

  def layer(tokens):
    dense = 2 * tokens * (4 * WIDTH * WIDTH + 2 * WIDTH * MLP)
    attention = 2 * 2 * tokens * tokens * WIDTH  # q.k and weights.v
    return dense + attention

  encoder = sum(FUSION_LAYER * layer(n + 1) + (LAYERS - FUSION_LAYER) * layer(n + 1 + BOTTLENECKS)
                for n in (VIDEO_PATCHES, AUDIO_PATCHES))  # + CLS, + bottleneck tokens when fused
  embedding = 2 * WIDTH * (VIDEO_PATCHES * VIDEO_PATCH_DIM + AUDIO_PATCHES * AUDIO_PATCH_DIM)
  classifier = 2 * 2 * WIDTH * CLASSES
  hand = encoder + embedding + classifier  # per clip
  assert hand <= result['flops']['inference'] <= 1.15 * hand


def test_unknown_pass_is_rejected():
  with pytest.raises(ValueError, match='passes'):
    summary.summarize(_config(), passes=('backward',))


def test_command_line_overrides_config_fields_and_refuses_a_field_set_twice(capsys):
  argv = ['--config.model.size=small', '--num_classes=7']
  define = functools.partial(summary.define_flags, argv=argv)
  fv, _ = command_line.parse(summary.PROG, summary.USAGE, define, argv)
  config = summary.config_from_flags(fv)
  assert (config.model.size, config.model.fusion) == ('small', 'bottleneck')  # --size not given
  assert dict(config.data.num_classes) == {'class': 7}
  argv = ['--size=tiny', '--config.model.size=small']
  fv, _ = command_line.parse(summary.PROG, summary.USAGE,
                             functools.partial(summary.define_flags, argv=argv), argv)
  with pytest.raises(SystemExit) as exit_info:
    summary.config_from_flags(fv)
  assert exit_info.value.code == 2
  assert '--size and --config.model.size set the same field' in capsys.readouterr().err
