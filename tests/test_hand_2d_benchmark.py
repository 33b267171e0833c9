"""benchmarks/hand_2d.py: its inputs on real renders, and a smoke run of both parts."""

import numpy as np
import pytest
import test_benchmarks  # tests/ is on sys.path under pytest

from benchmarks import hand_2d
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


def test_both_parts_print_their_tables(hand_dir):
  argv = [
      f'--synthetic_dir={hand_dir.rsplit("/", 1)[0]}',
      '--num_train=24',
      '--num_test=8',
      '--lifting_steps=20',
      '--steps=4',
      '--noise_px=0,2',
  ]
  lifting, localisation = test_benchmarks.tables(test_benchmarks.run_benchmark('hand_2d', argv))
  assert [r[0] for r in lifting] == ['mean hand (no 2D)', 'sigma 0 px', 'sigma 2 px']
  assert [r[1] for r in lifting[:2]] == ['-', '0.00']  # no noise, no 2D error
  # A 2D Gaussian of sigma 2 px has a mean length of 2 sqrt(pi / 2) px, here
  # over 8 x 21 joints, times 0.933 crop px per image px.
  assert float(lifting[2][1]) == pytest.approx(2 * np.sqrt(np.pi / 2) * 0.9333, rel=0.15)
  assert [r[0] for r in localisation] == ['mean 2D joints'] + [f'step {s}' for s in (1, 2, 3, 4)]
  values = [float(r[-1]) for r in lifting] + [float(r[1]) for r in localisation]
  assert all(np.isfinite(values)) and min(values) > 0
  # The mean hand, Procrustes-aligned, errs by millimetres, not metres.
  assert 1.0 < float(lifting[0][-1]) < 60.0
