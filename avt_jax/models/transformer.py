"""Pre-LayerNorm Transformer encoder block (ViT naming, so ViT checkpoints map in)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# 'xla' is the portable path; 'cudnn' selects the fused cuDNN kernel on NVIDIA GPUs.
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn')


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D]."""
    width = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init,
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.Dense(width, dtype=self.dtype, kernel_init=init,
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention through `jax.nn.dot_product_attention` (cuDNN fused kernel on GPU if asked).

  Parameter names and shapes follow flax's MultiHeadDotProductAttention (`query`, `key`, `value`,
  `out`), so ViT checkpoints load unchanged.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'Token width {width} is not divisible by num_heads={self.num_heads}.')
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                         kernel_init=nn.initializers.xavier_uniform(), name=name)
    q, k, v = dense('query')(x), dense('key')(x), dense('value')(x)  # [batch, tokens, heads, head_dim]
    impl = None if self.implementation == 'xla' else self.implementation
    y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name='out')(y)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: x + DropPath(MHSA(LN(x))), then x + DropPath(MLP(LN(x))).

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dropout: dropout rate after attention and inside the MLP.
    droppath: stochastic depth rate of this block (per example, residual branches).
    dtype: computation dtype; parameters are float32.
    attention_implementation: one of ATTENTION_IMPLEMENTATIONS.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  droppath: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str = 'xla'

  def _drop_path(self, y: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.droppath == 0.0:
      return y
    keep = 1.0 - self.droppath
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    keep_mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(keep_mask, y / keep, jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D]."""
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = MultiHeadSelfAttention(self.num_heads, self.dtype, self.attention_implementation,
                               name='MultiHeadDotProductAttention_1')(y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = x + self._drop_path(y, deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name='MlpBlock_3')(y, deterministic)
    return x + self._drop_path(y, deterministic)
