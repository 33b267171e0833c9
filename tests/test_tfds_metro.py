"""TFDS builder: the TSVs' rows and bytes; the same batches as the TSVs."""

import base64

import cv2
import numpy as np
import pytest

from configs import r50
from data_pipelines import input_pipeline
from data_pipelines import metro_tsv
from data_pipelines import tfds_metro

S = 32


def _examples(n):
  rng = np.random.default_rng(0)
  for i in range(n):
    img = cv2.GaussianBlur(rng.integers(0, 255, (48, 40, 3), np.uint8), (0, 0), 1.5)
    yield {
        'key': f'ex{i}',
        'jpeg': cv2.imencode('.jpg', img)[1].tobytes(),
        'height': 48,
        'width': 40,
        'label': {
            'center': [20 + rng.uniform(-2, 2), 24],
            'scale': 0.2,
            '2d_joints': np.c_[rng.uniform(5, 35, (24, 2)), np.ones(24)],
            'has_2d_joints': 1,
            '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)],
            'has_3d_joints': 1,
            'pose': rng.normal(0, 0.3, 72),
            'betas': np.r_[i, rng.normal(size=9)],
            'has_smpl': i % 2,
        },
    }


@pytest.fixture(name='sources', scope='module')
def fixture_sources(tmp_path_factory):
  """A TSV dataset with one corrupt JPEG row, and its TFDS build."""
  root = tmp_path_factory.mktemp('tfds')
  train = metro_tsv.write_split(str(root / 'tsv'), 'train', _examples(11))
  valid = metro_tsv.write_split(str(root / 'tsv'), 'valid', _examples(7))
  img = root / 'tsv' / 'train.img.tsv'
  rows = [line.split('\t') for line in img.read_text().splitlines()]
  rows[3][1] = base64.b64encode(b'\xff\xd8 broken').decode()
  metro_tsv.write_tsv(str(img), [tuple(r) for r in rows])
  builder = tfds_metro.Metro(
      data_dir=str(root / 'tfds'), yamls={'train': train, 'validation': valid}
  )
  builder.download_and_prepare()
  return train, valid, str(root / 'tfds')


def _config(kind, sources):
  train, valid, tfds_dir = sources
  data = r50.get_config().data
  data.source = kind
  data.train_yaml, data.eval_yaml, data.tfds_data_dir = train, valid, tfds_dir
  data.image_size = S
  data.batch_size = 4
  data.eval_batch_size = 4
  return data


def test_build_keeps_rows_in_order_and_skips_bad_ones(sources):
  train, _, tfds_dir = sources
  assert tfds_metro.num_examples(tfds_dir, 'train') == 10
  assert tfds_metro.num_examples(tfds_dir, 'validation') == 7
  dataset = metro_tsv.MetroDataset(train)
  rows = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # row 3 has a corrupt JPEG
  got = list(tfds_metro.read_split(tfds_dir, 'train').as_numpy_iterator())
  assert [g['key'].decode() for g in got] == [f'ex{r}' for r in rows]
  for g, r in zip(got, rows):
    ex = dataset.read(r)
    assert g['image'] == ex['jpeg']  # the original bytes, not re-encoded
    for name, value in ex['label'].items():
      np.testing.assert_array_equal(g[name], value, err_msg=name)
  part = tfds_metro.read_split(tfds_dir, 'train', start=4, end=7)
  assert [g['key'].decode() for g in part.as_numpy_iterator()] == ['ex5', 'ex6', 'ex7']


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_are_identical(sources, process_count):
  tsv, tfds = _config('tsv', sources), _config('tfds', sources)
  for process_index in range(process_count):
    a = input_pipeline.create_eval_dataset(
        tsv, process_index=process_index, process_count=process_count
    )
    b = input_pipeline.create_eval_dataset(
        tfds, process_index=process_index, process_count=process_count
    )
    assert len(a) == len(b)
    for x, y in zip(a.as_numpy_iterator(), b.as_numpy_iterator()):
      assert x.keys() == y.keys()
      for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_train_batches_hold_the_same_examples(sources):
  """Same rows in the same order -> same augmentation, same examples.

  The TSV stream keeps the corrupt row 3 as a mask-0 slot; the build left it
  out. Its good examples are the TFDS stream's, epoch for epoch.
  """
  tsv, tfds = _config('tsv', sources), _config('tfds', sources)
  kwargs = {'seed': 5, 'process_index': 0, 'process_count': 1, 'shuffle': False}
  a = list(input_pipeline.create_train_dataset(tsv, **kwargs).take(6).as_numpy_iterator())
  b = list(input_pipeline.create_train_dataset(tfds, **kwargs).take(5).as_numpy_iterator())
  a = {k: np.concatenate([x[k] for x in a]) for k in a[0]}
  b = {k: np.concatenate([x[k] for x in b]) for k in b[0]}
  # 24 TSV slots = rows 0-10, 0-10, 0, 1: bad at 3, 14; then 21 good examples,
  # of which the first 20 are the TFDS stream's (10 good rows per epoch).
  np.testing.assert_array_equal(np.flatnonzero(a['mask'] == 0), [3, 14])
  good = a['mask'] > 0
  for name in a:
    np.testing.assert_array_equal(a[name][good][:20], b[name], err_msg=name)


def test_shuffled_tfds_training_covers_the_host_slice(sources):
  tfds = _config('tfds', sources)
  ds = input_pipeline.create_train_dataset(tfds, seed=1, process_index=1, process_count=2)
  ids = np.concatenate([b['betas'][:, 0] for b in ds.take(5).as_numpy_iterator()])
  # Host 1 reads examples [5, 10) = rows 6..10; every epoch yields each once.
  assert sorted(ids[:5].astype(int)) == [6, 7, 8, 9, 10]


def test_build_without_yamls_fails(tmp_path):
  with pytest.raises(ValueError, match='yamls'):
    tfds_metro.Metro(data_dir=str(tmp_path)).download_and_prepare()
