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

from avt_jax.models.transformer import EncoderBlock

FUSIONS = ('bottleneck', 'concat', 'late')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Tokens = Mapping[str, jax.Array]  # modality -> [batch, tokens, D]


class BottleneckFusion(nn.Module):
  """Multimodal Transformer encoder with bottleneck (or concat / late) fusion.

  Parameters are named `encoderblock_{i}_{modality}` (shared `encoderblock_{i}` for the fused layers of
  `concat`), `encoder_norm_{modality}` and `bottleneck` ([1, n_bottlenecks, D]).

  Attributes:
    modalities: modality names, e.g. ('video', 'audio').
    hidden_size: token width D.
    num_layers: depth of each modality's stack.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    fusion: one of FUSIONS.
    fusion_layer: first fused layer, 0 (early) .. num_layers (late).
    n_bottlenecks: number of bottleneck tokens.
    dropout: dropout rate.
    stochastic_depth: drop-path rate of the last layer (linearly increasing from 0 at layer 0).
    dtype: computation dtype.
    attention_implementation: see transformer.ATTENTION_IMPLEMENTATIONS.
    remat_policy: one of REMAT_POLICIES; rematerialises each block in the backward pass.
  """
  modalities: Sequence[str]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  fusion: str = 'bottleneck'
  fusion_layer: int = 8
  n_bottlenecks: int = 4
  dropout: float = 0.0
  stochastic_depth: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str = 'xla'
  remat_policy: str = 'none'

  @property
  def fusion_start(self) -> int:
    """Index of the first layer in which modalities exchange information."""
    if self.fusion == 'late' or len(self.modalities) == 1:
      return self.num_layers
    return self.fusion_layer

  def _validate(self) -> None:
    if self.fusion not in FUSIONS:
      raise ValueError(f'BottleneckFusion.fusion: expected one of {FUSIONS}, got {self.fusion!r}.')
    if not 0 <= self.fusion_layer <= self.num_layers:
      raise ValueError(f'BottleneckFusion.fusion_layer: expected 0..num_layers={self.num_layers}, '
                       f'got {self.fusion_layer}.')
    if self.fusion == 'bottleneck' and self.n_bottlenecks < 1:
      raise ValueError(f'BottleneckFusion.n_bottlenecks: bottleneck fusion needs at least 1, got '
                       f'{self.n_bottlenecks}.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'BottleneckFusion.remat_policy: expected one of {sorted(REMAT_POLICIES)}, '
                       f'got {self.remat_policy!r}.')

  def setup(self):
    self._validate()
    if self.remat_policy == 'none':
      block_cls = EncoderBlock
    else:
      block_cls = nn.remat(EncoderBlock, policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(2,))

    def block(i, name):
      rate = self.stochastic_depth * i / max(self.num_layers - 1, 1)
      return block_cls(self.num_heads, self.mlp_dim, self.dropout, rate, self.dtype,
                       self.attention_implementation, name=name)

    shared = self.fusion == 'concat' and len(self.modalities) > 1
    fused_blocks = {i: block(i, f'encoderblock_{i}') for i in range(self.fusion_start, self.num_layers)
                    } if shared else {}  # one module per fused layer, used by all modalities
    self.blocks = {
        m: [fused_blocks[i] if i in fused_blocks else block(i, f'encoderblock_{i}_{m}')
            for i in range(self.num_layers)]
        for m in self.modalities}
    self.norms = {m: nn.LayerNorm(dtype=self.dtype, name=f'encoder_norm_{m}') for m in self.modalities}
    if self.fusion == 'bottleneck' and self.fusion_start < self.num_layers:
      self.bottleneck = self.param('bottleneck', nn.initializers.normal(stddev=0.02),
                                   (1, self.n_bottlenecks, self.hidden_size))

  def unimodal(self, tokens: Tokens, deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs layers [0, fusion_start): modality -> [batch, tokens, D] (before the final norm)."""
    out = {}
    for m in self.modalities:
      x = tokens[m]
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
      b = jnp.broadcast_to(self.bottleneck.astype(self.dtype),
                           (batch, self.n_bottlenecks, self.hidden_size))
      for i in range(start, self.num_layers):
        new_b = []
        for m in self.modalities:
          n = x[m].shape[1]
          y = self.blocks[m][i](jnp.concatenate([x[m], b.astype(x[m].dtype)], axis=1), deterministic)
          x[m], bm = y[:, :n], y[:, n:]
          new_b.append(bm)
        b = jnp.mean(jnp.stack(new_b), axis=0)  # [batch, n_bottlenecks, D]
    elif start < self.num_layers and self.fusion == 'concat':
      sizes = [x[m].shape[1] for m in self.modalities]
      y = jnp.concatenate([x[m] for m in self.modalities], axis=1)
      for i in range(start, self.num_layers):
        y = self.blocks[self.modalities[0]][i](y, deterministic)
      splits = jnp.split(y, list(np.cumsum(sizes)[:-1]), axis=1)
      x = dict(zip(self.modalities, splits))
    return {m: self.norms[m](x[m]) for m in self.modalities}

  def __call__(self, tokens: Tokens, deterministic: bool = True) -> dict[str, jax.Array]:
    """modality -> [batch, tokens, D] in, modality -> [batch, tokens, D] (normalised) out."""
    return self.fused(self.unimodal(tokens, deterministic), deterministic)
