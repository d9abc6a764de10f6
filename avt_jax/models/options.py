"""Encoder options: the settings every Transformer layer reads, in one object; and how the modules
report impossible settings.

`EncoderOptions` travels as one module attribute from `AVT` through `FusionEncoder` and
`EncoderBlock` down to the attention (as Flax's lm1b example does with its `TransformerConfig`). Its
field names are those of `config.model`, so a problem reported by `problems()` names the config
field as well as the module attribute (our design).
"""

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ('xla', 'chunked', 'cudnn')
DEFAULT_CHUNK_SIZE = 128
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Problem = tuple[str, str]  # (field name, what is wrong with its value)


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
  """How the encoder layers compute (not what they compute: parameters do not depend on these).

  Attributes:
    dropout: dropout rate after attention and inside the MLP, in [0, 1).
    stochastic_depth: drop-path rate of the last layer, in [0, 1) (linearly increasing from 0 at
      layer 0; `FusionEncoder` sets each block's rate).
    dtype: computation dtype; parameters stay float32.
    attention_implementation: one of ATTENTION_IMPLEMENTATIONS (see `transformer`).
    attention_chunk_size: queries per chunk of the `chunked` attention, >= 1.
    remat_policy: one of REMAT_POLICIES; rematerialises each block in the backward pass.
    scan_layers: run identical layers in `nn.scan` (stacked parameters, see `FusionEncoder`).
    gelu_approximate: the MLP's GELU as the tanh approximation (the original ViT, big_vision,
      Scenic) or exact with erf (PyTorch's default: DINOv2, timm, Hugging Face); a checkpoint
      reproduces its own outputs only with its own form (DINOv2 ViT-S/14 on a real image: up to
      0.025 apart in final features of magnitude ~10 with the other form, 3e-5 with its own).
  """
  dropout: float = 0.0
  stochastic_depth: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str = 'xla'
  attention_chunk_size: int = DEFAULT_CHUNK_SIZE
  remat_policy: str = 'none'
  scan_layers: bool = False
  gelu_approximate: bool = True

  def problems(self) -> list[Problem]:
    """(field, message) for each impossible setting; empty when all are valid."""
    found = []
    # A rate of 1 would divide by the keep probability 0 (NaN gradients).
    for name in ('dropout', 'stochastic_depth'):
      if not 0.0 <= getattr(self, name) < 1.0:
        found.append((name, f'must be in [0, 1), got {getattr(self, name)}'))
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      found.append(('attention_implementation', f'expected one of {ATTENTION_IMPLEMENTATIONS}, '
                    f'got {self.attention_implementation!r}'))
    elif self.attention_implementation == 'cudnn' and jnp.dtype(self.dtype) != jnp.bfloat16:
      found.append(('attention_implementation',
                    f"'cudnn' needs dtype bfloat16, got {jnp.dtype(self.dtype).name}"))
    if self.attention_chunk_size < 1:
      found.append(('attention_chunk_size', f'must be >= 1, got {self.attention_chunk_size}'))
    if self.remat_policy not in REMAT_POLICIES:
      found.append(('remat_policy', f'expected one of {sorted(REMAT_POLICIES)}, '
                    f'got {self.remat_policy!r}'))
    return found


def raise_first(owner: str, problems: Iterable[Problem], error: type[ValueError] = ValueError
                ) -> None:
  """Raises `error('<owner>.<field>: <message>')` for the first of `problems`, if any.

  `owner` names where the value came from: a module ('FusionEncoder') or a config
  ('config.model').
  """
  for field, message in problems:
    raise error(f'{owner}.{field}: {message}')
