r"""Training-step throughput: CoarseMETRO-S / FastMETRO-S in JAX vs PyTorch (examples/s).

  python -m benchmarks.train_step                     # R50 at 224 px, batch 16
  python -m benchmarks.train_step --dtype=bf16 --batch_sizes=16,32
  python -m benchmarks.train_step --tiny --quick      # smoke run

One step = forward in training mode (BatchNorm batch statistics, dropout 0.1)
+ loss + backward + gradient clipping (global norm 0.3) + AdamW update
(lr 1e-4, weight decay 1e-4), from the same initial weights in both
frameworks, on one batch of random data already in memory (no input pipeline).

The loss is FastMETRO's (coarsemetro_jax/losses.py `compute_loss` on the JAX
side, its PyTorch port torch_reference/losses.py on the other): 3D joints
(token + mesh-regressed, L1), 2D re-projection of both (L1), vertices at
431/1723/6890 (L1); without the optional edge-length/normal terms. Both
sides take the GT mesh from the batch (no SMPL forward) and regress H36M
joints with a dense [17, 6890] matrix. Every example carries every label, so
the masked means are plain means, as FastMETRO's losses are.

JAX: the step is one `jax.jit` with the state donated, built from steps.py's
pieces (`apply_train` with `config.bn_group_size`, AdamW from
`make_optimizer`); CoarseMETRO also masks joint tokens (its recipe).
PyTorch: eager reference modules in train mode, `optimizer.zero_grad`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` (defaults), CPU
autocast for the forward pass with --dtype=bf16, at each --torch_threads
count; speed-ups are against the fastest PyTorch FastMETRO-S of each round.
"transformer" rows train the part after the backbone on fixed backbone
features. Timing as benchmarks/inference.py (interleaved rounds, medians),
except that each timed step follows an untimed step of the same candidate
(`--no-warm` to drop it). XLA:CPU maps a step's temporaries (3.5 GB for
FastMETRO-S-R50) fresh from the kernel at every call; right after a PyTorch
step had freed its memory, a step took 12-18 s against 4.5 s back to back on
a 2-core VM (docs/benchmarks.md). A training loop never sees that: it runs its
own step back to back. Like main.py, the script re-executes itself under
glibc's huge-page tunable (coarsemetro_jax/huge_pages.py), so that both
frameworks run as main.py trains; `GLIBC_TUNABLES=` (empty) opts out. The
header line says which was in force.
GFLOP/s: XLA's FLOP count of the compiled JAX step (2 per multiply-add;
forward, backward, loss and optimizer) over the median step time, for the
PyTorch rows of the same model too; "% of matmul peak" is against the best
f32 2048^3 matmul (JAX or PyTorch) measured at the start of the same run.
"""

import contextlib
import copy

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from coarsemetro_jax import huge_pages
from coarsemetro_jax import losses
from coarsemetro_jax import optimizer
from coarsemetro_jax import steps

NUM_H36M = 17


def random_batch(pair, part, batch, seed=0):
  """Labels of the batch dict (data_pipelines/__init__.py) plus 'gt_vertices' [B, V, 3]."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  joints_2d = np.concatenate(
      [np.tanh(f32(batch, 24, 2)), (rng.random((batch, 24, 1)) > 0.2).astype(np.float32)], -1
  )
  joints_3d = np.concatenate([0.3 * f32(batch, 24, 3), np.ones((batch, 24, 1), np.float32)], -1)
  ones = np.ones((batch,), np.float32)
  return {
      'image': _timing.random_input(pair.input_shape(part, batch), seed + 1),
      'joints_2d': joints_2d,
      'joints_3d': joints_3d,
      'gt_vertices': 0.3 * f32(batch, pair.topology.num_vertices[0], 3),
      'has_smpl': ones,
      'has_3d_joints': ones,
      'has_2d_joints': ones,
      'mask': ones,
  }


def h36m_regressor(num_vertices, seed=0):
  """A dense, row-normalised [17, V] stand-in for J_regressor_h36m."""
  r = np.random.default_rng(seed).random((NUM_H36M, num_vertices)).astype(np.float32)
  return r / r.sum(1, keepdims=True)


# ----------------------------------------------------------------------------
# JAX.


def jax_train_step(pair, part, regressor):
  """jitted, state-donating (state, batch, rng) -> (state, loss)."""
  model, config, topology = pair.module(part, 'jax'), pair.config, pair.topology
  regress = lambda v: jnp.einsum('jv,bvc->bjc', regressor, v)

  def train_step(state, batch, rng):
    rngs = steps.step_rngs(rng, state.step)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      outputs, new_stats = steps.apply_train(
          model, variables, batch['image'], rngs, config.bn_group_size
      )
      loss, _ = losses.compute_loss(
          outputs, batch, batch['gt_vertices'], regress, topology, config.loss
      )
      return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=new_stats), loss

  return jax.jit(train_step, donate_argnums=0)


def new_state(config, variables):
  """TrainState (AdamW of optimizer.make_optimizer) over {'params', 'batch_stats'}."""
  tx, _ = optimizer.make_optimizer(config.optim)
  return steps.TrainState.create(
      apply_fn=None, params=variables['params'], tx=tx, batch_stats=variables.get('batch_stats', {})
  )


# ----------------------------------------------------------------------------
# PyTorch.


def torch_train_step(module, batch, regressor, pair, dtype):
  """A closure running one eager PyTorch training step; returns the loss."""
  import torch

  from torch_reference import losses as torch_losses

  o = pair.config.optim
  module.train()
  optimizer = torch.optim.AdamW(
      module.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
  )
  tbatch = {k: torch.from_numpy(v) for k, v in batch.items() if k != 'image'}
  images = _timing.to_torch_nchw(batch['image'])
  regressor = torch.from_numpy(regressor)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with contextlib.ExitStack() as stack:
      if dtype == 'bf16':
        stack.enter_context(torch.autocast('cpu', dtype=torch.bfloat16))
      out = module(images)
    loss = torch_losses.compute_loss(out, tbatch, regressor, pair.topology, pair.config.loss)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip_norm)
    optimizer.step()
    return loss.detach()

  return step


def step_flops(compiled):
  """XLA's FLOP count of a compiled step (2 per multiply-add), or None if it gives none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program in older jax
    analysis = analysis[0] if analysis else None
  return (analysis or {}).get('flops') or None


