"""Smoke runs of the efficiency benchmarks (tiny models, one round).

Each runs as a user runs it, `python -m benchmarks.<name>` from the repository
root, in a subprocess; the test reads the final markdown table(s) it prints.
The scripts run and print the expected rows, with the JAX and PyTorch sides
computing the same thing; no timing is asserted. Kept to one JAX model, the
transformer part and one batch size: three small programs compile.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('torch')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = [
    '--tiny',
    '--quick',
    '--parts=transformer',
    '--batch_sizes=2',
    '--torch_threads=1',
    '--no_torch_coarsemetro',
    '--models=coarsemetro',
]
TORCH = 'PyTorch eager (1 thr)'


def run_benchmark_result(name, argv):
  """`python -m benchmarks.<name> argv` run from the repository root: its CompletedProcess."""
  env = dict(os.environ)
  # As tests/conftest.py does in this process: cheaper compiles, same numerics
  # to the tolerances used here.
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return subprocess.run(
      [sys.executable, '-m', f'benchmarks.{name}', *argv],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


def run_benchmark(name, argv):
  """Stdout of `python -m benchmarks.<name> argv`, which must succeed."""
  result = run_benchmark_result(name, argv)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def tables(stdout):
  """Every markdown table printed, in order, as lists of body rows of cells."""
  blocks, block = [], []
  for line in stdout.splitlines() + ['']:
    if line.startswith('|'):
      block.append(line)
    elif block:
      blocks.append(block)
      block = []
  return [
      [[c.strip() for c in line.strip().strip('|').split('|')] for line in b[2:]] for b in blocks
  ]


def test_inference_table():
  rows = tables(run_benchmark('inference', SMOKE[:-1] + ['--models=fastmetro']))[-1]
  assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
      ('transformer', '2', 'FastMETRO-S', 'JAX'),
      ('transformer', '2', 'FastMETRO-S', TORCH),
  ]
  assert rows[1][6].startswith('1.00x')  # the baseline against itself
  assert float(rows[0][9]) < 1e-4  # same weights, same outputs


def test_train_step_table():
  rows = tables(run_benchmark('train_step', SMOKE))[-1]
  assert [(r[2], r[3]) for r in rows] == [('CoarseMETRO-S', 'JAX'), ('FastMETRO-S', TORCH)]
  assert all(np.isfinite(float(r[9])) for r in rows)  # first losses


def test_memory_tables():
  *_, memory_table, count_table = tables(run_benchmark('memory', SMOKE + ['--modes=inference']))
  (row,) = memory_table
  assert row[:5] == ['CoarseMETRO-S', 'transformer', 'inference', '2', 'f32']
  args_mb, out_mb, alias_mb, temp_mb, peak_mb = (float(c) for c in row[5:10])
  assert peak_mb == pytest.approx(args_mb + out_mb + temp_mb - alias_mb, abs=0.11)
  (count,) = count_table
  assert count[0] == 'CoarseMETRO-S-resnet' and float(count[3]) > 0
