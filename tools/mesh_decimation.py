"""Generic triangle-mesh geometry for the offline body- and hand-asset builds.

Used by tools/build_body_assets.py and tools/build_hand_assets.py (NumPy and
SciPy only, float64):

  largest_component      vertex ids of the largest edge-connected component
  component_containing   faces of the component that holds a given vertex
  boundary_loop          the ordered boundary of a disc-like surface
  cap_hole               closes that boundary with a fan around a new vertex
  decimate               subset quadric edge collapse to an exact vertex count
  check_closed_manifold  closed, consistently oriented, genus-0 check
  closest_points         closest point on a mesh (face id, barycentrics)
  upsample_weights       GraphCMR-style barycentric up-sampling matrix U

Decimation is Garland-Heckbert quadric error with half-edge collapse onto an
existing vertex (as COMA / qslim), so kept vertices keep their positions and
the coarse level is a subset of the fine one.
"""

import heapq

import numpy as np

# ----------------------------------------------------------------------------
# Connectivity.


def _component_labels(tris, num_vertices):
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components

  e = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
  graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(num_vertices, num_vertices))
  return connected_components(graph, directed=False)[1]


def largest_component(tris, num_vertices):
  """Vertex ids (sorted) of the largest edge-connected component."""
  labels = _component_labels(tris, num_vertices)
  used = np.unique(tris)
  best = np.bincount(labels[used]).argmax()
  return used[labels[used] == best]


def component_containing(tris, num_vertices, vertex):
  """Faces [F', 3] of the edge-connected component that holds `vertex`."""
  labels = _component_labels(tris, num_vertices)
  if vertex not in tris:
    raise RuntimeError(f'vertex {vertex} is in no face')
  return tris[labels[tris[:, 0]] == labels[vertex]]


def boundary_loop(tris):
  """Vertex ids of the single boundary loop of a surface, in edge order.

  The loop follows the faces' own orientation: each (loop[i], loop[i + 1]) is
  a directed edge of some face. Raises unless the boundary is one simple loop.
  """
  f = np.asarray(tris, np.int64)
  directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
  present = set(map(tuple, directed.tolist()))
  border = sorted((a, b) for a, b in present if (b, a) not in present)
  following = dict(border)
  if not border or len(following) != len(border):
    raise RuntimeError(f'expected one simple boundary loop; {len(border)} boundary edges')
  loop = [border[0][0]]
  while following[loop[-1]] != loop[0]:
    loop.append(following[loop[-1]])
    if len(loop) > len(border):
      raise RuntimeError('boundary edges do not form a loop')
  if len(loop) != len(border):
    raise RuntimeError(f'{len(border)} boundary edges form more than one loop')
  return np.asarray(loop, np.int64)


def cap_hole(loop, center):
  """Faces closing `loop` (from `boundary_loop`) with a fan around vertex id
  `center`; each cap face runs its boundary edge backwards, so the closed
  surface keeps a consistent orientation. Returns [len(loop), 3]."""
  loop = np.asarray(loop, np.int64)
  return np.stack([np.roll(loop, -1), loop, np.full(len(loop), center)], 1)


# ----------------------------------------------------------------------------
# Subset quadric edge collapse (Garland-Heckbert quadrics, half-edge collapse
# onto an existing vertex, as COMA/qslim), closed-manifold preserving.


def decimate(verts, faces, target):
  """Keeps exactly `target` of `verts` (positions unchanged).

  Returns (kept vertex ids, sorted [target]; faces [F', 3] indexing them).
  The link condition (two common neighbours, degrees > 3) keeps a closed
  2-manifold closed and manifold; collapses that flip a face are skipped.
  """
  verts = np.asarray(verts, np.float64)
  faces = np.asarray(faces, np.int64).copy()
  nv = len(verts)
  p0, p1, p2 = (verts[faces[:, i]] for i in range(3))
  normal = np.cross(p1 - p0, p2 - p0)
  area = np.linalg.norm(normal, axis=1, keepdims=True)
  normal /= np.maximum(area, 1e-20)
  plane = np.concatenate([normal, -(normal * p0).sum(1, keepdims=True)], 1)
  quad = np.zeros((nv, 4, 4))
  for i in range(3):
    np.add.at(quad, faces[:, i], plane[:, :, None] * plane[:, None, :] * area[:, :, None])
  homog = np.concatenate([verts, np.ones((nv, 1))], 1)
  vfaces = [set() for _ in range(nv)]
  nbrs = [set() for _ in range(nv)]
  for fi, f in enumerate(faces):
    for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])):
      vfaces[a].add(fi)
      nbrs[a].add(b)
      nbrs[b].add(a)
  alive_v = np.ones(nv, bool)
  alive_f = np.ones(len(faces), bool)
  stamp = np.zeros(nv, np.int64)
  heap = []

  def push(a, b):  # cheaper direction: remove u, keep v
    ca = float(homog[b] @ (quad[a] + quad[b]) @ homog[b])  # a -> b
    cb = float(homog[a] @ (quad[a] + quad[b]) @ homog[a])  # b -> a
    u, v, c = (a, b, ca) if ca <= cb else (b, a, cb)
    heapq.heappush(heap, (c, u, v, stamp[u], stamp[v]))

  for a in range(nv):
    for b in nbrs[a]:
      if a < b:
        push(a, b)
  num_alive = nv
  while num_alive > target:
    if not heap:
      raise RuntimeError(f'decimation stuck at {num_alive} > {target} vertices')
    _, u, v, su, sv = heapq.heappop(heap)
    if not (alive_v[u] and alive_v[v]) or su != stamp[u] or sv != stamp[v]:
      continue
    if v not in nbrs[u] or len(nbrs[u] & nbrs[v]) != 2 or len(nbrs[u]) <= 3 or len(nbrs[v]) <= 3:
      continue
    if _flips(verts, faces, vfaces[u], u, v):
      continue
    for fi in list(vfaces[u]):
      f = faces[fi]
      if v in f:
        alive_f[fi] = False
        for w in f:
          vfaces[w].discard(fi)
      else:
        faces[fi] = np.where(f == u, v, f)
        vfaces[v].add(fi)
    vfaces[u] = set()
    for w in nbrs[u]:
      nbrs[w].discard(u)
      if w != v:
        nbrs[w].add(v)
        nbrs[v].add(w)
    nbrs[v].discard(u)
    nbrs[u] = set()
    quad[v] += quad[u]
    alive_v[u] = False
    num_alive -= 1
    stamp[v] += 1
    for w in nbrs[v]:
      push(v, w)
  keep = np.nonzero(alive_v)[0]
  remap = -np.ones(nv, np.int64)
  remap[keep] = np.arange(len(keep))
  return keep, remap[faces[alive_f]].astype(np.int32)


