"""main.py that also saves the global training batches it trains on.

  python tests/multihost_main.py OUT_DIR <main.py flags>

tests/test_train.py's multi-process test runs it in each process; every
process takes part in gathering each global batch (a collective) and process
0 writes it to OUT_DIR/batch_<step>.npz. `recording` serves the in-process
1-process run too.
"""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recording(train_batches, out_dir):
  """`Datasets.train_batches` that also saves each global batch it yields."""
  import jax
  from jax.experimental import multihost_utils
  import numpy as np

  def wrapped(self, sharding, start_step=0):
    batches = train_batches(self, sharding, start_step)
    try:
      for step, batch in enumerate(batches, start_step + 1):
        full = multihost_utils.process_allgather(batch, tiled=True)
        if jax.process_index() == 0:
          os.makedirs(out_dir, exist_ok=True)
          np.savez(os.path.join(out_dir, f'batch_{step}.npz'), **full)
        yield batch
    finally:
      batches.close()

  return wrapped


if __name__ == '__main__':
  sys.path[0] = REPO  # this file's folder is there; main.py expects the repository
  from data_pipelines import datasets

  datasets.Datasets.train_batches = recording(datasets.Datasets.train_batches, sys.argv[1])
  sys.argv = [os.path.join(REPO, 'main.py')] + sys.argv[2:]
  runpy.run_path(sys.argv[0], run_name='__main__')
