"""Checkpoint key layouts: detection and conversion into two neutral forms.

`kind='vit'`: one image (or ViViT video) encoder under canonical keys, the flax ViT names of the
original release with attention projections flattened over heads:
  `embedding/kernel` [h, w, C, D] (ViViT: [t, h, w, C, D]), `embedding/bias` [D];
  `cls` [1, 1, D], the checkpoint's CLS token; `posemb` [1, P + N, D], the checkpoint's position
    embedding as stored: P prefix rows (CLS, registers) then N patch rows, row-major over the patch
    grid. How many prefix rows there are is what the file or its config says (`Source.prefix`); where
    a format leaves it open (timm's `no_embed_class`, old big_vision files) `resolve_posemb` decides
    from the stated or the model's patch grid, or stops naming the entry. Resolved, `cls` holds the
    CLS token plus its position row (AVT's CLS token gets no position embedding, so the sum keeps the
    first token's input unchanged) and `posemb` only the N patch rows;
  `encoderblock_{i}/LayerNorm_0|LayerNorm_2/scale|bias` [D];
  `encoderblock_{i}/MultiHeadDotProductAttention_1/query|key|value/kernel` [D, D] (input, heads x
    head_dim), `.../bias` [D], `.../out/kernel` [D, D] (heads x head_dim, output), `.../out/bias` [D];
  `encoderblock_{i}/MlpBlock_3/Dense_0/kernel` [D, mlp], `Dense_1/kernel` [mlp, D], biases;
  `encoder_norm/scale|bias` [D].
LayerScale (CaiT, DeiT-III, DINOv2: x + gamma * f(x), gamma [D] per residual branch) is folded into
the attention output and second MLP projections (kernel * gamma over its output axis, bias * gamma),
which computes the same function with AVT's unchanged block (our design: no extra parameter, so the
parameter tree, sharding rules, scanned layout and own checkpoints stay as they are; the difference
is in fine-tuning only, where gamma no longer has its own learning rate and weight decay).
`kind='avt'`: parameters already under AVT's names (`avt_jax.models.AVT`, unrolled layer layout),
  e.g. `encoder/encoderblock_3_audio/...`; position embeddings may still be flat [1, N, D] (Scenic).

Formats (each layout learned from the publisher's code, cited in the converter):
  `vit_npz`: google-research/vision_transformer release (`Transformer/encoderblock_{i}/...`,
    `Transformer/posembed_input/pos_embedding` [1, 1 + N, D], `cls`, `embedding`, `head`,
    `pre_logits`).
  `big_vision`: big_vision `.npz` (`params/...` or `opt/target/...` or bare): `pos_embedding`
    [1, N, D] added before CLS, linen numbering (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`), layers unrolled (`encoderblock_{i}`) or scanned (`encoderblock`, leading layer
    axis); two-tower files (SigLIP, LiT) contribute their `img` tower.
  `timm`: timm VisionTransformer state_dict in safetensors (`patch_embed.proj.weight` [D, C, h, w],
    `cls_token`, `reg_token`, `pos_embed`, `blocks.{i}.attn.qkv.weight` [3D, D] fused q/k/v,
    `blocks.{i}.ls1|ls2.gamma` LayerScale, `norm`, `head`); `pos_embed` covers the class and
    register tokens unless the model was made with `no_embed_class`, which only its config.json says.
  `hf_vit`: Hugging Face transformers ViTModel / ViTForImageClassification safetensors
    (`[vit.]embeddings.*`, `[vit.]encoder.layer.{i}.attention.attention.query|key|value.*`,
    `layernorm_before|after`, `intermediate.dense`, `output.dense`, `layernorm`, `pooler`,
    `classifier`).
  `hf_dinov2`: Hugging Face Dinov2Model / Dinov2ForImageClassification / Dinov2WithRegistersModel
    safetensors (modeling_dinov2.py: `[dinov2.]embeddings.cls_token|mask_token|register_tokens|
    position_embeddings` [1, 1 + N, D], `patch_embeddings.projection`, `encoder.layer.{i}.norm1|norm2`,
    `attention.attention.query|key|value`, `attention.output.dense`, `layer_scale1|2.lambda1`,
    `mlp.fc1|fc2`, `layernorm`, `classifier` [C, 2D]).
  `dinov2`: the original facebookresearch/dinov2 `dinov2_vit*14` state_dict written to safetensors
    (`cls_token`, `mask_token`, `register_tokens`, `pos_embed` [1, 1 + N, D], `patch_embed.proj`,
    `blocks.{i}.` or chunked `blocks.{c}.{i}.` with `norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`,
    `norm2`, `mlp.fc1|fc2`, `ls2.gamma`, then `norm`); the timm layout plus DINOv2's own tokens.
  DINOv2's `mask_token` (masked-image training) and register tokens have no counterpart in AVT and
  are reported unused.
  `scenic`: Scenic flax checkpoints (`params/...` or `optimizer/target/...`): MBT (`embedding` /
    `embedding_spectrogram`, `cls` / `clsspectrogram`, `bottleneck`, `Transformer/encoderblock_{i}`
    (RGB) and `..._spectrogram`, one shared `encoder_norm`, `output_projection`) or ViViT
    spatio-temporal (a ViT with a 3D `embedding` kernel).
  `avt`: this project's own checkpoints (the `params` of a workdir's train state).
PyTorch layouts are converted exactly: Linear weights [out, in] are transposed to kernels [in, out],
Conv weights [D, C, h, w] to [h, w, C, D]; the head split of q/k/v is the row-major (heads, head_dim)
order both PyTorch libraries use, so it is restored by a reshape to the model's `num_heads`.
"""

