"""Synthetic hands: NumPy MANO skinning, pose sampler limits, left hands, labels, files, cache."""

import json
import os

import cv2
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coarsemetro_jax import hand_model
from configs import r50
from data_pipelines import datasets
from data_pipelines import metro_tsv
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import generate
from data_pipelines.synthetic import hand_np
from data_pipelines.synthetic import hand_pose_sampler as hps
from data_pipelines.synthetic import hand_render

MIRROR_X = np.array([-1.0, 1.0, 1.0])


@pytest.fixture(scope='module')
def hand():
  return hand_model.load_hand_model('')


@pytest.fixture(scope='module')
def assets():
  return generate.load_assets(hand=True)


@pytest.fixture(scope='module')
def rest21(assets):
  return assets.right.rest_hand_joints(np.zeros(10))


def _random_pose(seed):
  rng = np.random.default_rng(seed)
  return rng.normal(0.0, 0.4, 48), rng.normal(0.0, 1.0, 10)


# ------------------------------------------------------------ NumPy skinning


@pytest.mark.parametrize('side', ['right', 'left'])
def test_numpy_skinning_matches_hand_model(hand, assets, side):
  model = hand_model.mirror(hand) if side == 'left' else hand
  arrays = getattr(assets, side)
  for seed in range(3):
    pose, betas = _random_pose(seed)
    verts, joints = hand_np.lbs(arrays, pose, betas)
    ref_v, ref_j = hand_model.forward(model, jnp.asarray(pose[None]), jnp.asarray(betas[None]))
    np.testing.assert_allclose(verts, np.asarray(ref_v[0]), atol=2e-6)
    np.testing.assert_allclose(joints, np.asarray(ref_j[0]), atol=2e-6)


def test_left_hand_is_the_mirrored_right_hand(assets):
  pose, betas = _random_pose(7)
  left_v, left_j = hand_np.lbs(assets.left, hand_render.mirror_pose(pose), betas)
  right_v, right_j = hand_np.lbs(assets.right, pose, betas)
  np.testing.assert_allclose(left_v, right_v * MIRROR_X, atol=1e-12)
  np.testing.assert_allclose(left_j, right_j * MIRROR_X, atol=1e-12)
  np.testing.assert_array_equal(hand_render.mirror_pose(pose), hand_model.mirror_pose(pose))
  # Both sides' faces wind outwards (positive volume).
  for side in ('right', 'left'):
    v, f = getattr(assets, side).v_template, assets.faces[side]
    volume = np.einsum('fi,fi->', v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])) / 6
    assert volume > 1e-5


def test_rendered_left_hands_are_mirrored_right_hands(assets):
  sides = set()
  for index in range(8):
    out = hand_render.render_example(assets, generate.example_rng(3, 'train', index), 64)
    label, cam = out['label'], out['camera']
    sides.add(out['side'])
    assert label['hand_type'] == out['side']
    right_v, _ = hand_np.lbs(assets.right, hand_render.mirror_pose(label['pose']), label['betas'])
    verts = out['vertices'] - cam.trans
    if out['side'] == 'left':  # the left hand's pose drives the mirrored model
      np.testing.assert_allclose(verts, right_v * MIRROR_X, atol=1e-5)
    else:
      np.testing.assert_allclose(
          verts, hand_np.lbs(assets.right, label['pose'], label['betas'])[0], atol=1e-5
      )
  assert sides == {'left', 'right'}


# --------------------------------------------------------------- pose sampler


