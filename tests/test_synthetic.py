"""Tests of the synthetic dataset: rasterizer, pose sampler, renderer, labels, files."""

import base64
import json
import sys
import types

import cv2
import numpy as np
import pytest

from coarsemetro_jax import joints
from coarsemetro_jax import rasterizer
from data_pipelines import metro_tsv
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import generate
from data_pipelines.synthetic import pose_sampler as ps
from data_pipelines.synthetic import render

BACKENDS = ['numpy'] + (['numba'] if rasterizer.HAVE_NUMBA else [])


@pytest.fixture(scope='module')
def body():
  from coarsemetro_jax import body_model

  return body_model.load_body_model('')


@pytest.fixture(scope='module')
def arrays(body):
  return body_np.from_body_model(body)


@pytest.fixture(scope='module')
def assets(arrays):
  return render.make_assets(arrays)


@pytest.fixture(scope='module')
def rest_joints(arrays):
  return arrays.rest_joints(np.zeros(arrays.shapedirs.shape[-1]))


# ----------------------------------------------------------------- rasterizer


@pytest.mark.parametrize('backend', BACKENDS)
def test_rasterize_hand_checked_triangle(backend):
  # Pixel (x, y) is sampled at (x + .5, y + .5): inside iff x >= 1, y >= 1 and
  # (x + .5) + (y + .5) <= 7 (the hypotenuse x + y = 7).
  tri = np.array([[[1.0, 1.0], [6.0, 1.0], [1.0, 6.0]]])
  depth, fid = rasterizer.rasterize(tri, np.array([[1.0, 2.0, 3.0]]), 8, 8, backend)
  yy, xx = np.mgrid[0:8, 0:8]
  expected = (xx >= 1) & (yy >= 1) & (xx + yy <= 6)
  assert expected.sum() == 15
  np.testing.assert_array_equal(fid >= 0, expected)
  assert np.all(fid[expected] == 0) and np.all(np.isinf(depth[~expected]))
  # At (1.5, 1.5) the weights are (0.8, 0.1, 0.1): z = 0.8 + 0.2 + 0.3.
  assert depth[1, 1] == pytest.approx(1.3)
  # At (1.5, 4.5): weights (0.2, 0.1, 0.7).
  assert depth[4, 1] == pytest.approx(0.2 * 1 + 0.1 * 2 + 0.7 * 3)


@pytest.mark.parametrize('backend', BACKENDS)
def test_rasterize_depth_test_and_ties(backend):
  square = np.array([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], [[4.0, 0.0], [4.0, 4.0], [0.0, 4.0]]])
  tris = np.concatenate([square, square, square])  # faces 0-1 far, 2-3 near, 4-5 near (tie)
  z = np.repeat([[5.0], [2.0], [2.0]], 2, axis=0) * np.ones((6, 3))
  depth, fid = rasterizer.rasterize(tris, z, 4, 4, backend)
  assert np.all(depth == 2.0)
  # Near faces win over far ones; the tie between 2/3 and 4/5 goes to the lower index.
  assert set(np.unique(fid)) == {2, 3}


def _sphere_mesh(n_lat=24, n_lon=48):
  lat = np.linspace(0, np.pi, n_lat + 1)
  lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
  v = np.stack(
      [
          np.sin(lat)[:, None] * np.cos(lon),
          np.cos(lat)[:, None] * np.ones_like(lon),
          np.sin(lat)[:, None] * np.sin(lon),
      ],
      -1,
  ).reshape(-1, 3)
  f = []
  for i in range(n_lat):
    for j in range(n_lon):
      a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
      f += [(a, a + n_lon, b), (b, a + n_lon, b + n_lon)]
  return v, np.array(f)