import dataclasses
import re

import numpy as np
from flax import traverse_util

from avt_jax.pretrained.files import Flat, PretrainedError, describe

FORMATS = ('vit_npz', 'big_vision', 'timm', 'hf_vit', 'hf_dinov2', 'dinov2', 'scenic', 'avt')

ATTENTION = 'MultiHeadDotProductAttention_1'
BLOCK_KEYS = tuple(
    [f'{ln}/{p}' for ln in ('LayerNorm_0', 'LayerNorm_2') for p in ('scale', 'bias')]
    + [f'{ATTENTION}/{proj}/{p}' for proj in ('query', 'key', 'value', 'out') for p in ('kernel', 'bias')]
    + [f'MlpBlock_3/{dense}/{p}' for dense in ('Dense_0', 'Dense_1') for p in ('kernel', 'bias')])


@dataclasses.dataclass
class Source:
  """A checkpoint converted to a neutral layout (see the module docstring).

  Attributes:
    format: one of FORMATS.
    kind: 'vit' (one encoder, canonical keys) or 'avt' (AVT parameter names).
    params: key -> array.
    origin: key -> the checkpoint entries it was made from (for the report).
    unused: checkpoint entries that no key uses (heads of image classifiers, pre_logits, ...).
    num_heads: attention heads stored in the checkpoint's kernel shapes (flax layouts), else None.
    prefix: (kind 'vit') the possible numbers of prefix rows (CLS, registers) in front of the patch
      rows of `posemb`, the format's convention first; one value where the format is unambiguous.
    grid: the patch grid the checkpoint's config states (e.g. image size / patch size), else None.
    posemb_note: how `resolve_posemb` split the position embedding, for the report.
    posemb_resize: how the checkpoint's own model resizes its position embedding to other grids
      ('bilinear', or 'bicubic' for DINOv2), used for the model's grid.
  """
  format: str
  kind: str
  params: Flat
  origin: dict[str, str]
  unused: list[str]
  num_heads: int | None = None
  prefix: tuple[int, ...] = (0,)
  grid: tuple[int, ...] | None = None
  posemb_note: str = ''
  posemb_resize: str = 'bilinear'


# ----------------------------------------------------------------------------------------------
# Detection


def _has(flat: Flat, pattern: str) -> bool:
  regex = re.compile(pattern)
  return any(regex.search(k) for k in flat)


def _is_mbt(flat: Flat) -> bool:
  return _has(flat, r'(^|/)(embedding_spectrogram|clsspectrogram|bottleneck)(/|$)|'
                    r'encoderblock_\d+_spectrogram/|posembed_input_spectrogram/')


def detect(container: str, flat: Flat) -> str:
  """Guesses the format from the container and the keys (`config.init.format='auto'`)."""
  if container == 'orbax' or _has(flat, r'^(encoder/encoderblocks?_|tokenizer_(video|audio)/)'):
    return 'avt'
  if _has(flat, r'(^|\.)blocks\.(\d+\.)?\d+\.attn\.qkv\.weight$'):
    return 'dinov2' if _has(flat, r'(^|\.)mask_token$') else 'timm'
  if _has(flat, r'(^|\.)encoder\.layer\.\d+\.(layer_scale1\.lambda1|norm1\.weight)$'):
    return 'hf_dinov2'
  if _has(flat, r'(^|\.)encoder\.layer\.\d+\.attention\.attention\.query\.weight$'):
    return 'hf_vit'
  if container == 'msgpack' or _is_mbt(flat) or _has(flat, r'^optimizer/target/'):
    return 'scenic'
  if _has(flat, r'^(params|opt/target)/') or 'pos_embedding' in flat:
    return 'big_vision'
  if _has(flat, r'^Transformer/encoderblock_\d+/'):
    return 'vit_npz'
  raise PretrainedError(
      f'Cannot tell the checkpoint format from its keys ({describe(flat)}); set config.init.format '
      f'to one of {FORMATS}.')


