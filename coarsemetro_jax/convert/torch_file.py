"""Reads and writes PyTorch checkpoint files (`.pth`/`.bin`/`.pt`) without torch.

Two serialisations exist and both are read:

* zip (torch >= 1.6, the default): a zip archive `<root>/data.pkl` (the pickle),
  `<root>/data/<key>` (one raw, uncompressed storage per key), optionally
  `<root>/byteorder` ('little'/'big'; absent = little) and `<root>/version`.
* legacy (`_use_new_zipfile_serialization=False`, e.g. FastMETRO's
  `smpl_431_adjmat_*.pt`): five consecutive pickles - magic number
  0x1950a86a20f9469cfc6c, protocol version 1001, sys_info {protocol_version,
  little_endian, type_sizes}, the main object, the sorted list of storage keys
  - then every storage in that order as an int64 element count followed by the
  raw elements.

  `type_sizes` records the writer's C `short`/`int`/`long` sizes; FastMETRO's
  files were written by a build with a 4-byte `long` (Windows). Storage
  elements do not depend on it: `LongStorage` is always int64 and the count
  header is always 8 bytes (smpl_431_adjmat_indices.pt: 335 header bytes +
  8 + 6010 * 8 = 48423 bytes, its exact size). We therefore read `long` as
  8 bytes, accept `type_sizes` only with short=2, int=4 and long in {4, 8}, and
  cross-check every count header against the element count in the pickle, so
  a file that really used other sizes fails loudly instead of being misread.

Pickles are read by a restricted unpickler: only the tensor/parameter rebuild
functions of `torch._utils`, torch storage and dtype names (mapped to numpy
dtypes), `torch.Size` (-> tuple), `collections.OrderedDict`, numpy's array
reconstruction and `_codecs.encode` (bytes in protocol 2) are resolved. Any
other global raises `TorchFileError` naming it, so no code from the file runs.

Tensors come back as numpy arrays that honour sizes, strides and storage
offsets; tensors that share a storage share memory (as after `torch.load`).
bfloat16 and float8 use `ml_dtypes` (installed with JAX). Device locations are
ignored (everything is loaded to host memory).

The writer is `torch_writer.save`.
"""

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchFileError(ValueError):
  """A file is not a readable PyTorch checkpoint (corrupt, truncated, unsafe)."""


# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
    'UntypedStorage': np.dtype(np.uint8),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != 'UntypedStorage'}