@pytest.mark.skipif(not rasterizer.HAVE_NUMBA, reason='numba not installed')
def test_rasterize_numpy_equals_numba():
  rng = np.random.default_rng(0)
  v, f = _sphere_mesh()
  # Two overlapping spheres (all faces, no culling), partly off-screen.
  verts = np.concatenate([v * 30 + [40, 30, 100], v * 25 + [60, 45, 90]])
  faces = np.concatenate([f, f + len(v)])
  soup = rng.uniform(-10, 90, (300, 1, 2)) + rng.normal(0, 6, (300, 3, 2))
  soup_z = rng.uniform(60, 140, (300, 3))
  tri_xy = np.concatenate([verts[faces][:, :, :2], soup, soup[:50]])  # with exact ties
  tri_z = np.concatenate([verts[faces][:, :, 2], soup_z, soup_z[:50]])
  tri_xy[7] = np.nan  # a broken triangle is skipped by both
  d_np, f_np = rasterizer.rasterize_numpy(tri_xy, tri_z, 72, 96)
  d_nb, f_nb = rasterizer.rasterize_numba(tri_xy, tri_z, 72, 96)
  assert (f_np >= 0).sum() > 3000
  np.testing.assert_array_equal(f_np, f_nb)
  np.testing.assert_array_equal(d_np, d_nb)


# --------------------------------------------------------------- pose sampler


def test_pose_sampler_anatomical_signs(rest_joints):
  frames = ps.joint_frames(rest_joints)
  rest_flex = ps.rest_flexion(rest_joints, frames)
  rest_pos, _ = body_np.forward_kinematics(rest_joints, np.tile(np.eye(3), (24, 1, 1)))

  def posed(joint, euler=None, rot=None):
    rots = np.tile(np.eye(3), (24, 1, 1))
    left = ps.RIGHT_TO_LEFT.get(joint, joint)
    r = ps.local_to_rotmat(frames[left], euler, rest_flex[left]) if rot is None else rot
    rots[joint] = ps.MIRROR @ r @ ps.MIRROR if joint != left else r
    return body_np.forward_kinematics(rest_joints, rots)[0]

  def moved(joint, target, euler=None, rot=None):
    return posed(joint, euler, rot)[target] - rest_pos[target]

  def bend(joint, child, flex):  # Angle between the parent bone and the bone.
    p = posed(joint, [flex, 0, 0])
    u, v = p[joint] - p[body_np.PARENTS[joint]], p[child] - p[joint]
    return np.rad2deg(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))

  for side, (hip, knee, ankle, elbow, wrist) in ((1, (1, 4, 7, 18, 20)), (-1, (2, 5, 8, 19, 21))):
    assert moved(hip, knee, [-60, 0, 0])[2] > 0.2  # hip flexion: thigh forward (+Z)
    assert side * moved(hip, knee, [0, 0, -30])[0] > 0.1  # abduction: knee outwards
    # Hinge flexion is the angle from the straight limb, whatever the rest bend.
    for joint, child in ((knee, ankle), (elbow, wrist)):
      for flex in (0, 45, 90, 140):
        assert abs(bend(joint, child, flex) - flex) < 3.0, (joint, flex)
    # Knee flexion: shank backwards; elbow flexion: forearm forwards.
    assert moved(knee, ankle, [90, 0, 0])[2] - moved(knee, ankle, [0, 0, 0])[2] < -0.2
    assert moved(elbow, wrist, [90, 0, 0])[2] - moved(elbow, wrist, [0, 0, 0])[2] > 0.1
  assert moved(3, 12, [30, 0, 0])[2] > 0.1  # spine flexion: bends forward
  up = moved(16, 18, rot=ps.shoulder_rotmat(rest_joints, 170, 0, 0)) + rest_pos[18] - rest_pos[16]
  assert up[1] > 0.2  # elevation 170: arm overhead


