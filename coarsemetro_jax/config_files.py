"""The one config loader of every command line: `load` and `define_flag`.

A config file is a Python file whose `get_config()` (or `get_config(arg)`)
returns an `ml_collections.ConfigDict`. It is named by a path, absolute or
relative to the working directory, with an optional `:arg` suffix
(`configs/tiny.py:fastmetro`); fields are overridden by `key.path=value`
(`--config.data.batch_size=8` on a command line), parsed by the field's type.

Config files extend each other by importing their package (`from configs
import r50`). The repository's `configs/` is not installed with the project,
so while a file runs, its directory (when it has an `__init__.py`) is the
package named after it; `sys.path` is never changed. A package of that name
that is already imported from another directory is set aside meanwhile and
put back afterwards, so two copies of `configs/` never mix.

Configs come back locked: an override, or a later assignment, of a field the
config does not have fails with one line naming the field.

  config = config_files.load('configs/tiny.py:fastmetro', ['data.batch_size=4'])

  _CONFIG = config_files.define_flag('config', 'Training configuration file.')
"""

import contextlib
import difflib
import importlib
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_dict

# The implementation module: its _ConfigFlag parses `--config.key=value`
# overrides by field type; the package exports only DEFINE_config_file, whose
# loader needs the config's directory on sys.path.
from ml_collections.config_flags import config_flags as ml_config_flags


class ConfigError(ValueError):
  """A config file is missing or broken, or an override names no field."""


def _describe(path):
  """`path` as given, plus the working directory when it is relative."""
  return repr(path) if os.path.isabs(path) else f'{path!r} (from {os.getcwd()})'


def _modules_under(name):
  return [k for k in sys.modules if k == name or k.startswith(name + '.')]


@contextlib.contextmanager
def _package(name, directory):
  """`directory` importable as package `name` for the duration of the block."""
  current = sys.modules.get(name)
  paths = [os.path.realpath(p) for p in getattr(current, '__path__', ())]
  if os.path.realpath(directory) in paths:  # already this package: use it
    yield
    return
  saved = {k: sys.modules.pop(k) for k in _modules_under(name)}
  try:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(directory, '__init__.py'), submodule_search_locations=[directory]
    )
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
    yield
  finally:
    for k in _modules_under(name):
      del sys.modules[k]
    sys.modules.update(saved)


@contextlib.contextmanager
def _standalone(path):
  """A config file outside any package, as a module for the block's duration."""
  name = f'_config_file_{abs(hash(path))}'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses in the file look their module up
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(name, None)


@contextlib.contextmanager
def _config_module(path):
  """The module of the config file at `path` (kept importable inside the block)."""
  directory, filename = os.path.split(os.path.abspath(path))
  stem, package = os.path.splitext(filename)[0], os.path.basename(directory)
  if (
      os.path.isfile(os.path.join(directory, '__init__.py'))
      and package.isidentifier()
      and stem.isidentifier()
  ):
    with _package(package, directory):
      yield importlib.import_module(f'{package}.{stem}')
  else:
    with _standalone(os.path.abspath(path)) as module:
      yield module


def load_file(spec):
  """`get_config([arg])` of 'path/to/config.py[:arg]', locked, without overrides."""
  path, has_arg, arg = spec.partition(':')
  if not path:
    raise ConfigError('no config file given (expected path/to/config.py[:arg])')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {_describe(path)} not found')
  try:
    with _config_module(path) as module:
      get_config = getattr(module, 'get_config', None)
      if not callable(get_config):
        raise ConfigError(f'config file {_describe(path)} defines no get_config()')
      config = get_config(arg) if has_arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # any error in the user's file
    raise ConfigError(f'config {spec!r}: {type(e).__name__}: {e}') from e
  if not isinstance(config, config_dict.ConfigDict):
    raise ConfigError(
        f'config {spec!r}: get_config() returned a '
        f'{type(config).__name__}, expected an ml_collections.ConfigDict'
    )
  config.lock()
  return config


def check_key(config, key, source):
  """Raises ConfigError naming `key` ('a.b.c') if `config` has no such field."""
  node, walked = config, []
  for part in key.split('.'):
    if '[' in part:  # tuple/list indexing: ml_collections checks it
      return
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      raise ConfigError(
          f'config {source}: {".".join(walked)} is a {type(node).__name__}, '
          f'it has no field {part!r} (override {key!r})'
      )
    if part not in node:
      close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
      hint = f'. Did you mean "{close[0]}" instead of "{part}"?' if close else ''
      raise ConfigError(f'config {source} has no field {".".join(walked + [part])!r}{hint}')
    node = node[part]
    walked.append(part)


class _FileParser(flags.ArgumentParser):
  """Reads the flag's value, 'path[:arg]', with `load_file`."""

  def parse(self, argument):
    return load_file(argument)

  def flag_type(self):
    return 'config file'


class _ConfigFileFlag(ml_config_flags._ConfigFlag):
  """ml_collections' config flag (overrides by field type), with a clear bad-key error."""

  def _parse(self, argument):
    try:
      return super()._parse(argument)
    except (AttributeError, KeyError, TypeError) as e:  # ml_collections: a missing field
      config = self.parser.parse(argument)
      try:
        for key in self._GetOverrides(self._GetArgv()):
          check_key(config, key, repr(argument))
      except ConfigError as bad:  # a flags.Error: absl prints one line, no traceback
        raise flags.IllegalFlagValueError(str(bad)) from bad
      raise flags.IllegalFlagValueError(f'config {argument!r}: an override failed: {e}') from e


def define_flag(
    name='config',
    help_string='Config file: path/to/config.py[:arg].',
    *,
    flag_values=flags.FLAGS,
    sys_argv=None,
):
  """An absl flag `--name=path[:arg]` with `--name.key.path=value` overrides.

  Define it in a command line's `main` module or a function (not when a library
  is imported). Its value is the locked ConfigDict.

  Returns:
    The flag's `flags.FlagHolder`.
  """
  flag = _ConfigFileFlag(
      parser=_FileParser(),
      serializer=flags.ArgumentSerializer(),
      name=name,
      default=None,
      help_string=help_string,
      flag_values=flag_values,
      sys_argv=sys_argv,
  )
  return flags.DEFINE_flag(flag, flag_values)


def load(spec, overrides=()):
  """The locked config of 'path/to/config.py[:arg]' with 'key.path=value' overrides.

  For command lines that do not use absl flags (argparse); the overrides are
  parsed exactly as `--config.key.path=value` is.

  Raises:
    ConfigError: the file is missing or broken, or an override names no field
      or gives a value of the wrong type.
  """
  overrides = [o.removeprefix('--config.') for o in overrides]
  if not overrides:
    return load_file(spec)
  argv = ['config_files', f'--config={spec}'] + [f'--config.{o}' for o in overrides]
  flag_values = flags.FlagValues()
  holder = define_flag('config', flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    raise (cause if isinstance(cause, ConfigError) else ConfigError(str(e))) from None
  return holder.value
