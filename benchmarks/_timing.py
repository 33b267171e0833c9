"""Shared harness of the efficiency benchmarks: identical-weight model pairs, fair timing.

* Models: FastMETRO-S-R50 (configs/fastmetro.py:S-r50) and CoarseMETRO-S-R50
  (configs/r50.py), or their configs/tiny.py versions for smoke runs. The
  PyTorch side is the hand-written reference of the parity tests
  (torch_reference/) with random weights; the JAX side gets the very same
  weights through the checkpoint converter (coarsemetro_jax/convert).
* "transformer" part: everything after the backbone (conv_1x1, tokens, the
  encoder-decoder stages, heads, mesh up-sampling), fed with a backbone
  feature map [B, h, w, C]; the backbone is swapped for an identity.
* Mesh hierarchy: a random one with SMPL's level sizes (6890/1723/431, 3
  weights per up-sampled vertex, as the real one; 60/24/10 with --tiny)
  unless --topology names a GraphCMR `mesh_downsampling.npz`. Run time does
  not depend on which: the decoder mask is applied densely and the
  up-sampling is a fixed-size gather.
* Timing: candidates run in rounds, each round calls every candidate once in
  an order that alternates between rounds, so load changes on a shared machine
  hit all of them alike; tables give medians and [min-max] over rounds, ratios
  are medians of the per-round ratios. Warm-up (and compile) is timed apart.
"""

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from configs import fastmetro as fastmetro_config
from configs import r50
from configs import tiny

MODELS = ('coarsemetro', 'fastmetro')
LABELS = {'coarsemetro': 'CoarseMETRO-S', 'fastmetro': 'FastMETRO-S'}
PARTS = ('full', 'transformer')
TINY_LEVELS = (60, 24, 10)  # mesh hierarchy of --tiny runs (as the parity tests)


# ----------------------------------------------------------------------------
# Command line and machine.


def parser(description, batch_sizes, reps, warm=False):
  """Flags shared by the benchmark scripts."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--batch_sizes', default=batch_sizes, help='comma-separated batch sizes')
  p.add_argument('--reps', type=int, default=reps, help='timed rounds per batch size')
  p.add_argument(
      '--dtype',
      choices=('f32', 'bf16'),
      default='f32',
      help='compute dtype (JAX compute_dtype; PyTorch CPU autocast)',
  )
  p.add_argument('--parts', default=','.join(PARTS), help='full,transformer')
  p.add_argument(
      '--models',
      default=','.join(MODELS),
      help='JAX models to run (PyTorch FastMETRO-S, the baseline, always runs)',
  )
  p.add_argument('--quick', action='store_true', help='2 rounds: a smoke run')
  p.add_argument(
      '--warm',
      action=argparse.BooleanOptionalAction,
      default=warm,
      help='an untimed call before each timed one: each candidate is timed as in its own loop',
  )
  p.add_argument(
      '--tiny',
      action='store_true',
      help='configs/tiny.py models at 64 px (tests); default: R50 at 224 px',
  )
  p.add_argument('--topology', default='', help="mesh_downsampling.npz ('' = random)")
  p.add_argument(
      '--torch_threads',
      default=f'{os.cpu_count()},1',
      help='PyTorch intra-op thread counts to time FastMETRO-S with (the '
      'first also for CoarseMETRO-S); the speed-ups are against the best',
  )
  p.add_argument(
      '--no_torch_coarsemetro',
      dest='torch_coarsemetro',
      action='store_false',
      help='skip the PyTorch-eager CoarseMETRO-S rows',
  )
  return p


def parse(p, argv):
  args = p.parse_args(argv)
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(',') if b]
  args.parts = [s for s in args.parts.split(',') if s]
  args.models = [s for s in args.models.split(',') if s]
  for flag, values, allowed in (('parts', args.parts, PARTS), ('models', args.models, MODELS)):
    for value in values:
      if value not in allowed:
        raise ValueError(f'--{flag}: {value!r} is not one of {allowed}')
  args.torch_threads = [int(t) for t in str(args.torch_threads).split(',') if t]
  if args.quick:
    args.reps = min(args.reps, 2)
  return args


# ----------------------------------------------------------------------------
# PyTorch candidates.


def torch_setup():
  """Flush denormals to zero, as XLA's CPU backend does by default.

  Random weights drive some activations into the denormal range, where x86
  arithmetic is many times slower; without this PyTorch would pay for that
  and XLA would not.
  """
  import torch

  torch.set_flush_denormal(True)


def torch_label(threads):
  return f'PyTorch eager ({threads} thr)'


def torch_runs(args):
  """[(model, threads)]: FastMETRO-S at every --torch_threads, CoarseMETRO-S at the first."""
  runs = [('fastmetro', t) for t in args.torch_threads]
  if args.torch_coarsemetro:
    runs.append(('coarsemetro', args.torch_threads[0]))
  return runs


def with_threads(fn, threads):
  """`fn` run with `threads` PyTorch intra-op threads."""
  import torch

  def call():
    torch.set_num_threads(threads)
    return fn()

  return call


def baseline(times):
  """Per round, the fastest PyTorch-eager FastMETRO-S time (over thread counts)."""
  runs = [
      t
      for (name, framework), t in times.items()
      if name == 'fastmetro' and framework.startswith('PyTorch eager')
  ]
  return np.min(np.stack(runs), 0)


def load_average():
  return '{:.2f} / {:.2f} / {:.2f}'.format(*os.getloadavg())


# /proc/cpuinfo flags that decide the CPU's matmul peak: vector width, FMA, bf16/int8 units.
VECTOR_FLAG_PREFIXES = ('avx512', 'amx', 'avx_vnni', 'avx2', 'fma')


def _cpuinfo_field(field):
  """First value of `field` in /proc/cpuinfo, or '' (not Linux)."""
  if not os.path.exists('/proc/cpuinfo'):
    return ''
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.split(':', 1)[0].strip() == field:
        return line.split(':', 1)[1].strip()
  return ''


def cpu_flags():
  """The CPU's vector and matrix flags (avx512*, amx*, ...), sorted."""
  flags = _cpuinfo_field('flags').split()
  return sorted(f for f in flags if f.startswith(VECTOR_FLAG_PREFIXES))


