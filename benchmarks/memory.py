r"""Peak memory per step (XLA memory analysis) and activation counts (profile.py).

  python -m benchmarks.memory                     # R50 at 224 px, batch 16
  python -m benchmarks.memory --dtype=bf16 --modes=train --batch_sizes=16,64
  python -m benchmarks.memory --tiny --quick      # smoke run

For each model, part (full / transformer), mode and batch size, the JAX
program of benchmarks/inference.py (eval forward) or benchmarks/train_step.py
(the donated train step) is compiled for abstract inputs, no weights needed,
and `compiled.memory_analysis()` gives the buffer sizes XLA assigned:
arguments (weights, optimiser state, batch), outputs, temporaries, and the
aliased bytes (donated state reused for the new state). "peak" = arguments +
outputs + temporaries - aliased: the most the step holds at once (XLA's
buffer assignment is static, so this is exact for the executable, not a
sample). PyTorch eager has no equivalent on CPU and is not shown.
The second table is coarsemetro_jax/profile.py's per-image counts (batch 1,
fvcore conventions) next to the paper's Table 1.
"""

import jax

from benchmarks import _timing
from benchmarks import inference
from benchmarks import train_step
from coarsemetro_jax import profile

MODES = ('inference', 'train')
MB = 2.0**20


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lowered(pair, part, mode, batch):
  """The benchmarked program of (part, mode), lowered for abstract inputs."""
  variables = pair.variables(part)
  if mode == 'inference':
    x = jax.ShapeDtypeStruct(pair.input_shape(part, batch), jax.numpy.float32)
    return inference.jax_forward(pair, part).lower(variables, x)
  state = jax.eval_shape(lambda v: train_step.new_state(pair.config, v), variables)
  data = abstract(train_step.random_batch(pair, part, batch))
  step = train_step.jax_train_step(
      pair, part, train_step.h36m_regressor(pair.topology.num_vertices[0])
  )
  return step.lower(state, data, jax.random.key(0))


def memory_row(pair, part, mode, batch, dtype):
  compile_s, compiled = _timing.timed(lambda: lowered(pair, part, mode, batch).compile())
  m = compiled.memory_analysis()
  args, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  peak = args + out + temp - alias
  return [
      _timing.LABELS[pair.name],
      part,
      mode,
      batch,
      dtype,
      f'{args / MB:.1f}',
      f'{out / MB:.1f}',
      f'{alias / MB:.1f}',
      f'{temp / MB:.1f}',
      f'{peak / MB:.1f}',
      f'{peak / MB / batch:.1f}',
      f'{compile_s:.1f}',
  ]


MEMORY_HEADER = [
    'model',
    'part',
    'mode',
    'batch',
    'dtype',
    'arguments MB',
    'outputs MB',
    'aliased MB',
    'temporaries MB',
    'peak MB',
    'peak MB / example',
    'compile s',
]
COUNT_HEADER = [
    'model',
    'transformer activations (M)',
    'non-backbone activations (M)',
    'total activations (M)',
    'transformer GFLOPs',
    'total GFLOPs',
    'paper: transformer activations (M) / GFLOPs',
]


def count_row(pair, image_size):
  c = profile.profile_model(pair.jax_model, image_size)
  label = profile.model_label(pair.config)
  paper = profile.PAPER_TABLE1.get(label)
  return [
      label,
      f"{c['transformer_activations'] / 1e6:.2f}",
      f"{c['non_backbone_activations'] / 1e6:.2f}",
      f"{c['total_activations'] / 1e6:.2f}",
      f"{c['transformer_gflops']:.2f}",
      f"{c['total_gflops']:.2f}",
      f'{paper[2]} / {paper[1]}' if paper else '-',
  ]


def main(argv=None):
  p = _timing.parser(__doc__.splitlines()[0], batch_sizes='16', reps=1)
  p.add_argument('--modes', default=','.join(MODES), help='inference,train')
  args = _timing.parse(p, argv)
  args.modes = [m for m in args.modes.split(',') if m]
  for mode in args.modes:
    if mode not in MODES:
      raise ValueError(f'--modes: {mode!r} is not one of {MODES}')
  print(_timing.machine_description(), flush=True)
  topology = _timing.load_topology(args.topology, args.tiny)
  pairs = [_timing.abstract_pair(name, topology, args.tiny, args.dtype) for name in args.models]
  rows = []
  for pair in pairs:
    for part in args.parts:
      for mode in args.modes:
        for batch in args.batch_sizes:
          rows.append(memory_row(pair, part, mode, batch, args.dtype))
          print(_timing.markdown(MEMORY_HEADER, rows[-1:]), flush=True)
  memory_table = _timing.markdown(MEMORY_HEADER, rows)
  image_size = pairs[0].config.data.image_size
  count_table = _timing.markdown(COUNT_HEADER, [count_row(pair, image_size) for pair in pairs])
  print(
      f'\n## Memory per step (XLA buffer assignment), {args.dtype}, '
      f'{"tiny" if args.tiny else "R50 224 px"}\n'
  )
  print(memory_table)
  print(f'\n## Activation counts per image (coarsemetro_jax/profile.py, {image_size} px)\n')
  print(count_table)
  return memory_table, count_table


if __name__ == '__main__':
  main()
