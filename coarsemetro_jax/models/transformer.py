"""Transformer blocks shared by CoarseMETRO and FastMETRO.

Ported from FastMETRO's DETR-derived `transformer.py` (pre-norm layers,
`nn.MultiheadAttention` with a packed input projection, sine positional
encoding). Submodules carry the PyTorch attribute names so a state dict maps by
a fixed rule: `transformer_1.encoder.layers.0.self_attn.in_proj_weight` <->
`transformer_1/encoder/layers_0/self_attn/in_proj/kernel` (transposed).

Layout is batch-first ([B, L, E]); PyTorch's is sequence-first.
"""

from collections.abc import Callable
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax.models import attention
from coarsemetro_jax.models import conv_ops
from coarsemetro_jax.models import dropout as dropout_lib

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def torch_linear_init(fan_in):
  """PyTorch nn.Linear default init: U(+-1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchDense(nn.Module):
  """Linear layer with PyTorch's parameter init and a Flax `kernel`/`bias`."""

  features: int
  xavier: bool = False  # FastMETRO re-inits transformer weights with xavier
  zero_bias: bool = False  # MultiheadAttention biases start at zero
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel_init = xavier_uniform if self.xavier else torch_linear_init(fan_in)
    kernel = self.param('kernel', kernel_init, (fan_in, self.features))
    bias = self.param(
        'bias', zeros if self.zero_bias else torch_linear_init(fan_in), (self.features,)
    )
    x = x.astype(self.dtype)
    return conv_ops.matmul(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class TokenLinear(nn.Module):
  """Linear map along the token axis: [B, N_in, C] -> [B, N_out, C].

  Equals PyTorch's `nn.Linear(N_in, N_out)` applied to x.transpose(1, 2): the
  bias is per output token and shared by all channels (FastMETRO's
  `coarse2intermediate_upsample`).
  """

  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable | None = None  # None: PyTorch's nn.Linear init
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-2]
    kernel = self.param(
        'kernel', self.kernel_init or torch_linear_init(fan_in), (fan_in, self.features)
    )
    bias = self.param('bias', self.bias_init or torch_linear_init(fan_in), (self.features,))
    x = x.astype(self.dtype)
    out = jnp.einsum('bnc,nm->bmc', x, kernel.astype(self.dtype))
    return out + bias.astype(self.dtype)[None, :, None]


