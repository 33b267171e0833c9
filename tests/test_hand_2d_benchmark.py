"""benchmarks/hand_2d.py: its inputs on real renders, the true-depth measure, a smoke run."""

import jax
import numpy as np
import pytest
import test_benchmarks  # tests/ is on sys.path under pytest

from benchmarks import hand_2d
from coarsemetro_jax import build
from coarsemetro_jax import infer
from coarsemetro_jax.convert import orbax_variables
from configs import hand_embedded
from data_pipelines import datasets
from data_pipelines import metro_tsv


@pytest.fixture(name='hand_dir', scope='module')
def fixture_hand_dir(tmp_path_factory):
  """A tiny render of the embedded hands (right and left)."""
  data = hand_embedded.get_config().data
  data.synthetic.dir = str(tmp_path_factory.mktemp('hands'))
  data.synthetic.num_train, data.synthetic.num_test = 24, 8
  data.synthetic.workers = 1
  return datasets.prepare_synthetic(data)


def test_normalised_2d_drops_translation_and_scale():
  rng = np.random.default_rng(0)
  joints = rng.normal(size=(3, 21, 2))
  out = hand_2d.normalised_2d(joints)
  np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-12)  # the wrist
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1).max(-1), 1.0)
  moved = 7.5 * joints + np.array([3.0, -2.0])
  np.testing.assert_allclose(hand_2d.normalised_2d(moved), out, atol=1e-12)


def test_with_true_depth_moves_only_the_moved_joint():
  # A hand-computed camera: uv = 2 * xy + (0.1, -0.2). Moving one predicted
  # 2D joint by (0.2, 0) moves its 3D x by 0.2 / 2 and nothing else; the
  # depth is the true one throughout.
  rng = np.random.default_rng(0)
  xyz = rng.normal(size=(2, 21, 3))
  uv = 2.0 * xyz[..., :2] + np.array([0.1, -0.2])
  s, c = hand_2d.camera_fit(uv, xyz)
  np.testing.assert_allclose(s, 2.0, rtol=1e-12)
  np.testing.assert_allclose(c, [[0.1, -0.2]] * 2, atol=1e-12)
  np.testing.assert_allclose(hand_2d.with_true_depth(uv, uv, xyz), xyz, atol=1e-12)
  pred = uv.copy()
  pred[:, 5, 0] += 0.2
  want = xyz.copy()
  want[:, 5, 0] += 0.1
  np.testing.assert_allclose(hand_2d.with_true_depth(pred, uv, xyz), want, atol=1e-12)
  # A uniform 2D shift is a 3D translation, which PA-MPJPE aligns away.
  shifted = hand_2d.with_true_depth(uv + np.array([0.3, 0.4]), uv, xyz)
  assert hand_2d.pa_mpjpe_mm(shifted, xyz) < 1e-3


def test_model_row_of_the_truth_is_zero(hand_dir):
  test = hand_2d.load_split(f'{hand_dir}/test.yaml', 96)
  config = hand_embedded.get_config()
  px, pa, true_depth = hand_2d.model_row(config, test[1], test[3], test)
  assert px == 0.0 and pa < 1e-3
  # The renders' camera is near-orthographic: the true 2D joints, taken back
  # through the fitted weak-perspective camera, are the 3D joints to well
  # under a millimetre.
  assert true_depth < 1.0


def test_mirrored_2d_and_3d_joints_agree(hand_dir):
  # The renders' camera is near-orthographic, so the crop's 2D joints are a
  # scaled and shifted copy of the 3D joints' x and y. A left hand mirrored
  # only in 2D, or only in 3D, would need a reflection instead.
  crops, uv, px, xyz, crop_px = hand_2d.load_split(f'{hand_dir}/train.yaml', 96)
  assert crops.shape == (24, 96, 96, 3) and uv.shape == (24, 21, 2) and xyz.shape == (24, 21, 3)
  labels = metro_tsv.MetroDataset(f'{hand_dir}/train.yaml', hand=True)
  left = [bool(labels.read(i)['label']['is_left']) for i in range(len(labels))]
  assert 0 < sum(left) < len(left)
  for a, b in ((uv, xyz[..., :2]), (px, xyz[..., :2])):
    for pred, target in zip(a, b):
      design = np.concatenate([target.reshape(-1, 1), np.tile(np.eye(2), (21, 1))], 1)
      coef, *_ = np.linalg.lstsq(design, pred.reshape(-1), rcond=None)
      assert coef[0] > 0  # a scale, not a reflection
      fit = design @ coef
      spread = np.ptp(pred, axis=0).max()
      assert np.abs(fit - pred.reshape(-1)).max() < 0.02 * spread
  # The crop box is 0.9 * 128 / 224 * 200 px of the 128-px render (the label
  # rounds the scale to 6 decimals), resized to 96.
  np.testing.assert_allclose(crop_px, 96 / (0.9 * 128 / 224 * 200), rtol=1e-5)


