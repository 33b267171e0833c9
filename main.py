"""Trains and evaluates CoarseMETRO / FastMETRO.

  python main.py --config=configs/embedded.py --workdir=runs/embedded
  python main.py --config=configs/r50.py --workdir=runs/r50 --config.data.train_yaml=...
  python main.py --config=configs/r50.py --workdir=runs/r50 --mode=eval

This file is intentionally kept short; the logic is in coarsemetro_jax/train.py.
Several processes (a TPU pod slice, several GPU hosts, or one process per GPU)
join with `--multihost` (jax.distributed.initialize, which reads the cluster
from the environment on TPU/SLURM) or explicit --coordinator_address,
--num_processes and --process_id.

On Linux with glibc, main.py first re-executes itself once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (coarsemetro_jax/huge_pages.py); set
GLIBC_TUNABLES yourself (even to an empty string) to opt out.
"""

import os

from coarsemetro_jax import huge_pages  # pylint: disable=g-bad-import-order

if __name__ == '__main__' and (_exec_args := huge_pages.exec_args(os.environ)):
  os.execve(*_exec_args)  # before anything heavy is imported or allocated

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax

from coarsemetro_jax import config_files
from coarsemetro_jax import train

_CONFIG = config_files.define_flag('config', 'Training configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train (resumes from the workdir) or eval (latest checkpoint '
                          'in the workdir, else config.init_from).')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (cluster from the env).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info('GLIBC_TUNABLES=%r', os.environ.get('GLIBC_TUNABLES'))
  logging.info('process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)


if __name__ == '__main__':
  app.run(main)
