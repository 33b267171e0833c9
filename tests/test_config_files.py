"""config_files: config paths from any directory, `:arg`, overrides, clear errors."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from absl import flags
import pytest

from coarsemetro_jax import config_files
import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / 'configs' / 'tiny.py'


def test_absolute_path_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_files.load(str(TINY))
  assert config.model.name == 'coarsemetro' and config.model.resnet_width == 8
  assert config.seed == 88  # from configs/r50.py, its parent
  assert config.is_locked


def test_relative_path_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  relative = os.path.relpath(TINY, tmp_path)
  assert relative.startswith('..')
  assert config_files.load(relative).data.image_size == 64


def test_arg_suffix_and_overrides():
  config = config_files.load(
      f'{TINY}:fastmetro',
      [
          'data.batch_size=4',
          'model.stage_dims=(8, 4, 4)',
          'topology.hierarchy=/data/mesh_downsampling.npz',
          'model.backbone_remat=True',
      ],
  )
  assert config.model.name == 'fastmetro'
  assert config.data.batch_size == 4
  assert config.model.stage_dims == (8, 4, 4)
  assert config.topology.hierarchy == '/data/mesh_downsampling.npz'
  assert config.model.backbone_remat is True
  assert config.is_locked


def test_misspelt_override_key_is_named():
  with pytest.raises(config_files.ConfigError) as error:
    config_files.load(str(TINY), ['data.batch_size=4', 'model.nmae=fastmetro'])
  assert str(error.value) == (
      f"config {str(TINY)!r} has no field 'model.nmae'. " 'Did you mean "name" instead of "nmae"?'
  )
  message = """no field 'modle'. Did you mean "model" instead of "modle"?"""
  with pytest.raises(config_files.ConfigError, match=re.escape(message)):
    config_files.load(str(TINY), ['modle.name=fastmetro'])


def test_absl_flag_overrides_and_misspelt_key():
  argv = ['prog', f'--config={TINY}:fastmetro', '--config.data.batch_size=2']
  flag_values = flags.FlagValues()
  holder = config_files.define_flag('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert (holder.value.model.name, holder.value.data.batch_size) == ('fastmetro', 2)
  # A flags.Error: absl's app.run prints its one line instead of a traceback.
  argv = ['prog', f'--config={TINY}', '--config.data.bach_size=2']
  flag_values = flags.FlagValues()
  config_files.define_flag('config', flag_values=flag_values, sys_argv=argv)
  with pytest.raises(
      flags.Error,
      match=re.escape(
          """has no field 'data.bach_size'. Did you mean "batch_size" instead of "bach_size"?"""
      ),
  ):
    flag_values(argv)


def test_file_errors(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(
      config_files.ConfigError,
      match=rf"config file 'configs/nope.py' \(from {tmp_path}\) not found",
  ):
    config_files.load('configs/nope.py')
  with pytest.raises(config_files.ConfigError, match='ValueError: configs/tiny.py argument'):
    config_files.load(f'{TINY}:bogus')
  (tmp_path / 'empty.py').write_text('X = 1\n')
  with pytest.raises(config_files.ConfigError, match='defines no get_config'):
    config_files.load('empty.py')


def test_standalone_file_without_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'mine.py').write_text(
      'import ml_collections\n'
      'def get_config(arg="7"):\n'
      '  return ml_collections.ConfigDict({"n": int(arg)})\n'
  )
  assert config_files.load('mine.py').n == 7
  assert config_files.load('mine.py:3', ['n=5']).n == 5


def test_a_copy_of_configs_does_not_mix_with_the_imported_one(tmp_path):
  # `configs` (the repository's) is imported in this process; a copy elsewhere
  # with another r50 loads its own r50, and the imported package is untouched.
  copy = tmp_path / 'configs'
  shutil.copytree(REPO / 'configs', copy, ignore=shutil.ignore_patterns('__pycache__'))
  r50 = copy / 'r50.py'
  r50.write_text(r50.read_text().replace('config.seed = 88', 'config.seed = 7'))
  before = {k: m for k, m in sys.modules.items() if k.split('.')[0] == 'configs'}
  assert config_files.load(str(copy / 'tiny.py')).seed == 7
  assert {k: m for k, m in sys.modules.items() if k.split('.')[0] == 'configs'} == before
  assert sys.modules['configs'] is configs
  assert config_files.load(str(TINY)).seed == 88


def test_sibling_import_without_the_repository_on_sys_path(tmp_path):
  # `python -I`: neither the working directory nor PYTHONPATH is on sys.path,
  # as for an installed project run from elsewhere; `from configs import r50`
  # in configs/tiny.py must still resolve to its sibling.
  script = f"""
import importlib.util, json, sys
assert not any(p in ({str(REPO)!r}, '') for p in sys.path), sys.path
spec = importlib.util.spec_from_file_location(
    'config_files', {str(REPO / 'coarsemetro_jax' / 'config_files.py')!r})
config_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_files)
config = config_files.load({str(TINY)!r} + ':fastmetro', ['data.batch_size=3'])
print(json.dumps({{'name': config.model.name, 'seed': config.seed,
                  'batch_size': config.data.batch_size,
                  'configs_left': [k for k in sys.modules if k.split('.')[0] == 'configs']}}))
"""
  result = subprocess.run(
      [sys.executable, '-I', '-c', script],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.splitlines()[-1]) == {
      'name': 'fastmetro',
      'seed': 88,
      'batch_size': 3,
      'configs_left': [],
  }
