"""Tests for the torch-free PyTorch file reader/writer (convert/torch_file.py)."""

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from coarsemetro_jax.convert import torch_file
from coarsemetro_jax.convert import torch_writer

# ---------------------------------------------------------------- real files


def test_fastmetro_adjacency_files(smpl_topology_dir):
  # Legacy serialisation from a 4-byte-`long` build (FastMETRO src/modeling/data).
  indices = torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_indices.pt')
  values = torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_values.pt')
  size = torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_size.pt')
  assert indices.dtype == np.int64 and indices.shape == (2, 3005)
  assert values.dtype == np.float32 and values.shape == (3005,)
  assert size == (431, 431)
  assert indices.min() == 0 and indices.max() == 430
  # Row-normalised adjacency with self-loops: each row sums to 1 and holds its
  # diagonal; 4-11 entries per row.
  row_sums = np.zeros(431)
  np.add.at(row_sums, indices[0], values)
  np.testing.assert_allclose(row_sums, 1.0, rtol=1e-6)
  assert set(zip(*indices[:, indices[0] == indices[1]])) == {(i, i) for i in range(431)}
  counts = np.bincount(indices[0], minlength=431)
  assert counts.min() == 4 and counts.max() == 11


def test_real_files_match_torch_load(smpl_topology_dir):
  torch = pytest.importorskip('torch')
  for name in ('indices', 'values', 'size'):
    path = smpl_topology_dir / f'smpl_431_adjmat_{name}.pt'
    ours = torch_file.load(path)
    ref = torch.load(path, weights_only=False)
    if name == 'size':
      assert ours == tuple(ref)
    else:
      assert ours.dtype == ref.numpy().dtype
      np.testing.assert_array_equal(ours, ref.numpy())


# ------------------------------------------------------- parity with torch.load


def _torch_dtypes(torch):
  return [
      torch.float32,
      torch.float64,
      torch.float16,
      torch.bfloat16,
      torch.int64,
      torch.int32,
      torch.int16,
      torch.int8,
      torch.uint8,
      torch.bool,
  ]


def _sample_state(torch):
  """A state dict with every dtype, views, offsets and shared storages."""
  gen = torch.Generator().manual_seed(0)
  out = collections.OrderedDict()
  for dtype in _torch_dtypes(torch):
    x = (torch.randn(3, 5, generator=gen) * 50).to(dtype)
    out[f'plain.{dtype}'] = x
  base = torch.randn(4, 6, generator=gen)
  out['base'] = base
  out['transposed'] = base.t()  # non-contiguous, shares storage
  out['strided'] = base[:, 1::2]  # strides (6, 2), offset 1
  out['row'] = base[2]  # offset 12
  out['scalar'] = torch.tensor(3.5)
  out['empty'] = torch.zeros(0, 3)
  out['conv.weight'] = torch.randn(8, 3, 3, 3, generator=gen).permute(0, 2, 3, 1)
  half = torch.randn(10, generator=gen).to(torch.bfloat16)
  out['bf16_view'] = half[3:7]
  out['param'] = torch.nn.Parameter(torch.randn(2, 2, generator=gen))
  return out


def _to_numpy(torch, t):
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.detach().numpy()


@pytest.mark.parametrize('zipfile_serialization', [True, False])
def test_matches_torch_load(tmp_path, zipfile_serialization):
  torch = pytest.importorskip('torch')
  state = _sample_state(torch)
  path = tmp_path / 'state.pth'
  torch.save(state, path, _use_new_zipfile_serialization=zipfile_serialization)
  ref = torch.load(path, weights_only=True)
  ours = torch_file.load(path)
  assert isinstance(ours, collections.OrderedDict)
  assert list(ours) == list(ref)
  for key, t in ref.items():
    expected = _to_numpy(torch, t)
    got = ours[key]
    assert got.dtype == expected.dtype, key
    assert got.shape == tuple(t.shape), key
    np.testing.assert_array_equal(
        got.view(np.uint8) if got.dtype == ml_dtypes.bfloat16 else got,
        expected.view(np.uint8) if got.dtype == ml_dtypes.bfloat16 else expected,
        err_msg=key,
    )
    if got.size > 1:
      assert got.strides == tuple(s * got.itemsize for s in t.stride()), key
  # Views share memory exactly where torch's tensors share a storage.
  for a in ('base', 'transposed', 'strided', 'row'):
    for b in ('base', 'transposed', 'strided', 'row'):
      assert np.shares_memory(ours[a], ours[b])
  assert not np.shares_memory(ours['base'], ours['param'])
  ours['base'][2, 3] = 123.0
  assert ours['row'][3] == 123.0 and ours['transposed'][3, 2] == 123.0