def test_pose_sampler_limits_and_determinism(rest_joints):
  rng = np.random.default_rng(1)
  frames = ps.joint_frames(rest_joints)
  rest_flex = ps.rest_flexion(rest_joints, frames)
  poses = np.stack([ps.sample_pose(rng, rest_joints) for _ in range(150)])
  again = np.stack([ps.sample_pose(np.random.default_rng(1), rest_joints) for _ in range(1)])
  np.testing.assert_array_equal(poses[:1], again)
  assert not np.allclose(poses[0], poses[1])
  rots = body_np.rotvec_to_matrix(poses.reshape(-1, 24, 3))
  for j in range(1, 24):
    left = ps.RIGHT_TO_LEFT.get(j, j)
    r = ps.MIRROR @ rots[:, j] @ ps.MIRROR if j != left else rots[:, j]  # to the left twin
    if left == 16:
      bone = rest_joints[18] - rest_joints[16]
      for d in r @ (bone / np.linalg.norm(bone)):
        elev, azim = ps.direction_to_shoulder(d)
        assert ps.SHOULDER_ELEV[0] - 1e-6 <= elev <= ps.SHOULDER_ELEV[1] + 1e-6
        assert ps.SHOULDER_AZIM[0] - 1e-6 <= azim <= ps.SHOULDER_AZIM[1] + 1e-6 or elev < 1.0
        assert azim >= -1e-6 or elev <= ps.SHOULDER_BACK_MAX_ELEV + 1e-6
      continue
    euler = np.stack([ps.rotmat_to_local(frames[left], m, rest_flex[left]) for m in r])  # [N, 3]
    lims = np.array(ps.LIMITS_DEG[left])  # [3, (lo, hi, mean)]
    assert np.all(euler >= lims[:, 0] - 1e-6), (j, euler.min(0))
    assert np.all(euler <= lims[:, 1] + 1e-6), (j, euler.max(0))
  # Knees and hips use a good part of their range.
  knee = np.stack([ps.rotmat_to_local(frames[4], m, rest_flex[4])[0] for m in rots[:, 4]])
  assert knee.max() > 90 and np.median(knee) < 45
  # Upright people: the trunk's up axis stays within PITCH_MAX + bends of vertical.
  up = rots[:, 0] @ np.array([0.0, 1.0, 0.0])
  assert np.all(up[:, 1] > 0) and np.mean(up[:, 1] > np.cos(np.deg2rad(30))) > 0.75
  # Yaw leans frontal (N(0, YAW_STD), |yaw| <= YAW_MAX) and reaches side views;
  # pitch and roll tilt the facing axis by a few degrees more.
  facing = rots[:, 0] @ np.array([0.0, 0.0, 1.0])
  yaw = np.degrees(np.arctan2(facing[:, 0], facing[:, 2]))
  assert np.all(np.abs(yaw) <= ps.YAW_MAX + 10.0)
  assert yaw.min() < -60 and yaw.max() > 60
  assert 0.7 * ps.YAW_STD < yaw.std() < 1.3 * ps.YAW_STD


def test_penetration_test(rest_joints):
  rots = np.tile(np.eye(3), (24, 1, 1))
  assert not ps.penetrates(body_np.matrix_to_rotvec(rots).reshape(72), rest_joints)
  # Left arm pointing horizontally through the chest.
  rots[16] = ps.shoulder_rotmat(rest_joints, 90, 180, 0)
  assert ps.penetrates(body_np.matrix_to_rotvec(rots).reshape(72), rest_joints)
  rng = np.random.default_rng(3)
  for _ in range(40):
    assert not ps.penetrates(ps.sample_pose(rng, rest_joints, max_tries=1000), rest_joints)


# ------------------------------------------------------------ body and render


def _fit_weak_perspective(points, target):
  """Least-squares (s, tx, ty) with s * (points[:, :2] + t) = target."""
  n = len(points)
  a = np.zeros((2 * n, 3))
  a[0::2, 0], a[1::2, 0] = points[:, 0], points[:, 1]
  a[0::2, 1], a[1::2, 2] = 1.0, 1.0
  sol, *_ = np.linalg.lstsq(a, target.reshape(-1), rcond=None)  # (s, s*tx, s*ty)
  return sol[0], sol[1:] / sol[0], (a @ sol).reshape(n, 2)


