"""Hand rows through the data pipeline: labels, augmentation (no flip), batches, the mean-hand baseline."""

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coarsemetro_jax import metrics
from configs import r50
from data_pipelines import augment
from data_pipelines import datasets
from data_pipelines import examples
from data_pipelines import input_pipeline
from data_pipelines import metro_labels
from data_pipelines import metro_tsv
from data_pipelines.synthetic import generate
from data_pipelines.synthetic import hand_render

S = 32


def _hand_label(rng, side=None):
  label = {
      'center': [40.0, 41.0],
      'scale': 0.3,
      '2d_joints': np.c_[rng.uniform(20, 60, (21, 2)), np.ones(21)],
      'has_2d_joints': 1,
      '3d_joints': np.c_[rng.normal(0, 0.05, (21, 3)) + [0.1, -0.2, 3.0], np.ones(21)],
      'has_3d_joints': 1,
      'pose': rng.normal(0, 0.3, 48),
      'betas': rng.normal(size=10),
      'has_smpl': 1,
  }
  if side:
    label['hand_type'] = side
  return label


# ------------------------------------------------------------------- labels


def test_hand_labels_parse_with_their_shapes_and_side():
  rng = np.random.default_rng(0)
  for side, is_left in ((None, 0.0), ('right', 0.0), ('left', 1.0)):
    label = _hand_label(rng, side)
    parsed = metro_labels.parse_label_text(metro_labels.encode_label(label, hand=True), hand=True)
    assert parsed['joints_2d'].shape == (21, 3) and parsed['joints_3d'].shape == (21, 4)
    assert parsed['pose'].shape == (48,) and parsed['betas'].shape == (10,)
    assert parsed['is_left'] == is_left and parsed['is_left'].dtype == np.float32
    np.testing.assert_array_equal(parsed['joints_2d'], label['2d_joints'])
    np.testing.assert_allclose(parsed['pose'], label['pose'], rtol=1e-6)
  with pytest.raises(ValueError, match="hand_type must be one of .* got 'both'"):
    metro_labels.parse_label(_hand_label(rng, 'both'), hand=True)
  # A hand label is not a body label, and the other way round.
  with pytest.raises(ValueError, match=r'2d_joints has shape \(21, 3\), expected \(24, 3\)'):
    metro_labels.encode_label(_hand_label(rng))
  body = {**_hand_label(rng), '2d_joints': np.ones((24, 3))}
  with pytest.raises(ValueError, match=r'2d_joints has shape \(24, 3\), expected \(21, 3\)'):
    metro_labels.parse_label(body, hand=True)


# ------------------------------------------------------------- augmentation


def _metro_hand_params(seed, rot_factor=90.0):
  """METRO's HandMeshTSVDataset.augm_params, written out with a NumPy Generator."""
  rng = np.random.default_rng(seed)
  pn = rng.uniform(0.6, 1.4, 3)
  rot = min(2 * rot_factor, max(-2 * rot_factor, rng.standard_normal() * rot_factor))
  sc = min(1.25, max(0.75, rng.standard_normal() * 0.25 + 1))
  if rng.uniform() <= 0.6:
    rot = 0
  return 0, pn, rot, sc


def test_hand_augmentation_is_metros_and_never_flips():
  rots = []
  for seed in range(300):
    params = augment.sample_hand_params(np.random.default_rng(seed))
    flip, pn, rot, sc = _metro_hand_params(seed)
    assert params.flip is False
    np.testing.assert_array_equal(params.pn, pn)
    assert (params.rot, params.sc) == (rot, sc)
    rots.append(params.rot)
  assert max(np.abs(rots)) > 100.0  # METRO's hand rotations reach past the body's 60
  data = r50.get_config().data
  data.hand = True
  sample = examples.params_fn(data, seed=3, train=True)
  assert not any(sample(epoch, row).flip for epoch in range(3) for row in range(100))