def test_nested_checkpoint_with_numpy_values(tmp_path):
  torch = pytest.importorskip('torch')
  obj = {
      'state_dict': {'w': torch.arange(6.0).reshape(2, 3)},
      'epoch': 7,
      'best': np.float64(0.25),
      'arr': np.arange(4, dtype=np.int16),
      'name': 'run',
      'flags': (True, None),
  }
  path = tmp_path / 'ckpt.pth'
  torch.save(obj, path)
  ours = torch_file.load(path)
  np.testing.assert_array_equal(ours['state_dict']['w'], np.arange(6.0).reshape(2, 3))
  assert ours['epoch'] == 7 and ours['best'] == 0.25 and ours['name'] == 'run'
  assert ours['flags'] == (True, None)
  np.testing.assert_array_equal(ours['arr'], np.arange(4, dtype=np.int16))


def test_new_dtypes_rebuild_v3(tmp_path):
  # uint16 and float8 are saved as untyped storages + _rebuild_tensor_v3.
  torch = pytest.importorskip('torch')
  state = {
      'u16': torch.arange(10, dtype=torch.int32).to(torch.uint16)[2:8],
      'f8': torch.linspace(-2, 2, 9).to(torch.float8_e4m3fn),
  }
  path = tmp_path / 'v3.pth'
  torch.save(state, path)
  ours = torch_file.load(path)
  np.testing.assert_array_equal(ours['u16'], np.arange(2, 8, dtype=np.uint16))
  assert ours['f8'].dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(ours['f8'].astype(np.float32), state['f8'].float().numpy())


# ------------------------------------------------------------------- writing


def _random_state():
  rng = np.random.default_rng(0)
  return collections.OrderedDict(
      [
          ('a.weight', rng.standard_normal((4, 3)).astype(np.float32)),
          ('a.bias', rng.standard_normal(4).astype(np.float32)),
          ('conv', rng.standard_normal((2, 3, 3, 3)).astype(np.float32).transpose(0, 2, 3, 1)),
          ('half', rng.standard_normal(5).astype(np.float16)),
          ('bf16', rng.standard_normal(5).astype(ml_dtypes.bfloat16)),
          ('steps', np.full((), 12, np.int64)),
          ('flags', np.array([True, False])),
          ('empty', np.zeros((0, 2), np.float32)),
      ]
  )


def test_save_round_trip_without_torch(tmp_path):
  state = _random_state()
  path = tmp_path / 'out.pth'
  torch_writer.save(state, path)
  back = torch_file.load(path)
  assert list(back) == list(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape
    assert back[key].tobytes() == value.tobytes(), key
  # Storage records are 64-byte aligned, as torch writes them (mmap loading).
  with zipfile.ZipFile(path) as zf:
    for info in zf.infolist():
      if '/data/' in info.filename:
        header_end = info.header_offset + 30 + len(info.filename) + len(info.extra)
        assert header_end % 64 == 0, info.filename


def test_save_is_readable_by_torch(tmp_path):
  torch = pytest.importorskip('torch')
  state = _random_state()
  path = tmp_path / 'out.pth'
  torch_writer.save({'model': state, 'epoch': 3, 'note': 'x'}, path)
  ref = torch.load(path, weights_only=True)
  assert ref['epoch'] == 3 and ref['note'] == 'x'
  for key, value in state.items():
    got = _to_numpy(torch, ref['model'][key])
    assert got.dtype == value.dtype and got.shape == value.shape, key
    assert got.tobytes() == value.tobytes(), key
  mm = torch.load(path, weights_only=True, mmap=True)
  np.testing.assert_array_equal(mm['model']['a.weight'].numpy(), state['a.weight'])


# -------------------------------------------------------------------- errors


def test_truncated_zip_names_file(tmp_path):
  path = tmp_path / 'model.pth'
  torch_writer.save(_random_state(), path)
  data = path.read_bytes()
  bad = tmp_path / 'cut.pth'
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_file.TorchFileError, match='cut.pth'):
    torch_file.load(bad)


def test_corrupt_zip_storage(tmp_path):
  path = tmp_path / 'model.pth'
  torch_writer.save(_random_state(), path)
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo('archive/data/0')
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  data[start + 3] ^= 0xFF  # flips bits inside a storage: CRC mismatch
  bad = tmp_path / 'flipped.pth'
  bad.write_bytes(bytes(data))
  with pytest.raises(torch_file.TorchFileError, match=r'flipped.pth.*corrupt'):
    torch_file.load(bad)