def test_flexion_and_abduction_signs(assets, rest21):
  """+flexion curls a finger towards the palm, +abduction turns it towards the little finger."""
  right, betas = assets.right, np.zeros(10)
  base = hand_np.lbs(right, hps.angles_to_pose(rest21, np.zeros((16, 3))), betas)[1]
  normal = hps.palm_normal(rest21)
  ulnar = hps._unit(rest21[17] - rest21[5])
  for mano_joint, tip in ((2, 8), (5, 12), (14, 4), (15, 4)):  # index/middle PIP, thumb MCP/IP
    angles = np.zeros((16, 3))
    angles[mano_joint, 0] = 60.0
    moved = hand_np.lbs(right, hps.angles_to_pose(rest21, angles), betas)[1]
    step = moved[tip] - base[tip]
    assert step @ normal > 0.3 * np.linalg.norm(step), mano_joint
  for mcp, tip in ((1, 8), (7, 20)):
    angles = np.zeros((16, 3))
    angles[mcp, 2] = 10.0
    moved = hand_np.lbs(right, hps.angles_to_pose(rest21, angles), betas)[1]
    assert (moved[tip] - base[tip]) @ ulnar > 0.008  # about 10 degrees of an 8 cm finger


def test_flexion_is_measured_from_the_straight_finger(assets, rest21):
  """At zero angles no joint of the four fingers is bent about its flexion axis."""
  right, betas = assets.right, np.zeros(10)
  frames = hps.joint_frames(rest21)
  pose = hps.angles_to_pose(rest21, np.zeros((16, 3)))
  rest16 = right.rest_joints(betas)
  _, glob = body_np.forward_kinematics(
      rest16, body_np.rotvec_to_matrix(pose.reshape(16, 3)), right.parents
  )
  joints = hand_np.lbs(right, pose, betas)[1]
  flex0 = hps.rest_flexion(rest21, frames)
  assert 5.0 < flex0[[2, 5, 8, 11]].min() and flex0.max() < 25.0  # the rest mesh is bent
  for j in range(1, 13):  # index, middle, pinky, ring
    k, child, prev = hps.MANO_TO_21[j]
    x = glob[right.parents[j]] @ frames[j][:, 0]  # the flexion axis, posed with the parent
    u, y = joints[k] - joints[prev], joints[child] - joints[k]
    u = u - (u @ x) * x
    bend = np.degrees(np.arctan2(x @ np.cross(u, y), u @ y))
    assert abs(bend) < 1e-6, (j, bend)


def test_angles_round_trip(rest21):
  rng = np.random.default_rng(0)
  for _ in range(5):
    angles = hps.sample_angles(rng)
    pose = hps.angles_to_pose(rest21, angles, global_rotvec=rng.normal(size=3))
    np.testing.assert_allclose(hps.pose_to_angles(rest21, pose), angles, atol=1e-6)


def test_sampler_stays_within_the_limits_and_covers_them(assets):
  rng = np.random.default_rng(1)
  right = assets.right
  angles, orient = [], []
  for _ in range(500):
    betas = hps.sample_betas(rng)
    rest = right.rest_hand_joints(betas)
    pose = hps.sample_pose(rng, rest, lambda p, b=betas: hand_np.lbs(right, p, b)[1])
    angles.append(hps.pose_to_angles(rest, pose))
    orient.append(hps.sample_global_orientation(rng))
  angles = np.stack(angles)  # [N, 16, 3]
  for j, limits in hps.LIMITS_DEG.items():
    for axis, (lo, hi) in enumerate(limits):
      a = angles[:, j, axis]
      assert a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6, (j, axis, a.min(), a.max())
      span = hi - lo
      if span:  # every limit is reached (to within 5 % of the range)
        assert a.min() < lo + 0.05 * span and a.max() > hi - 0.05 * span, (j, axis)
  # Unrestricted global orientation: uniform over rotations (the mean rotation
  # matrix is ~0). The restricted ones are tested below.
  mean_rot = Rotation.from_rotvec(np.stack(orient)).as_matrix().mean(0)
  assert np.abs(mean_rot).max() < 0.12


def test_global_orientation_shows_the_palm_or_the_back(rest21):
  rng = np.random.default_rng(0)
  palm = hps.palm_normal(rest21)
  tilt = lambda rotvec: np.degrees(np.arccos(abs(Rotation.from_rotvec(rotvec).apply(palm)[2])))
  tilts = np.array([tilt(hps.sample_pose(rng, rest21)[:3]) for _ in range(200)])
  assert tilts.max() <= hps.MAX_PALM_TILT_DEG and tilts.min() < 10.0
  # Uniform over those rotations: the normal's |z| is uniform in [cos 60, 1].
  assert abs(np.mean(np.cos(np.radians(tilts))) - 0.75) < 0.03
  anywhere = [tilt(hps.sample_global_orientation(rng)) for _ in range(200)]
  assert max(anywhere) > 80.0


