"""models/attention.py: attention equals softmax attention, in blocks or whole; MultiHeadAttention keeps nn.Dropout's mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax.models import attention
from coarsemetro_jax.models import transformer


def _qkv(b=6, lq=9, lk=11, h=2, d=4, seed=0):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk)]


def _softmax_reference(q, k, v, mask=None):
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', w, v)


def test_attend_equals_softmax_attention():
  q, k, v = _qkv()
  mask = np.random.default_rng(1).random((9, 11)) > 0.3
  mask[:, 0] = True  # every query attends somewhere
  for m in (None, mask):
    np.testing.assert_allclose(
        attention.attend(q, k, v, m), _softmax_reference(q, k, v, m), rtol=1e-5, atol=1e-6
    )


def test_cpu_block_size():
  # FastMETRO's decoder at batch 16: 8 x 445 x 445 f32 weights, 101 MB.
  assert attention.cpu_block_size(16, 8, 445, 445) == attention.BLOCK_EXAMPLES
  assert attention.cpu_block_size(15, 8, 445, 445) == 1  # blocks divide the batch
  # CoarseMETRO's 206-token stage: 21.7 MB at batch 16, 10.9 MB at 8.
  assert attention.cpu_block_size(16, 8, 206, 206) == attention.BLOCK_EXAMPLES
  assert attention.cpu_block_size(8, 8, 206, 206) == 0
  # Small attentions run whole.
  assert attention.cpu_block_size(16, 8, 62, 62) == 0
  assert attention.cpu_block_size(1, 8, 445, 445) == 0
  # A symbolic batch (a shape-polymorphic export) runs whole.
  (b,) = jax.export.symbolic_shape('b')
  assert attention.cpu_block_size(b, 8, 445, 445) == 0


def test_blocked_equals_whole(monkeypatch):
  q, k, v = _qkv(b=6)
  mask = jnp.asarray(np.tril(np.ones((9, 11), bool), 2))

  def run(block):
    monkeypatch.setattr(attention, 'cpu_block_size', lambda *a: block)
    f = lambda q, k, v: attention.attention(q, k, v, mask)
    loss = lambda q, k, v: (f(q, k, v) ** 2).sum()
    return jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  whole, whole_grads = run(0)
  np.testing.assert_allclose(whole, _softmax_reference(q, k, v, mask), rtol=1e-5, atol=1e-6)
  for block in (1, 2, 3):
    got, grads = run(block)
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, whole_grads):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


class _FlaxDropoutAttention(nn.Module):
  """MultiHeadAttention's arithmetic with nn.Dropout applied to the whole weights array."""

  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic):
    e = x.shape[-1]
    q, k, v = transformer.PackedInProjection(name='in_proj')(x, x, x)
    b, l, d = x.shape[0], x.shape[1], e // self.num_heads
    q, k, v = (y.reshape(b, l, self.num_heads, d) for y in (q, k, v))
    q = q * d**-0.5
    drop = lambda w: nn.Dropout(self.dropout, name='Dropout_0')(w, deterministic=deterministic)
    out = attention.attend(q, k, v, None, drop).reshape(b, l, e)
    return transformer.TorchDense(e, xavier=True, zero_bias=True, name='out_proj')(out)


@pytest.mark.parametrize('block', [0, 2])
def test_multi_head_attention_draws_flax_dropout_mask(block, monkeypatch):
  monkeypatch.setattr(attention, 'cpu_block_size', lambda *a: block)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 10, 8)), jnp.float32)
  mha = transformer.MultiHeadAttention(num_heads=2, dropout=0.4)
  variables = mha.init(jax.random.key(0), x, x, x)
  rngs = {'dropout': jax.random.key(7)}
  got = mha.apply(variables, x, x, x, deterministic=False, rngs=rngs)
  want = _FlaxDropoutAttention(2, 0.4).apply(variables, x, False, rngs=rngs)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  quiet = mha.apply(variables, x, x, x, deterministic=True)
  assert not np.allclose(got, quiet)
  np.testing.assert_allclose(
      quiet, _FlaxDropoutAttention(2, 0.4).apply(variables, x, True), rtol=1e-6, atol=1e-6
  )
