"""Test setup: 8 fake CPU devices, set before JAX is first imported."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()

import pathlib

import jax
import pytest

# Tests compile many small programs: skipping XLA's heavier passes halves the
# suite's compile time (as the Flax examples' tests do); numerics are unchanged
# to the tolerances used here.
jax.config.update('jax_disable_most_optimizations', True)

# Real SMPL topology files live outside the repository (never committed);
# tests that need them skip when the folder is absent.
SMPL_TOPOLOGY_DIR = pathlib.Path(
    os.environ.get(
        'SMPL_TOPOLOGY_DIR',
        pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'smpl_topology',
    )
)


@pytest.fixture(scope='session')
def smpl_topology_dir():
  if not (SMPL_TOPOLOGY_DIR / 'mesh_downsampling.npz').exists():
    pytest.skip(f'real SMPL topology files not found in {SMPL_TOPOLOGY_DIR}')
  return SMPL_TOPOLOGY_DIR


def pytest_report_header(config):
  del config
  return f'jax {jax.__version__}, devices: {jax.device_count()}'


@pytest.fixture(scope='session')
def topology():
  """The embedded mesh hierarchy (6890/1723/431)."""
  from coarsemetro_jax import mesh_topology

  return mesh_topology.load_topology()