def test_global_orientation_holds_the_fingers_up(rest21):
  rng = np.random.default_rng(1)
  up = rest21[9] - rest21[hps.WRIST]
  up = up / np.linalg.norm(up)

  def roll(rotvec):  # image angle of the long axis from -y (camera axes: y down)
    x, y = Rotation.from_rotvec(rotvec).apply(up)[:2]
    return np.degrees(np.arctan2(x, -y))

  rolls = np.array([roll(hps.sample_pose(rng, rest21)[:3]) for _ in range(300)])
  assert np.abs(rolls).max() <= hps.MAX_ROLL_DEG
  # Both ways, out to the limit.
  assert rolls.min() < -0.8 * hps.MAX_ROLL_DEG and rolls.max() > 0.8 * hps.MAX_ROLL_DEG
  # A hand turned 90 degrees in the image plane (fingers to the right) is a roll of 90.
  quarter = Rotation.from_rotvec([0.0, 0.0, np.pi / 2]).as_rotvec()
  rot_up = Rotation.align_vectors([[0.0, -1.0, 0.0]], [up])[0]
  assert abs(abs(roll((Rotation.from_rotvec(quarter) * rot_up).as_rotvec())) - 90.0) < 1e-6
  unlimited = [roll(hps.sample_global_orientation(rng)) for _ in range(300)]
  assert np.abs(unlimited).max() > 150.0


def test_penetration_test(assets, rest21):
  right, betas = assets.right, np.zeros(10)
  joints = lambda angles: hand_np.lbs(right, hps.angles_to_pose(rest21, angles), betas)[1]
  assert not hps.penetrates(joints(np.zeros((16, 3))))
  fist = np.zeros((16, 3))
  for mcp in (1, 4, 7, 10):
    fist[mcp : mcp + 3, 0] = (*hps.FIST_DEG, hps.DIP_PER_PIP * hps.FIST_DEG[1])
  assert not hps.penetrates(joints(fist))
  deep = fist.copy()
  for mcp in (1, 4, 7, 10):  # every joint at its limit: the fingertips end inside the palm
    deep[mcp : mcp + 3, 0] = (90.0, 105.0, 80.0)
  assert hps.penetrates(joints(deep))
  crossed = np.zeros((16, 3))
  crossed[1, 2], crossed[4, 2] = 25.0, -25.0  # index and middle turned into each other
  crossed[1, 0], crossed[4, 0] = 30.0, 30.0
  assert hps.penetrates(joints(crossed))


# ------------------------------------------------------------- labels, files


def test_label_projects_its_joints_and_matches_the_image(assets):
  size = 128
  for index in range(4):
    out = hand_render.render_example(assets, generate.example_rng(0, 'test', index), size)
    label, cam = out['label'], out['camera']
    assert label['center'] == [63.5, 63.5] and label['scale'] == pytest.approx(0.9 * 128 / 224)
    j3d = np.array(label['3d_joints'])
    j2d = np.array(label['2d_joints'])
    assert j3d.shape == (21, 4) and j2d.shape == (21, 3) and np.all(j3d[:, 3] == 1)
    # The 2D joints are the pinhole projection of the 3D joints (+ the camera's translation).
    p = j3d[:, :3] + cam.trans
    uv = cam.focal * p[:, :2] / p[:, 2:] + cam.principal - 0.5
    np.testing.assert_allclose(j2d[:, :2], uv, atol=2e-3)
    inside = np.all((uv >= 0) & (uv <= size - 1), axis=1)
    np.testing.assert_array_equal(j2d[:, 2], inside)
    # ... and, near-orthographic, a weak-perspective camera of the wrist-centred joints.
    rel = j3d[:, :3] - j3d[0, :3]
    a = np.c_[rel[:, :2].reshape(-1, 1), np.tile(np.eye(2), (21, 1))]
    fit, *_ = np.linalg.lstsq(a, j2d[:, :2].reshape(-1), rcond=None)
    # Its error is about the joints' offset from the image centre (up to ~50 px)
    # times the hand's depth spread over the camera distance (~2 %): under 1 px.
    assert np.abs(a @ fit - j2d[:, :2].reshape(-1)).max() < 1.0  # px
    # Joints lie inside the hand: most project onto its pixels.
    px = np.clip(np.round(j2d[:, :2]).astype(int), 0, size - 1)
    assert np.mean(out['face_id'][px[:, 1], px[:, 0]] >= 0) > 0.8
    assert label['hand_type'] == out['side'] and len(label['pose']) == 48