class PackedInProjection(nn.Module):
  """`nn.MultiheadAttention`'s packed q/k/v projection (in_proj_weight [3E, E]).

  Stored as Flax `kernel` [E, 3E] (= in_proj_weight.T) and `bias` [3E]; the
  column blocks are q, k, v.
  """

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value):
    e = query.shape[-1]
    kernel = self.param('kernel', xavier_uniform, (e, 3 * e)).astype(self.dtype)
    bias = self.param('bias', zeros, (3 * e,)).astype(self.dtype)

    def proj(x, i):
      return (
          conv_ops.matmul(x.astype(self.dtype), kernel[:, i * e : (i + 1) * e])
          + bias[i * e : (i + 1) * e]
      )

    return proj(query, 0), proj(key, 1), proj(value, 2)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch-first), with attention weights sown.

  The softmax weights [B, H, Lq, Lk] are sown into the 'intermediates'
  collection as `attention_weights` when the caller makes that collection
  mutable (the paper's attention-map figures); otherwise nothing is kept.
  """

  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, mask=None, *, deterministic=True):
    # query [B, Lq, E]; key, value [B, Lk, E]; mask [Lq, Lk] bool, True = attend.
    e = query.shape[-1]
    head_dim = e // self.num_heads
    q, k, v = PackedInProjection(dtype=self.dtype, name='in_proj')(query, key, value)
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, lq, self.num_heads, head_dim) * (head_dim**-0.5)
    k = k.reshape(b, lk, self.num_heads, head_dim)
    v = v.reshape(b, lk, self.num_heads, head_dim)
    if self.is_mutable_collection('intermediates'):
      weights = jax.nn.softmax(attention.masked_logits(q, k, mask), axis=-1)
      self.sow('intermediates', 'attention_weights', weights)
    drop = None
    if self.dropout and not deterministic:
      drop = lambda w: dropout_lib.Dropout(self.dropout)(w, deterministic)
    out = attention.attention(q, k, v, mask, drop)  # [B, Lq, H, d]
    out = out.astype(self.dtype).reshape(b, lq, e)
    return TorchDense(e, xavier=True, zero_bias=True, dtype=self.dtype, name='out_proj')(out)


def layer_norm(name):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, name=name)


def _ffn(x, hidden_dim, dropout, deterministic, dtype):
  """FastMETRO's FFN: linear1 -> ReLU -> dropout -> linear2.

  Called inside a layer's compact `__call__`, so linear1/linear2 are named
  directly in that layer, as in PyTorch.
  """
  e = x.shape[-1]
  h = TorchDense(hidden_dim, xavier=True, dtype=dtype, name='linear1')(x)
  h = dropout_lib.Dropout(dropout, name='dropout')(nn.relu(h), deterministic)
  return TorchDense(e, xavier=True, dtype=dtype, name='linear2')(h)


class EncoderLayer(nn.Module):
  """Pre-norm encoder layer; `pos` is added to queries and keys only."""

  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, *, deterministic):
    # x [B, L, E]; pos [L, E] (zeros for the camera token).
    drop = lambda y, name: dropout_lib.Dropout(self.dropout, name=name)(y, deterministic)
    s = layer_norm('norm1')(x)
    qk = s + pos.astype(s.dtype)
    attn = MultiHeadAttention(
        num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype, name='self_attn'
    )
    x = x + drop(attn(qk, qk, s, deterministic=deterministic), 'dropout1')
    s = layer_norm('norm2')(x)
    x = x + drop(_ffn(s, self.ffn_dim, self.dropout, deterministic, self.dtype), 'dropout2')
    return x


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer: self-attention, cross-attention to the image, FFN.

  CoarseMETRO adds a cross-granularity attention (`vertex_attn`: queries are
  the stage's joint+vertex tokens, keys/values the previous-resolution vertex
  tokens), placed before the self-attention ('beginning') or after the image
  cross-attention ('end'); 'none' leaves FastMETRO's layer unchanged.
  """

  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  vertex_attention: str = 'none'  # 'none' | 'beginning' | 'end'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t, memory, memory_pos, self_mask=None, vertex_memory=None, *, deterministic):
    # t [B, Lt, E]; memory [B, Lm, E]; memory_pos [Lm, E]; self_mask [Lt, Lt];
    # vertex_memory [B, Lv, E] (previous-resolution vertex tokens).
    drop = lambda y, name: dropout_lib.Dropout(self.dropout, name=name)(y, deterministic)
    mha = lambda name: MultiHeadAttention(
        num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype, name=name
    )

    def vertex_block(t):
      s = layer_norm('norm_vertex')(t)
      kv = layer_norm('norm_vertex_memory')(vertex_memory)
      return t + drop(mha('vertex_attn')(s, kv, kv, deterministic=deterministic), 'dropout_vertex')

    if self.vertex_attention not in ('none', 'beginning', 'end'):
      raise ValueError(
          f'vertex_attention must be none|beginning|end, got ' f'{self.vertex_attention!r}'
      )
    if self.vertex_attention == 'beginning':
      t = vertex_block(t)
    s = layer_norm('norm1')(t)  # FastMETRO's query_pos is zero: no query pos.
    t = t + drop(mha('self_attn')(s, s, s, mask=self_mask, deterministic=deterministic), 'dropout1')
    s = layer_norm('norm2')(t)
    t = t + drop(
        mha('multihead_attn')(
            s, memory + memory_pos.astype(memory.dtype), memory, deterministic=deterministic
        ),
        'dropout2',
    )
    if self.vertex_attention == 'end':
      t = vertex_block(t)
    s = layer_norm('norm3')(t)
    t = t + drop(_ffn(s, self.ffn_dim, self.dropout, deterministic, self.dtype), 'dropout3')
    return t


class Encoder(nn.Module):
  """`num_layers` encoder layers and a final LayerNorm (`encoder.norm`)."""

  num_layers: int
  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, *, deterministic):
    for i in range(self.num_layers):
      x = EncoderLayer(
          num_heads=self.num_heads,
          ffn_dim=self.ffn_dim,
          dropout=self.dropout,
          dtype=self.dtype,
          name=f'layers_{i}',
      )(x, pos, deterministic=deterministic)
    return layer_norm('norm')(x)


