r"""Inference latency and throughput: CoarseMETRO-S / FastMETRO-S in JAX vs PyTorch.

  python -m benchmarks.inference                     # R50 at 224 px, batch 1 and 16
  python -m benchmarks.inference --dtype=bf16 --batch_sizes=16,64 --reps=20
  python -m benchmarks.inference --tiny --quick      # smoke run

Eval-mode forward passes with the same weights in both frameworks
(benchmarks/_timing.py): the full model on images, and the transformer part
(everything after the backbone) on backbone feature maps. JAX: the jitted
`model.apply`, compiled ahead (compile time reported apart), inputs already
on the device. PyTorch: the parity-test reference modules in eager mode under
`torch.inference_mode()` (CPU autocast for bf16), denormals flushed as XLA
does, FastMETRO-S at each --torch_threads count (on a busy machine OpenMP's
2 threads can be several times slower than 1) and, with --torch_compile,
`torch.compile` of FastMETRO-S. All candidates of a (part, batch) run in
interleaved rounds; the table shows medians and [min-max] over rounds, and
speed-ups as medians of per-round ratios against the fastest PyTorch-eager
FastMETRO-S of the round. On a shared machine, run it niced
(`nice -n -15 python -m benchmarks.inference`) so that other jobs disturb
the measurement less. Like main.py, the script re-executes itself under
glibc's huge-page tunable (coarsemetro_jax/huge_pages.py); `GLIBC_TUNABLES=`
(empty) opts out.
The "max rel. diff" column checks the JAX outputs against PyTorch on the same
input (max |JAX - PyTorch| / max |PyTorch| over the fine mesh).
"""

import contextlib
import functools

import jax
import numpy as np

from benchmarks import _timing
from coarsemetro_jax import huge_pages

CHECKED_OUTPUT = 'pred_3d_vertices_fine'


def jax_forward(pair, part):
  """jitted (variables, x [B, H, W, C]) -> output dict, eval mode."""
  model = pair.module(part, 'jax')
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def torch_context(dtype):
  import torch

  stack = contextlib.ExitStack()
  stack.enter_context(torch.inference_mode())
  if dtype == 'bf16':
    stack.enter_context(torch.autocast('cpu', dtype=torch.bfloat16))
  return stack


def _rel_diff(got, want):
  if hasattr(want, 'float'):  # a torch tensor; NumPy has no bf16 to take it as
    want = want.float()
  want = np.asarray(want, np.float32)
  return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def candidates(pairs, part, batch, args):
  """{(model, framework): (call, warm-up info, output)}; warm-up done here."""
  import torch

  x = _timing.random_input(pairs['fastmetro'].input_shape(part, batch))
  x_jax, x_torch = jax.device_put(x), _timing.to_torch_nchw(x)
  out = {}
  for name in args.models:
    pair = pairs[name]
    variables = pair.variables(part)
    compile_s, compiled = _timing.timed(
        lambda: jax_forward(pair, part).lower(variables, x_jax).compile()
    )
    call = functools.partial(lambda c, v: _timing.block_jax(c(v, x_jax)), compiled, variables)
    first_s, result = _timing.timed(call)
    out[(name, 'JAX')] = (call, {'compile_s': compile_s, 'first_s': first_s}, result)

  def torch_call(module):
    with torch_context(args.dtype):
      return module(x_torch)

  for name, threads in _timing.torch_runs(args):
    call = _timing.with_threads(
        functools.partial(torch_call, pairs[name].module(part, 'torch')), threads
    )
    first_s, result = _timing.timed(call)
    out[(name, _timing.torch_label(threads))] = (call, {'first_s': first_s}, result)
  if args.torch_compile == 'all' or (args.torch_compile == 'transformer' and part == 'transformer'):
    compiled = torch.compile(pairs['fastmetro'].module(part, 'torch'))
    call = _timing.with_threads(functools.partial(torch_call, compiled), args.torch_threads[0])
    try:
      first_s, result = _timing.timed(call)
      out[('fastmetro', f'torch.compile ({args.torch_threads[0]} thr)')] = (
          call,
          {'compile_s': first_s},
          result,
      )
    except Exception as e:
      print(f'torch.compile failed, skipped: {type(e).__name__}: {e}'.splitlines()[0])
  return out


def bench_part(pairs, part, batch, args):
  """Markdown rows and per-candidate round times for one (part, batch)."""
  cands = candidates(pairs, part, batch, args)
  times = _timing.interleave({k: c[0] for k, c in cands.items()}, args.reps, args.warm)
  base = _timing.baseline(times)
  rows = []
  for key, (_, warm, result) in cands.items():
    name, framework = key
    torch_key = (name, _timing.torch_label(args.torch_threads[0]))
    if not framework.startswith('PyTorch eager') and torch_key in cands:
      check = f'{_rel_diff(result[CHECKED_OUTPUT], cands[torch_key][2][CHECKED_OUTPUT]):.1e}'
    else:
      check = '-'
    compile_s = f"{warm['compile_s']:.1f}" if 'compile_s' in warm else '-'
    first_s = f"{warm['first_s']:.2f}" if 'first_s' in warm else '-'
    rows.append(
        [
            part,
            batch,
            _timing.LABELS[name],
            framework,
            _timing.spread(times[key]),
            _timing.throughput(times[key], batch),
            _timing.ratio(base, times[key]),
            compile_s,
            first_s,
            check,
        ]
    )
  return rows, times


HEADER = [
    'part',
    'batch',
    'model',
    'framework',
    'latency ms',
    'examples/s',
    'speed-up vs best PyTorch FastMETRO-S',
    'compile s',
    'first call s',
    'max rel. diff vs PyTorch',
]


def main(argv=None):
  p = _timing.parser(__doc__.splitlines()[0], batch_sizes='1,16', reps=5)
  p.add_argument(
      '--torch_compile',
      choices=('none', 'transformer', 'all'),
      default='none',
      help='also time torch.compile(FastMETRO-S) (transformer part / every part)',
  )
  args = _timing.parse(p, argv)
  return _timing.run_tables('Inference', HEADER, bench_part, args)


if __name__ == '__main__':
  huge_pages.reexecute()  # as main.py trains and evaluates; `GLIBC_TUNABLES=` opts out
  main()