def test_written_rows_parse_back_to_their_labels(assets, tmp_path):
  yaml_path, kept = generate.generate_split(
      assets, tmp_path, 'test', 3, seed=4, image_size=64, progress=False, keep_first=3
  )
  dataset = metro_tsv.MetroDataset(yaml_path, hand=True)
  assert len(dataset) == 3
  for i, ex in enumerate(kept):
    row = dataset.read(i)
    label = ex['label']
    assert row['key'] == ex['key'] == f'synthetic_hand_test_{i:08d}'
    assert row['jpeg'] == ex['jpeg']
    parsed = row['label']
    np.testing.assert_array_equal(parsed['center'], label['center'])
    assert parsed['scale'] == label['scale']
    np.testing.assert_array_equal(parsed['joints_2d'], label['2d_joints'])
    np.testing.assert_allclose(parsed['joints_3d'], label['3d_joints'], atol=1e-7)
    np.testing.assert_allclose(parsed['pose'], label['pose'], atol=1e-7)
    np.testing.assert_allclose(parsed['betas'], label['betas'], atol=1e-7)
    assert parsed['is_left'] == (label['hand_type'] == 'left')
    assert parsed['has_2d_joints'] == parsed['has_3d_joints'] == parsed['has_smpl'] == 1
    # The rendered example of that index, again: the same label.
    again = hand_render.render_example(assets, generate.example_rng(4, 'test', i), 64)
    assert again['label'] == label
  # METRO's reader sees the label keys it indexes (its first dict), in JSON.
  with open(os.path.join(tmp_path, 'test.label.tsv')) as f:
    first = json.loads(f.readline().split('\t')[1])[0]
  assert len(first['2d_joints']) == 21 and len(first['pose']) == 48


def test_generation_is_deterministic_by_seed(assets, tmp_path):
  read = lambda d, name: open(os.path.join(d, name), 'rb').read()
  runs = {}
  for name, seed, workers in (('a', 5, 1), ('b', 5, 2), ('c', 6, 1)):
    generate.generate_split(
        assets, tmp_path / name, 'train', 6, seed, 48, workers, progress=False, chunk=2
    )
    runs[name] = [read(tmp_path / name, f) for f in ('train.img.tsv', 'train.label.tsv')]
  assert runs['a'] == runs['b']  # whatever the number of workers
  assert runs['a'][0] != runs['c'][0] and runs['a'][1] != runs['c'][1]


def test_cli_hand_mode_writes_splits_and_contact_sheet(tmp_path):
  from data_pipelines.synthetic import __main__ as cli

  sheet = tmp_path / 'sheet.png'
  common = ['--out', str(tmp_path / 'd'), '--num_test', '1', '--workers', '1', '--quiet']
  cli.main(
      common + ['--hand', '--num_train', '2', '--image_size', '48', '--contact_sheet', str(sheet)]
  )
  train = metro_tsv.MetroDataset(tmp_path / 'd' / 'train.yaml', hand=True)
  assert len(train) == 2 and train.read(0)['label']['joints_2d'].shape == (21, 3)
  assert cv2.imread(str(sheet)).shape == (48, 4 * 48, 3)
  with pytest.raises(SystemExit):
    cli.main(common + ['--hand_model', 'x.pkl'])  # a hand model without --hand


