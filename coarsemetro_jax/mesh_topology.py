"""Mesh hierarchies: body (6890 / 1723 / 431), hand (778 / 195), up/down-sampling, adjacency.

The model never hard-codes SMPL or MANO: it receives a `MeshTopology`. A body
hierarchy is loaded (`load_topology`) from

* the project's embedded asset (`coarsemetro_jax/assets/mesh_downsampling.npz`,
  derived from CC0 MakeHuman data; plain arrays, no pickle), or
* GraphCMR's `mesh_downsampling.npz` that METRO/FastMETRO users already have.
  That file stores pickled scipy matrices (keys A, U, D, F) and pickled
  `psbody.mesh.Mesh` objects (key M). We read A/U/D/F through a restricted
  unpickler that only rebuilds numpy arrays and the fields of scipy's
  `csc_matrix` (no scipy objects are created, no other code can run) and never
  touch M, so neither psbody nor chumpy is needed.

The decoder's adjacency on the coarsest level is derived from A[-1] plus
self-loops. FastMETRO's own copy of it (`smpl_431_adjmat_*.pt`, read by
`coarsemetro_jax/convert/adjacency.py`) holds the same graph and can be passed
in as arrays instead.

A hand hierarchy (`load_hand_topology`) keeps the first two levels, 778 and
195 vertices, of MANO's `mano_downsampling.npz` (GraphCMR's layout with a
vertex array V instead of M; levels 778 / 195 / 49 / 13 / 4) or of the
embedded CC0 hand (`coarsemetro_jax/assets/hand_downsampling.npz`, plain
layout). Its decoder adjacency is A[1] plus self-loops, the graph of
FastMETRO's `mano_195_adjmat_*.pt`, which can be passed in instead.

Plain-array layout written by `save_hierarchy` (level l = 0 is the finest):
  F{l}                       int32 [F_l, 3] faces of level l
  A{l}_{data,indices,indptr,shape}   csc adjacency of level l (values 2.0)
  U{l}_{data,indices,indptr,shape}   csc up-sampling, level l+1 -> l
  D{l}_{data,indices,indptr,shape}   csc one-hot down-sampling, level l -> l+1
"""

import dataclasses
import io
import os
import pickle
import zipfile

import numpy as np

from coarsemetro_jax import model_pickle

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
EMBEDDED_HIERARCHY = os.path.join(ASSETS_DIR, 'mesh_downsampling.npz')
EMBEDDED_HAND_HIERARCHY = os.path.join(ASSETS_DIR, 'hand_downsampling.npz')
# Vertex counts of SMPL's mesh hierarchy; the embedded body has the same.
SMPL_LEVELS = (6890, 1723, 431)
# The levels of MANO's hierarchy the hand network uses (full mesh, coarse
# mesh of its 195 vertex tokens); the embedded hand has the same.
HAND_LEVELS = (778, 195)
# Every row of GraphCMR's U matrices has exactly this many non-zeros.
UPSAMPLE_NNZ = 3