def convert(fmt: str, flat: Flat, where: str, side: dict | None = None) -> Source:
  """Converts a checkpoint of format `fmt` (see FORMATS); `where` names the file in errors.

  `side` is the `config.json` found beside the file (Hugging Face, timm hub layouts), if any: its
  image and patch size state the patch grid, timm's `model_args.no_embed_class` the prefix rows.
  """
  side = side or {}
  if fmt in ('timm', 'dinov2'):
    return _timm(flat, where, fmt, side)
  if fmt in ('hf_vit', 'hf_dinov2'):
    return _hf(flat, where, fmt, side)
  if fmt == 'avt':
    return _avt(flat, where)
  if fmt in ('vit_npz', 'big_vision', 'scenic'):
    inner, unused = _unwrap_flax(flat)
    if _is_mbt(inner):
      source = _mbt(inner, where)
    else:
      source = _flax_vit(inner, where)
    source.format = fmt
    source.unused += unused
    return source
  raise PretrainedError(f'config.init.format: expected auto or one of {FORMATS}, got {fmt!r}.')


# ----------------------------------------------------------------------------------------------
# Shared helpers


class _Taker:
  """Takes entries out of a flat checkpoint, recording what was used."""

  def __init__(self, flat: Flat, where: str):
    self.flat, self.where, self.used = flat, where, set()

  def has(self, key: str) -> bool:
    return key in self.flat

  def take(self, key: str) -> np.ndarray:
    if key not in self.flat:
      raise PretrainedError(f'{self.where}: missing checkpoint entry {key!r} (found '
                            f'{describe(self.flat)}).')
    self.used.add(key)
    return np.asarray(self.flat[key])

  def unused(self) -> list[str]:
    return sorted(set(self.flat) - self.used)


def _as_float32(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32)


def resolve_posemb(source: Source, model_grids: list[tuple[int, ...]], where: str,
                   grid: tuple[int, ...] | None = None) -> str:
  """Splits a 'vit' source's position embedding into its prefix rows and patch rows (in place).

  The number of prefix rows is the format's (`source.prefix`) where it is unambiguous. Otherwise a
  reading is chosen only by evidence, in this order: the patch grid stated by `grid` (config.init's
  `posemb_grid`) or by the checkpoint's config (`source.grid`); the patch grid of one of the model's
  encoders it initialises (`model_grids`, (rows, cols) / (time, mel)); the only reading whose patch
  count is a square (image checkpoints). Afterwards `source.grid` is the grid to lay the rows out on
  (stated, or None) and `cls` holds the CLS token plus its position row.

  Returns:
    why this number of prefix rows, for the report.

  Raises:
    PretrainedError: naming the entry, when the evidence allows no reading or more than one.
  """
  posemb = source.params['posemb']
  rows, key = posemb.shape[1], source.origin['posemb']
  stated = tuple(grid) if grid else source.grid
  readings = [p for p in source.prefix if rows - p > 0]
  fix = ("set config.init.posemb_grid (or init.<modality>.posemb_grid) to the checkpoint's patch "
         'grid, e.g. (14, 14)')
  if stated is not None:
    chosen = [p for p in readings if rows - p == int(np.prod(stated))]
    if not chosen:
      raise PretrainedError(f'{where}: {key} has {rows} rows, which fit no prefix {source.prefix} '
                            f'plus the stated patch grid {stated}.')
    why = f'the stated patch grid {stated}'
  elif len(readings) == 1:
    chosen, why = readings, f'the {source.format} layout'
  else:
    chosen = [p for p in readings if any(rows - p == int(np.prod(g)) for g in model_grids)]
    why = "the model's patch grid"
    if not chosen:
      chosen, why = [p for p in readings if _is_square(rows - p)], 'the only square patch grid'
    if len(chosen) != 1:
      options = ', '.join(f'{p} prefix rows + {rows - p} patches' for p in readings)
      raise PretrainedError(f'{where}: cannot tell the layout of {key} ({rows} rows: {options}); '
                            f'the checkpoint does not say which; {fix}.')
  prefix = chosen[0]
  source.grid = stated
  if prefix:
    source.params['posemb'] = posemb[:, prefix:]
    source.origin['posemb'] = f'{key}[{prefix}:]'
    if 'cls' in source.params:
      source.params['cls'] = source.params['cls'] + posemb[:, :1]
      source.origin['cls'] = f'{source.origin["cls"]} + {key}[0]'
    if prefix > 1:  # position rows of register tokens, which AVT does not have
      source.unused.append(f'{key}[1:{prefix}]')
  return f'{prefix} prefix rows ({why})'


def _is_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _finish_vit(params: Flat, where: str, num_layers: int) -> None:
  """Checks that every canonical ViT key is present."""
  required = ['embedding/kernel', 'embedding/bias', 'posemb', 'encoder_norm/scale', 'encoder_norm/bias']
  required += [f'encoderblock_{i}/{k}' for i in range(num_layers) for k in BLOCK_KEYS]
  missing = [k for k in required if k not in params]
  if missing:
    raise PretrainedError(f'{where}: the checkpoint lacks {missing[:6]} (canonical ViT names'
                          f'{", ..." if len(missing) > 6 else ""}); found {describe(params)}.')
  if num_layers == 0:
    raise PretrainedError(f'{where}: no encoder blocks found.')