def test_truncated_legacy(smpl_topology_dir, tmp_path):
  data = (smpl_topology_dir / 'smpl_431_adjmat_indices.pt').read_bytes()
  for cut, pattern in (
      (len(data) - 100, 'truncated in storage'),
      (340, 'truncated'),
      (200, 'corrupt or truncated pickle'),
  ):
    bad = tmp_path / f'cut{cut}.pt'
    bad.write_bytes(data[:cut])
    with pytest.raises(torch_file.TorchFileError, match=f'cut{cut}.pt.*{pattern}'):
      torch_file.load(bad)
  extra = tmp_path / 'extra.pt'
  extra.write_bytes(data + b'\0')
  with pytest.raises(torch_file.TorchFileError, match='unexpected bytes'):
    torch_file.load(extra)


def test_legacy_count_header_must_match(smpl_topology_dir, tmp_path):
  data = bytearray((smpl_topology_dir / 'smpl_431_adjmat_values.pt').read_bytes())
  header = len(data) - 8 - 3005 * 4
  assert struct.unpack('<q', data[header : header + 8]) == (3005,)
  data[header : header + 8] = struct.pack('<q', 3004)
  bad = tmp_path / 'count.pt'
  bad.write_bytes(bytes(data))
  with pytest.raises(torch_file.TorchFileError, match='3004 elements'):
    torch_file.load(bad)


class _Evil:

  def __reduce__(self):
    return (print, ('executed',))


def test_refuses_arbitrary_globals(tmp_path, capsys):
  # A legacy-format file whose main pickle calls builtins.print.
  buf = io.BytesIO()
  for header in (
      torch_file.LEGACY_MAGIC,
      torch_file.LEGACY_PROTOCOL,
      {
          'protocol_version': 1001,
          'little_endian': True,
          'type_sizes': {'short': 2, 'int': 4, 'long': 8},
      },
  ):
    pickle.dump(header, buf, protocol=2)
  pickle.dump({'w': _Evil()}, buf, protocol=2)
  path = tmp_path / 'evil.pt'
  path.write_bytes(buf.getvalue())
  with pytest.raises(torch_file.TorchFileError, match=r'evil.pt.*builtins.print'):
    torch_file.load(path)
  assert 'executed' not in capsys.readouterr().out


def test_refuses_pickled_module(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'model.pth'
  torch.save(torch.nn.Linear(2, 3), path)
  with pytest.raises(torch_file.TorchFileError, match=r'torch.nn.modules.linear.Linear'):
    torch_file.load(path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('hello')
  with pytest.raises(torch_file.TorchFileError, match='notes.txt.*not a PyTorch'):
    torch_file.load(path)
  with pytest.raises(torch_file.TorchFileError, match='no such file'):
    torch_file.load(tmp_path / 'missing.pth')


def test_fastmetro_mask_equals_topology_mask(smpl_topology_dir):
  # FastMETRO builds its decoder mask from these files (True = blocked); the
  # Flax models build it from the mesh hierarchy (True = attend). Same mask.
  from coarsemetro_jax import mesh_topology

  indices = torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_indices.pt')
  values = torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_values.pt')
  adjacency = np.zeros(torch_file.load(smpl_topology_dir / 'smpl_431_adjmat_size.pt'), np.float32)
  adjacency[indices[0], indices[1]] = values
  blocked = np.zeros((445, 445), bool)
  blocked[14:, 14:] = adjacency == 0
  topology = mesh_topology.load_topology(str(smpl_topology_dir / 'mesh_downsampling.npz'))
  np.testing.assert_array_equal(topology.decoder_attention_mask(14), ~blocked)


def test_read_adjmat_returns_the_three_files(tmp_path):
  # FastMETRO's layout: COO indices [2, N], values [N] and the size, one file each.
  from coarsemetro_jax import mesh_topology
  from coarsemetro_jax.convert import adjacency

  indices = np.array([[0, 0, 1, 2], [0, 1, 1, 2]], np.int64)
  values = np.array([0.5, 0.5, 1.0, 1.0], np.float32)
  torch_writer.save(indices, tmp_path / 'adj_indices.pt')
  torch_writer.save(values, tmp_path / 'adj_values.pt')
  torch_writer.save((3, 3), tmp_path / 'adj_size.pt')
  got_indices, got_values, size = adjacency.read_adjmat(str(tmp_path / 'adj'))
  np.testing.assert_array_equal(got_indices, indices)
  np.testing.assert_array_equal(got_values, values)
  assert size == (3, 3)
  (tmp_path / 'adj_values.pt').unlink()
  with pytest.raises(mesh_topology.TopologyError, match='adj_values.pt'):
    adjacency.read_adjmat(str(tmp_path / 'adj'))