def test_numpy_lbs_matches_body_model(body, arrays):
  from coarsemetro_jax import body_model

  rng = np.random.default_rng(0)
  rest = arrays.rest_joints(np.zeros(10))
  poses = np.stack([render.to_camera_pose(ps.sample_pose(rng, rest)) for _ in range(2)])
  betas = np.stack([ps.sample_betas(rng) for _ in range(2)])
  verts, posed = body_model.forward(body, poses, betas)
  j24, conf = body_model.j24_joints(body, verts)
  for i in range(2):
    v_np, j_np = body_np.lbs(arrays, poses[i], betas[i])
    np.testing.assert_allclose(v_np, verts[i], atol=2e-5)
    np.testing.assert_allclose(j_np, posed[i], atol=2e-5)
    np.testing.assert_allclose(arrays.j24_regressor @ v_np, j24[i], atol=2e-5)
  np.testing.assert_array_equal(arrays.j24_conf, conf)
  # Pose correctives (a real SMPL model has them; the embedded body does not).
  posedirs = 0.01 * rng.standard_normal((207, 3 * len(arrays.v_template))).astype(np.float32)
  with_pd = body.replace(posedirs=posedirs)
  verts, _ = body_model.forward(with_pd, poses[:1], betas[:1])
  v_np, _ = body_np.lbs(body_np.from_body_model(with_pd), poses[0], betas[0])
  np.testing.assert_allclose(v_np, verts[0], atol=2e-5)
  assert np.abs(v_np - body_np.lbs(arrays, poses[0], betas[0])[0]).max() > 1e-3


def test_camera_axes_of_a_frontal_body(arrays):
  # Rest pose, no yaw: the body faces the camera (x right, y down, z forward),
  # so its right wrist is on the image's left and its nose nearer than the head.
  pose = render.to_camera_pose(np.zeros(72))
  verts, _ = body_np.lbs(arrays, pose, np.zeros(10))
  j24 = arrays.j24_regressor @ verts
  names = {n: i for i, n in enumerate(joints.J24_NAMES)}
  assert j24[names['R_Wrist'], 0] < -0.2 and j24[names['L_Wrist'], 0] > 0.2
  assert j24[names['Top_of_Head'], 1] < j24[names['Pelvis'], 1] - 0.5
  assert j24[names['R_Ankle'], 1] > j24[names['Pelvis'], 1] + 0.5
  if arrays.j24_conf[names['Nose']] > 0:
    assert j24[names['Nose'], 2] < j24[names['Head'], 2] - 0.05
  cam = render.Camera(focal=5000.0, principal=np.array([64.0, 64.0]), trans=np.array([0, 0, 50.0]))
  uv, _ = render.project(j24, cam)
  assert uv[names['R_Wrist'], 0] < 64 < uv[names['L_Wrist'], 0]
  assert uv[names['Top_of_Head'], 1] < 64 < uv[names['R_Ankle'], 1]


@pytest.fixture(scope='module')
def rendered(assets):
  return [
      render.render_example(assets, generate.example_rng(7, 'train', i), 224, 256) for i in range(6)
  ]


def test_render_label_matches_body_model_and_image(body, assets, rendered):
  from coarsemetro_jax import body_model

  on_body = total = checked = 0
  for out in rendered:
    label, face_id = out['label'], out['face_id']
    assert out['image'].shape == (224, 256, 3) and out['image'].dtype == np.uint8
    pose, betas = np.array(label['pose'])[None], np.array(label['betas'])[None]
    # The label's (pose, betas) are the rendered body in camera axes, root-free.
    verts, _ = body_model.forward(body, pose, betas)
    np.testing.assert_allclose(verts[0] + out['camera'].trans, out['vertices'], atol=1e-4)
    j24 = np.array(label['3d_joints'])
    np.testing.assert_allclose(body_model.j24_joints(body, verts)[0][0], j24[:, :3], atol=1e-4)
    # Weak perspective on METRO's crop (box 200*scale around center -> [-1, 1])
    # explains the 2D joints to within 1.5 pixels of the 224 crop (focal 5000:
    # perspective departs from it by about a pixel for the largest people).
    j2d = np.array(label['2d_joints'])
    vis = j2d[:, 2] > 0
    crop = (j2d[:, :2] - np.array(label['center'])) / (100.0 * label['scale'])
    s, _, fit = _fit_weak_perspective(j24[vis, :3], crop[vis])
    assert 0.6 < s < 2.0
    assert np.abs(fit - crop[vis]).max() * 112 < 1.5
    # Visible joints sit on the body's silhouette; surface landmarks (nose,
    # top of the head) seen edge-on may be the pixel next to it.
    x, y = np.rint(j2d[vis, :2]).astype(int).T
    silhouette = (face_id >= 0).astype(np.uint8)
    near = cv2.dilate(silhouette, np.ones((3, 3), np.uint8))
    assert np.all(near[y, x]), np.array(label['2d_joints'])[vis][near[y, x] == 0]
    on_body += silhouette[y, x].sum()
    total += vis.sum()
    fg = np.argwhere(face_id >= 0)  # The box is centred on the silhouette...
    if fg.min() > 0 and np.all(fg.max(0) < np.array(face_id.shape) - 1):  # ...unless cut.
      box_centre = 0.5 * (fg.min(0) + fg.max(0))[::-1]
      np.testing.assert_allclose(box_centre, label['center'], atol=1.0)
      checked += 1
  available = (assets.body.j24_conf > 0).sum()
  assert total > 0.8 * available * len(rendered) and on_body / total > 0.9
  assert checked >= len(rendered) // 2