def has_bf16_units():
  return any(f in ('avx512_bf16', 'amx_bf16') for f in cpu_flags())


def machine_description():
  """One markdown paragraph: date, CPU and its vector flags, cores, load, library versions."""
  cpu = _cpuinfo_field('model name') or platform.processor() or 'unknown CPU'
  import torch

  return (
      f'{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; '
      f'{cpu} ({" ".join(cpu_flags()) or "no vector flags listed"}), '
      f'{os.cpu_count()} cores, {jax.devices()[0].platform.upper()} '
      f'({jax.device_count()} JAX devices); load average (1/5/15 min) '
      f'{load_average()}; jax {jax.__version__}, torch {torch.__version__} '
      f'({torch.get_num_threads()} threads); XLA_FLAGS='
      f"{os.environ.get('XLA_FLAGS', '')!r}; GLIBC_TUNABLES="
      f"{os.environ.get('GLIBC_TUNABLES', '(unset)')!r}"
  )


def matmul_peaks(torch_threads, n=2048, reps=5):
  """{'JAX f32': GFLOP/s, ...}: the best of `reps` n x n x n matmuls (2 n^3 FLOPs).

  f32 always, bf16 (f32 results in JAX) where the CPU lists avx512_bf16 or
  amx_bf16; JAX (all of XLA's threads) and PyTorch at `torch_threads`. The machine's practical
  peak for dense math, measured under the same load as the benchmark.
  """
  import torch

  dtypes = ['f32'] + (['bf16'] if has_bf16_units() else [])
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n)).astype(np.float32)
  peaks = {}
  for dtype in dtypes:
    x = jax.device_put(a).astype(jax.numpy.bfloat16 if dtype == 'bf16' else jax.numpy.float32)
    # f32 results: XLA:CPU runs bf16 x bf16 -> bf16 dots at its f32 rate.
    matmul = jax.jit(lambda x: jax.numpy.dot(x, x, preferred_element_type=jax.numpy.float32))
    matmul = matmul.lower(x).compile()
    block_jax(matmul(x))
    best = min(timed(lambda: block_jax(matmul(x)))[0] for _ in range(reps))
    peaks[f'JAX {dtype}'] = 2 * n**3 / best / 1e9
    t = torch.from_numpy(a).to(torch.bfloat16 if dtype == 'bf16' else torch.float32)
    torch.set_num_threads(torch_threads)
    with torch.inference_mode():
      torch.mm(t, t)
      best = min(timed(lambda: torch.mm(t, t))[0] for _ in range(reps))
    peaks[f'PyTorch {dtype} ({torch_threads} thr)'] = 2 * n**3 / best / 1e9
  return peaks