class TopologyError(ValueError):
  """A mesh-hierarchy file is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class MeshTopology:
  """Mesh hierarchy as numpy arrays; hashable by identity (safe as a Flax attr).

  Level 0 is the full mesh, level L-1 the coarsest.
  """

  num_vertices: tuple[int, ...]
  faces: tuple[np.ndarray, ...]  # per level, int32 [F_l, 3]
  edges: tuple[np.ndarray, ...]  # per level, int32 [E_l, 2], i < j
  down_indices: tuple[np.ndarray, ...]  # l -> l+1: int32 [V_{l+1}] into level l
  up_indices: tuple[np.ndarray, ...]  # l+1 -> l: int32 [V_l, K] into level l+1
  up_weights: tuple[np.ndarray, ...]  # l+1 -> l: float32 [V_l, K]
  coarse_adjacency: np.ndarray  # bool [V_c, V_c]: graph + self-loops
  source: str = ''

  @property
  def num_levels(self):
    return len(self.num_vertices)

  def downsample(self, vertices, from_level=0, to_level=None):
    """Selects vertices of a coarser level. [..., V_from, C] -> [..., V_to, C]."""
    to_level = self.num_levels - 1 if to_level is None else to_level
    for level in range(from_level, to_level):
      vertices = vertices[..., self.down_indices[level], :]
    return vertices

  def upsample(self, vertices, from_level, to_level=0):
    """Fixed barycentric up-sampling as a gather. [..., V_from, C] -> [..., V_to, C].

    Works on numpy and jax arrays; equals the dense product `U @ vertices`.
    One gather per neighbour slot k, summed, rather than one [..., V_l, K, C]
    gather reduced over K: that gather's layout puts the batch between the
    vertex and neighbour axes, which makes it and its gradient much slower on
    XLA:CPU.
    """
    for level in range(from_level - 1, to_level - 1, -1):
      indices, weights = self.up_indices[level], self.up_weights[level]
      upsampled = 0
      for k in range(indices.shape[1]):
        slot = vertices[..., indices[:, k], :]  # [..., V_l, C]
        upsampled = upsampled + slot * weights[:, k, None].astype(slot.dtype)
      vertices = upsampled
    return vertices

  def upsample_matrix(self, level):
    """Dense U[level] ([V_level, V_level+1]); for tests and references only."""
    n_out, n_in = self.num_vertices[level], self.num_vertices[level + 1]
    dense = np.zeros((n_out, n_in), np.float64)
    rows = np.repeat(np.arange(n_out), self.up_indices[level].shape[1])
    np.add.at(dense, (rows, self.up_indices[level].ravel()), self.up_weights[level].ravel())
    return dense

  def decoder_attention_mask(self, num_joints):
    """FastMETRO's decoder self-attention mask, True = may attend.

    Joint rows attend to everything; vertex rows attend to all joints, to
    themselves and to their 1-ring on the coarsest mesh. Shape [J+V, J+V].
    """
    num_coarse = self.num_vertices[-1]
    size = num_joints + num_coarse
    mask = np.ones((size, size), bool)
    mask[num_joints:, num_joints:] = self.coarse_adjacency
    return mask


# ----------------------------------------------------------------------------
# Loading.


def load_topology(path='', adjmat=None, adjmat_source='adjmat'):
  """Loads a hierarchy: '' for the embedded body, else a GraphCMR-style npz.

  Args:
    path: `mesh_downsampling.npz` (GraphCMR's pickled layout or ours).
    adjmat: optional decoder adjacency of the coarsest level, replacing the one
      derived from the hierarchy: a dense or scipy-sparse [V_c, V_c] matrix, or
      the COO arrays (indices [2, N], values [N], size (V_c, V_c)) that
      FastMETRO stores. Non-zero entries are edges (self-loops included).
    adjmat_source: how error messages name `adjmat` (e.g. its files).
  """
  path = path or EMBEDDED_HIERARCHY
  if not os.path.exists(path):
    raise TopologyError(
        f"mesh hierarchy file not found: {path!r} (expected GraphCMR's "
        'mesh_downsampling.npz or the embedded asset)'
    )
  return _with_adjmat(_build(_read_matrices(path), source=path), adjmat, adjmat_source)


def load_hand_topology(path='', adjmat=None, adjmat_source='adjmat'):
  """Loads the hand hierarchy's levels 778 and 195: '' for the embedded hand, else an npz.

  Args:
    path: MANO's `mano_downsampling.npz` (GraphCMR's pickled layout) or a
      plain-layout file (`save_hierarchy`); its first two levels must have
      778 and 195 vertices, the coarser ones are not used.
    adjmat: optional decoder adjacency of the 195-vertex level (FastMETRO's
      `mano_195_adjmat_*.pt` arrays; see `load_topology`), replacing A[1]
      plus self-loops.
    adjmat_source: how error messages name `adjmat`.
  """
  path = path or EMBEDDED_HAND_HIERARCHY
  if not os.path.exists(path):
    raise TopologyError(
        f"hand mesh hierarchy file not found: {path!r} (expected MANO's "
        'mano_downsampling.npz or the embedded hand asset)'
    )
  mats = _read_matrices(path)
  sizes = tuple(a.shape[0] for a in mats['A'])
  if sizes[: len(HAND_LEVELS)] != HAND_LEVELS:
    raise TopologyError(
        f'{path!r} has mesh levels {sizes}; a hand hierarchy starts with '
        f'{HAND_LEVELS} (MANO mano_downsampling.npz or the embedded hand)'
    )
  n = len(HAND_LEVELS)
  mats = {'A': mats['A'][:n], 'F': mats['F'][:n], 'U': mats['U'][: n - 1], 'D': mats['D'][: n - 1]}
  return _with_adjmat(_build(mats, source=path), adjmat, adjmat_source)


def _read_matrices(path):
  """{'A', 'U', 'D', 'F': per-level lists} of a GraphCMR-style or plain-layout npz."""
  try:
    with zipfile.ZipFile(path) as zf:
      names = {n[:-4] for n in zf.namelist() if n.endswith('.npy')}
      if {'A', 'U', 'D', 'F'} <= names:
        return {k: _read_pickled_member(zf, k, path) for k in 'AUDF'}
      return _read_plain_members(zf, names, path)
  except zipfile.BadZipFile as e:
    raise TopologyError(f'{path!r} is not an .npz (zip) file: {e}') from e


def _with_adjmat(topology, adjmat, adjmat_source):
  if adjmat is None:
    return topology
  adjacency = _coarse_adjacency(adjmat, topology.num_vertices[-1], adjmat_source)
  return dataclasses.replace(topology, coarse_adjacency=adjacency)


def _read_pickled_member(zf, key, path):
  """Reads an object-array member (list of csc matrices or arrays)."""
  with zf.open(key + '.npy') as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      _, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      _, _, dtype = np.lib.format.read_array_header_2_0(f)
    payload = f.read()
  if dtype != np.dtype(object):
    return list(np.load(io.BytesIO(_npy_bytes(zf, key)), allow_pickle=False))
  expected = 'only numpy arrays and scipy csc matrices are expected in a mesh hierarchy file'
  try:
    items = model_pickle.loads(payload, expected)
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise TopologyError(f'{path!r}: cannot read key {key!r}: {e}') from e
  out = []
  for item in items:
    if isinstance(item, model_pickle.CscStub):
      out.append(item.csc())
    else:
      out.append(np.asarray(item))
  return out


def _npy_bytes(zf, key):
  with zf.open(key + '.npy') as f:
    return f.read()


def _read_plain_members(zf, names, path):
  """Reads the plain-array layout written by `save_hierarchy`."""

  def arr(name):
    return np.load(io.BytesIO(_npy_bytes(zf, name)), allow_pickle=False)

  mats = {}
  for key in 'AUD':
    levels = sorted(
        int(n[1 : -len('_data')]) for n in names if n.startswith(key) and n.endswith('_data')
    )
    mats[key] = [
        model_pickle.Csc(
            arr(f'{key}{l}_data'),
            arr(f'{key}{l}_indices'),
            arr(f'{key}{l}_indptr'),
            tuple(int(d) for d in arr(f'{key}{l}_shape')),
        )
        for l in levels
    ]
  f_levels = sorted(int(n[1:]) for n in names if n[0] == 'F' and n[1:].isdigit())
  mats['F'] = [arr(f'F{l}') for l in f_levels]
  if not all(mats.values()):
    raise TopologyError(
        f'{path!r}: expected keys A/U/D/F (GraphCMR) or A0_data.., U0_data.., '
        f'D0_data.., F0.. (plain layout); found {sorted(names)}'
    )
  return mats


def _build(mats, source):
  a_list, u_list, d_list, f_list = mats['A'], mats['U'], mats['D'], mats['F']
  num_levels = len(a_list)
  if not (len(f_list) == num_levels and len(u_list) == len(d_list) == num_levels - 1):
    raise TopologyError(
        f'{source!r}: inconsistent level counts A={len(a_list)} U={len(u_list)} '
        f'D={len(d_list)} F={len(f_list)}'
    )
  num_vertices = tuple(a.shape[0] for a in a_list)
  down, up_idx, up_w, edges = [], [], [], []
  for l in range(num_levels - 1):
    d = d_list[l]
    if d.shape != (num_vertices[l + 1], num_vertices[l]):
      raise TopologyError(
          f'{source!r}: D[{l}] has shape {d.shape}, expected '
          f'{(num_vertices[l + 1], num_vertices[l])}'
      )
    rows, cols, vals = d.to_coo()
    if (
        len(rows) != d.shape[0]
        or not np.allclose(vals, 1.0)
        or (np.bincount(rows, minlength=d.shape[0]) != 1).any()
    ):
      raise TopologyError(f'{source!r}: D[{l}] is not a one-hot selection')
    sel = np.empty(d.shape[0], np.int32)
    sel[rows] = cols
    down.append(sel)
    u = u_list[l]
    if u.shape != (num_vertices[l], num_vertices[l + 1]):
      raise TopologyError(
          f'{source!r}: U[{l}] has shape {u.shape}, expected '
          f'{(num_vertices[l], num_vertices[l + 1])}'
      )
    rows, cols, vals = u.to_coo()
    counts = np.bincount(rows, minlength=u.shape[0])
    k = int(counts.max())
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.zeros((u.shape[0], k), np.int32)
    w = np.zeros((u.shape[0], k), np.float32)
    idx[rows, slot] = cols
    w[rows, slot] = vals
    up_idx.append(idx)
    up_w.append(w)
  for a in a_list:
    rows, cols, _ = a.to_coo()
    keep = rows < cols
    e = np.stack([rows[keep], cols[keep]], 1).astype(np.int32)
    edges.append(e[np.lexsort((e[:, 1], e[:, 0]))])
  faces = tuple(np.asarray(f, np.int32) for f in f_list)
  coarse = np.eye(num_vertices[-1], dtype=bool)
  coarse[edges[-1][:, 0], edges[-1][:, 1]] = True
  coarse[edges[-1][:, 1], edges[-1][:, 0]] = True
  return MeshTopology(
      num_vertices=num_vertices,
      faces=faces,
      edges=tuple(edges),
      down_indices=tuple(down),
      up_indices=tuple(up_idx),
      up_weights=tuple(up_w),
      coarse_adjacency=coarse,
      source=source,
  )


def _coarse_adjacency(adjmat, num_coarse, source):
  """bool [V_c, V_c] from a dense/sparse matrix or (indices, values, size)."""
  if isinstance(adjmat, (tuple, list)):
    if len(adjmat) != 3:
      raise TopologyError(
          f'{source}: expected (indices, values, size) or a matrix, '
          f'got a sequence of {len(adjmat)}'
      )
    indices, values = np.asarray(adjmat[0]), np.asarray(adjmat[1])
    size = tuple(int(s) for s in adjmat[2])
    if (
        size != (num_coarse, num_coarse)
        or indices.shape != (2, values.shape[0])
        or (indices.size and not 0 <= indices.min() <= indices.max() < num_coarse)
    ):
      raise TopologyError(
          f'{source}: adjacency of size {size} with indices {indices.shape} '
          f'does not fit the coarsest mesh level ({num_coarse} vertices)'
      )
    adjacency = np.zeros(size, bool)
    nonzero = values != 0
    adjacency[indices[0, nonzero], indices[1, nonzero]] = True
    return adjacency
  dense = np.asarray(adjmat.toarray() if hasattr(adjmat, 'toarray') else adjmat)
  if dense.shape != (num_coarse, num_coarse):
    raise TopologyError(
        f'{source}: adjacency matrix of shape {dense.shape} does not fit '
        f'the coarsest mesh level ({num_coarse} vertices)'
    )
  return dense != 0


# ----------------------------------------------------------------------------
# Writing (used by tools/build_body_assets.py).


def _csc_fields(dense_or_coo, shape):
  rows, cols, vals = dense_or_coo
  order = np.lexsort((rows, cols))
  rows, cols, vals = rows[order], cols[order], vals[order]
  indptr = np.zeros(shape[1] + 1, np.int32)
  np.add.at(indptr, cols + 1, 1)
  return (
      np.asarray(vals, np.float64),
      rows.astype(np.int32),
      np.cumsum(indptr).astype(np.int32),
      np.asarray(shape, np.int64),
  )


def save_hierarchy(path, faces, down_indices, up_indices, up_weights):
  """Writes a hierarchy in the plain-array layout (see module docstring).

  Args:
    path: output `.npz`.
    faces: per level, int [F_l, 3] (level 0 finest).
    down_indices: per level transition, int [V_{l+1}] indices into level l.
    up_indices, up_weights: per transition, [V_l, K] into level l+1.
  """
  arrays = {}
  num_vertices = [len(up_indices[0])] + [len(d) for d in down_indices]
  for l, f in enumerate(faces):
    f = np.asarray(f, np.int64)
    arrays[f'F{l}'] = f.astype(np.int32)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.unique(np.concatenate([e, e[:, ::-1]]), axis=0)
    n = num_vertices[l]
    _put(arrays, f'A{l}', (e[:, 0], e[:, 1], np.full(len(e), 2.0)), (n, n))
  for l, sel in enumerate(down_indices):
    sel = np.asarray(sel, np.int64)
    _put(
        arrays, f'D{l}', (np.arange(len(sel)), sel, np.ones(len(sel))), (len(sel), num_vertices[l])
    )
    idx = np.asarray(up_indices[l], np.int64)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    _put(
        arrays,
        f'U{l}',
        (rows, idx.ravel(), np.asarray(up_weights[l]).ravel()),
        (idx.shape[0], num_vertices[l + 1]),
    )
  np.savez_compressed(path, **arrays)


def _put(arrays, key, coo, shape):
  data, indices, indptr, shp = _csc_fields(coo, shape)
  arrays.update(
      {f'{key}_data': data, f'{key}_indices': indices, f'{key}_indptr': indptr, f'{key}_shape': shp}
  )