@pytest.mark.skipif(not rasterizer.HAVE_NUMBA, reason='numba not installed')
def test_render_is_backend_independent(assets, rendered):
  out = render.render_example(assets, generate.example_rng(7, 'train', 0), 224, 256, 'numpy')
  np.testing.assert_array_equal(out['face_id'], rendered[0]['face_id'])
  np.testing.assert_array_equal(out['image'], rendered[0]['image'])


def test_write_split_round_trip(assets, tmp_path):
  yaml_path, kept = generate.generate_split(
      assets, tmp_path, 'test', 3, seed=5, image_size=96, progress=False, keep_first=3
  )
  ds = metro_tsv.MetroDataset(yaml_path)
  assert len(ds) == 3
  with open(tmp_path / 'test.img.tsv', 'rb') as f:
    data = f.read()
  offsets = [int(x) for x in (tmp_path / 'test.img.lineidx').read_text().split()]
  assert offsets[0] == 0 and all(data[o - 1 : o] == b'\n' for o in offsets[1:])
  for i, ex in enumerate(kept):
    row = ds.read(i)
    assert row['key'] == ex['key'] == f'synthetic_test_{i:08d}'
    assert row['jpeg'] == ex['jpeg']
    assert data[offsets[i] :].split(b'\t', 1)[1].split(b'\n', 1)[0] == base64.b64encode(ex['jpeg'])
    img = cv2.imdecode(np.frombuffer(row['jpeg'], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (96, 96, 3)
    label = row['label']
    np.testing.assert_allclose(label['joints_2d'], ex['label']['2d_joints'], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(label['pose'], ex['label']['pose'], atol=1e-6)
    assert label['has_smpl'] == label['has_2d_joints'] == label['has_3d_joints'] == 1
  hw = (tmp_path / 'test.hw.tsv').read_text().splitlines()[0].split('\t')
  assert json.loads(hw[1]) == [{'height': 96, 'width': 96}]


def test_input_pipeline_reads_generated_split(assets, tmp_path):
  from configs import r50
  from data_pipelines import input_pipeline

  yaml_path, kept = generate.generate_split(
      assets, tmp_path, 'test', 3, seed=2, image_size=128, progress=False, keep_first=3
  )
  data = r50.get_config().data
  data.train_yaml = data.eval_yaml = yaml_path
  data.image_size, data.eval_batch_size, data.num_parallel_calls = 64, 4, 1
  data.crop = 'continuous'  # the synthetic data's convention (configs/embedded.py)
  batches = list(input_pipeline.create_eval_dataset(data).as_numpy_iterator())
  assert len(batches) == 1
  b = batches[0]
  np.testing.assert_array_equal(b['mask'], [1, 1, 1, 0])
  assert b['image'].shape == (4, 64, 64, 3) and np.all(np.isfinite(b['image']))
  for i, ex in enumerate(kept):
    label = ex['label']
    j2d, j3d = np.array(label['2d_joints']), np.array(label['3d_joints'])
    # Eval crop: the box of side 200 * scale around center spans [-1, 1].
    expected = (j2d[:, :2] - label['center']) / (100.0 * label['scale'])
    np.testing.assert_allclose(b['joints_2d'][i, :, :2], expected, atol=1e-4)
    np.testing.assert_array_equal(b['joints_2d'][i, :, 2], j2d[:, 2])
    root_free = j3d[:, :3] - j3d[14, :3]  # J24 pelvis
    np.testing.assert_allclose(b['joints_3d'][i, :, :3], root_free, atol=1e-5)
    np.testing.assert_allclose(b['pose'][i], label['pose'], atol=1e-6)
    np.testing.assert_allclose(b['betas'][i], label['betas'], atol=1e-6)
    assert b['has_smpl'][i] == b['has_3d_joints'][i] == b['has_2d_joints'][i] == 1
    # The model's weak-perspective camera s * (X + t) explains the batch's
    # normalised 2D joints from the batch's 3D joints (within a crop pixel).
    vis = b['joints_2d'][i, :, 2] > 0
    _, _, fit = _fit_weak_perspective(b['joints_3d'][i, vis, :3], b['joints_2d'][i, vis, :2])
    assert np.abs(fit - b['joints_2d'][i, vis, :2]).max() * 112 < 1.0


def test_generation_is_deterministic_across_workers(assets, tmp_path):
  generate.generate_split(assets, tmp_path / 'a', 'train', 5, 11, 64, workers=1, progress=False)
  generate.generate_split(
      assets, tmp_path / 'b', 'train', 5, 11, 64, workers=2, progress=False, chunk=2
  )  # 3 chunks over 2 spawned processes
  generate.generate_split(assets, tmp_path / 'c', 'test', 5, 11, 64, progress=False)
  for name in ('train.img.tsv', 'train.label.tsv', 'train.img.lineidx', 'train.yaml'):
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
  # train and test draw from different streams.
  assert (tmp_path / 'a' / 'train.label.tsv').read_text().split('\t')[1] != (
      tmp_path / 'c' / 'test.label.tsv'
  ).read_text().split('\t')[1]


def test_spawned_workers_do_not_rerun_the_parents_main_script(assets, tmp_path, monkeypatch):
  # A parent script (like main.py, which imports JAX and TensorFlow) that
  # 'spawn' would run again in every worker: here it leaves a mark when run.
  mark = tmp_path / 'main_ran'
  script = tmp_path / 'parent_main.py'
  script.write_text(f'open({str(mark)!r}, "a").write("ran\\n")\n')
  parent_main = types.ModuleType('__main__')
  parent_main.__file__ = str(script)
  monkeypatch.setitem(sys.modules, '__main__', parent_main)
  generate.generate_split(
      assets, tmp_path / 'w', 'train', 4, 11, 64, workers=2, progress=False, chunk=2
  )
  assert len(metro_tsv.MetroDataset(tmp_path / 'w' / 'train.yaml')) == 4
  assert not mark.exists()
  assert sys.modules['__main__'] is parent_main  # restored after the pool started


def test_cli_writes_splits_and_contact_sheet(tmp_path):
  from data_pipelines.synthetic import __main__ as cli

  sheet = tmp_path / 'sheet.png'
  cli.main(
      [
          '--out',
          str(tmp_path / 'd'),
          '--num_train',
          '2',
          '--num_test',
          '1',
          '--workers',
          '1',
          '--image_size',
          '64',
          '--contact_sheet',
          str(sheet),
          '--quiet',
      ]
  )
  assert len(metro_tsv.MetroDataset(tmp_path / 'd' / 'train.yaml')) == 2
  assert len(metro_tsv.MetroDataset(tmp_path / 'd' / 'test.yaml')) == 1
  assert cv2.imread(str(sheet)).shape == (64, 4 * 64, 3)


@pytest.mark.parametrize(
    'args, message',
    [
        (['--num_train', '0', '--num_test', '0'], 'nothing to generate'),
        (['--num_train', '-1'], 'need num_train, num_test >= 0'),
    ],
)
def test_cli_refuses_arguments_that_write_nothing(tmp_path, capsys, args, message):
  from data_pipelines.synthetic import __main__ as cli

  with pytest.raises(SystemExit) as e:
    cli.main(['--out', str(tmp_path / 'd'), *args])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and err[-1].startswith('python -m data_pipelines.synthetic: error:')
  assert not (tmp_path / 'd').exists()
