"""Z-buffer triangle rasterizer: a vectorised NumPy default and a numba kernel.

Both return the same buffers, pixel for pixel: for every pixel the nearest
covering triangle wins, and a depth tie goes to the lower triangle index. A
pixel (x, y) is sampled at its centre (x + 0.5, y + 0.5) and is covered when
all three barycentric weights are >= 0 (so shared edges are covered by both
triangles and the depth test decides). Shading is left to the caller, which
looks the winning face up in `face_id`.
"""

import numpy as np

try:
  import numba
except ImportError:  # numba is optional: the NumPy path needs nothing.
  numba = None

HAVE_NUMBA = numba is not None
_EPS_DEN = 1e-12  # Degenerate (zero-area) triangles are skipped.


def _bboxes(tri_xy, height, width):
  """Integer pixel bounding boxes clipped to the image, and the edge denominators."""
  ax, ay = tri_xy[:, 0, 0], tri_xy[:, 0, 1]
  bx, by = tri_xy[:, 1, 0], tri_xy[:, 1, 1]
  cx, cy = tri_xy[:, 2, 0], tri_xy[:, 2, 1]
  den = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
  # Clip before the integer cast so far off-screen triangles cannot overflow;
  # they end up with x0 > x1 (or y0 > y1) and are skipped.
  x0 = np.clip(np.floor(np.minimum(np.minimum(ax, bx), cx)), 0, width)
  x1 = np.clip(np.ceil(np.maximum(np.maximum(ax, bx), cx)), -1, width - 1)
  y0 = np.clip(np.floor(np.minimum(np.minimum(ay, by), cy)), 0, height)
  y1 = np.clip(np.ceil(np.maximum(np.maximum(ay, by), cy)), -1, height - 1)
  # Non-finite or degenerate triangles are skipped (their boxes are emptied).
  bad = ~(np.abs(den) >= _EPS_DEN) | ~np.isfinite(den)
  x0, x1 = np.where(bad, 1, x0), np.where(bad, 0, x1)
  y0, y1 = np.where(bad, 1, y0), np.where(bad, 0, y1)
  return (den, x0.astype(np.int64), x1.astype(np.int64), y0.astype(np.int64), y1.astype(np.int64))


def rasterize_numpy(tri_xy, tri_z, height, width):
  """Vectorised z-buffer; see `rasterize`."""
  tri_xy = np.asarray(tri_xy, np.float64)  # [F, 3, 2]
  tri_z = np.asarray(tri_z, np.float64)  # [F, 3]
  den, x0, x1, y0, y1 = _bboxes(tri_xy, height, width)
  ok = (x0 <= x1) & (y0 <= y1)
  faces = np.nonzero(ok)[0]
  size = np.maximum(x1 - x0, y1 - y0)[faces] + 1
  # Bucket triangles by bbox side (1, 2, 4, 8, ...) so that each bucket tests a
  # dense [n, s*s] grid of candidate pixels without much waste.
  bucket = np.ceil(np.log2(size)).astype(np.int64)
  pix_all, z_all, f_all = [], [], []
  for b in np.unique(bucket):
    f = faces[bucket == b]
    s = 1 << int(b)
    dy, dx = np.divmod(np.arange(s * s), s)  # [s*s]
    px_i = x0[f, None] + dx[None]  # [n, s*s]
    py_i = y0[f, None] + dy[None]
    inb = (px_i <= x1[f, None]) & (py_i <= y1[f, None])
    px = px_i + 0.5
    py = py_i + 0.5
    t = tri_xy[f]
    ax, ay = t[:, 0, 0, None], t[:, 0, 1, None]
    bx, by = t[:, 1, 0, None], t[:, 1, 1, None]
    cx, cy = t[:, 2, 0, None], t[:, 2, 1, None]
    d = den[f, None]
    # Same expressions, in the same order, as the numba kernel: bit-identical.
    w0 = ((by - cy) * (px - cx) + (cx - bx) * (py - cy)) / d
    w1 = ((cy - ay) * (px - cx) + (ax - cx) * (py - cy)) / d
    w2 = 1.0 - w0 - w1
    inside = inb & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    tz = tri_z[f]
    z = w0 * tz[:, 0, None] + w1 * tz[:, 1, None] + w2 * tz[:, 2, None]
    rows, cols = np.nonzero(inside)
    pix_all.append(py_i[rows, cols] * width + px_i[rows, cols])
    z_all.append(z[rows, cols])
    f_all.append(f[rows])
  depth = np.full(height * width, np.inf)
  face_id = np.full(height * width, np.iinfo(np.int32).max, np.int64)
  if pix_all:
    pix = np.concatenate(pix_all)
    z = np.concatenate(z_all)
    f = np.concatenate(f_all)
    np.minimum.at(depth, pix, z)
    # Among the candidates at the minimum depth, the lowest face index wins.
    win = z == depth[pix]
    np.minimum.at(face_id, pix[win], f[win])
  face_id[np.isinf(depth)] = -1
  return depth.reshape(height, width), face_id.astype(np.int32).reshape(height, width)