def format_peaks(peaks):
  return ', '.join(f'{k} {v:.0f}' for k, v in peaks.items())


# ----------------------------------------------------------------------------
# Timing and tables.


def timed(fn):
  """(seconds, result) of one call; `fn` must block until its work is done."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def interleave(fns, reps, warm=False):
  """{name: [seconds per round]}: each round calls every fn once.

  The order alternates between rounds (forward, reversed) so that the
  position in a round, and slow drifts of the machine load, even out. With
  `warm`, every timed call follows an untimed call of the same fn, so each is
  timed as it runs back to back in its own loop rather than right after
  another candidate (see `--warm`).
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(reps):
    for name in names if r % 2 == 0 else names[::-1]:
      if warm:
        fns[name]()
      times[name].append(timed(fns[name])[0])
  return {name: np.asarray(t) for name, t in times.items()}


def spread(seconds, scale=1e3, fmt='{:.0f}'):
  """'median [min-max]' of seconds x scale."""
  s = np.asarray(seconds) * scale
  return f'{fmt.format(np.median(s))} [{fmt.format(s.min())}-{fmt.format(s.max())}]'


def throughput(seconds, batch):
  """'median [min-max]' examples/s (min from the slowest round)."""
  s = batch / np.asarray(seconds)
  return f'{np.median(s):.1f} [{s.min():.1f}-{s.max():.1f}]'


def ratio(slow, fast):
  """Median (and range) of the per-round ratios slow/fast: the speed-up of `fast`."""
  r = np.asarray(slow) / np.asarray(fast)
  return f'{np.median(r):.2f}x [{r.min():.2f}-{r.max():.2f}]'