def _flips(verts, faces, face_ids, u, v):
  """Whether moving u onto v turns any surviving face of u upside down."""
  for fi in face_ids:
    f = faces[fi]
    if v in f:
      continue
    g = np.where(f == u, v, f)
    before = np.cross(verts[f[1]] - verts[f[0]], verts[f[2]] - verts[f[0]])
    after = np.cross(verts[g[1]] - verts[g[0]], verts[g[2]] - verts[g[0]])
    if before @ after <= 0:
      return True
  return False


def check_closed_manifold(faces, num_vertices):
  """Every edge in exactly two faces, consistently oriented; Euler char 2."""
  f = np.asarray(faces, np.int64)
  directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
  if len(np.unique(directed, axis=0)) != len(directed):
    raise RuntimeError('a directed edge appears twice (non-manifold or flipped)')
  undirected = np.unique(np.sort(directed, 1), axis=0)
  if 2 * len(undirected) != len(directed):
    raise RuntimeError('mesh is not closed: some edge has one face')
  used = len(np.unique(f))
  euler = used - len(undirected) + len(f)
  if used != num_vertices or euler != 2:
    raise RuntimeError(f'{used}/{num_vertices} vertices used, Euler char {euler}')


def closest_points(points, verts, faces, k=16):
  """Closest point on a triangle mesh: (face id [N], barycentrics [N, 3]).

  Candidates: the k triangles with the nearest centroids; exact point-triangle
  distance (Ericson, Real-Time Collision Detection 5.1.5), vectorised.
  """
  from scipy.spatial import cKDTree

  tri = verts[faces]  # [F, 3, 3]
  _, cand = cKDTree(tri.mean(1)).query(points, k=min(k, len(faces)))
  a, b, c = (tri[cand, i] for i in range(3))  # [N, k, 3]
  p = points[:, None]
  bary = _closest_barycentric(p, a, b, c)  # [N, k, 3]
  closest = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
  best = np.argmin(((closest - p) ** 2).sum(-1), 1)
  rows = np.arange(len(points))
  return cand[rows, best], bary[rows, best]


def _closest_barycentric(p, a, b, c):
  """Barycentrics of the closest point to p on triangle abc (broadcasting)."""
  dot = lambda x, y: (x * y).sum(-1)
  ab, ac, ap = b - a, c - a, p - a
  d1, d2 = dot(ab, ap), dot(ac, ap)
  bp = p - b
  d3, d4 = dot(ab, bp), dot(ac, bp)
  cp = p - c
  d5, d6 = dot(ab, cp), dot(ac, cp)
  va = d3 * d6 - d5 * d4
  vb = d5 * d2 - d1 * d6
  vc = d1 * d4 - d3 * d2
  safe = lambda x: np.where(np.abs(x) > 1e-30, x, 1e-30)
  denom = safe(va + vb + vc)
  # Interior by default, then overwrite with edge/vertex regions (Ericson's
  # early-outs applied in reverse priority order).
  v, w = vb / denom, vc / denom
  out = np.stack([1 - v - w, v, w], -1)
  t_bc = (d4 - d3) / safe((d4 - d3) + (d5 - d6))  # edge bc
  bc_ = np.stack([np.zeros_like(t_bc), 1 - t_bc, t_bc], -1)
  t_ac = d2 / safe(d2 - d6)  # edge ac
  ac_ = np.stack([1 - t_ac, np.zeros_like(t_ac), t_ac], -1)
  t_ab = d1 / safe(d1 - d3)  # edge ab
  ab_ = np.stack([1 - t_ab, t_ab, np.zeros_like(t_ab)], -1)
  one = lambda i: np.broadcast_to(np.eye(3)[i], out.shape)
  cases = [  # lowest priority first; later ones win
      ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), bc_),
      ((vb <= 0) & (d2 >= 0) & (d6 <= 0), ac_),
      ((d6 >= 0) & (d5 <= d6), one(2)),
      ((vc <= 0) & (d1 >= 0) & (d3 <= 0), ab_),
      ((d3 >= 0) & (d4 <= d3), one(1)),
      ((d1 <= 0) & (d2 <= 0), one(0)),
  ]
  for mask, value in cases:
    out = np.where(mask[..., None], value, out)
  return np.clip(out, 0.0, 1.0) / np.clip(out, 0.0, 1.0).sum(-1, keepdims=True)


def upsample_weights(fine, coarse, coarse_faces):
  """GraphCMR-style U: each fine vertex as barycentrics of its closest coarse
  triangle. Returns (indices [N, 3] into coarse, weights [N, 3])."""
  face, bary = closest_points(fine, coarse, coarse_faces)
  return np.asarray(coarse_faces)[face].astype(np.int32), bary
