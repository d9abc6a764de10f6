"""AVT: audio-video Transformer with bottleneck fusion, a shared classifier and self-supervised heads."""

from typing import Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avt_jax.losses import OBJECTIVE_TABLE, OBJECTIVES
from avt_jax.models import masking
from avt_jax.models.decoders import MaskedDecoder
from avt_jax.models.fusion import FusionEncoder, fusion_problems, fusion_start
from avt_jax.models.heads import (ClassificationHead, ContrastiveProjection, LogitFusion, LogitScale,
                                  MatchingHead, TEMPERATURE_INIT, TEMPERATURE_RANGE,
                                  sample_hard_negatives)
from avt_jax.models.options import EncoderOptions, Problem, raise_first
from avt_jax.models.tokenizers import (PositionEmbedding, SpectrogramPatchEmbedding, TubeletEmbedding,
                                       patchify, token_grid)
from avt_jax.models.transformer import ATTENTION_COLLECTION

MODALITIES = ('video', 'audio')
CLASSIFIERS = ('token', 'gap')
CONTRASTIVE_POOLS = ('token', 'gap')
FULL_PASS_OBJECTIVES = {o.name for o in OBJECTIVE_TABLE.values() if o.model_pass == 'full'}


def objective_problems(objectives: Sequence[str], modalities: Sequence[str]) -> list[Problem]:
  """(field, message) for each objective that a model of `modalities` cannot compute: the
  audio-video objectives need both modalities, masked modelling its own (field `weights` or
  `weights.<objective>`, as in `config.loss`)."""
  found = []
  needs = {o: OBJECTIVE_TABLE[o].modalities for o in objectives}
  both = [o for o, need in needs.items() if len(need) > 1]
  if both and len(modalities) < 2:
    found.append(('weights', f'objectives {both} need both modalities, but '
                  f'model.modalities={tuple(modalities)}'))
  for o, need in needs.items():
    if len(need) == 1 and need[0] not in modalities:
      found.append((f'weights.{o}', f'needs the {need[0]} modality in model.modalities'))
  return found