def markdown(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def block_jax(x):
  return jax.block_until_ready(x)


# ----------------------------------------------------------------------------
# Models with identical weights.


class FeaturesIn(nn.Module):
  """Stands in for the backbone: the input already is the [B, h, w, C] feature map."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return x


def model_config(name, use_tiny=False, dtype='f32'):
  if name not in MODELS:
    raise ValueError(f'model must be one of {MODELS}, got {name!r}')
  if use_tiny:
    config = tiny.get_config(name)
    config.model.vertex_tokens = (4, 6, 8)  # on TINY_LEVELS
  else:
    config = r50.get_config() if name == 'coarsemetro' else fastmetro_config.get_config('S-r50')
  config.model.compute_dtype = {'f32': 'float32', 'bf16': 'bfloat16'}[dtype]
  # Both sides of the train-step comparison compute the same loss terms; the
  # edge/normal terms need the real mesh edges (not in the random hierarchy).
  config.loss.use_edge_normal = False
  return config


def random_topology(levels=mesh_topology.SMPL_LEVELS, seed=0):
  """Random hierarchy with given level sizes (coarse graph of ~6 neighbours)."""
  rng = np.random.default_rng(seed)
  adjacency = rng.random((levels[-1], levels[-1])) < 3.0 / levels[-1]
  adjacency |= adjacency.T | np.eye(levels[-1], dtype=bool)
  k = mesh_topology.UPSAMPLE_NNZ
  up = range(len(levels) - 1)
  return mesh_topology.MeshTopology(
      num_vertices=tuple(levels),
      faces=tuple(np.zeros((0, 3), np.int32) for _ in levels),
      edges=tuple(np.zeros((0, 2), np.int32) for _ in levels),
      down_indices=tuple(
          np.sort(rng.choice(levels[l], levels[l + 1], replace=False)).astype(np.int32) for l in up
      ),
      up_indices=tuple(rng.integers(0, levels[l + 1], (levels[l], k)).astype(np.int32) for l in up),
      up_weights=tuple(rng.dirichlet(np.ones(k), levels[l]).astype(np.float32) for l in up),
      coarse_adjacency=adjacency,
      source='random (SMPL level sizes)',
  )


def load_topology(path, use_tiny=False):
  if path:
    return mesh_topology.load_topology(path)
  return random_topology(TINY_LEVELS if use_tiny else mesh_topology.SMPL_LEVELS)


@dataclasses.dataclass
class Pair:
  """One architecture in both frameworks with the same weights.

  `jax_model`/`torch_model` map images; `jax_head`/`torch_head` (backbone
  replaced by an identity) map backbone features; `jax_variables` hold the
  converted weights of the whole model.
  """

  name: str
  config: object
  topology: object
  jax_model: nn.Module
  jax_head: nn.Module
  jax_variables: dict
  torch_model: object
  torch_head: object

  def variables(self, part):
    if part == 'full':
      return self.jax_variables
    return {
        c: {k: v for k, v in tree.items() if k != 'backbone'}
        for c, tree in self.jax_variables.items()
    }

  def module(self, part, framework):
    if framework == 'jax':
      return self.jax_model if part == 'full' else self.jax_head
    return self.torch_model if part == 'full' else self.torch_head

  def input_shape(self, part, batch):
    """NHWC shape of the input of `part` (images or backbone features)."""
    size = self.config.data.image_size
    if part == 'full':
      return (batch, size, size, 3)
    channels = models.build_backbone(self.config.model).out_channels
    return (batch, size // 32, size // 32, channels)


def build_pair(name, topology, use_tiny=False, dtype='f32', seed=0):
  """Random PyTorch reference weights, converted to Flax."""
  import torch

  from torch_reference import build
  from torch_reference import random_init

  config = model_config(name, use_tiny, dtype)
  torch.manual_seed(seed)
  mask, upsample = build.topology_tensors(topology, config.model.num_joints)
  reference = random_init.randomize_(
      build.reference_model(config.model, mask, upsample), seed=seed
  ).eval()
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  variables, _ = state_dict_lib.to_flax(
      state,
      tables.model_table(config.model),
      kinds.abstract_variables(config, topology=topology),
      source=f'{name} reference',
  )
  variables = jax.device_put(variables)
  head = copy.deepcopy(reference)
  head.backbone = torch.nn.Identity()
  model = models.build_model(config.model, topology)
  return Pair(
      name, config, topology, model, model.clone(backbone=FeaturesIn()), variables, reference, head
  )


def abstract_pair(name, topology, use_tiny=False, dtype='f32'):
  """JAX side only, variables as ShapeDtypeStructs (memory analysis, no weights)."""
  config = model_config(name, use_tiny, dtype)
  model = models.build_model(config.model, topology)
  return Pair(
      name,
      config,
      topology,
      model,
      model.clone(backbone=FeaturesIn()),
      kinds.abstract_variables(config, topology=topology),
      None,
      None,
  )


def random_input(shape, seed=1):
  """Normal images, or non-negative (post-ReLU-like) features. NHWC float32."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return x if shape[-1] == 3 else np.abs(x)


def to_torch_nchw(x):
  import torch

  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run_tables(title, header, bench_part, args):
  """Builds the JAX/PyTorch pairs, runs `bench_part` per part and batch size, prints the tables.

  `bench_part(pairs, part, batch, args) -> (rows, times)`; returns the whole table.
  """
  print(machine_description(), flush=True)
  torch_setup()
  n = 512 if args.tiny else 2048  # --tiny: a smoke run
  peaks = matmul_peaks(max(args.torch_threads), n)
  print(f'Matmul peak ({n}^3, GFLOP/s): {format_peaks(peaks)}', flush=True)
  topology = load_topology(args.topology, args.tiny)
  pairs = {name: build_pair(name, topology, args.tiny, args.dtype) for name in MODELS}
  args.peaks = peaks
  rows = []
  for part in args.parts:
    for batch in args.batch_sizes:
      part_rows, _ = bench_part(pairs, part, batch, args)
      rows += part_rows
      print(markdown(header, part_rows), flush=True)
  table = markdown(header, rows)
  print(
      f'\n## {title}, {args.dtype}, {"tiny" if args.tiny else "R50 224 px"}, '
      f'{args.reps} rounds (load average after: {load_average()}; matmul peak GFLOP/s at '
      f'the start, {n}^3: {format_peaks(peaks)})\n'
  )
  print(table)
  return table
