"""Writes PyTorch zip-serialised checkpoints without torch.

The archive mirrors what `torch.save` writes: `<root>/data.pkl` (a protocol-2
pickle in which every tensor is `torch._utils._rebuild_tensor_v2` of a
persistent-id storage), `<root>/byteorder`, one uncompressed record
`<root>/data/<key>` per tensor whose bytes start 64-byte aligned (so
`torch.load(..., mmap=True)` works) and `<root>/version`.
`torch.load(path, weights_only=True)` reads the result.

The pickle is emitted opcode by opcode: torch's globals cannot be pickled by
reference without importing torch.
"""

import io
import os
import struct
import zipfile

import numpy as np

from coarsemetro_jax.convert import torch_file

STORAGE_ALIGNMENT = 64
FORMAT_VERSION = b'3\n'  # torch's zip serialisation version


class _PickleWriter:
  """Protocol-2 pickle of nested dicts of arrays and plain values."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(b'\x80\x02')  # PROTO 2
    self.arrays = []  # storage key i -> contiguous array

  def global_(self, module, name):
    self.out.write(b'c' + module.encode() + b'\n' + name.encode() + b'\n')

  def write(self, v):
    w = self.out.write
    if isinstance(v, np.ndarray):
      self.tensor(v)
    elif isinstance(v, dict):
      self.global_('collections', 'OrderedDict')
      w(b')R')  # OrderedDict()
      if v:
        w(b'(')  # MARK
        for key, value in v.items():
          if not isinstance(key, str):
            raise TypeError(f'dict keys must be str, got {key!r}')
          self.write(key)
          self.write(value)
        w(b'u')  # SETITEMS
    elif v is None:
      w(b'N')
    elif isinstance(v, (bool, np.bool_)):
      w(b'\x88' if v else b'\x89')
    elif isinstance(v, (int, np.integer)):
      v = int(v)
      if -(2**31) <= v < 2**31:
        w(b'J' + struct.pack('<i', v))  # BININT
      else:
        raw = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
        w(b'\x8a' + bytes([len(raw)]) + raw)  # LONG1
    elif isinstance(v, (float, np.floating)):
      w(b'G' + struct.pack('>d', float(v)))  # BINFLOAT
    elif isinstance(v, str):
      raw = v.encode('utf-8')
      w(b'X' + struct.pack('<I', len(raw)) + raw)  # BINUNICODE
    elif isinstance(v, tuple):
      w(b'(')
      for x in v:
        self.write(x)
      w(b't')  # TUPLE
    else:
      raise TypeError(f'cannot write a {type(v).__name__} into a PyTorch file')

  def tensor(self, array):
    """`_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`."""
    if array.dtype not in torch_file.STORAGE_NAMES:
      raise TypeError(f'no torch storage type for dtype {array.dtype}')
    if not array.flags.c_contiguous:
      array = array.copy(order='C')
    key = str(len(self.arrays))
    self.arrays.append(array)
    self.global_('torch._utils', '_rebuild_tensor_v2')
    self.out.write(b'((')  # MARK args, MARK persistent id
    self.write('storage')
    self.global_('torch', torch_file.STORAGE_NAMES[array.dtype])
    self.write(key)
    self.write('cpu')
    self.write(array.size)
    self.out.write(b'tQ')  # TUPLE, BINPERSID
    self.write(0)
    self.write(tuple(array.shape))
    strides = np.cumprod((1,) + array.shape[:0:-1])[::-1] if array.ndim else ()
    self.write(tuple(int(s) for s in strides))
    self.write(False)
    self.write({})
    self.out.write(b'tR')  # TUPLE, REDUCE

  def finish(self):
    self.out.write(b'.')  # STOP
    return self.out.getvalue()


def _aligned_record(zf, name, data):
  """A stored (uncompressed) record whose data starts 64-byte aligned."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  offset = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + extra header
  pad = -offset % STORAGE_ALIGNMENT
  info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad  # torch's padding field id
  zf.writestr(info, data)


def save(obj, path, root='archive'):
  """Writes a (nested) dict of numpy arrays as a PyTorch checkpoint.

  Strings, numbers, bools, None and tuples are allowed as other values. Every
  array gets its own little-endian storage. The file appears atomically.
  """
  writer = _PickleWriter()
  writer.write(obj)
  data_pkl = writer.finish()
  path = os.fspath(path)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
      _aligned_record(zf, f'{root}/data.pkl', data_pkl)
      _aligned_record(zf, f'{root}/byteorder', b'little')
      for key, array in enumerate(writer.arrays):
        if array.dtype.byteorder == '>':
          array = array.astype(array.dtype.newbyteorder('<'))
        _aligned_record(zf, f'{root}/data/{key}', array.tobytes())
      _aligned_record(zf, f'{root}/version', FORMAT_VERSION)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