def test_hand_targets_are_wrist_centred_and_turn_with_the_image():
  rng = np.random.default_rng(1)
  label = metro_labels.parse_label(_hand_label(rng, 'left'), hand=True)
  params = augment.AugParams(rot=35.0)
  out = augment.label_targets(label, params, hand=True)
  assert out['joints_3d'].shape == (21, 4) and out['pose'].shape == (48,)
  np.testing.assert_array_equal(out['joints_3d'][0, :3], 0.0)
  assert out['is_left'] == 1.0
  # The joints turn by the same rotation as the global orientation; fingers do not.
  turn = Rotation.from_rotvec(out['pose'][:3]) * Rotation.from_rotvec(label['pose'][:3]).inv()
  centred = label['joints_3d'][:, :3] - label['joints_3d'][0, :3]
  np.testing.assert_allclose(out['joints_3d'][:, :3], turn.apply(centred), atol=1e-6)
  np.testing.assert_allclose(out['pose'][3:], label['pose'][3:], rtol=1e-6)
  assert turn.magnitude() == pytest.approx(np.radians(35.0))
  with pytest.raises(ValueError, match='never flipped'):
    augment.label_targets(label, augment.AugParams(flip=True), hand=True)


# ----------------------------------------------------------------- pipeline


@pytest.fixture(name='hand_yaml', scope='module')
def fixture_hand_yaml(tmp_path_factory):
  out = tmp_path_factory.mktemp('hands')
  return generate.generate_split(
      generate.load_assets(hand=True), out, 'train', 6, 0, 64, progress=False
  )[0]


def _config(yaml_path):
  data = r50.get_config().data
  data.hand = True
  data.train_yaml = data.eval_yaml = yaml_path
  data.image_size = S
  data.batch_size, data.eval_batch_size = 4, 4
  data.num_parallel_calls = 1
  data.rot_factor = 90.0  # METRO's hand training
  return data


def test_hand_rows_through_the_training_pipeline(hand_yaml):
  data = _config(hand_yaml)
  seed = 5
  ds = input_pipeline.create_train_dataset(
      data, seed=seed, shuffle=False, process_index=0, process_count=1
  )
  batches = list(ds.take(2).as_numpy_iterator())
  dataset = metro_tsv.MetroDataset(hand_yaml, hand=True)
  shapes = {
      'image': (4, S, S, 3),
      'joints_2d': (4, 21, 3),
      'joints_3d': (4, 21, 4),
      'pose': (4, 48),
      'betas': (4, 10),
      **dict.fromkeys(('has_2d_joints', 'has_3d_joints', 'has_smpl', 'is_left', 'mask'), (4,)),
  }
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == shapes
    assert all(v.dtype == np.float32 for v in batch.values())
    np.testing.assert_array_equal(batch['mask'], 1.0)
    np.testing.assert_array_equal(batch['joints_3d'][:, 0, :3], 0.0)  # wrist-centred
  # Positions 0..7 are rows 0..5 of epoch 0, then rows 0, 1 of epoch 1.
  flat = {k: np.concatenate([b[k] for b in batches]) for k in shapes}
  for position in range(8):
    epoch, row = divmod(position, 6)
    params = augment.sample_hand_params(np.random.default_rng((seed, epoch, row)), rot_factor=90.0)
    ex = dataset.read(row)
    image = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(ex['jpeg'], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    ref = augment.process_example(image, ex['label'], params, S, hand=True)
    img = np.clip(ref['image'] * np.float32(params.pn), 0, 255) / 255.0
    img = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(flat['image'][position], img, atol=1e-5)
    for name in ('joints_2d', 'joints_3d', 'pose', 'betas', 'is_left'):
      np.testing.assert_allclose(flat[name][position], ref[name], atol=1e-6, err_msg=name)
    assert flat['is_left'][position] == (ex['label']['is_left'] == 1)
  assert set(flat['is_left']) <= {0.0, 1.0}


def test_hand_eval_batches_are_padded(hand_yaml):
  data = _config(hand_yaml)
  batches = list(
      input_pipeline.create_eval_dataset(data, process_index=0, process_count=1).as_numpy_iterator()
  )
  assert len(batches) == 2
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 6 + [0] * 2)
  assert batches[1]['joints_2d'].shape == (4, 21, 3) and batches[1]['is_left'].shape == (4,)
  # Without augmentation the crop is METRO's 'metro' crop of the label's box.
  assert np.abs(batches[0]['joints_2d'][..., :2]).max() <= 1.0


