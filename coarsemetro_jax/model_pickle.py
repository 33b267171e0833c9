"""Restricted unpickling of the model files users download (SMPL, MANO, GraphCMR hierarchies).

SMPL's and MANO's `.pkl` files are Python 2 pickles of chumpy arrays and a
scipy `csc_matrix`; GraphCMR's `mesh_downsampling.npz` (METRO's, FastMETRO's)
stores pickled lists of `csc_matrix`. `loads` rebuilds numpy arrays and maps
those two classes to inert stand-ins that only keep their pickled state, so
neither chumpy, psbody nor an old scipy is needed, and it refuses every other
global: no code from the file can run.
"""

import codecs
import copyreg
import dataclasses
import io
import pickle

import numpy as np


class Stub:
  """Inert stand-in for a pickled chumpy / scipy object: keeps its state."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    self.state = None

  def __setstate__(self, state):
    self.state = state


class ChumpyStub(Stub):
  """chumpy.ch.Ch (and its subclasses): the array is in state['x']."""


@dataclasses.dataclass
class Csc:
  """Fields of a compressed sparse column matrix (scipy's csc_matrix, without scipy)."""

  data: np.ndarray
  indices: np.ndarray
  indptr: np.ndarray
  shape: tuple[int, int]

  def to_coo(self):
    cols = np.repeat(np.arange(self.shape[1]), np.diff(self.indptr))
    return self.indices.astype(np.int64), cols, self.data

  def to_dense(self):
    dense = np.zeros(self.shape, np.float64)
    rows, cols, vals = self.to_coo()
    np.add.at(dense, (rows, cols), vals)
    return dense


class CscStub(Stub):
  """scipy.sparse csc_matrix: data / indices / indptr / shape in the state."""

  def csc(self):
    """The pickled matrix's fields."""
    s = self.state
    shape = tuple(int(d) for d in s.get('_shape', s.get('shape')))
    return Csc(np.asarray(s['data']), np.asarray(s['indices']), np.asarray(s['indptr']), shape)


_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy.core.multiarray', 'scalar'): np._core.multiarray.scalar,
    ('numpy._core.multiarray', 'scalar'): np._core.multiarray.scalar,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('copy_reg', '_reconstructor'): copyreg._reconstructor,
    ('copyreg', '_reconstructor'): copyreg._reconstructor,
    ('__builtin__', 'object'): object,
    ('builtins', 'object'): object,
    # Protocol-2 pickles written by Python 3 store bytes this way.
    ('_codecs', 'encode'): codecs.encode,
}


class _Unpickler(pickle.Unpickler):
  """Numpy arrays, csc stand-ins and (optionally) chumpy stand-ins; nothing else."""

  def __init__(self, file, expected, chumpy):
    super().__init__(file, encoding='latin1')
    self._expected = expected
    self._chumpy = chumpy

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if self._chumpy and module.split('.')[0] == 'chumpy':
      return ChumpyStub
    if module.startswith('scipy.sparse') and name == 'csc_matrix':
      return CscStub
    raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name}: {self._expected}')


def loads(data, expected, chumpy=False):
  """The object pickled in `data` (bytes), read as Python 2 pickles need (latin-1).

  Args:
    data: the pickle's bytes.
    expected: what the file should hold, for the error (e.g. 'an SMPL or MANO
      model holds only numpy arrays, chumpy arrays and a scipy csc_matrix').
    chumpy: whether chumpy arrays are expected (as `ChumpyStub`s).

  Raises:
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError or
    AttributeError for a file that is not such a pickle; the callers turn them
    into one line naming the file.
  """
  return _Unpickler(io.BytesIO(data), expected, chumpy).load()


def load_model(path, kind, error):
  """The dict of an SMPL-family model pickle (SMPL, MANO), chumpy arrays as stand-ins.

  Raises `error` with one line naming the file when it is not such a pickle
  or holds any class other than numpy's, chumpy's and scipy's csc_matrix.
  """
  with open(path, 'rb') as f:
    data = f.read()
  expected = f'a {kind} model holds only numpy arrays, chumpy arrays and a scipy csc_matrix'
  try:
    model = loads(data, expected, chumpy=True)
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise error(f'{path!r}: not a readable {kind} model pickle: {e}') from e
  if not isinstance(model, dict):
    raise error(f'{path!r}: expected a dict, got {type(model)}')
  return model


def array(value, key, path, error):
  """numpy array from an ndarray, a chumpy stand-in or a csc stand-in of `load_model`'s dict."""
  if isinstance(value, np.ndarray):
    return value
  if isinstance(value, ChumpyStub):
    state = value.state if isinstance(value.state, dict) else {}
    if isinstance(state.get('x'), np.ndarray):
      return state['x']
    raise error(
        f"{path!r}: key {key!r} is a chumpy object without its array ('x'); "
        're-save the model with plain arrays'
    )
  if isinstance(value, CscStub):
    return value.csc().to_dense()
  raise error(f'{path!r}: key {key!r} has unexpected type {type(value)}')