# ----------------------------------------------------------------------------------------------
# Flax family: the original ViT release, big_vision, Scenic


def _strip(flat: Flat, prefix: str) -> Flat:
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _unwrap_flax(flat: Flat) -> tuple[Flat, list[str]]:
  """Finds the model parameters inside a training checkpoint.

  big_vision: `params/...` (optax) or `opt/target/...` (flax.optim); SigLIP/LiT two-tower files put
  the image tower under `img/`. Scenic: `params/...` or `optimizer/target/...`, sometimes with another
  `params/` inside (pre-Linen). Returns (parameters, a summary of the entries outside them).
  """
  prefix = next((p for p in ('params/', 'opt/target/', 'optimizer/target/')
                 if any(k.startswith(p) for k in flat)), '')
  if any(k.startswith(prefix + 'params/') for k in flat):
    prefix += 'params/'
  inner = _strip(flat, prefix)
  if not any(k.startswith(('Transformer/', 'embedding')) for k in inner) and any(
      k.startswith('img/') for k in inner):
    prefix += 'img/'
    inner = _strip(flat, prefix)
  outside: dict[str, int] = {}
  first = prefix.split('/')[0] + '/'
  for key in flat:
    if not key.startswith(prefix):  # e.g. optimizer state, step, rng; big_vision's text tower
      parts = key.split('/')
      top = '/'.join(parts[:2] if key.startswith(first) else parts[:1])
      outside[top] = outside.get(top, 0) + 1
  return inner, [f'{top}/... ({n} entries outside the model parameters)' for top, n in
                 sorted(outside.items())]


_MODULE = re.compile(r'^(LayerNorm|MultiHeadDotProductAttention|MlpBlock)_(\d+)/(.+)$')


def _flax_block(block: Flat, where: str, name_of) -> tuple[Flat, dict[str, str], int | None]:
  """One encoder block in any flax numbering -> canonical keys.

  The original release numbers a block's modules globally (LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3); linen (big_vision, Scenic) per type (LayerNorm_0, LayerNorm_1,
  MultiHeadDotProductAttention_0, MlpBlock_0). The first LayerNorm precedes attention in both.

  Args:
    block: the block's entries under their keys relative to the block.
    where: the checkpoint, for messages.
    name_of: relative key -> the checkpoint's full key (for the report).

  Returns:
    (canonical key -> value, canonical key -> checkpoint key, heads if the kernels show them).
  """
  modules: dict[str, dict[int, dict[str, str]]] = {}
  for key in block:
    match = _MODULE.match(key)
    if not match:
      raise PretrainedError(f'{where}: unexpected entry {key!r} in an encoder block (expected '
                            'LayerNorm, MultiHeadDotProductAttention and MlpBlock modules).')
    kind, index, rest = match.groups()
    modules.setdefault(kind, {}).setdefault(int(index), {})[rest] = key
  found = {kind: [modules.get(kind, {})[i] for i in sorted(modules.get(kind, {}))]
           for kind in ('LayerNorm', 'MultiHeadDotProductAttention', 'MlpBlock')}
  if [len(v) for v in found.values()] != [2, 1, 1]:
    raise PretrainedError(f'{where}: an encoder block needs 2 LayerNorms, 1 attention and 1 MLP; '
                          f'found {sorted(block)}.')
  renamed = [('LayerNorm_0', found['LayerNorm'][0]), ('LayerNorm_2', found['LayerNorm'][1]),
             (ATTENTION, found['MultiHeadDotProductAttention'][0]), ('MlpBlock_3', found['MlpBlock'][0])]
  out, names, heads = {}, {}, None
  for module, members in renamed:
    for rest, key in members.items():
      value = block[key]
      if module == ATTENTION:
        value, block_heads = _flatten_heads(rest, value)
        heads = block_heads or heads
      out[f'{module}/{rest}'], names[f'{module}/{rest}'] = value, name_of(key)
  return out, names, heads


def _flatten_heads(rest: str, value: np.ndarray) -> tuple[np.ndarray, int | None]:
  """flax attention arrays -> the canonical [D, H*dh] / [H*dh, D] / [H*dh]; also the heads."""
  proj, leaf = rest.split('/')
  if proj == 'out' and leaf == 'kernel' and value.ndim == 3:  # [heads, head_dim, D]
    return value.reshape(-1, value.shape[-1]), value.shape[0]
  if leaf == 'kernel' and value.ndim == 3:  # [D, heads, head_dim]
    return value.reshape(value.shape[0], -1), value.shape[1]
  if leaf == 'bias' and value.ndim == 2:  # [heads, head_dim]
    return value.reshape(-1), value.shape[0]
  return value, None