if HAVE_NUMBA:

  @numba.njit(cache=True, nogil=True)
  def _raster_kernel(tri_xy, tri_z, den, x0, x1, y0, y1, depth, face_id):
    for f in range(tri_xy.shape[0]):
      if x0[f] > x1[f] or y0[f] > y1[f]:
        continue
      ax, ay = tri_xy[f, 0, 0], tri_xy[f, 0, 1]
      bx, by = tri_xy[f, 1, 0], tri_xy[f, 1, 1]
      cx, cy = tri_xy[f, 2, 0], tri_xy[f, 2, 1]
      d = den[f]
      for yi in range(y0[f], y1[f] + 1):
        py = yi + 0.5
        for xi in range(x0[f], x1[f] + 1):
          px = xi + 0.5
          w0 = ((by - cy) * (px - cx) + (cx - bx) * (py - cy)) / d
          w1 = ((cy - ay) * (px - cx) + (ax - cx) * (py - cy)) / d
          w2 = 1.0 - w0 - w1
          if w0 < 0 or w1 < 0 or w2 < 0:
            continue
          z = w0 * tri_z[f, 0] + w1 * tri_z[f, 1] + w2 * tri_z[f, 2]
          # Strict < with ascending f: a depth tie keeps the lower index.
          if z < depth[yi, xi]:
            depth[yi, xi] = z
            face_id[yi, xi] = f


def rasterize_numba(tri_xy, tri_z, height, width):
  """numba z-buffer; see `rasterize`. Raises ImportError without numba."""
  if not HAVE_NUMBA:
    raise ImportError('rasterize_numba needs numba, which is not installed.')
  tri_xy = np.ascontiguousarray(tri_xy, np.float64)
  tri_z = np.ascontiguousarray(tri_z, np.float64)
  den, x0, x1, y0, y1 = _bboxes(tri_xy, height, width)
  depth = np.full((height, width), np.inf)
  face_id = np.full((height, width), -1, np.int32)
  _raster_kernel(tri_xy, tri_z, den, x0, x1, y0, y1, depth, face_id)
  return depth, face_id


def rasterize(tri_xy, tri_z, height, width, backend='auto'):
  """Rasterizes triangles into depth and face-id buffers.

  Args:
    tri_xy: [F, 3, 2] vertex positions in pixels (x right, y down); pixel (x, y)
      covers [x, x+1) x [y, y+1).
    tri_z: [F, 3] vertex depths (smaller = nearer), interpolated linearly in
      screen space.
    height, width: image size in pixels.
    backend: 'numba', 'numpy', or 'auto' (numba when importable).

  Returns:
    depth [H, W] float64 (inf where empty) and face_id [H, W] int32 (index into
    the F triangles, -1 where empty).
  """
  if backend == 'auto':
    backend = 'numba' if HAVE_NUMBA else 'numpy'
  if backend == 'numba':
    return rasterize_numba(tri_xy, tri_z, height, width)
  if backend == 'numpy':
    return rasterize_numpy(tri_xy, tri_z, height, width)
  raise ValueError(f"Unknown rasterizer backend {backend!r}; expected 'auto', 'numba' or 'numpy'.")
