"""Pre-LayerNorm Transformer encoder block (ViT naming, so ViT checkpoints map in), and attention.

Attention implementations (`attention_implementation`), all computing softmax(q k^T / sqrt(d)) v with
float32 logits and softmax statistics whatever the compute dtype:
  `xla`: the attention matrix [batch, heads, tokens, tokens] in plain einsums, for every backend.
    The softmax normalisation is applied to the [tokens, head_dim] output instead of the
    [tokens, tokens] weights, which saves one pass over the largest array.
  `chunked`: memory-efficient attention (the FlashAttention algorithm in XLA): queries are processed
    in chunks of `attention_chunk_size`, the forward pass keeps only the output and the log-sum-exp
    per query, and the backward pass recomputes each chunk's weights. Peak memory per block is
    O(chunk x tokens) instead of O(tokens^2); the backward pass costs one extra q k^T product.
  `cudnn`: the fused cuDNN kernel through `jax.nn.dot_product_attention` (NVIDIA GPUs only).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from avt_jax.models.options import ATTENTION_IMPLEMENTATIONS, DEFAULT_CHUNK_SIZE, EncoderOptions

ATTENTION_COLLECTION = 'attention'  # where MultiHeadSelfAttention sows its weights when asked to
CUDNN_TOKEN_MULTIPLE = 64  # cuDNN's fused kernels train on even lengths, fastest on multiples of 64


def _plain_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """[batch, tokens, heads, head_dim] (q, k, v) -> [batch, tokens, heads, head_dim]."""
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # scaling q costs tokens x d, not tokens^2
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits)  # [batch, heads, queries, keys], unnormalised
  total = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]  # [batch, queries, heads, 1]
  out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / total).astype(v.dtype)


def _heads_first(x: jax.Array) -> jax.Array:
  """[batch, tokens, heads, d] -> [batch, heads, tokens, d]."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _split_queries(x: jax.Array, chunks: int) -> jax.Array:
  """[batch, heads, tokens, ...] -> [chunks, batch, heads, tokens / chunks, ...], zero-padded."""
  tokens = x.shape[2]
  size = -(-tokens // chunks)
  x = jnp.pad(x, [(0, 0), (0, 0), (0, chunks * size - tokens)] + [(0, 0)] * (x.ndim - 3))
  return jnp.moveaxis(x.reshape(*x.shape[:2], chunks, size, *x.shape[3:]), 2, 0)


def _merge_queries(x: jax.Array, tokens: int) -> jax.Array:
  """Inverse of `_split_queries`: [chunks, batch, heads, size, ...] -> [batch, heads, tokens, ...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :tokens]


# The chunked attention works in a heads-first layout with keys and values also stored transposed
# ([batch, heads, d, tokens]), prepared once outside the loops over query chunks, so that every
# product inside the loops is a plain batched [m, k] x [k, n] matrix product (no per-chunk transposes
# of the key / value arrays, which on CPU cost as much as the products).


def _chunk_forward(q: jax.Array, keys_t: jax.Array, values: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """One query chunk.

  Args:
    q: scaled queries [batch, heads, chunk, d].
    keys_t: [batch, heads, d, tokens].
    values: [batch, heads, tokens, d].

  Returns:
    (out [batch, heads, chunk, d] float32, log-sum-exp of the logits [batch, heads, chunk]).
  """
  logits = jnp.einsum('bhcd,bhdn->bhcn', q, keys_t, preferred_element_type=jnp.float32)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)  # [batch, heads, chunk, tokens], unnormalised
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum('bhcn,bhnd->bhcd', weights.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  return out / total, (peak + jnp.log(total))[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int) -> jax.Array:
  """Memory-efficient attention: `_plain_attention`'s result, O(chunk_size x tokens) memory.

  Args:
    q, k, v: [batch, tokens, heads, head_dim].
    chunk_size: queries per chunk (the tokens are split into ceil(tokens / chunk_size) equal chunks).

  Returns:
    [batch, tokens, heads, head_dim] in q's dtype.
  """
  return _chunked_forward(q, k, v, chunk_size)[0]


def _chunked_forward(q, k, v, chunk_size):
  tokens = q.shape[1]
  chunks = -(-tokens // chunk_size)
  scaled = _heads_first(q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype))
  keys_t = jnp.transpose(k, (0, 2, 3, 1))  # [batch, heads, d, tokens]
  values = _heads_first(v)
  queries = _split_queries(scaled, chunks)  # [chunks, batch, heads, chunk, d]
  out, lse = jax.lax.map(lambda qc: _chunk_forward(qc, keys_t, values), queries)
  out = out.astype(q.dtype)
  result = jnp.transpose(_merge_queries(out, tokens), (0, 2, 1, 3))  # [batch, tokens, heads, d]
  return result, (queries, keys_t, values, out, lse)


def _chunked_backward(chunk_size, residuals, grad):
  queries, keys_t, values, out, lse = residuals  # queries are scaled by 1/sqrt(d)
  tokens, d = keys_t.shape[3], keys_t.shape[2]
  keys = jnp.swapaxes(keys_t, 2, 3)  # [batch, heads, tokens, d]
  values_t = jnp.swapaxes(values, 2, 3)  # [batch, heads, d, tokens]
  grads = _split_queries(_heads_first(grad), queries.shape[0])

  def accumulate(carry, xs):
    """Adds one chunk's contribution to dK^T and dV^T [batch, heads, d, tokens]; returns dQ."""
    q, o, chunk_lse, g = xs  # [batch, heads, chunk, d] (lse: [batch, heads, chunk])
    logits = jnp.einsum('bhcd,bhdn->bhcn', q, keys_t, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - chunk_lse[..., None])
    grad_weights = jnp.einsum('bhcd,bhdn->bhcn', g, values_t, preferred_element_type=jnp.float32)
    row = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    grad_logits = (weights * (grad_weights - row)).astype(q.dtype)
    dq = jnp.einsum('bhcn,bhnd->bhcd', grad_logits, keys, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum('bhcd,bhcn->bhdn', q, grad_logits, preferred_element_type=jnp.float32)
    dv_t = jnp.einsum('bhcd,bhcn->bhdn', g, weights.astype(g.dtype),
                      preferred_element_type=jnp.float32)
    return (carry[0] + dk_t, carry[1] + dv_t), dq

  zeros = jnp.zeros(keys_t.shape, jnp.float32)
  (dk_t, dv_t), dq = jax.lax.scan(accumulate, (zeros, zeros), (queries, out, lse, grads))
  dq = _merge_queries(dq, tokens) * (1.0 / math.sqrt(d))  # [batch, heads, tokens, d]
  to_input = lambda x, perm, dtype: jnp.transpose(x, perm).astype(dtype)
  return (to_input(dq, (0, 2, 1, 3), queries.dtype), to_input(dk_t, (0, 3, 1, 2), keys_t.dtype),
          to_input(dv_t, (0, 3, 1, 2), values.dtype))


chunked_attention.defvjp(_chunked_forward, _chunked_backward)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout (`options.dropout`, `options.dtype`).

  Logical axes: `Dense_0` kernel ('embed', 'mlp'), bias ('mlp',); `Dense_1` kernel ('mlp', 'embed').
  """
  mlp_dim: int
  options: EncoderOptions = EncoderOptions()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D]."""
    width, dtype, rate = x.shape[-1], self.options.dtype, self.options.dropout
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=dtype,
                 kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')),
                 bias_init=nn.with_logical_partitioning(bias_init, ('mlp',)))(x)
    x = nn.gelu(x, approximate=self.options.gelu_approximate)
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    x = nn.Dense(width, dtype=dtype, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')),
                 bias_init=bias_init)(x)
    return nn.Dropout(rate)(x, deterministic=deterministic)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int,
                     implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` on tokens zero-padded to a multiple of `multiple`.

  The padding is masked out through the sequence lengths and sliced off, so the result equals plain
  attention over the real tokens (e.g. 3137 = 1 + 16 x 14 x 14 video tokens, which cuDNN's fused
  backward pass does not take as they are).

  Args:
    q, k, v: [batch, tokens, heads, head_dim].
    multiple: pad tokens up to a multiple of this.
    implementation: `jax.nn.dot_product_attention`'s implementation ('cudnn' or 'xla').

  Returns:
    [batch, tokens, heads, head_dim] in q's dtype.
  """
  batch, tokens = q.shape[:2]
  padded = -(-tokens // multiple) * multiple
  if padded == tokens:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - tokens), (0, 0), (0, 0)])
  lengths = jnp.full((batch,), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :tokens]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = 'xla',
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v by one of ATTENTION_IMPLEMENTATIONS (see the module docstring).

  Args:
    q, k, v: [batch, tokens, heads, head_dim].
    implementation: `xla`, `chunked` or `cudnn`.
    chunk_size: queries per chunk for `chunked`.

  Returns:
    [batch, tokens, heads, head_dim] in q's dtype.
  """
  if implementation == 'xla':
    return _plain_attention(q, k, v)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, chunk_size)
  if implementation == 'cudnn':
    return padded_attention(q, k, v, CUDNN_TOKEN_MULTIPLE, 'cudnn')
  raise ValueError(f'attention implementation: expected one of {ATTENTION_IMPLEMENTATIONS}, got '
                   f'{implementation!r}.')


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) over the keys, in float32.

  Args:
    q, k: [batch, tokens, heads, head_dim].

  Returns:
    [batch, heads, queries, keys]; each row sums to 1.
  """
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with a selectable implementation (`dot_product_attention`).

  Parameter names and shapes follow flax's MultiHeadDotProductAttention (`query`, `key`, `value`,
  `out`), so ViT checkpoints load unchanged. When the `attention` collection is mutable (e.g.
  `apply(..., mutable=['attention'])`, see `AVT.attention_maps`; not at init), the attention weights
  are also sown there as `weights` [batch, heads, queries, keys]; otherwise they are never formed.
  Reads `options.dtype`, `options.attention_implementation` and `options.attention_chunk_size`.
  Logical axes: `query` / `key` / `value` kernels ('embed', 'heads', None) and biases ('heads', None),
  `out` kernel ('heads', None, 'embed').
  """
  num_heads: int
  options: EncoderOptions = EncoderOptions()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'Token width {width} is not divisible by num_heads={self.num_heads}.')
    head_dim, dtype = width // self.num_heads, self.options.dtype
    init = nn.initializers.xavier_uniform()
    dense = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=dtype,
        kernel_init=nn.with_logical_partitioning(init, ('embed', 'heads', None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('heads', None)),
        name=name)
    q, k, v = dense('query')(x), dense('key')(x), dense('value')(x)  # [batch, tokens, heads, head_dim]
    # Only when asked for (init makes every collection mutable): costs tokens^2 memory.
    if self.is_mutable_collection(ATTENTION_COLLECTION) and not self.is_initializing():
      self.sow(ATTENTION_COLLECTION, 'weights', attention_weights(q, k))
    y = dot_product_attention(q, k, v, self.options.attention_implementation,
                              self.options.attention_chunk_size)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=dtype,
                           kernel_init=nn.with_logical_partitioning(init, ('heads', None, 'embed')),
                           name='out')(y)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: x + DropPath(MHSA(LN(x))), then x + DropPath(MLP(LN(x))).

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    droppath: stochastic depth rate of this block (per example, residual branches).
    options: dropout rate (after attention and inside the MLP), dtype and attention implementation.
  """
  num_heads: int
  mlp_dim: int
  droppath: float = 0.0
  options: EncoderOptions = EncoderOptions()

  def _drop_path(self, y: jax.Array, deterministic: bool, rate: float | jax.Array) -> jax.Array:
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return y
    keep = 1.0 - rate
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    keep_mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(keep_mask, y / jnp.asarray(keep, y.dtype), jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               droppath: jax.Array | None = None) -> jax.Array:
    """[batch, tokens, D] -> [batch, tokens, D].

    `droppath` (a traced scalar) overrides the `droppath` attribute; the layer scan of
    `FusionEncoder` passes each layer's rate this way.
    """
    rate = float(self.droppath) if droppath is None else droppath
    dtype = self.options.dtype
    y = nn.LayerNorm(dtype=dtype, name='LayerNorm_0')(x)
    y = MultiHeadSelfAttention(self.num_heads, self.options, name='MultiHeadDotProductAttention_1')(y)
    y = nn.Dropout(self.options.dropout)(y, deterministic=deterministic)
    x = x + self._drop_path(y, deterministic, rate)
    y = nn.LayerNorm(dtype=dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.options, name='MlpBlock_3')(y, deterministic)
    return x + self._drop_path(y, deterministic, rate)