def _flax_blocks(inner: Flat, where: str) -> tuple[list[tuple[Flat, dict[str, str]]], list[str],
                                                   int | None]:
  """Encoder blocks, unrolled (`encoderblock_{i}`) or scanned (`encoderblock`, leading axis).

  Returns ([(canonical block, canonical key -> checkpoint key)], checkpoint keys used, heads).
  """
  unrolled = {}
  for key in inner:
    match = re.match(r'^Transformer/encoderblock_(\d+)/(.+)$', key)
    if match:
      unrolled.setdefault(int(match.group(1)), {})[match.group(2)] = inner[key]
  used = [k for k in inner if re.match(r'^Transformer/encoderblock_\d+/', k)]
  name_of = lambda i: lambda key: f'Transformer/encoderblock_{i}/{key}'
  if not unrolled:
    stacked = _strip(inner, 'Transformer/encoderblock/')
    if stacked:
      depth = next(iter(stacked.values())).shape[0]
      unrolled = {i: {k: v[i] for k, v in stacked.items()} for i in range(depth)}
      used = [f'Transformer/encoderblock/{k}' for k in stacked]
      name_of = lambda i: lambda key: f'Transformer/encoderblock/{key}[{i}]'
  if sorted(unrolled) != list(range(len(unrolled))):
    raise PretrainedError(f'{where}: encoder blocks {sorted(unrolled)} are not numbered 0..L-1.')
  blocks, heads = [], None
  for i in range(len(unrolled)):
    block, names, heads = _flax_block(unrolled[i], f'{where} (encoder block {i})', name_of(i))
    blocks.append((block, names))
  return blocks, used, heads


def _flax_vit(inner: Flat, where: str) -> Source:
  """The original ViT release, big_vision ViT, Scenic ViViT (spatio-temporal) -> kind 'vit'."""
  if _has(inner, r'^(SpatialTransformer|TemporalTransformer)/'):
    raise PretrainedError(f'{where}: a factorised-encoder ViViT (separate spatial and temporal '
                          'stacks); only spatio-temporal ViViT and image ViTs map onto AVT encoders.')
  take = _Taker(inner, where)
  params, origin = {}, {}

  def put(key, value, source):
    params[key], origin[key] = _as_float32(value), source

  for name in ('kernel', 'bias'):
    put(f'embedding/{name}', take.take(f'embedding/{name}'), f'embedding/{name}')
  pos_key = next((k for k in ('Transformer/posembed_input/pos_embedding', 'pos_embedding',
                              'Transformer/pos_embedding') if take.has(k)), None)
  if pos_key is None:
    raise PretrainedError(f'{where}: no learned position embedding (expected '
                          "'Transformer/posembed_input/pos_embedding' or 'pos_embedding'; fixed "
                          'sin-cos embeddings are not stored in checkpoints and are not supported).')
  put('posemb', take.take(pos_key), pos_key)
  if take.has('cls'):
    put('cls', take.take('cls'), 'cls')
  # The original release and Scenic add `posembed_input` after prepending CLS; big_vision's
  # `pos_embedding` comes before it, except in files converted from the old layout, which
  # big_vision's `fix_old_checkpoints` recognises by their count.
  if pos_key.startswith('Transformer/posembed_input'):
    prefix = (1,) if 'cls' in params else (0,)
  else:
    prefix = (0, 1) if 'cls' in params else (0,)
  blocks, used, heads = _flax_blocks(inner, where)
  take.used.update(used)
  for i, (block, names) in enumerate(blocks):
    for key, value in block.items():
      put(f'encoderblock_{i}/{key}', value, names[key])
  for name in ('scale', 'bias'):
    put(f'encoder_norm/{name}', take.take(f'Transformer/encoder_norm/{name}'),
        f'Transformer/encoder_norm/{name}')
  _finish_vit(params, where, len(blocks))
  return Source('', 'vit', params, origin, take.unused(), heads, prefix)


