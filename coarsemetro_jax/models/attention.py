"""Scaled dot-product attention, computed in blocks of examples on XLA:CPU.

`attend` is the arithmetic of torch.nn.MultiheadAttention after its input
projection: softmax(q k^T + mask) v, with the softmax normalised after the
value product (dropout is elementwise, so dropout(e) / sum(e) =
dropout(e / sum(e))): the exponentials feed the matmul directly and the
division runs on [B, Lq, H, d], not on [B, H, Lq, Lk].

Why blocks: XLA:CPU computes each step of the attention (logits, maximum,
exponentials, value product) as a separate pass over the whole [B, H, Lq, Lk]
array, which for FastMETRO's 445 tokens or CoarseMETRO's 398-token last stage
is 80-100 MB at batch 16. In inference a loop over blocks of two examples
keeps a block's arrays in the cache between passes: 1.5-1.7x for those
attentions and CoarseMETRO's 206-token stage on a 2-core Xeon (measured in
docs/benchmarks.md). The training step's attention (forward, dropout and
backward) gained nothing from blocks there, smaller attentions gain nothing,
and on TPU and GPU a loop would only serialise work: all of these run whole
(`cpu_block_size`, `lax.platform_dependent`).
"""

from jax import lax
import jax.numpy as jnp

# Blocks when the whole batch's f32 attention weights exceed this.
MIN_BLOCKED_BYTES = 16 * 2**20
# Examples per block: the fastest of 1, 2, 4 and 8 for all three attentions above.
BLOCK_EXAMPLES = 2


def masked_logits(q, k, mask=None):
  """f32 [B, H, Lq, Lk] q.k per head, masked-out pairs at the f32 minimum (q, k, mask as `attend`)."""
  # f32 results: what the softmax needs, and on XLA:CPU the form that runs
  # bf16 operands on the CPU's bf16 units (a bf16-result dot is upcast to f32).
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return logits


def attend(q, k, v, mask=None, drop=None):
  """softmax(q k^T + mask) v per head: q [B, Lq, H, d], k, v [B, Lk, H, d] -> f32 [B, Lq, H, d].

  q is already scaled by 1 / sqrt(d). mask [Lq, Lk] bool, True = attend.
  drop: None, or fn(weights [B, H, Lq, Lk]) -> the same with dropout applied.
  """
  logits = masked_logits(q, k, mask)
  unnormalized = jnp.exp(logits - lax.stop_gradient(logits.max(-1, keepdims=True)))
  denominator = unnormalized.sum(-1).transpose(0, 2, 1)[..., None]  # [B, Lq, H, 1]
  if drop is not None:
    unnormalized = drop(unnormalized)
  out = jnp.einsum(
      'bhqk,bkhd->bqhd', unnormalized.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return out / denominator


def cpu_block_size(batch, heads, lq, lk):
  """Examples per block for inference on XLA:CPU, or 0 to attend over the whole batch at once."""
  if not isinstance(batch, int):  # a symbolic batch (jax.export): blocks need a known size
    return 0
  if batch * heads * lq * lk * 4 <= MIN_BLOCKED_BYTES:
    return 0
  return BLOCK_EXAMPLES if batch % BLOCK_EXAMPLES == 0 else 1


def blocked_attend(q, k, v, mask, block):
  """`attend` without dropout over blocks of `block` examples, one after another (`lax.map`)."""
  b = q.shape[0]
  split = lambda x: x.reshape(b // block, block, *x.shape[1:])
  out = lax.map(lambda qkv: attend(*qkv, mask), (split(q), split(k), split(v)))
  return out.reshape(b, *out.shape[2:])


def attention(q, k, v, mask=None, drop=None):
  """`attend`, in blocks of examples where XLA:CPU gains (inference: `drop` None)."""
  block = cpu_block_size(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  if drop is not None or not block:
    return attend(q, k, v, mask, drop)
  return lax.platform_dependent(
      q,
      k,
      v,
      cpu=lambda q, k, v: blocked_attend(q, k, v, mask, block),
      default=lambda q, k, v: attend(q, k, v, mask),
  )