class Decoder(nn.Module):
  """`num_layers` decoder layers and a final LayerNorm (`decoder.norm`)."""

  num_layers: int
  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  vertex_attention: str = 'none'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t, memory, memory_pos, self_mask=None, vertex_memory=None, *, deterministic):
    for i in range(self.num_layers):
      t = DecoderLayer(
          num_heads=self.num_heads,
          ffn_dim=self.ffn_dim,
          dropout=self.dropout,
          vertex_attention=self.vertex_attention,
          dtype=self.dtype,
          name=f'layers_{i}',
      )(
          t,
          memory,
          memory_pos,
          self_mask=self_mask,
          vertex_memory=vertex_memory,
          deterministic=deterministic,
      )
    return layer_norm('norm')(t)


class Transformer(nn.Module):
  """FastMETRO's `Transformer`: encoder over [cam; image] tokens, then decoder.

  Returns the normalised camera feature [B, 1, E], image features [B, N, E]
  and decoder tokens [B, Lt, E].
  """

  num_layers: int
  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  vertex_attention: str = 'none'
  memory_includes_cam: bool = False  # FastMETRO: image tokens only
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, img, cam, tgt, pos, self_mask=None, vertex_memory=None, *, deterministic):
    # img [B, N, E]; cam [B, 1, E]; tgt [B, Lt, E]; pos [N, E].
    e = img.shape[-1]
    enc_pos = jnp.concatenate([jnp.zeros((1, e), pos.dtype), pos], 0)  # [1+N, E]
    x = jnp.concatenate([cam, img], 1)  # [B, 1+N, E]
    x = Encoder(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        ffn_dim=self.ffn_dim,
        dropout=self.dropout,
        dtype=self.dtype,
        name='encoder',
    )(x, enc_pos, deterministic=deterministic)
    cam_f, img_f = x[:, :1], x[:, 1:]
    memory, memory_pos = (x, enc_pos) if self.memory_includes_cam else (img_f, pos)
    t = Decoder(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        ffn_dim=self.ffn_dim,
        dropout=self.dropout,
        vertex_attention=self.vertex_attention,
        dtype=self.dtype,
        name='decoder',
    )(
        tgt,
        memory,
        memory_pos,
        self_mask=self_mask,
        vertex_memory=vertex_memory,
        deterministic=deterministic,
    )
    return cam_f, img_f, t


def sine_position_encoding(height, width, dim):
  """DETR/FastMETRO `PositionEmbeddingSine(dim/2, normalize=True)` as [H*W, dim].

  Input-independent, so it is a numpy constant folded into the program.
  Channels are concat(PE_y, PE_x), each with interleaved sin/cos; tokens are
  flattened row-major (token = y * width + x).
  """
  feats = dim // 2
  scale, eps, temperature = 2 * math.pi, 1e-6, 10000.0
  y = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, 1)
  x = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, 0)
  y = y / (height + eps) * scale
  x = x / (width + eps) * scale
  dim_t = temperature ** (2 * (np.arange(feats) // 2) / feats)
  pos_x = x[..., None] / dim_t  # [H, W, F]
  pos_y = y[..., None] / dim_t

  def interleave(p):
    return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], -1).reshape(height, width, feats)

  pe = np.concatenate([interleave(pos_y), interleave(pos_x)], -1)  # [H, W, dim]
  return pe.reshape(height * width, dim).astype(np.float32)
