"""Re-execution with glibc's transparent-huge-page tunable (main.py and the speed benchmarks).

XLA:CPU takes each step's temporaries as one large block, which glibc maps
fresh from the kernel and unmaps again every step, so every step faults in each
of its 4 KiB pages and a CPU-bound run spends a large share of its time in the
kernel. With this tunable glibc backs such blocks with transparent huge pages,
which take far fewer faults (measurements: docs/benchmarks.md). glibc reads
GLIBC_TUNABLES only at start-up, hence the re-execution. This module imports
nothing heavy: main.py calls it first.
"""

import os
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'


def exec_args(environ, platform=sys.platform):
  """(executable, argv, env) to re-execute with TUNABLE, or None.

  None where it cannot apply (not Linux/glibc) or where GLIBC_TUNABLES is
  already set: by an earlier re-execution, or by a user who chose their own.
  """
  if platform != 'linux' or 'GLIBC_TUNABLES' in environ:
    return None
  if not os.confstr('CS_GNU_LIBC_VERSION'):  # e.g. musl
    return None
  return (
      sys.executable,
      [sys.executable] + sys.orig_argv[1:],
      {**environ, 'GLIBC_TUNABLES': TUNABLE},
  )


def reexecute():
  """Replaces this process by one under TUNABLE where `exec_args` gives one; else returns."""
  if args := exec_args(os.environ):
    os.execve(*args)