def _mbt(inner: Flat, where: str) -> Source:
  """Scenic MBT (scenic/projects/mbt/model.py) -> kind 'avt'.

  RGB is AVT's video, spectrogram its audio. MBT names the RGB stream's modules without a suffix
  (`embedding`, `cls`, `posembed_input`, `encoderblock_{i}`), the spectrogram's with one
  (`embedding_spectrogram`, `clsspectrogram`, `posembed_input_spectrogram`,
  `encoderblock_{i}_spectrogram`; absent with `share_encoder`, where both use `encoderblock_{i}`). Its
  single `encoder_norm` is applied to both streams; its `bottleneck` holds n_bottlenecks + 1 tokens
  with a CLS classifier (AVT keeps the first n, see mapping); `output_projection` is the shared head.
  """
  take = _Taker(inner, where)
  params, origin = {}, {}

  def put(key, value, source):
    params[key], origin[key] = _as_float32(value), source

  streams = {'video': ('', '', ''), 'audio': ('_spectrogram', 'spectrogram', '_spectrogram')}
  for modality, (embed_sfx, cls_sfx, pos_sfx) in streams.items():
    if not take.has(f'embedding{embed_sfx}/kernel'):
      continue
    for name in ('kernel', 'bias'):
      put(f'tokenizer_{modality}/embedding/{name}', take.take(f'embedding{embed_sfx}/{name}'),
          f'embedding{embed_sfx}/{name}')
    pos_key = f'Transformer/posembed_input{pos_sfx}/pos_embedding'
    posemb = take.take(pos_key)
    cls_key = f'cls{cls_sfx}'
    if take.has(cls_key):  # MBT adds position embeddings after prepending CLS
      put(f'cls_{modality}', take.take(cls_key) + posemb[:, :1], f'{cls_key} + {pos_key}[0]')
      posemb = posemb[:, 1:]
    put(f'posembed_{modality}/posembed_input', posemb, pos_key)
    for name in ('scale', 'bias'):
      put(f'encoder/encoder_norm_{modality}/{name}', take.take(f'Transformer/encoder_norm/{name}'),
          f'Transformer/encoder_norm/{name}')
  has_audio, heads = 'tokenizer_audio/embedding/kernel' in params, None
  for i in range(_num_layers(inner, r'^Transformer/encoderblock_(\d+)(?:_spectrogram)?/')):
    rgb, spec = f'Transformer/encoderblock_{i}/', f'Transformer/encoderblock_{i}_spectrogram/'
    shared = has_audio and not any(k.startswith(spec) for k in inner)  # MBT's share_encoder
    for prefix, modalities in ((rgb, ('video', 'audio') if shared else ('video',)), (spec, ('audio',))):
      entries = _strip(inner, prefix)
      if not entries:
        continue
      block, names, heads = _flax_block(entries, f'{where} ({prefix})', lambda k, p=prefix: p + k)
      take.used.update(prefix + k for k in entries)
      for modality in modalities:
        for k, v in block.items():
          put(f'encoder/encoderblock_{i}_{modality}/{k}', v, names[k])
  if take.has('bottleneck'):
    put('encoder/bottleneck', take.take('bottleneck'), 'bottleneck')
  for name in ('kernel', 'bias'):
    if take.has(f'output_projection/{name}'):
      put(f'classifier/output_projection/{name}', take.take(f'output_projection/{name}'),
          f'output_projection/{name}')
  return Source('scenic', 'avt', params, origin, take.unused(), heads)


# ----------------------------------------------------------------------------------------------
# PyTorch layouts (safetensors): timm and Hugging Face transformers