@pytest.fixture(name='random_hand_checkpoint')
def fixture_random_hand_checkpoint(tmp_path):
  """The recipe's hand network at random weights, as a converted checkpoint."""
  config = hand_embedded.get_config()
  model = build.build(config, body=False).model
  # Shapes only (an eager init of the whole network costs seconds): small
  # random weights, BatchNorm statistics at mean 0 and variance 1.
  abstract = infer.abstract_variables(model, config.data.image_size)
  rng = np.random.default_rng(0)
  variables = {
      'params': jax.tree.map(
          lambda a: rng.normal(0.0, 0.02, a.shape).astype(a.dtype), abstract['params']
      ),
      'batch_stats': jax.tree_util.tree_map_with_path(
          lambda path, a: np.full(a.shape, float(path[-1].key == 'var'), a.dtype),
          abstract['batch_stats'],
      ),
  }
  path = str(tmp_path / 'random_hand')
  orbax_variables.save_converted(
      path, variables, {'kind': 'test', 'scope': 'model', 'model': config.model.to_dict()}
  )
  return path


def test_all_parts_print_their_tables(hand_dir, random_hand_checkpoint):
  argv = [
      f'--synthetic_dir={hand_dir.rsplit("/", 1)[0]}',
      '--num_train=24',
      '--num_test=8',
      '--lifting_steps=20',
      '--steps=4',
      '--noise_px=0,2',
      '--parts=lifting,localisation,model',
      f'--checkpoint={random_hand_checkpoint}',
  ]
  lifting, localisation, model = test_benchmarks.tables(
      test_benchmarks.run_benchmark('hand_2d', argv)
  )
  assert [r[0] for r in lifting] == ['mean hand (no 2D)', 'sigma 0 px', 'sigma 2 px']
  assert [r[1] for r in lifting[:2]] == ['-', '0.00']  # no noise, no 2D error
  # A 2D Gaussian of sigma 2 px has a mean length of 2 sqrt(pi / 2) px, here
  # over 8 x 21 joints, times 0.933 crop px per image px.
  assert float(lifting[2][1]) == pytest.approx(2 * np.sqrt(np.pi / 2) * 0.9333, rel=0.15)
  # Exact 2D joints with the true depth are the 3D joints (to the camera
  # fit); noise in 2D costs millimetres in 3D.
  assert lifting[0][3] == '-' and float(lifting[1][3]) < 1.0 < float(lifting[2][3])
  assert [r[0] for r in localisation] == ['mean 2D joints'] + [f'step {s}' for s in (1, 2, 3, 4)]
  assert len(model) == 1 and len(model[0]) == 3
  values = [float(r[2]) for r in lifting] + [
      float(v) for r in localisation for v in r[1:] if v != '-'
  ]
  values += [float(v) for v in model[0]]
  assert all(np.isfinite(values)) and min(values) > 0
  # The mean hand, Procrustes-aligned, errs by millimetres, not metres.
  assert 1.0 < float(lifting[0][2]) < 60.0


def test_model_part_names_a_missing_checkpoint(hand_dir, tmp_path):
  result = test_benchmarks.run_benchmark_result(
      'hand_2d',
      [
          f'--synthetic_dir={hand_dir.rsplit("/", 1)[0]}',
          '--num_train=24',
          '--num_test=8',
          '--parts=model',
          f'--checkpoint={tmp_path}/missing',
      ],
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      f'benchmarks.hand_2d: checkpoint not found: {tmp_path}/missing'
  )
