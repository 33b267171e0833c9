"""A non-editable install runs the command lines from any directory.

The project is copied (only what setup.py packages), installed as a wheel into
a fresh venv, and run from a temporary working directory, so nothing in the
checkout is importable by accident: the packaged assets, the config loader and
the builder must all work from site-packages. The venv sees the test
environment's dependencies through a .pth file (no download).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGED = ('setup.py', 'pyproject.toml', 'coarsemetro_jax', 'data_pipelines')


def _run(cmd, cwd, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = ''
  proc = subprocess.run(
      [str(c) for c in cmd],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  assert proc.returncode == 0, f'{cmd}\n{proc.stdout}\n{proc.stderr}'
  return proc.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(python of a fresh venv with the project installed from a wheel, a work dir)."""
  root = tmp_path_factory.mktemp('install')
  src = root / 'src'
  src.mkdir()
  for name in PACKAGED:
    path = REPO / name
    if path.is_dir():
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(path, src / name)
  venv = root / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', venv], root)
  python = venv / 'bin' / 'python'
  purelib = _run(
      [python, '-c', "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
  ).strip()
  _run(
      [
          sys.executable,
          '-m',
          'pip',
          'install',
          '-q',
          '--no-deps',
          '--no-build-isolation',
          '--no-index',
          '--target',
          purelib,
          src,
      ],
      root,
  )
  # Dependencies from this environment, after the venv's own site-packages
  # (paths listed in a .pth file are appended; their own .pth files, such as
  # an editable install's finder, are not run).
  deps = sysconfig.get_paths()['purelib']
  pathlib.Path(purelib, 'test_deps.pth').write_text(deps + '\n')
  work = root / 'work'
  work.mkdir()
  return python, purelib, work


@pytest.mark.slow
def test_installed_package_is_imported_from_site_packages(installed):
  python, purelib, work = installed
  where = _run(
      [
          python,
          '-c',
          'import coarsemetro_jax, data_pipelines; '
          'print(coarsemetro_jax.__file__); print(data_pipelines.__file__)',
      ],
      work,
  )
  assert all(line.startswith(purelib) for line in where.split()), where
  assert not (pathlib.Path(purelib) / 'configs').exists()  # configs are not packaged


@pytest.mark.slow
def test_profile_with_a_relative_config_path(installed):
  """The installed profile prints the same table as the checkout's."""
  python, _, work = installed
  config = os.path.relpath(REPO / 'configs' / 'tiny.py', work)
  assert not os.path.isabs(config)
  got = _run([python, '-m', 'coarsemetro_jax.profile', f'--config={config}'], work)
  want = _run(
      [sys.executable, '-m', 'coarsemetro_jax.profile', f'--config={REPO / "configs" / "tiny.py"}'],
      REPO,
  )
  assert 'params' in got.lower() and got == want


@pytest.mark.slow
def test_infer_with_an_absolute_config_path(installed):
  """Random weights saved by the installed package; infer writes a full mesh."""
  python, _, work = installed
  config = REPO / 'configs' / 'tiny.py'
  checkpoint = work / 'ckpt'
  _run(
      [
          python,
          '-c',
          f"""
import jax, jax.numpy as jnp
from coarsemetro_jax import build, config_files
from coarsemetro_jax.convert import orbax_variables
config = config_files.load({str(config)!r})
model = build.build(config, body=False).model
size = config.data.image_size
variables = model.init({{'params': jax.random.key(0)}}, jnp.zeros((1, size, size, 3)), train=False)
orbax_variables.save_converted({str(checkpoint)!r}, variables,
                               {{'kind': 'test', 'scope': 'model', 'model': config.model.to_dict()}})
""",
      ],
      work,
  )
  out = work / 'out'
  printed = _run(
      [
          python,
          '-m',
          'coarsemetro_jax.infer',
          f'--config={config}',
          f'--checkpoint={checkpoint}',
          f'--output_dir={out}',
          '--images',
          REPO / 'docs' / 'example.jpg',
      ],
      work,
  )
  assert '1 images' in printed, printed
  meshes = sorted(out.glob('*.obj'))
  assert len(meshes) == 1
  lines = meshes[0].read_text().splitlines()
  assert sum(line.startswith('v ') for line in lines) == 6890
  assert sum(line.startswith('f ') for line in lines) == 13776
