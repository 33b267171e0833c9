"""The project's imports run one way: core -> data_pipelines -> apps -> CLIs.

Every `import` statement of every module (top-level and inside functions) is
read with `ast`; a module may import modules of its own layer or below, and
the module graph has no cycle. The core is also imported in a fresh
interpreter to check that it pulls in no TensorFlow.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layer 0: the jit-compiled core (models, geometry, losses, metrics, steps).
CORE = {
    'coarsemetro_jax',
    'coarsemetro_jax.models',
    'coarsemetro_jax.mesh_topology',
    'coarsemetro_jax.model_pickle',
    'coarsemetro_jax.body_model',
    'coarsemetro_jax.hand_model',
    'coarsemetro_jax.hand_losses',
    'coarsemetro_jax.hand_steps',
    'coarsemetro_jax.joints',
    'coarsemetro_jax.losses',
    'coarsemetro_jax.smpl_param_loss',
    'coarsemetro_jax.metrics',
    'coarsemetro_jax.steps',
    'coarsemetro_jax.optimizer',
    'coarsemetro_jax.image_ops',
    'coarsemetro_jax.rasterizer',
    'coarsemetro_jax.mirror',
}
LAYERS = ('core', 'data', 'apps', 'cli', 'dev')
# Project packages whose modules are walked; tests are walked for cycles too.
WALKED = ('coarsemetro_jax', 'data_pipelines', 'configs', 'torch_reference', 'benchmarks', 'tools')
# Third-party packages the core never imports: accelerator hosts may lack
# TensorFlow, and checkpointing and PyTorch belong to the apps and the tests.
# (clu.metrics is TF-free; clu's writers, which import TF, are the loop's.)
NOT_IN_CORE = ('tensorflow', 'tensorflow_datasets', 'orbax', 'torch')


def layer_of(module):
  """The layer of a project module name, or None for a third-party module."""
  if module == 'main':
    return 'cli'
  top = module.split('.')[0]
  if top in ('torch_reference', 'benchmarks', 'tools', 'tests'):
    return 'dev'
  if top == 'configs':
    return 'core'  # plain ml_collections files, importable by anyone
  if top == 'data_pipelines':
    return 'data'
  if top == 'coarsemetro_jax':
    if module.endswith('.__main__'):
      return 'cli'
    if any(module == c or module.startswith(c + '.') for c in CORE - {'coarsemetro_jax'}):
      return 'core'
    if module == 'coarsemetro_jax':
      return 'core'
    return 'apps'
  return None


def module_name(path):
  rel = path.relative_to(ROOT).with_suffix('')
  parts = list(rel.parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def project_modules():
  """{module name: path} of every project .py file."""
  out = {'main': ROOT / 'main.py'}
  for package in WALKED + ('tests',):
    for path in (ROOT / package).rglob('*.py'):
      out[module_name(path)] = path
  return out


def imports_of(name, path, known):
  """The project modules (in `known`) and third-party roots imported by a file."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  targets = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:  # `from pkg import module` imports pkg.module
        full = f'{base}.{alias.name}'
        targets.append(full if full in known else base)
  project, external = set(), set()
  for target in targets:
    # The longest known prefix is the module imported (a.b.c -> a.b if c is
    # a function); importing a.b also runs a's __init__, which is a's layer.
    parts = target.split('.')
    for i in range(len(parts), 0, -1):
      candidate = '.'.join(parts[:i])
      if candidate in known:
        project.add(candidate)
        break
    else:
      external.add(parts[0])
  project.discard(name)
  return project, external


@pytest.fixture(scope='module')
def graph():
  known = project_modules()
  return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_project_module_has_a_layer(graph):
  assert all(layer_of(name) for name in graph), [n for n in graph if not layer_of(n)]


def test_no_upward_import(graph):
  upward = []
  for name, (project, _) in graph.items():
    for target in project:
      if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)):
        upward.append(f'{name} ({layer_of(name)}) imports {target} ({layer_of(target)})')
  assert not upward, '\n'.join(sorted(upward))


def test_core_imports_no_tensorflow_orbax_or_torch(graph):
  bad = [
      f'{name} imports {ext}'
      for name, (_, external) in graph.items()
      if layer_of(name) == 'core' and not name.startswith('configs')
      for ext in external
      if ext in NOT_IN_CORE
  ]
  assert not bad, bad


def test_no_import_cycle(graph):
  """Depth-first search for a back edge in the module graph."""
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(graph[node][0]):
      if state.get(target) == 'open':
        cycles.append(stack[stack.index(target) :] + [target])
      elif target not in state:
        visit(target)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, '\n'.join(' -> '.join(c) for c in cycles)


def test_layer_rules_catch_an_upward_import(tmp_path):
  """The checker itself: a core module importing an app is reported."""
  known = {'coarsemetro_jax.losses': None, 'coarsemetro_jax.train': None}
  path = tmp_path / 'losses.py'
  path.write_text('from coarsemetro_jax import train\nimport tensorflow as tf\n')
  project, external = imports_of('coarsemetro_jax.losses', path, known)
  assert project == {'coarsemetro_jax.train'} and external == {'tensorflow'}
  assert LAYERS.index(layer_of('coarsemetro_jax.train')) > LAYERS.index(
      layer_of('coarsemetro_jax.losses')
  )


def test_core_import_loads_no_tensorflow():
  """Importing every core module in a fresh interpreter leaves TF unloaded."""
  modules = sorted(
      m for m in project_modules() if layer_of(m) == 'core' and m.startswith('coarsemetro_jax')
  )
  code = (
      'import sys\n'
      + ''.join(f'import {m}\n' for m in modules)
      + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'orbax', 'torch')))"
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout
