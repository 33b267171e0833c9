"""Trains and evaluates CoarseMETRO / FastMETRO.

  python main.py --config=configs/embedded.py --workdir=runs/embedded
  python main.py --config=configs/r50.py --workdir=runs/r50 --config.data.train_yaml=...
  python main.py --config=configs/r50.py --workdir=runs/r50 --mode=eval

This file is intentionally kept short; the logic is in coarsemetro_jax/train.py.
A mistake in the flags or the config (a misspelt key, a missing config file,
unset data paths) ends in one `error:` line and exit code 2; a missing or
unusable input (data, body model, checkpoint, too many bad rows) in one line
and exit code 1. `--verbose` shows the traceback of those too.
Several processes (a TPU pod slice, several GPU hosts, or one process per GPU)
join with `--multihost` (jax.distributed.initialize, which reads the cluster
from the environment on TPU/SLURM) or explicit --coordinator_address,
--num_processes and --process_id.

On Linux with glibc, main.py first re-executes itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (coarsemetro_jax/huge_pages.py); set
GLIBC_TUNABLES yourself (even to an empty string) to opt out.
"""

import os
import re
import sys

from coarsemetro_jax import huge_pages

if __name__ == '__main__':
  huge_pages.reexecute()  # before anything heavy is imported or allocated

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
from absl import logging
import jax

from coarsemetro_jax import config_files

_CONFIG = config_files.define_flag('config', 'Training configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_MODE = flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval'],
    'train (resumes from the workdir) or eval (latest checkpoint '
    'in the workdir, else config.init_from).',
)
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() (cluster from the env).'
)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Tracebacks for config and input errors too.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(code, message):
  message = ' '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _flag_error(error):
  """One line for an error of flag parsing (the config file loads there)."""
  text = ' '.join(str(error).split())
  # absl prefixes 'flag --config=PATH: '; the loader's own message names the
  # config file already.
  config_message = re.match(r'flag --config=\S*: (config .*)', text)
  return config_message.group(1) if config_message else text


def _parse_flags(argv):
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # a config file that did not load raises here
    return argv
  except (flags.Error, config_files.ConfigError) as e:
    if '--verbose' in argv:
      raise
    _fail(2, _flag_error(e))


def main(argv):
  if len(argv) > 1:
    _fail(2, f'unexpected arguments: {argv[1:]}')
  # Imported after the flags are parsed: a mistake in them is reported before
  # TensorFlow and the model code load.
  from coarsemetro_jax import train

  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
  logging.info('GLIBC_TUNABLES=%r', os.environ.get('GLIBC_TUNABLES'))
  logging.info(
      'process %d/%d, %d local / %d global devices (%s)',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)
  except train.CONFIG_ERRORS + train.INPUT_ERRORS as e:
    if _VERBOSE.value:
      raise
    _fail(2 if isinstance(e, train.CONFIG_ERRORS) else 1, e)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