# ------------------------------------------------------------- cached dataset


def _hand_data_config(tmp_path):
  config = r50.get_config()
  config.model.hand = True
  data = config.data
  data.source = 'synthetic'
  data.synthetic.dir = str(tmp_path)
  data.synthetic.num_train, data.synthetic.num_test = 4, 2
  data.synthetic.image_size, data.synthetic.workers = 48, 1
  data.batch_size = data.eval_batch_size = 2
  return config


def test_synthetic_hands_are_cached_apart_from_bodies(tmp_path):
  config = _hand_data_config(tmp_path)
  data = config.data
  assert data.hand  # one value with config.model.hand
  body_dir = datasets.synthetic_dir(data.synthetic)
  hand_dir = datasets.synthetic_dir(data.synthetic, hand=True)
  assert os.path.basename(hand_dir) == 'hand3_train4_test2_seed0_48px'
  # A body dataset with the same parameters (and a file of the user's) is left alone.
  os.makedirs(body_dir)
  with open(os.path.join(body_dir, datasets.DONE_MARKER), 'w') as f:
    json.dump({k: data.synthetic[k] for k in datasets.SYNTHETIC_PARAMS}, f)
  with open(os.path.join(body_dir, 'sentinel'), 'w') as f:
    f.write('user data')
  assert datasets.check_inputs(data) == [
      f'config.data.source: synthetic hands, {hand_dir} (to render)'
  ]
  out = datasets.prepare_synthetic(data)
  assert out == hand_dir
  with open(os.path.join(out, datasets.DONE_MARKER)) as f:
    assert json.load(f)['hand'] == datasets.HAND_VERSION == 3
  with open(os.path.join(body_dir, 'sentinel')) as f:
    assert f.read() == 'user data'
  stamp = os.stat(os.path.join(out, 'train.img.tsv')).st_mtime_ns
  assert datasets.prepare_synthetic(data) == out  # cached
  assert os.stat(os.path.join(out, 'train.img.tsv')).st_mtime_ns == stamp
  assert 'cached' in datasets.check_inputs(data)[0]
  built = datasets.Datasets.create(config, out)
  assert built.num_train == 4 and built.data_config.hand
  # A hand dataset directory holding a body marker is refused, not replaced.
  data.synthetic.seed = 3
  other = datasets.synthetic_dir(data.synthetic, hand=True)
  os.makedirs(other)
  with open(os.path.join(other, datasets.DONE_MARKER), 'w') as f:
    json.dump({k: data.synthetic[k] for k in datasets.SYNTHETIC_PARAMS}, f)
  with pytest.raises(datasets.InputError, match='left as it is'):
    datasets.prepare_synthetic(data)


def test_hand_settings_that_do_not_fit_fail_in_one_line(tmp_path):
  config = _hand_data_config(tmp_path)
  config.data.source = 'tfds'
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(datasets.DataConfigError, match='TFDS build stores body labels'):
    datasets.check_config(config.data)
  # A body dataset read as hands: the first label names what was expected.
  body_yaml = generate.generate_split(
      generate.load_assets(), tmp_path / 'body', 'train', 1, 0, 48, progress=False
  )[0]
  config.data.source, config.data.train_yaml, config.data.eval_yaml = 'tsv', body_yaml, body_yaml
  with pytest.raises(
      datasets.InputError, match=r'2d_joints has shape \(24, 3\), expected \(21, 3\)'
  ):
    datasets.check_inputs(config.data)
  # Hand data and a body model: a config whose two fields are not one value.
  config = ml_collections.ConfigDict(r50.get_config().to_dict())
  config.data.hand, config.data.source = True, 'synthetic'
  with pytest.raises(datasets.DataConfigError, match='hand data needs the hand model'):
    datasets.Datasets.create(config, str(tmp_path))
