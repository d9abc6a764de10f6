"""AVT: audio-video Transformer with bottleneck fusion, a shared classifier and self-supervised heads."""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avt_jax.models import masking
from avt_jax.models.decoders import MaskedDecoder
from avt_jax.models.fusion import BottleneckFusion
from avt_jax.models.heads import (ClassificationHead, ContrastiveProjection, LogitScale, MatchingHead,
                                  sample_hard_negatives)
from avt_jax.models.tokenizers import (PositionEmbedding, SpectrogramPatchEmbedding, TubeletEmbedding,
                                       patchify)
from avt_jax.models.transformer import ATTENTION_COLLECTION, DEFAULT_CHUNK_SIZE

MODALITIES = ('video', 'audio')
OBJECTIVES = ('classification', 'contrastive', 'matching', 'masked_video', 'masked_audio',
              'masked_audio_segment')
CLASSIFIERS = ('token', 'gap')


class AVT(nn.Module):
  """Audio-video Transformer.

  Inputs are `video` [batch, frames, height, width, 3] and `audio` [batch, time, mels] (log-mel,
  100 frames/s). Each modality is tokenized (tubelets / spectrogram patches, learned position
  embeddings, a CLS token), encoded by its own Transformer stack and fused through bottleneck tokens
  (`BottleneckFusion`). Which branches are computed is decided by `objectives`, so an objective that
  is not requested adds nothing to the compiled graph.

  Our design choices where the method description is silent (see DESIGN.md): the contrastive
  representation is the mean of a modality's tokens at the input of the first fused layer; the matching
  head sees the concatenated final CLS tokens; the masked-modelling pass masks every modality at its
  ratio and runs the full (fused) encoder on the visible tokens; the masked audio segment pass replaces
  the embeddings of whole time segments with a learned mask token, runs the fused encoder on all tokens
  and decodes the segment from the fused audio tokens (the video stream's unimodal layers are those
  of the full pass when it runs: same inputs, so computed once).

  Attributes:
    num_classes: label head -> classes, e.g. {'class': 309} or {'verb': 97, 'noun': 300}.
    modalities: subset of MODALITIES, in this order.
    hidden_size, num_layers, num_heads, mlp_dim: encoder size (per modality).
    video_patch: tubelet (t, h, w).
    audio_patch: spectrogram patch (time, mels); `audio_stride` defaults to it.
    video_grid: video token grid the position embedding is created for.
    audio_grid: audio token grid the position embedding is created for.
    fusion, fusion_layer, n_bottlenecks: see BottleneckFusion.
    contrastive_dim: projection width of the contrastive heads.
    decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: masked-modelling decoders.
    mask_ratio_video, mask_ratio_audio: MAE mask ratios.
    segment_patches, num_segments: masked audio segments (in time patches) per example.
    classifier: the fused representation of a modality that the classifier and the matching head
      read: `token`, its CLS token (ViT); `gap`, the mean of its other tokens (global average
      pooling, as in big_vision's ViT option of that name; better on small datasets, see README).
    dropout, stochastic_depth, dtype, attention_implementation, remat_policy, scan_layers,
      attention_chunk_size: see BottleneckFusion.
  """
  num_classes: Mapping[str, int]
  modalities: Sequence[str] = MODALITIES
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  video_patch: Sequence[int] = (2, 16, 16)
  audio_patch: Sequence[int] = (16, 16)
  audio_stride: Sequence[int] | None = None
  video_grid: Sequence[int] = (16, 14, 14)
  audio_grid: Sequence[int] = (50, 8)
  fusion: str = 'bottleneck'
  fusion_layer: int = 8
  n_bottlenecks: int = 4
  contrastive_dim: int = 256
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512
  mask_ratio_video: float = 0.9
  mask_ratio_audio: float = 0.75
  segment_patches: int = 4
  num_segments: int = 2
  classifier: str = 'token'
  dropout: float = 0.0
  stochastic_depth: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_chunk_size: int = DEFAULT_CHUNK_SIZE

  def _pool(self, tokens: jax.Array) -> jax.Array:
    """[B, 1 + N, D] encoder output (CLS first) -> [B, D] per `classifier`."""
    return tokens[:, 0] if self.classifier == 'token' else jnp.mean(tokens[:, 1:], axis=1)

  def _patch(self, m: str) -> tuple[int, ...]:
    return tuple(self.video_patch) if m == 'video' else tuple(self.audio_patch)

  def token_grid(self, modality: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Token grid of an input of `shape` ([B, T, H, W, 3] video or [B, time, mels] audio): tubelets
    (frames, rows, columns) or spectrogram patches (time, frequency)."""
    patch = self._patch(modality)
    stride = patch if modality == 'video' else tuple(self.audio_stride or self.audio_patch)
    return tuple((s - p) // st + 1 for s, p, st in zip(shape[1:1 + len(patch)], patch, stride))

  def attention_maps(self, params, inputs: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """What the bottleneck tokens attend to in every fused layer, for analysis (inference mode).

    Usable outside training, e.g. `jax.jit(model.attention_maps)(params, inputs)`; it runs the
    classification pass with the attention weights sown (`transformer.ATTENTION_COLLECTION`). In a
    fused layer each modality's block attends over [CLS, its tokens, bottleneck tokens] (our layout,
    see `fusion.bottleneck_layer`); the maps are the rows of the bottleneck tokens.

    Args:
      params: the model's parameters.
      inputs: `video` [B, T, H, W, 3] and `audio` [B, time, mels], as for `__call__`.

    Returns:
      modality -> {`weights`: [B, fused layers, heads, n_bottlenecks, 1 + N + n_bottlenecks] float32
      softmax weights over those keys (each row sums to 1), `grid`: [B, fused layers, heads,
      n_bottlenecks, *token_grid] the weights over the modality's N tokens laid out on its grid}.

    Raises:
      ValueError: the model has no bottleneck-fused layer (fusion other than 'bottleneck',
        fusion_layer = num_layers, or a single modality).
    """
    if self.fusion != 'bottleneck' or len(self.modalities) < 2 or self.fusion_layer >= self.num_layers:
      raise ValueError(f'AVT.attention_maps needs bottleneck-fused layers; this model has '
                       f'fusion={self.fusion!r}, fusion_layer={self.fusion_layer}, '
                       f'num_layers={self.num_layers}, modalities={tuple(self.modalities)}.')
    _, state = self.apply({'params': params}, inputs, objectives=('classification',),
                          mutable=[ATTENTION_COLLECTION])
    encoder = state[ATTENTION_COLLECTION]['encoder']
    attention = 'MultiHeadDotProductAttention_1'
    maps = {}
    for m in self.modalities:
      if self.scan_layers:  # stacked on a leading layer axis
        weights = jnp.moveaxis(encoder['encoderblocks_fused'][m][attention]['weights'][0], 0, 1)
      else:
        weights = jnp.stack([encoder[f'encoderblock_{i}_{m}'][attention]['weights'][0]
                             for i in range(self.fusion_layer, self.num_layers)], axis=1)
      weights = weights[..., -self.n_bottlenecks:, :]  # [B, layers, heads, n_bottlenecks, keys]
      grid = self.token_grid(m, inputs[m].shape)
      tokens = weights[..., 1:weights.shape[-1] - self.n_bottlenecks]
      maps[m] = {'weights': weights, 'grid': tokens.reshape(*tokens.shape[:-1], *grid)}
    return maps

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], *, train: bool = False,
               objectives: Sequence[str] = ('classification',)) -> dict:
    """Runs the branches needed by `objectives`.

    Args:
      inputs: `video` [B, T, H, W, 3] and/or `audio` [B, time, mels]; optional `mask` [B] (1 = real
        example) used to keep padding out of hard-negative sampling.
      train: enables dropout / stochastic depth (rng 'dropout').
      objectives: subset of OBJECTIVES. Masking and negative sampling draw from rng 'masking'.

    Returns:
      Dict with, depending on `objectives`:
        `logits`: head -> [B, classes], the mean over modalities of `modality_logits`;
        `modality_logits`: modality -> head -> [B, classes], the shared classifier on that modality;
        `contrastive`: `video`, `audio` [B, contrastive_dim] unit vectors and `logit_scale` [];
        `matching`: `positive` [B], `negative` [2B] logits and `negative_valid` [2B];
        `masked_video` / `masked_audio` / `masked_audio_segment`: `pred` and `target`
          [B, patches, patch_dim] and `mask` [B, patches] (1 = masked);
        `features`: `pre_fusion` and (if the fused layers ran) `final`: modality -> [B, D].
    """
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown:
      raise ValueError(f'Unknown objectives {sorted(unknown)}; expected a subset of {OBJECTIVES}.')
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'AVT.classifier: expected one of {CLASSIFIERS}, got {self.classifier!r}.')
    objectives = set(objectives)
    deterministic = not train
    d = self.hidden_size
    tokenizers = {
        'video': TubeletEmbedding(d, self.video_patch, self.dtype, name='tokenizer_video'),
        'audio': SpectrogramPatchEmbedding(d, self.audio_patch, self.audio_stride, self.dtype,
                                           name='tokenizer_audio'),
    }
    posembs = {'video': PositionEmbedding(self.video_grid, name='posembed_video'),
               'audio': PositionEmbedding(self.audio_grid, name='posembed_audio')}
    cls = {m: self.param(f'cls_{m}', nn.initializers.zeros, (1, 1, d)) for m in self.modalities}
    encoder = BottleneckFusion(
        self.modalities, d, self.num_layers, self.num_heads, self.mlp_dim, self.fusion,
        self.fusion_layer, self.n_bottlenecks, self.dropout, self.stochastic_depth, self.dtype,
        self.attention_implementation, self.remat_policy, self.scan_layers,
        self.attention_chunk_size, name='encoder')

    def add_cls(tokens):
      return {m: jnp.concatenate(
          [jnp.broadcast_to(cls[m].astype(x.dtype), (x.shape[0], 1, d)), x], axis=1)
              for m, x in tokens.items()}

    embedded = {m: tokenizers[m](inputs[m]) for m in self.modalities}  # [B, *grid, D]
    grids = {m: embedded[m].shape[1:-1] for m in self.modalities}
    tokens = {m: posembs[m](embedded[m]) for m in self.modalities}  # [B, N_m, D]
    batch = tokens[self.modalities[0]].shape[0]
    example_mask = inputs.get('mask', jnp.ones((batch,), jnp.float32))
    out = {}
    pre = None  # unimodal encoder outputs of the full pass, when it runs

    # Full pass: classification, contrastive (pre-fusion) and matching (fused) branches.
    if objectives & {'classification', 'contrastive', 'matching'}:
      pre = encoder.unimodal(add_cls(tokens), deterministic)
      out['features'] = {'pre_fusion': {m: jnp.mean(x[:, 1:], axis=1) for m, x in pre.items()}}
      if objectives & {'contrastive', 'matching'}:
        emb = {m: ContrastiveProjection(self.contrastive_dim, name=f'contrastive_projection_{m}')(
            out['features']['pre_fusion'][m]) for m in MODALITIES}
        scale = LogitScale(name='contrastive_temperature')()
        out['contrastive'] = {**emb, 'logit_scale': scale}
      if objectives & {'classification', 'matching'}:
        if 'matching' in objectives:
          sim = scale * emb['video'] @ emb['audio'].T  # [B, B]
          a_for_v, v_for_a, has_neg = sample_hard_negatives(self.make_rng('masking'), sim, example_mask)
          # Positives, then (video i, audio a_for_v[i]), then (video v_for_a[j], audio j): [3B, N, D].
          pairs = {'video': jnp.concatenate([pre['video'], pre['video'], pre['video'][v_for_a]]),
                   'audio': jnp.concatenate([pre['audio'], pre['audio'][a_for_v], pre['audio']])}
          final = encoder.fused(pairs, deterministic)
          fused = jnp.concatenate([self._pool(final['video']), self._pool(final['audio'])], axis=-1)
          scores = MatchingHead(name='matching_head')(fused)  # [3B]
          out['matching'] = {'positive': scores[:batch], 'negative': scores[batch:],
                             'negative_valid': jnp.concatenate([has_neg, has_neg]).astype(jnp.float32)}
          final = {m: x[:batch] for m, x in final.items()}
        else:
          final = encoder.fused(pre, deterministic)
        out['features']['final'] = {m: self._pool(x) for m, x in final.items()}
        if 'classification' in objectives:
          head = ClassificationHead(self.num_classes, name='classifier')
          per_modality = {m: head({m: f}) for m, f in out['features']['final'].items()}
          out['logits'] = {h: jnp.mean(jnp.stack([per_modality[m][h] for m in per_modality]), 0)
                           for h in self.num_classes}
          out['modality_logits'] = per_modality

    # Masked-modelling pass: every modality masked at its ratio, visible tokens through the encoder.
    mae = [m for m in self.modalities if f'masked_{m}' in objectives]
    if mae:
      ratios = {'video': self.mask_ratio_video, 'audio': self.mask_ratio_audio}
      rngs = jax.random.split(self.make_rng('masking'), len(self.modalities))
      visible, restore, masks = {}, {}, {}
      for rng, m in zip(rngs, self.modalities):
        keep, restore[m], masks[m] = masking.random_masking(rng, batch, tokens[m].shape[1], ratios[m])
        visible[m] = jnp.take_along_axis(tokens[m], keep[..., None], axis=1)
      encoded = encoder(add_cls(visible), deterministic)
      for m in mae:
        target = patchify(inputs[m] if m == 'video' else inputs[m][..., None], self._patch(m))
        decoder = MaskedDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                                self.decoder_mlp_dim, target.shape[-1],
                                self.video_grid if m == 'video' else self.audio_grid,
                                self.dtype, name=f'decoder_{m}')
        pred = decoder(encoded[m][:, 1:], grids[m], restore[m], deterministic)
        out[f'masked_{m}'] = {'pred': pred, 'target': target.astype(jnp.float32), 'mask': masks[m]}

    # Masked audio segment pass: whole time segments replaced by a mask token, fused encoder.
    if 'masked_audio_segment' in objectives:
      grid = grids['audio']
      seg = masking.segment_mask(self.make_rng('masking'), batch, grid, self.segment_patches,
                                 self.num_segments)  # [B, N_audio]
      mask_token = self.param('segment_mask_token', nn.initializers.normal(stddev=0.02), (1, 1, d))
      patches = embedded['audio'].reshape(batch, -1, d)
      patches = jnp.where(seg[..., None] > 0, mask_token.astype(patches.dtype), patches)
      masked_audio = posembs['audio'](patches.reshape(batch, *grid, d))
      if pre is not None:  # the other modalities' unimodal layers saw the same tokens: reuse them
        audio = encoder.unimodal(add_cls({'audio': masked_audio}), deterministic)
        encoded = encoder.fused(dict(pre, **audio), deterministic)
      else:
        encoded = encoder(add_cls(dict(tokens, audio=masked_audio)), deterministic)
      target = patchify(inputs['audio'][..., None], self._patch('audio'))
      decoder = MaskedDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                              self.decoder_mlp_dim, target.shape[-1], self.audio_grid, self.dtype,
                              name='segment_decoder')
      pred = decoder(encoded['audio'][:, 1:], grid, None, deterministic)
      out['masked_audio_segment'] = {'pred': pred, 'target': target.astype(jnp.float32), 'mask': seg}
    return out
