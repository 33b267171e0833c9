"""FastMETRO's decoder adjacency files -> arrays for `mesh_topology.load_topology`.

FastMETRO ships the graph of the coarsest mesh level (431 vertices) as three
files in PyTorch's legacy serialisation: `<prefix>_indices.pt` (int64 [2, N]),
`<prefix>_values.pt` (float [N]) and `<prefix>_size.pt` (torch.Size [V, V]),
the COO form of a sparse matrix whose non-zeros are the mesh edges and the
self-loops (e.g. prefix `.../smpl_431_adjmat`).
"""

import os

import numpy as np

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import torch_file


def read_adjmat(prefix):
  """(indices int [2, N], values [N], size (V, V)) from `<prefix>_{indices,values,size}.pt`.

  Raises:
    mesh_topology.TopologyError: a file is missing.
    torch_file.TorchFileError: a file is not a readable PyTorch file.
  """
  paths = {part: f'{prefix}_{part}.pt' for part in ('indices', 'values', 'size')}
  for path in paths.values():
    if not os.path.exists(path):
      raise mesh_topology.TopologyError(f'decoder adjacency file not found: {path!r}')
  indices = np.asarray(torch_file.load(paths['indices']))
  values = np.asarray(torch_file.load(paths['values']))
  size = tuple(int(s) for s in torch_file.load(paths['size']))
  return indices, values, size