# ----------------------------------------------------------------------------
# Benchmark.


def candidates(pairs, part, batch, args):
  """{(model, framework): (call, warm-up info, loss after warm-up)}."""
  out = {}
  for name in args.models:
    pair = pairs[name]
    data = random_batch(pair, part, batch)
    regressor = h36m_regressor(pair.topology.num_vertices[0])
    # A private copy of the converted weights: the step donates its state.
    state = new_state(
        pair.config, jax.tree.map(lambda x: jnp.array(x, copy=True), pair.variables(part))
    )
    data_jax, rng = jax.device_put(data), jax.random.key(0)
    compile_s, compiled = _timing.timed(
        lambda: jax_train_step(pair, part, regressor).lower(state, data_jax, rng).compile()
    )
    flops = step_flops(compiled)
    holder = {'state': state}

    def call(compiled=compiled, holder=holder, data_jax=data_jax):
      holder['state'], loss = compiled(holder['state'], data_jax, rng)
      return _timing.block_jax((holder['state'], loss))[1]

    first_s, loss = _timing.timed(call)
    out[(name, 'JAX')] = (call, {'compile_s': compile_s, 'first_s': first_s, 'flops': flops}, loss)

  for name, threads in _timing.torch_runs(args):
    pair = pairs[name]
    # A private copy of the module per run: the steps update its weights.
    call = _timing.with_threads(
        torch_train_step(
            copy.deepcopy(pair.module(part, 'torch')),
            random_batch(pair, part, batch),
            h36m_regressor(pair.topology.num_vertices[0]),
            pair,
            args.dtype,
        ),
        threads,
    )
    first_s, loss = _timing.timed(call)
    out[(name, _timing.torch_label(threads))] = (call, {'first_s': first_s}, loss)
  return out


HEADER = [
    'part',
    'batch',
    'model',
    'framework',
    'step ms',
    'examples/s',
    'speed-up vs best PyTorch FastMETRO-S',
    'compile s',
    'first step s',
    'first loss',
    'GFLOP/step (XLA)',
    'GFLOP/s',
    '% of matmul peak',
]


def bench_part(pairs, part, batch, args):
  cands = candidates(pairs, part, batch, args)
  times = _timing.interleave({k: c[0] for k, c in cands.items()}, args.reps, args.warm)
  # The PyTorch rows run the same model, so they get the FLOPs XLA counted for it.
  flops = {name: warm['flops'] for (name, _), (_, warm, _) in cands.items() if warm.get('flops')}
  peak = max(v for k, v in args.peaks.items() if 'f32' in k)
  rows = []
  for key, (_, warm, loss) in cands.items():
    name, framework = key
    compile_s = f"{warm['compile_s']:.1f}" if 'compile_s' in warm else '-'
    if name in flops:
      rate = flops[name] / np.median(times[key]) / 1e9
      rates = [f'{flops[name] / 1e9:.4g}', f'{rate:.3g}', f'{100 * rate / peak:.2g} %']
    else:
      rates = ['-', '-', '-']
    rows.append(
        [
            part,
            batch,
            _timing.LABELS[name],
            framework,
            _timing.spread(times[key]),
            _timing.throughput(times[key], batch),
            _timing.ratio(_timing.baseline(times), times[key]),
            compile_s,
            f"{warm['first_s']:.2f}",
            f'{float(loss):.4g}',
            *rates,
        ]
    )
  return rows, times


def main(argv=None):
  p = _timing.parser(__doc__.splitlines()[0], batch_sizes='16', reps=3, warm=True)
  args = _timing.parse(p, argv)
  return _timing.run_tables('Training step', HEADER, bench_part, args)


if __name__ == '__main__':
  huge_pages.reexecute()  # as main.py trains and evaluates; `GLIBC_TUNABLES=` opts out
  main()