# ----------------------------------------------------------------- baseline


def test_hand_targets_are_the_rendered_hands(hand_yaml):
  joints, verts, left = datasets.hand_targets(hand_yaml)
  assert joints.shape == (6, 21, 3) and verts.shape == (6, 778, 3) and left.dtype == bool
  assets = generate.load_assets(hand=True)
  for i in range(6):
    out = hand_render.render_example(assets, generate.example_rng(0, 'train', i), 64)
    wrist = out['joints'][0]
    assert left[i] == (out['side'] == 'left')
    np.testing.assert_allclose(verts[i], out['vertices'] - wrist, atol=2e-6)
    np.testing.assert_allclose(joints[i], out['joints'] - wrist, atol=2e-6)


def _procrustes(src, dst):
  """Similarity Procrustes of src onto dst [N, 3] (Umeyama), in NumPy."""
  xs, xd = src - src.mean(0), dst - dst.mean(0)
  u, s, vt = np.linalg.svd(xs.T @ xd)
  d = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
  rot = vt.T @ d @ u.T
  scale = np.trace(np.diag(s) @ d) / (xs**2).sum()
  return scale * xs @ rot.T + dst.mean(0)


def _f_score(pred, gt, threshold):
  d = np.linalg.norm(gt[:, None] - pred[None], axis=-1)
  p, r = (d.min(1) < threshold).mean(), (d.min(0) < threshold).mean()
  return 2 * p * r / (p + r) if p + r else 0.0


def test_mean_hand_baseline_against_numpy():
  rng = np.random.default_rng(0)
  joints, verts = rng.normal(0, 0.03, (21, 3)), rng.normal(0, 0.04, (60, 3))
  hand = np.concatenate([joints, verts])
  turn = lambda points, r: points @ r.T
  # Training set: the one hand seen turned, half of the copies as left hands.
  rots = Rotation.random(12, random_state=1).as_matrix()
  left = np.arange(12) % 2 == 1
  seen = np.stack([turn(hand, r) * ([-1, 1, 1] if lf else 1) for r, lf in zip(rots, left)])
  train = (seen[:, :21], seen[:, 21:], left)
  # Test set: the hand (right), its mirror (left), and a hand with moved points.
  moved = hand + rng.normal(0, 0.004, hand.shape)
  tests = np.stack([hand, hand * [-1, 1, 1], turn(moved, rots[3])])
  test_left = np.array([False, True, False])
  result = metrics.hand_mean_pose_baseline(
      train, (tests[:, :21], tests[:, 21:], test_left), chunk=2
  )
  assert result['count'] == 3
  # The mean is the hand itself: exact on the first two, a NumPy reference on the third.
  exact = [0.0, 0.0]
  pa_j = np.linalg.norm(_procrustes(joints, moved[:21]) - moved[:21], axis=-1).mean()
  aligned = _procrustes(verts, moved[21:])
  pa_v = np.linalg.norm(aligned - moved[21:], axis=-1).mean()
  assert result['pa_mpjpe'] == pytest.approx(1000 * np.mean(exact + [pa_j]), abs=1e-3)
  assert result['pa_mpvpe'] == pytest.approx(1000 * np.mean(exact + [pa_v]), abs=1e-3)
  for key, threshold in (('f5', 0.005), ('f15', 0.015)):
    expected = np.mean([1.0, 1.0, _f_score(aligned, moved[21:], threshold)])
    assert result[key] == pytest.approx(expected, abs=1e-6)
  assert result['pa_mpvpe'] > 1.0  # the moved points are an error (mm)
  # Ignoring the sides: a similarity cannot turn the mean right hand into the left one.
  unsided = metrics.hand_mean_pose_baseline(
      (seen[:, :21], seen[:, 21:], left), (tests[:2, :21], tests[:2, 21:], np.zeros(2, bool))
  )
  assert unsided['pa_mpvpe'] > 10.0  # mm