# torch dtype name (as pickled: `torch.float32` -> global 'torch float32').
TORCH_DTYPES = {
    'float64': np.float64,
    'double': np.float64,
    'float32': np.float32,
    'float': np.float32,
    'float16': np.float16,
    'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64,
    'long': np.int64,
    'int32': np.int32,
    'int': np.int32,
    'int16': np.int16,
    'short': np.int16,
    'int8': np.int8,
    'uint8': np.uint8,
    'uint16': np.uint16,
    'uint32': np.uint32,
    'uint64': np.uint64,
    'bool': np.bool_,
    'complex64': np.complex64,
    'complex128': np.complex128,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn,
    'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz,
    'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}


# ----------------------------------------------------------------------------
# Reading.


class _StorageType:
  """Stands in for a torch storage class (`torch.FloatStorage`, ...)."""

  def __init__(self, name):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


class _TorchDtype:
  """Stands in for a torch dtype object (`torch.float32`)."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(TORCH_DTYPES[name])


class _Storage:
  """A loaded storage: a flat numpy array of its elements."""

  def __init__(self, array):
    self.array = array


def _as_tensor(storage, offset, size, stride, dtype=None):
  """numpy view of `storage` with torch's (offset, size, stride) in elements."""
  if not isinstance(storage, _Storage):
    raise TorchFileError(f'tensor rebuilt from a {type(storage).__name__}, not a storage')
  base = storage.array
  if dtype is not None and np.dtype(dtype) != base.dtype:  # _rebuild_tensor_v3
    if base.dtype != np.uint8 or base.size % np.dtype(dtype).itemsize:
      raise TorchFileError(f'cannot view a {base.dtype} storage as {np.dtype(dtype)}')
    base = base.view(dtype)
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise TorchFileError(
        f'invalid tensor geometry: size {size}, stride {stride}, ' f'offset {offset}'
    )
  if 0 in size:
    return np.zeros(size, base.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= base.size:
    raise TorchFileError(
        f'tensor of size {size}, stride {stride}, offset {offset} '
        f'reads element {last} of a storage with {base.size}'
    )
  return np.lib.stride_tricks.as_strided(
      base[offset:], size, tuple(s * base.itemsize for s in stride)
  )


def _rebuild_tensor(storage, offset, size, stride):
  return _as_tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
  del requires_grad, backward_hooks
  if metadata and any(metadata.values()):  # conj/neg bits: not plain data
    raise TorchFileError(f'tensor metadata {dict(metadata)} is not supported')
  return _as_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  del requires_grad, backward_hooks
  if metadata and any(metadata.values()):
    raise TorchFileError(f'tensor metadata {dict(metadata)} is not supported')
  if not isinstance(dtype, _TorchDtype):
    raise TorchFileError(f'_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}')
  return _as_tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses (nn.Parameter pickled via __reduce_ex__): plain data."""
  del new_type, state
  return func(*args)


class _TensorType:
  """Stands in for `torch.Tensor` / `torch.nn.Parameter` as a type argument."""


def _torch_size(dims=()):
  return tuple(int(d) for d in dims)


def _import_numpy_reconstruct():
  try:
    from numpy._core import multiarray
  except ImportError:  # numpy < 2
    from numpy.core import multiarray
  return multiarray


_MULTIARRAY = _import_numpy_reconstruct()
_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _TensorType,
    ('torch.nn.parameter', 'Parameter'): _TensorType,
    ('torch', 'Size'): _torch_size,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): lambda text, encoding='utf-8': text.encode(encoding),
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
}
for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _ALLOWED_GLOBALS[(_module, '_reconstruct')] = _MULTIARRAY._reconstruct
  _ALLOWED_GLOBALS[(_module, 'scalar')] = _MULTIARRAY.scalar
for _name in STORAGE_DTYPES:
  _ALLOWED_GLOBALS[('torch', _name)] = _StorageType(_name)
_ALLOWED_GLOBALS[('torch.storage', 'UntypedStorage')] = _StorageType('UntypedStorage')
for _name in TORCH_DTYPES:
  _ALLOWED_GLOBALS[('torch', _name)] = _TorchDtype(_name)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the allow-listed globals; storages via `load_storage`."""

  def __init__(self, file, path, load_storage):
    super().__init__(file, encoding='utf-8')
    self._path = path
    self._load_storage = load_storage

  def find_class(self, module, name):
    # Protocol 2 names Python 3 modules by their Python 2 names (__builtin__).
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      if module == 'torch' and name.startswith('Q') and name.endswith('Storage'):
        what = 'quantized storages are not supported'
      else:
        what = (
            'only tensors, storages, dtypes, torch.Size, OrderedDict and numpy '
            'arrays may appear in a checkpoint (is this a whole pickled model '
            'rather than a state dict?)'
        )
      raise TorchFileError(
          f'{self._path}: refusing to unpickle global {module}.{name}: {what}'
      ) from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ('storage', b'storage'):
      kind = pid[0] if isinstance(pid, tuple) and pid else pid
      raise TorchFileError(
          f'{self._path}: unsupported persistent id {kind!r} ' '(only storages can be loaded)'
      )
    return self._load_storage(pid[1:])


def _unpickle(file, path, load_storage=None):
  def no_storage(pid):
    raise TorchFileError(f'{path}: unexpected storage reference {pid!r} in a header')

  try:
    return _RestrictedUnpickler(file, path, load_storage or no_storage).load()
  except TorchFileError:
    raise
  except (
      EOFError,
      pickle.UnpicklingError,
      struct.error,
      ValueError,
      TypeError,
      IndexError,
      KeyError,
      AttributeError,
      UnicodeDecodeError,
  ) as e:
    raise TorchFileError(
        f'{path}: corrupt or truncated pickle data ' f'({type(e).__name__}: {e})'
    ) from e


def _storage_args(pid, path):
  """(storage type, key, numel, view metadata) of a storage persistent id."""
  if len(pid) not in (4, 5):
    raise TorchFileError(f'{path}: malformed storage id {pid!r}')
  storage_type, key, _, numel = pid[:4]
  if not isinstance(storage_type, _StorageType):
    raise TorchFileError(f'{path}: storage id with unknown type {storage_type!r}')
  key = key.decode('ascii') if isinstance(key, bytes) else str(key)
  return storage_type, key, int(numel), (pid[4] if len(pid) == 5 else None)


def _byteswapped(array):
  return array.byteswap() if array.dtype.itemsize > 1 else array


def _load_zip(path, progress):
  """torch >= 1.6 zip serialisation."""
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise TorchFileError(
        f'{path}: not a readable zip archive ({e}); the file may ' 'be truncated'
    ) from e
  with zf:
    pkls = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise TorchFileError(
          f'{path}: zip archive without a single <root>/data.pkl '
          f'(found {pkls or "none"}); not a PyTorch checkpoint'
      )
    root = pkls[0][: -len('data.pkl')]
    names = set(zf.namelist())
    byteorder = 'little'
    if root + 'byteorder' in names:
      byteorder = zf.read(root + 'byteorder').decode('ascii', 'replace')
      if byteorder not in ('little', 'big'):
        raise TorchFileError(f'{path}: unknown byteorder record {byteorder!r}')
    total = sum(zf.getinfo(n).file_size for n in names if n.startswith(root + 'data/'))
    done = [0]
    storages = {}

    def load_storage(pid):
      storage_type, key, numel, _ = _storage_args(pid, path)
      if key in storages:
        return storages[key]
      name = f'{root}data/{key}'
      if name not in names:
        raise TorchFileError(f'{path}: storage record {name!r} is missing')
      nbytes = numel * storage_type.dtype.itemsize
      info = zf.getinfo(name)
      if info.file_size != nbytes:
        raise TorchFileError(
            f'{path}: storage {key!r} holds {info.file_size} bytes, expected '
            f'{nbytes} ({numel} x {storage_type.dtype})'
        )
      buf = np.empty(nbytes, np.uint8)
      try:
        with zf.open(name) as f:
          got = f.readinto(memoryview(buf))
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TorchFileError(f'{path}: storage {key!r} is corrupt ({e})') from e
      if got != nbytes:
        raise TorchFileError(f'{path}: storage {key!r} is truncated ' f'({got} of {nbytes} bytes)')
      array = buf.view(storage_type.dtype)
      if byteorder != sys.byteorder:
        array = _byteswapped(array)
      storages[key] = _Storage(array)
      done[0] += nbytes
      if progress:
        progress(done[0], total)
      return storages[key]

    try:
      data = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise TorchFileError(f'{path}: data.pkl is corrupt ({e})') from e
    return _unpickle(io.BytesIO(data), path, load_storage)


def _load_legacy(path, progress):
  """torch's pre-1.6 ("legacy") serialisation."""
  with open(path, 'rb') as f:
    magic = _unpickle(f, path)
    if magic != LEGACY_MAGIC:
      raise TorchFileError(f'{path}: not a PyTorch file (bad magic number {magic!r})')
    version = _unpickle(f, path)
    if version != LEGACY_PROTOCOL:
      raise TorchFileError(f'{path}: unsupported legacy protocol version {version!r}')
    sys_info = _unpickle(f, path)
    if not isinstance(sys_info, dict):
      raise TorchFileError(f'{path}: malformed sys_info {sys_info!r}')
    sizes = sys_info.get('type_sizes', {})
    if (sizes.get('short', 2), sizes.get('int', 4)) != (2, 4) or sizes.get('long', 8) not in (4, 8):
      raise TorchFileError(
          f'{path}: unsupported C type sizes {sizes} (short=2, int=4, ' 'long=4 or 8 expected)'
      )
    order = '<' if sys_info.get('little_endian', True) else '>'

    # As torch does: storages are allocated when the pickle names them (so
    # tensors can be built as views right away) and filled once the storage
    # bytes, which follow the pickle, are read.
    storages = {}  # key -> (_Storage, numel)

    def load_storage(pid):
      storage_type, key, numel, view = _storage_args(pid, path)
      if key not in storages:
        storages[key] = (_Storage(np.empty(numel, storage_type.dtype)), numel)
      root = storages[key][0]
      if view is None:
        return root
      _, offset, view_numel = view
      return _Storage(root.array[int(offset) : int(offset) + int(view_numel)])

    result = _unpickle(f, path, load_storage)
    keys = _unpickle(f, path)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
      raise TorchFileError(
          f'{path}: storage key list {keys!r} does not match the '
          f'storages referenced by the pickle ({sorted(storages)})'
      )
    total = sum(s.array.nbytes for s, _ in storages.values())
    done = 0
    for key in map(str, keys):
      storage, numel = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise TorchFileError(f'{path}: truncated before storage {key!r}')
      (count,) = struct.unpack(order + 'q', header)
      if count != numel:
        raise TorchFileError(
            f'{path}: storage {key!r} has {count} elements, the '
            f'pickle declares {numel}; corrupt file'
        )
      got = f.readinto(memoryview(storage.array.view(np.uint8)))
      if got != storage.array.nbytes:
        raise TorchFileError(
            f'{path}: truncated in storage {key!r} ({got} of ' f'{storage.array.nbytes} bytes)'
        )
      if (order == '<') != (sys.byteorder == 'little') and storage.array.itemsize > 1:
        storage.array.byteswap(inplace=True)
      done += storage.array.nbytes
      if progress:
        progress(done, total)
    if f.read(1):
      raise TorchFileError(f'{path}: unexpected bytes after the last storage')
  return result


def load(path, progress=None):
  """Loads a PyTorch `.pth`/`.bin`/`.pt` file; tensors become numpy arrays.

  Args:
    path: the file.
    progress: optional callable(bytes_done, bytes_total) called per storage.

  Returns:
    The unpickled object (usually an OrderedDict name -> np.ndarray).

  Raises:
    TorchFileError: the file is missing, truncated, corrupt or holds objects
      other than tensors and plain containers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchFileError(f'{path}: no such file')
  with open(path, 'rb') as f:
    head = f.read(4)
  if head[:4] == b'PK\x03\x04':
    return _load_zip(path, progress)
  if head[:1] == b'\x80':
    return _load_legacy(path, progress)
  raise TorchFileError(
      f'{path}: not a PyTorch checkpoint (neither a zip archive nor '
      f'a legacy pickle; starts with {head!r})'
  )