class Embedded(NamedTuple):
  """The inputs tokenized once, shared by the passes."""
  patches: dict[str, jax.Array]  # modality -> [B, *grid, D] tubelet / spectrogram patch embeddings
  tokens: dict[str, jax.Array]  # modality -> [B, N, D] the same plus position embeddings, flattened
  cls: dict[str, jax.Array]  # modality -> [1, 1, D] its CLS token

  def with_cls(self, tokens: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """modality -> [B, N, D] in, modality -> [B, 1 + N, D] (its CLS token first) out."""
    return {m: jnp.concatenate(
        [jnp.broadcast_to(self.cls[m].astype(x.dtype), (x.shape[0], 1, x.shape[-1])), x], axis=1)
            for m, x in tokens.items()}


class FullPass(NamedTuple):
  """Outputs of the full pass; None where the objectives did not ask for a branch."""
  unimodal: dict[str, jax.Array]  # modality -> [B, 1 + N, D] output of the unimodal layers
  # `pre_fusion` (mean of the tokens), `pre_fusion_token` (CLS) at the input of the first fused
  # layer and (if the fused layers ran) `final` (pooled per `classifier`): modality -> [B, D]
  features: dict
  contrastive: dict | None  # `video`, `audio` [B, contrastive_dim] unit vectors, `logit_scale` []
  matching: dict | None  # `positive` [B], `negative` [2B] logits, `negative_valid` [2B]
  logits: dict | None  # head -> [B, classes], `LogitFusion` of `modality_logits`
  modality_logits: dict | None  # modality -> head -> [B, classes]


class Reconstruction(NamedTuple):
  """Output of a masked-modelling pass for one modality."""
  pred: jax.Array  # [B, patches, patch_dim] float32 predictions
  target: jax.Array  # [B, patches, patch_dim] float32 input patches
  mask: jax.Array  # [B, patches] float32, 1 = masked


class AVT(nn.Module):
  """Audio-video Transformer.

  Inputs are `video` [batch, frames, height, width, 3] and `audio` [batch, time, mels] (log-mel,
  100 frames/s). Each modality is tokenized (tubelets / spectrogram patches, learned position
  embeddings, a CLS token), encoded by its own Transformer stack and fused through bottleneck tokens
  (`FusionEncoder`). Which branches are computed is decided by `objectives`, so an objective that
  is not requested adds nothing to the compiled graph.

  Our design choices where the method description is silent (see docs/method.md): the contrastive
  representation is a modality's CLS token (or token mean, `contrastive_pool`) at the input of the
  first fused layer; the matching
  head sees the concatenated final CLS tokens; the masked-modelling pass masks every modality at its
  ratio and runs the full (fused) encoder on the visible tokens; the masked audio segment pass replaces
  the embeddings of whole time segments with a learned mask token, runs the fused encoder on all tokens
  and decodes the segment from the fused audio tokens (the video stream's unimodal layers are those
  of the full pass when it runs: same inputs, so computed once).

  `init` returns the attention and MLP parameters boxed with their logical axis names
  (`nn.LogicallyPartitioned`, read by `avt_jax.sharding.logical_axes`); `nn.meta.unbox` gives plain
  arrays (as `train_step.init_state` does), and `apply` takes either.

  Attributes:
    num_classes: label head -> classes, e.g. {'class': 309} or {'verb': 97, 'noun': 300}.
    modalities: subset of MODALITIES, in this order.
    hidden_size, num_layers, num_heads, mlp_dim: encoder size (per modality).
    video_patch: tubelet (t, h, w).
    audio_patch: spectrogram patch (time, mels); `audio_stride` defaults to it.
    video_grid: video token grid the position embedding is created for.
    audio_grid: audio token grid the position embedding is created for.
    fusion, fusion_layer, n_bottlenecks: see FusionEncoder.
    contrastive_dim: projection width of the contrastive heads.
    contrastive_temperature: the learnable InfoNCE temperature's initial value (CLIP: 0.07). Our
      finding: where an encoder maps every clip to nearly the same point (a pretrained encoder on
      new inputs), 0.07 makes the loss at initialisation exceed ln(batch), and the shortest way down
      is to make every embedding the same, the collapse at ln(batch) (README "Self-supervision").
    decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: masked-modelling decoders.
    mask_ratio_video, mask_ratio_audio: MAE mask ratios.
    segment_patches, num_segments: masked audio segments (in time patches) per example.
    classifier: the fused representation of a modality that the classifier and the matching head
      read: `token`, its CLS token (ViT); `gap`, the mean of its other tokens (global average
      pooling, as in big_vision's ViT option of that name; better on small datasets, see README).
    contrastive_pool: what the contrastive projections read, at the input of the first fused layer:
      `token`, the modality's CLS token; `gap`, the mean of its other tokens. Our design: `gap` of a
      freshly initialised encoder is nearly a bag of patches (position embeddings start small), so
      where / when something happens, often the only thing the two modalities share, barely reaches
      it, and InfoNCE collapses to ln(batch) before it can learn (README "Self-supervision").
    posemb_init_std: standard deviation of the position embeddings' initialisation (ViT: 0.02;
      larger lets a from-scratch encoder see positions from the start, see README).
    options: how the layers compute (dropout, stochastic depth, dtype, attention, remat, scan); its
      dtype is also that of the tokenizers and decoders.

  Raises (at init or apply):
    ValueError: `AVT.<field>: ...` for an impossible attribute (see `problems`).
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
  contrastive_temperature: float = TEMPERATURE_INIT
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512
  mask_ratio_video: float = 0.9
  mask_ratio_audio: float = 0.75
  segment_patches: int = 4
  num_segments: int = 2
  classifier: str = 'token'
  contrastive_pool: str = 'token'
  posemb_init_std: float = 0.02
  options: EncoderOptions = EncoderOptions()

  def problems(self) -> list[Problem]:
    """(field, message) for each impossible attribute, the encoder's and `options`' included; the
    fields are named as in `config.model`."""
    mods = tuple(self.modalities)
    found = [] if mods and len(set(mods)) == len(mods) and set(mods) <= set(MODALITIES) else [
        ('modalities', f'expected a non-empty subset of {MODALITIES}, got {mods}')]
    found += fusion_problems(self.hidden_size, self.num_layers, self.num_heads, self.fusion,
                             self.fusion_layer, self.n_bottlenecks)
    if self.classifier not in CLASSIFIERS:
      found.append(('classifier', f'expected one of {CLASSIFIERS}, got {self.classifier!r}'))
    if self.contrastive_pool not in CONTRASTIVE_POOLS:
      found.append(('contrastive_pool', f'expected one of {CONTRASTIVE_POOLS}, got '
                    f'{self.contrastive_pool!r}'))
    if not self.posemb_init_std >= 0:
      found.append(('posemb_init_std', f'must be >= 0, got {self.posemb_init_std}'))
    low, high = TEMPERATURE_RANGE
    if not low <= self.contrastive_temperature <= high:
      found.append(('contrastive_temperature', f'expected a number in [{low}, {high}], got '
                    f'{self.contrastive_temperature}'))
    if self.decoder_width % self.decoder_heads:
      found.append(('decoder_heads', f'decoder_width {self.decoder_width} is not divisible by '
                    f'decoder_heads {self.decoder_heads}'))
    for m, ratio in (('video', self.mask_ratio_video), ('audio', self.mask_ratio_audio)):
      if not 0.0 <= ratio < 1.0:
        found.append((f'mask_ratio_{m}', f'must be in [0, 1), got {ratio}'))
    return found + self.options.problems()

  def _pool(self, tokens: jax.Array, how: str | None = None) -> jax.Array:
    """[B, 1 + N, D] encoder output (CLS first) -> [B, D] per `how` (default `classifier`)."""
    how = how or self.classifier
    return tokens[:, 0] if how == 'token' else jnp.mean(tokens[:, 1:], axis=1)

  def _patch(self, m: str) -> tuple[int, ...]:
    return tuple(self.video_patch) if m == 'video' else tuple(self.audio_patch)

  def token_grid(self, modality: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Token grid of an input of `shape` ([B, T, H, W, 3] video or [B, time, mels] audio): tubelets
    (frames, rows, columns) or spectrogram patches (time, frequency)."""
    patch = self._patch(modality)
    stride = self.audio_stride if modality == 'audio' else None
    return token_grid(shape[1:1 + len(patch)], patch, stride)

  @property
  def fusion_start(self) -> int:
    """First layer in which the modalities exchange information (`fusion.fusion_start`)."""
    return fusion_start(self.fusion, self.fusion_layer, self.num_layers, len(self.modalities))

  @property
  def has_bottleneck_layers(self) -> bool:
    """Whether some layer fuses the modalities through bottleneck tokens (see `attention_maps`)."""
    return self.fusion == 'bottleneck' and self.fusion_start < self.num_layers

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
    if not self.has_bottleneck_layers:
      raise ValueError(f'AVT.attention_maps needs bottleneck-fused layers; this model has '
                       f'fusion={self.fusion!r}, fusion_layer={self.fusion_layer}, '
                       f'num_layers={self.num_layers}, modalities={tuple(self.modalities)}.')
    _, state = self.apply({'params': params}, inputs, objectives=('classification',),
                          mutable=[ATTENTION_COLLECTION])
    encoder = state[ATTENTION_COLLECTION]['encoder']
    attention = 'MultiHeadDotProductAttention_1'
    maps = {}
    for m in self.modalities:
      if self.options.scan_layers:  # stacked on a leading layer axis
        weights = jnp.moveaxis(encoder['encoderblocks_fused'][m][attention]['weights'][0], 0, 1)
      else:
        weights = jnp.stack([encoder[f'encoderblock_{i}_{m}'][attention]['weights'][0]
                             for i in range(self.fusion_start, self.num_layers)], axis=1)
      weights = weights[..., -self.n_bottlenecks:, :]  # [B, layers, heads, n_bottlenecks, keys]
      grid = self.token_grid(m, inputs[m].shape)
      tokens = weights[..., 1:weights.shape[-1] - self.n_bottlenecks]
      maps[m] = {'weights': weights, 'grid': tokens.reshape(*tokens.shape[:-1], *grid)}
    return maps

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], *, train: bool = False,
               objectives: Sequence[str] = ('classification',)) -> dict:
    """Runs the passes needed by `objectives`.

    Args:
      inputs: `video` [B, T, H, W, 3] and/or `audio` [B, time, mels]; optional `mask` [B] (1 = real
        example) used to keep padding out of hard-negative sampling.
      train: enables dropout / stochastic depth (rng 'dropout').
      objectives: subset of OBJECTIVES. Masking and negative sampling draw from rng 'masking'.

    Returns:
      Dict with, depending on `objectives`:
        `logits`: head -> [B, classes], the weighted sum over modalities of `modality_logits`
          (`LogitFusion`: equal weights until calibrated on held-out clips);
        `modality_logits`: modality -> head -> [B, classes], the shared classifier on that modality;
        `contrastive`: `video`, `audio` [B, contrastive_dim] unit vectors and `logit_scale` [];
        `matching`: `positive` [B], `negative` [2B] logits and `negative_valid` [2B];
        `masked_video` / `masked_audio` / `masked_audio_segment`: `pred` and `target`
          [B, patches, patch_dim] and `mask` [B, patches] (1 = masked);
        `features`: `pre_fusion` (token mean), `pre_fusion_token` (CLS) and (if the fused layers
          ran) `final`: modality -> [B, D].

    Raises:
      ValueError: unknown objectives, objectives the modalities cannot serve, or an impossible
        attribute (`AVT.<field>: ...`).
    """
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown:
      raise ValueError(f'Unknown objectives {sorted(unknown)}; expected a subset of {OBJECTIVES}.')
    raise_first('AVT', self.problems())
    for _, message in objective_problems(objectives, self.modalities):
      raise ValueError(f'AVT objectives: {message}.')
    objectives, deterministic = set(objectives), not train
    posembs = {m: PositionEmbedding(grid, self.posemb_init_std, name=f'posembed_{m}')
               for m, grid in (('video', self.video_grid), ('audio', self.audio_grid))}
    patches = {m: self._tokenizer(m)(inputs[m]) for m in self.modalities}  # [B, *grid, D]
    x = Embedded(patches, {m: posembs[m](patches[m]) for m in self.modalities},
                 {m: self.param(f'cls_{m}', nn.initializers.zeros, (1, 1, self.hidden_size))
                  for m in self.modalities})
    encoder = FusionEncoder(
        modalities=self.modalities, hidden_size=self.hidden_size, num_layers=self.num_layers,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, fusion=self.fusion,
        fusion_layer=self.fusion_layer, n_bottlenecks=self.n_bottlenecks, options=self.options,
        name='encoder')
    out, full = {}, None
    if objectives & FULL_PASS_OBJECTIVES:
      full = self._full_pass(encoder, x, inputs.get('mask'), objectives, deterministic)
      out.update({k: v for k, v in full._asdict().items() if k != 'unimodal' and v is not None})
    masked = [m for m in self.modalities if f'masked_{m}' in objectives]
    if masked:
      recon = self._masked_pass(encoder, x, inputs, masked, deterministic)
      out.update({f'masked_{m}': r._asdict() for m, r in recon.items()})
    if 'masked_audio_segment' in objectives:
      unimodal = full.unimodal if full else None
      out['masked_audio_segment'] = self._segment_pass(
          encoder, x, posembs['audio'], inputs, unimodal, deterministic)._asdict()
    return out

  def _tokenizer(self, modality: str) -> nn.Module:
    d, dtype = self.hidden_size, self.options.dtype
    if modality == 'video':
      return TubeletEmbedding(d, self.video_patch, dtype, name='tokenizer_video')
    return SpectrogramPatchEmbedding(d, self.audio_patch, self.audio_stride, dtype,
                                     name='tokenizer_audio')

  def _decoder(self, modality: str, patch_dim: int, name: str) -> MaskedDecoder:
    grid = self.video_grid if modality == 'video' else self.audio_grid
    return MaskedDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                         self.decoder_mlp_dim, patch_dim, grid, self.options.dtype,
                         self.posemb_init_std, name=name)

  def _target(self, inputs: Mapping[str, jax.Array], modality: str) -> jax.Array:
    """The input cut into token-ordered patches: [B, patches, patch_dim] float32."""
    x = inputs[modality] if modality == 'video' else inputs[modality][..., None]
    return patchify(x, self._patch(modality)).astype(jnp.float32)

  def _full_pass(self, encoder: FusionEncoder, x: Embedded, example_mask: jax.Array | None,
                 objectives: set[str], deterministic: bool) -> FullPass:
    """Classification, contrastive (pre-fusion) and matching (fused) branches on all tokens."""
    unimodal = encoder.unimodal(x.with_cls(x.tokens), deterministic)
    features = {'pre_fusion': {m: jnp.mean(t[:, 1:], axis=1) for m, t in unimodal.items()},
                'pre_fusion_token': {m: t[:, 0] for m, t in unimodal.items()}}
    contrastive = matching = logits = modality_logits = final = None
    if objectives & {'contrastive', 'matching'}:
      contrastive = {m: ContrastiveProjection(self.contrastive_dim,
                                              name=f'contrastive_projection_{m}')(
          self._pool(t, self.contrastive_pool)) for m, t in unimodal.items()}
      contrastive['logit_scale'] = LogitScale(self.contrastive_temperature,
                                              name='contrastive_temperature')()
    if 'matching' in objectives:
      final, matching = self._matching(encoder, unimodal, contrastive, example_mask, deterministic)
    elif 'classification' in objectives:
      final = encoder.fused(unimodal, deterministic)
    if final is not None:
      features['final'] = {m: self._pool(t) for m, t in final.items()}
    if 'classification' in objectives:
      head = ClassificationHead(self.num_classes, name='classifier')
      modality_logits = {m: head({m: f}) for m, f in features['final'].items()}
      logits = (LogitFusion(len(modality_logits), name='logit_fusion')(modality_logits)
                if len(modality_logits) > 1 else next(iter(modality_logits.values())))
    return FullPass(unimodal, features, contrastive, matching, logits, modality_logits)

  def _matching(self, encoder: FusionEncoder, unimodal: dict[str, jax.Array],
                contrastive: dict[str, jax.Array], example_mask: jax.Array | None,
                deterministic: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Scores the positive pairs and one hard negative per example and direction.

    Returns:
      (modality -> [B, 1 + N, D] fused tokens of the positive pairs, the `matching` output).
    """
    video, audio = unimodal['video'], unimodal['audio']
    batch = video.shape[0]
    example_mask = jnp.ones((batch,), jnp.float32) if example_mask is None else example_mask
    sim = contrastive['logit_scale'] * contrastive['video'] @ contrastive['audio'].T  # [B, B]
    a_for_v, v_for_a, has_neg = sample_hard_negatives(self.make_rng('masking'), sim, example_mask)
    # Positives, then (video i, audio a_for_v[i]), then (video v_for_a[j], audio j): [3B, N, D].
    pairs = {'video': jnp.concatenate([video, video, video[v_for_a]]),
             'audio': jnp.concatenate([audio, audio[a_for_v], audio])}
    final = encoder.fused(pairs, deterministic)
    fused = jnp.concatenate([self._pool(final['video']), self._pool(final['audio'])], axis=-1)
    scores = MatchingHead(name='matching_head')(fused)  # [3B]
    matching = {'positive': scores[:batch], 'negative': scores[batch:],
                'negative_valid': jnp.concatenate([has_neg, has_neg]).astype(jnp.float32)}
    return {m: t[:batch] for m, t in final.items()}, matching

  def _masked_pass(self, encoder: FusionEncoder, x: Embedded, inputs: Mapping[str, jax.Array],
                   decoded: Sequence[str], deterministic: bool) -> dict[str, Reconstruction]:
    """Masks every modality at its ratio (MAE), runs the encoder on the visible tokens and decodes
    the modalities in `decoded`."""
    ratios = {'video': self.mask_ratio_video, 'audio': self.mask_ratio_audio}
    rngs = jax.random.split(self.make_rng('masking'), len(self.modalities))
    visible, restore, masks = {}, {}, {}
    for rng, m in zip(rngs, self.modalities):
      batch, num_tokens = x.tokens[m].shape[:2]
      keep, restore[m], masks[m] = masking.random_masking(rng, batch, num_tokens, ratios[m])
      visible[m] = jnp.take_along_axis(x.tokens[m], keep[..., None], axis=1)
    encoded = encoder(x.with_cls(visible), deterministic)
    out = {}
    for m in decoded:
      target = self._target(inputs, m)
      pred = self._decoder(m, target.shape[-1], f'decoder_{m}')(
          encoded[m][:, 1:], x.patches[m].shape[1:-1], restore[m], deterministic)
      out[m] = Reconstruction(pred, target, masks[m])
    return out

  def _segment_pass(self, encoder: FusionEncoder, x: Embedded, posembed_audio: nn.Module,
                    inputs: Mapping[str, jax.Array], unimodal: dict[str, jax.Array] | None,
                    deterministic: bool) -> Reconstruction:
    """Replaces whole time segments of the audio embeddings with a learned mask token, runs the
    fused encoder on all tokens and decodes the audio. `unimodal`: the full pass's unimodal outputs,
    if it ran (the other modalities' unimodal layers saw the same tokens: reused)."""
    patches = x.patches['audio']  # [B, time patches, mel patches, D]
    batch, grid, d = patches.shape[0], patches.shape[1:-1], patches.shape[-1]
    seg = masking.segment_mask(self.make_rng('masking'), batch, grid, self.segment_patches,
                               self.num_segments)  # [B, N_audio]
    mask_token = self.param('segment_mask_token', nn.initializers.normal(stddev=0.02), (1, 1, d))
    flat = patches.reshape(batch, -1, d)
    flat = jnp.where(seg[..., None] > 0, mask_token.astype(flat.dtype), flat)
    masked_audio = posembed_audio(flat.reshape(batch, *grid, d))
    if unimodal is not None:
      audio = encoder.unimodal(x.with_cls({'audio': masked_audio}), deterministic)
      encoded = encoder.fused(dict(unimodal, **audio), deterministic)
    else:
      encoded = encoder(x.with_cls(dict(x.tokens, audio=masked_audio)), deterministic)
    target = self._target(inputs, 'audio')
    pred = self._decoder('audio', target.shape[-1], 'segment_decoder')(
        encoded['audio'][:, 1:], grid, None, deterministic)
    return Reconstruction(pred, target, seg)