def _linear(weight: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> flax kernel [in, out]."""
  return weight.T


def _conv(weight: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight [D, C, h, w] -> flax kernel [h, w, C, D] (Conv3d: [t, h, w, C, D])."""
  return np.moveaxis(weight, (0, 1), (-1, -2))


def _prefix(flat: Flat, suffix_regex: str) -> str:
  """The common prefix (e.g. 'vit.', 'model.') in front of a known key."""
  for key in sorted(flat):
    match = re.match(rf'^(.*?){suffix_regex}$', key)
    if match:
      return match.group(1)
  return ''


def _num_layers(flat: Flat, regex: str) -> int:
  found = {int(m.group(1)) for m in (re.match(regex, k) for k in flat) if m}
  return max(found) + 1 if found else 0


_UNSUPPORTED = {r'(^|\.)norm_pre\.': 'a LayerNorm before the encoder (CLIP)',
                r'\.attn\.[qk]_norm\.|\.attention\.[qk]_norm\.': 'query / key normalisation',
                r'\.attn\.[qv]_bias$': 'separate q / v biases (BEiT)',
                r'\.mlp\.(w12|w3|fc1_g|weights_in)\.': 'a SwiGLU MLP (e.g. DINOv2 ViT-g)',
                r'(^|\.)dist_token$': 'a distillation token (DeiT)'}


def _refuse_unsupported(flat: Flat, where: str) -> None:
  for regex, feature in _UNSUPPORTED.items():
    bad = [k for k in flat if re.search(regex, k)]
    if bad:
      raise PretrainedError(f'{where}: entry {bad[0]!r} means this model uses {feature}, which '
                            "AVT's encoder blocks do not have.")


def _fold_layer_scale(put, take: _Taker, block: str, gammas: tuple[str, str]) -> None:
  """Multiplies the attention output and second MLP projections of canonical `block` (in place) by
  the checkpoint's LayerScale vectors `gammas` (attention, MLP), where it has them."""
  for gamma_key, proj in zip(gammas, (f'{ATTENTION}/out', 'MlpBlock_3/Dense_1')):
    if not take.has(gamma_key):
      continue
    gamma = _as_float32(take.take(gamma_key))
    for leaf in ('kernel', 'bias'):
      key = f'{block}{proj}/{leaf}'
      put(key, put.params[key] * gamma, f'{put.origin[key]} x {gamma_key}')


class _Put:
  """Stores canonical entries as float32 with their origin."""

  def __init__(self):
    self.params, self.origin = {}, {}

  def __call__(self, key: str, value: np.ndarray, source: str) -> None:
    self.params[key], self.origin[key] = _as_float32(value), source


def _timm_prefix(p: str, take: _Taker, side: dict) -> tuple[int, ...]:
  """Possible prefix rows of timm's `pos_embed`: the class and register tokens unless the model was
  made with `no_embed_class` (its config.json's `model_args` says so; the file alone does not)."""
  tokens = (1 if take.has(f'{p}cls_token') else 0) + (
      take.flat[f'{p}reg_token'].shape[1] if take.has(f'{p}reg_token') else 0)
  args = side.get('model_args') or {}
  if 'no_embed_class' in args:
    return (0,) if args['no_embed_class'] else (tokens,)
  return (tokens, 0) if tokens else (0,)


def _timm(flat: Flat, where: str, fmt: str, side: dict) -> Source:
  """timm `VisionTransformer.state_dict()` (timm/models/vision_transformer.py) and the original
  DINOv2 `DinoVisionTransformer` (dinov2/models/vision_transformer.py) -> kind 'vit'."""
  _refuse_unsupported(flat, where)
  p = _prefix(flat, r'blocks\.(?:\d+\.)?\d+\.attn\.qkv\.weight')
  take = _Taker(flat, where)
  put = _Put()
  put('embedding/kernel', _conv(take.take(f'{p}patch_embed.proj.weight')), f'{p}patch_embed.proj.weight')
  put('embedding/bias', take.take(f'{p}patch_embed.proj.bias'), f'{p}patch_embed.proj.bias')
  if take.has(f'{p}cls_token'):
    put('cls', take.take(f'{p}cls_token'), f'{p}cls_token')
  put('posemb', take.take(f'{p}pos_embed'), f'{p}pos_embed')
  # DINOv2 adds `pos_embed` (CLS + patches) before inserting its registers; timm, see _timm_prefix.
  prefix = (1,) if fmt == 'dinov2' else _timm_prefix(p, take, side)
  # DINOv2 with block_chunks > 0 (its training checkpoints) nests blocks as blocks.{chunk}.{i}.
  blocks = {}
  for key in flat:
    match = re.match(rf'^({re.escape(p)}blocks\.(?:\d+\.)?(\d+)\.)', key)
    if match:
      blocks[int(match.group(2))] = match.group(1)
  if sorted(blocks) != list(range(len(blocks))):
    raise PretrainedError(f'{where}: encoder blocks {sorted(blocks)} are not numbered 0..L-1.')
  for i in range(len(blocks)):
    b, c = blocks[i], f'encoderblock_{i}/'
    for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      put(f'{c}{ours}/scale', take.take(f'{b}{theirs}.weight'), f'{b}{theirs}.weight')
      put(f'{c}{ours}/bias', take.take(f'{b}{theirs}.bias'), f'{b}{theirs}.bias')
    qkv = _linear(take.take(f'{b}attn.qkv.weight'))  # [D, 3D]: q, k, v along the output axis
    width = qkv.shape[0]
    bias = take.take(f'{b}attn.qkv.bias') if take.has(f'{b}attn.qkv.bias') else np.zeros(3 * width)
    for j, proj in enumerate(('query', 'key', 'value')):
      put(f'{c}{ATTENTION}/{proj}/kernel', qkv[:, j * width:(j + 1) * width], f'{b}attn.qkv.weight')
      put(f'{c}{ATTENTION}/{proj}/bias', bias[j * width:(j + 1) * width], f'{b}attn.qkv.bias')
    put(f'{c}{ATTENTION}/out/kernel', _linear(take.take(f'{b}attn.proj.weight')), f'{b}attn.proj.weight')
    put(f'{c}{ATTENTION}/out/bias', take.take(f'{b}attn.proj.bias'), f'{b}attn.proj.bias')
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      put(f'{c}MlpBlock_3/{ours}/kernel', _linear(take.take(f'{b}mlp.{theirs}.weight')),
          f'{b}mlp.{theirs}.weight')
      put(f'{c}MlpBlock_3/{ours}/bias', take.take(f'{b}mlp.{theirs}.bias'), f'{b}mlp.{theirs}.bias')
    _fold_layer_scale(put, take, c, (f'{b}ls1.gamma', f'{b}ls2.gamma'))
  put('encoder_norm/scale', take.take(f'{p}norm.weight'), f'{p}norm.weight')
  put('encoder_norm/bias', take.take(f'{p}norm.bias'), f'{p}norm.bias')
  _finish_vit(put.params, where, len(blocks))
  grid = _stated_grid(side, put.params['embedding/kernel'].shape[:2])
  return Source(fmt, 'vit', put.params, put.origin, take.unused(), prefix=prefix, grid=grid,
                posemb_resize='bicubic' if fmt == 'dinov2' else 'bilinear')


def _stated_grid(side: dict, patch: tuple[int, int]) -> tuple[int, int] | None:
  """The patch grid from a config.json: Hugging Face `image_size` (int or [h, w]); timm
  `model_args.img_size` or `pretrained_cfg.input_size` [C, H, W]; divided by the kernel's patch."""
  size = side.get('image_size') or (side.get('model_args') or {}).get('img_size')
  if size is None and (side.get('pretrained_cfg') or {}).get('input_size'):
    size = side['pretrained_cfg']['input_size'][1:]
  if size is None:
    return None
  size = (size, size) if isinstance(size, int) else tuple(size)
  return tuple(s // q for s, q in zip(size, patch))


_HF_BLOCK = (  # (ours, theirs in ViT, theirs in DINOv2, is a Linear weight)
    ('LayerNorm_0/scale', 'layernorm_before.weight', 'norm1.weight', False),
    ('LayerNorm_0/bias', 'layernorm_before.bias', 'norm1.bias', False),
    *[(f'{ATTENTION}/{proj}/{leaf}', f'attention.attention.{proj}.{w}',
       f'attention.attention.{proj}.{w}', leaf == 'kernel')
      for proj in ('query', 'key', 'value') for leaf, w in (('kernel', 'weight'), ('bias', 'bias'))],
    (f'{ATTENTION}/out/kernel', 'attention.output.dense.weight', 'attention.output.dense.weight', True),
    (f'{ATTENTION}/out/bias', 'attention.output.dense.bias', 'attention.output.dense.bias', False),
    ('LayerNorm_2/scale', 'layernorm_after.weight', 'norm2.weight', False),
    ('LayerNorm_2/bias', 'layernorm_after.bias', 'norm2.bias', False),
    ('MlpBlock_3/Dense_0/kernel', 'intermediate.dense.weight', 'mlp.fc1.weight', True),
    ('MlpBlock_3/Dense_0/bias', 'intermediate.dense.bias', 'mlp.fc1.bias', False),
    ('MlpBlock_3/Dense_1/kernel', 'output.dense.weight', 'mlp.fc2.weight', True),
    ('MlpBlock_3/Dense_1/bias', 'output.dense.bias', 'mlp.fc2.bias', False),
)


def _hf(flat: Flat, where: str, fmt: str, side: dict) -> Source:
  """Hugging Face `ViTModel` / `ViTForImageClassification` (modeling_vit.py) and `Dinov2Model` /
  `Dinov2ForImageClassification` / `Dinov2WithRegistersModel` (modeling_dinov2*.py) -> kind 'vit'.
  Both add `position_embeddings` after prepending CLS; DINOv2 inserts its registers after that."""
  _refuse_unsupported(flat, where)
  dino = fmt == 'hf_dinov2'
  p = _prefix(flat, r'encoder\.layer\.\d+\.attention\.attention\.query\.weight')
  take = _Taker(flat, where)
  put = _Put()
  e = f'{p}embeddings.'
  put('embedding/kernel', _conv(take.take(f'{e}patch_embeddings.projection.weight')),
      f'{e}patch_embeddings.projection.weight')
  put('embedding/bias', take.take(f'{e}patch_embeddings.projection.bias'),
      f'{e}patch_embeddings.projection.bias')
  if take.has(f'{e}cls_token'):
    put('cls', take.take(f'{e}cls_token'), f'{e}cls_token')
  put('posemb', take.take(f'{e}position_embeddings'), f'{e}position_embeddings')
  layers = _num_layers(flat, rf'^{re.escape(p)}encoder\.layer\.(\d+)\.')
  for i in range(layers):
    b = f'{p}encoder.layer.{i}.'
    for ours, vit, dinov2, linear in _HF_BLOCK:
      key = b + (dinov2 if dino else vit)
      value = take.take(key)
      put(f'encoderblock_{i}/{ours}', _linear(value) if linear else value, key)
    _fold_layer_scale(put, take, f'encoderblock_{i}/',
                      (f'{b}layer_scale1.lambda1', f'{b}layer_scale2.lambda1'))
  put('encoder_norm/scale', take.take(f'{p}layernorm.weight'), f'{p}layernorm.weight')
  put('encoder_norm/bias', take.take(f'{p}layernorm.bias'), f'{p}layernorm.bias')
  _finish_vit(put.params, where, layers)
  grid = _stated_grid(side, put.params['embedding/kernel'].shape[:2])
  return Source(fmt, 'vit', put.params, put.origin, take.unused(),
                prefix=(1,) if 'cls' in put.params else (0,), grid=grid,
                posemb_resize='bicubic' if dino else 'bilinear')


# ----------------------------------------------------------------------------------------------
# This project's checkpoints


def _avt(flat: Flat, where: str) -> Source:
  """This project's parameters, scanned layouts unrolled, under AVT names -> kind 'avt'."""
  from avt_jax.models import scan  # pylint: disable=g-import-not-at-top
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value)
  try:
    tree = scan.scanned_to_unrolled(tree)
  except ValueError as e:
    raise PretrainedError(f'{where}: {e}') from e
  params = {k: _as_float32(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}
  return Source('avt', 'avt', params, {k: k for k in params}, [])
