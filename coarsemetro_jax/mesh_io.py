"""Mesh files: Wavefront OBJ and binary PLY (vertices and triangle faces).

Both round-trip float32 vertices exactly: OBJ with 9 significant digits, PLY
as raw little-endian float32. `comment` is written into the file header.
"""

import numpy as np


def write_obj(path, vertices, faces, comment=''):
  """Wavefront OBJ: `v x y z` lines (float32 exact) and 1-based `f` lines."""
  vertices, faces = np.asarray(vertices, np.float32), np.asarray(faces, np.int64)
  with open(path, 'w') as f:
    f.write(f'# {comment}\n' if comment else '')
    f.write(''.join(f'v {x:.9g} {y:.9g} {z:.9g}\n' for x, y, z in vertices.tolist()))
    f.write(''.join(f'f {a} {b} {c}\n' for a, b, c in (faces + 1).tolist()))


def read_obj(path):
  """(vertices float32 [V, 3], faces int64 [F, 3]) of a triangle OBJ."""
  vertices, faces = [], []
  with open(path) as f:
    for line in f:
      parts = line.split()
      if parts and parts[0] == 'v':
        vertices.append([float(p) for p in parts[1:4]])
      elif parts and parts[0] == 'f':
        faces.append([int(p.split('/')[0]) - 1 for p in parts[1:4]])
  return np.array(vertices, np.float32), np.array(faces, np.int64)


_PLY_FACE = np.dtype([('n', 'u1'), ('i', '<i4', (3,))])


def write_ply(path, vertices, faces, comment=''):
  """Binary little-endian PLY: float x, y, z and uchar-count int vertex_indices."""
  vertices = np.ascontiguousarray(vertices, '<f4')
  face_rows = np.zeros(len(faces), _PLY_FACE)
  face_rows['n'], face_rows['i'] = 3, np.asarray(faces)
  header = (
      'ply\nformat binary_little_endian 1.0\n'
      + (f'comment {comment}\n' if comment else '')
      + f'element vertex {len(vertices)}\nproperty float x\nproperty float y\n'
      f'property float z\nelement face {len(faces)}\n'
      'property list uchar int vertex_indices\nend_header\n'
  )
  with open(path, 'wb') as f:
    f.write(header.encode('ascii'))
    f.write(vertices.tobytes())
    f.write(face_rows.tobytes())


def read_ply(path):
  """(vertices, faces) of a PLY written by `write_ply`."""
  with open(path, 'rb') as f:
    data = f.read()
  if not data.startswith(b'ply\nformat binary_little_endian 1.0\n'):
    raise ValueError(f'{path}: expected a binary little-endian PLY as write_ply writes')
  end = data.index(b'end_header\n') + len(b'end_header\n')
  counts = {
      line.split()[1]: int(line.split()[2])
      for line in data[:end].decode('ascii').splitlines()
      if line.startswith('element')
  }
  nv, nf = counts['vertex'], counts['face']
  vertices = np.frombuffer(data, '<f4', nv * 3, end).reshape(nv, 3)
  faces = np.frombuffer(data, _PLY_FACE, nf, end + nv * 12)
  if np.any(faces['n'] != 3):
    raise ValueError(f'{path}: only triangle faces are supported')
  return vertices.copy(), faces['i'].astype(np.int64)
