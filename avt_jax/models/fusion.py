"""Per-modality Transformer encoders fused through bottleneck tokens (MBT-style).

Layers below `fusion_layer` are unimodal. From `fusion_layer` on, with `fusion='bottleneck'`, each
modality's block attends over [its own tokens, the bottleneck tokens] and the bottleneck passed to the
next layer is the mean of the modalities' bottleneck outputs, so the modalities exchange information
only through `n_bottlenecks` tokens. Ablations: `concat` runs one shared block per fused layer over
all tokens of both modalities (cross-modal attention, quadratic in the total token count); `late`
never exchanges (same as `fusion_layer = num_layers`).
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avt_jax.models.options import REMAT_POLICIES, EncoderOptions, Problem, raise_first
from avt_jax.models.transformer import ATTENTION_COLLECTION, EncoderBlock

FUSIONS = ('bottleneck', 'concat', 'late')

Tokens = Mapping[str, jax.Array]  # modality -> [batch, tokens, D]


def fusion_start(fusion: str, fusion_layer: int, num_layers: int, num_modalities: int) -> int:
  """Index of the first layer in which modalities exchange information: `fusion_layer`, or
  `num_layers` for late fusion and single-modality models."""
  return num_layers if fusion == 'late' or num_modalities == 1 else fusion_layer


def fusion_problems(hidden_size: int, num_layers: int, num_heads: int, fusion: str,
                    fusion_layer: int, n_bottlenecks: int) -> list[Problem]:
  """(field, message) for each impossible encoder shape or fusion setting (see FusionEncoder)."""
  found = []
  if fusion not in FUSIONS:
    found.append(('fusion', f'expected one of {FUSIONS}, got {fusion!r}'))
  if not 0 <= fusion_layer <= num_layers:
    found.append(('fusion_layer', f'must be in [0, num_layers={num_layers}], got {fusion_layer}'))
  if fusion == 'bottleneck' and n_bottlenecks < 1:
    found.append(('n_bottlenecks',
                  f'bottleneck fusion needs at least 1 bottleneck token, got {n_bottlenecks}'))
  if hidden_size % num_heads:
    found.append(('num_heads',
                  f'hidden_size {hidden_size} is not divisible by num_heads {num_heads}'))
  return found


class FusionEncoder(nn.Module):
  """Multimodal Transformer encoder with bottleneck, concat or late fusion (`fusion`).

  Formerly `BottleneckFusion` (that name stays an alias).

  Parameters are named `encoderblock_{i}_{modality}` (shared `encoderblock_{i}` for the fused layers of
  `concat`), `encoder_norm_{modality}` and `bottleneck` ([1, n_bottlenecks, D]).

  With `options.scan_layers`, identical layers run in a `nn.scan` (the program holds one layer of
  each kind, so compile time no longer grows with depth) and their parameters are stacked on a
  leading layer axis (convert with `avt_jax.models.scan`):
    `encoderblocks_{modality}`: layers [0, fusion_start) of that modality, [fusion_start, ...];
    `encoderblocks_fused`: {modality: block} of the bottleneck layers [fusion_start, num_layers),
      [num_layers - fusion_start, ...];
    `encoderblocks_shared`: the shared blocks of the `concat` layers [fusion_start, num_layers).
  `encoder_norm_{modality}` and `bottleneck` keep their names. The layer axis has the logical name
  'layers' (see `avt_jax.sharding`).

  Attributes:
    modalities: modality names, e.g. ('video', 'audio').
    hidden_size: token width D.
    num_layers: depth of each modality's stack.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    fusion: one of FUSIONS.
    fusion_layer: first fused layer, 0 (early) .. num_layers (late).
    n_bottlenecks: number of bottleneck tokens.
    options: dropout, stochastic depth, dtype, attention, remat and scan settings.

  Raises (at init or apply):
    ValueError: `FusionEncoder.<field>: ...` for an impossible attribute or option.
  """
  modalities: Sequence[str]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  fusion: str = 'bottleneck'
  fusion_layer: int = 8
  n_bottlenecks: int = 4
  options: EncoderOptions = EncoderOptions()

  @property
  def fusion_start(self) -> int:
    """Index of the first layer in which modalities exchange information (`fusion_start`)."""
    return fusion_start(self.fusion, self.fusion_layer, self.num_layers, len(self.modalities))

  def _droppath(self, layer: int) -> float:
    """Stochastic depth rate of `layer`: linear from 0 (first layer) to `stochastic_depth` (last)."""
    return self.options.stochastic_depth * layer / max(self.num_layers - 1, 1)

  def _block_args(self) -> dict:
    return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, options=self.options)

  def setup(self):
    raise_first('FusionEncoder', fusion_problems(
        self.hidden_size, self.num_layers, self.num_heads, self.fusion, self.fusion_layer,
        self.n_bottlenecks) + self.options.problems())
    scan_layers = self.options.scan_layers
    block_cls = remat_block_class(self.options.remat_policy, in_scan=scan_layers)
    shared = self.fusion == 'concat' and len(self.modalities) > 1
    start = self.fusion_start
    if scan_layers:
      self.stacks = {m: block_cls(**self._block_args(), name=f'encoderblocks_{m}')
                     for m in self.modalities if start > 0}
      if start < self.num_layers:
        self.fused_stack = (block_cls(**self._block_args(), name='encoderblocks_shared') if shared else
                            BottleneckLayer(tuple(self.modalities), self._block_args(),
                                            name='encoderblocks_fused'))
    else:
      def block(i, name):
        return block_cls(droppath=self._droppath(i), **self._block_args(), name=name)

      fused_blocks = {i: block(i, f'encoderblock_{i}') for i in range(start, self.num_layers)
                      } if shared else {}  # one module per fused layer, used by all modalities
      self.blocks = {
          m: [fused_blocks[i] if i in fused_blocks else block(i, f'encoderblock_{i}_{m}')
              for i in range(self.num_layers)]
          for m in self.modalities}
    self.norms = {m: nn.LayerNorm(dtype=self.options.dtype, name=f'encoder_norm_{m}')
                  for m in self.modalities}
    if self.fusion == 'bottleneck' and start < self.num_layers:
      self.bottleneck = self.param('bottleneck', nn.initializers.normal(stddev=0.02),
                                   (1, self.n_bottlenecks, self.hidden_size))

  def _scan(self, module: nn.Module, carry, layers: range, deterministic: bool):
    """Runs `module` (parameters stacked over `layers`) as carry -> module(carry) for each layer."""
    rates = jnp.asarray([self._droppath(i) for i in layers], jnp.float32)
    use_rates = self.options.stochastic_depth > 0  # else the blocks keep their static rate 0

    def step(layer, carry, rate):
      return layer(carry, deterministic, rate if use_rates else None), None

    scan = nn.scan(step, variable_axes={'params': 0, ATTENTION_COLLECTION: 0},
                   split_rngs={'params': True, 'dropout': True}, length=len(layers),
                   metadata_params={nn.PARTITION_NAME: 'layers'})
    return scan(module, carry, rates)[0]

  def unimodal(self, tokens: Tokens, deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs layers [0, fusion_start) of the modalities in `tokens` (any subset):
    modality -> [batch, tokens, D] (before the final norm)."""
    out = {}
    for m in tokens:
      x = tokens[m]
      if self.options.scan_layers and self.fusion_start > 0:
        x = self._scan(self.stacks[m], x, range(self.fusion_start), deterministic)
      elif not self.options.scan_layers:
        for i in range(self.fusion_start):
          x = self.blocks[m][i](x, deterministic)
      out[m] = x
    return out

  def fused(self, tokens: Tokens, deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs layers [fusion_start, num_layers) and the final norms on `unimodal`'s output."""
    x = dict(tokens)
    start = self.fusion_start
    if start < self.num_layers and self.fusion == 'bottleneck':
      batch = x[self.modalities[0]].shape[0]
      b = jnp.broadcast_to(self.bottleneck.astype(self.options.dtype),
                           (batch, self.n_bottlenecks, self.hidden_size))
      if self.options.scan_layers:
        x, b = self._scan(self.fused_stack, (x, b), range(start, self.num_layers), deterministic)
      else:
        for i in range(start, self.num_layers):
          x, b = bottleneck_layer({m: self.blocks[m][i] for m in self.modalities}, x, b,
                                  deterministic)
    elif start < self.num_layers and self.fusion == 'concat':
      sizes = [x[m].shape[1] for m in self.modalities]
      y = jnp.concatenate([x[m] for m in self.modalities], axis=1)
      if self.options.scan_layers:
        y = self._scan(self.fused_stack, y, range(start, self.num_layers), deterministic)
      else:
        for i in range(start, self.num_layers):
          y = self.blocks[self.modalities[0]][i](y, deterministic)
      splits = jnp.split(y, list(np.cumsum(sizes)[:-1]), axis=1)
      x = dict(zip(self.modalities, splits))
    return {m: self.norms[m](x[m]) for m in self.modalities}

  def __call__(self, tokens: Tokens, deterministic: bool = True) -> dict[str, jax.Array]:
    """modality -> [batch, tokens, D] in, modality -> [batch, tokens, D] (normalised) out."""
    return self.fused(self.unimodal(tokens, deterministic), deterministic)


def remat_block_class(policy: str, in_scan: bool = False) -> type[nn.Module]:
  """EncoderBlock, or EncoderBlock rematerialised in the backward pass with `REMAT_POLICIES[policy]`.

  `in_scan`: the block runs inside `nn.scan`, which already keeps XLA from merging the recomputation
  with the forward pass, so the (costly) CSE barriers are left out.
  """
  if policy == 'none':
    return EncoderBlock
  return nn.remat(EncoderBlock, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan,
                  static_argnums=(2,))


def bottleneck_layer(blocks: Mapping[str, nn.Module], x: Tokens, b: jax.Array, deterministic: bool,
                     droppath: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
  """One bottleneck-fused layer.

  Each modality's block sees [its tokens, bottleneck tokens]; the next bottleneck is the mean of the
  modalities' bottleneck outputs.

  Args:
    blocks: modality -> its EncoderBlock of this layer.
    x: modality -> [batch, tokens, D].
    b: bottleneck tokens [batch, n_bottlenecks, D].
    deterministic: disables dropout and drop path.
    droppath: optional traced drop-path rate (see EncoderBlock).

  Returns:
    (modality -> [batch, tokens, D], next bottleneck [batch, n_bottlenecks, D]).
  """
  x, new_b = dict(x), []
  for m, block in blocks.items():
    n = x[m].shape[1]
    y = block(jnp.concatenate([x[m], b.astype(x[m].dtype)], axis=1), deterministic, droppath)
    x[m] = y[:, :n]
    new_b.append(y[:, n:])
  return x, jnp.mean(jnp.stack(new_b), axis=0)


class BottleneckLayer(nn.Module):
  """One bottleneck-fused layer of all modalities: the body of the scan over fused layers.

  The EncoderBlock of each modality is named after the modality (see `bottleneck_layer`).

  Attributes:
    modalities: modality names.
    block_args: EncoderBlock attributes other than `droppath` (its `options` give the remat policy).
  """
  modalities: Sequence[str]
  block_args: Mapping

  @nn.compact
  def __call__(self, carry: tuple[dict[str, jax.Array], jax.Array], deterministic: bool,
               droppath: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
    """({modality: [batch, tokens, D]}, bottleneck [batch, n_bottlenecks, D]) -> the same, one layer on."""
    block_cls = remat_block_class(self.block_args['options'].remat_policy, in_scan=True)
    blocks = {m: block_cls(**self.block_args, name=m) for m in self.modalities}
    return bottleneck_layer(blocks, *carry, deterministic, droppath)


BottleneckFusion = FusionEncoder  # the former name, kept for users' imports
