"""TFDS builder (ArrayRecord and TFRecord): the TSVs' rows and bytes; the same batches as
the TSVs; ArrayRecord training batches independent of the host count."""

import base64
import logging

import cv2
import numpy as np
import pytest
import tensorflow as tf

from configs import r50
from data_pipelines import bad_rows
from data_pipelines import examples
from data_pipelines import input_pipeline
from data_pipelines import metro_tsv
from data_pipelines import ordering
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


# The rows of the training split's examples: row 3 has a corrupt JPEG.
TRAIN_ROWS = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
BATCH_KEYS = (
    'image',
    'joints_2d',
    'joints_3d',
    'pose',
    'betas',
    'has_2d_joints',
    'has_3d_joints',
    'has_smpl',
    'mask',
)


@pytest.fixture(name='sources', scope='module')
def fixture_sources(tmp_path_factory):
  """A TSV dataset with one corrupt JPEG row, and its ArrayRecord and TFRecord builds."""
  root = tmp_path_factory.mktemp('tfds')
  train = metro_tsv.write_split(str(root / 'tsv'), 'train', _examples(11))
  valid = metro_tsv.write_split(str(root / 'tsv'), 'valid', _examples(7))
  img = root / 'tsv' / 'train.img.tsv'
  rows = [line.split('\t') for line in img.read_text().splitlines()]
  rows[3][1] = base64.b64encode(b'\xff\xd8 broken').decode()
  metro_tsv.write_tsv(str(img), [tuple(r) for r in rows])
  builds = {}
  for file_format in ('array_record', 'tfrecord'):
    builds[file_format] = str(root / file_format)
    builder = tfds_metro.Metro(
        data_dir=builds[file_format], yamls={'train': train, 'validation': valid}
    )
    if file_format == 'array_record':
      builder.download_and_prepare()  # the default format
    else:
      builder.download_and_prepare(file_format=file_format)
  return train, valid, builds


def _config(kind, sources, file_format='array_record'):
  train, valid, builds = sources
  data = r50.get_config().data
  data.source = kind
  data.train_yaml, data.eval_yaml, data.tfds_data_dir = train, valid, builds[file_format]
  data.image_size = S
  data.batch_size = 4
  data.eval_batch_size = 4
  return data


def _batches(data, num, **kwargs):
  ds = input_pipeline.create_train_dataset(data, **kwargs)
  return list(ds.take(num).as_numpy_iterator())


def _assert_batches_equal(a, b, what=''):
  assert len(a) == len(b) > 0
  for t, (x, y) in enumerate(zip(a, b)):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=f'{name}, batch {t} {what}')


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_build_keeps_rows_in_order_and_skips_bad_ones(sources, file_format):
  train, _, builds = sources
  tfds_dir = builds[file_format]
  assert tfds_metro.file_format(tfds_dir) == file_format
  assert tfds_metro.num_examples(tfds_dir, 'train') == 10
  assert tfds_metro.num_examples(tfds_dir, 'validation') == 7
  dataset = metro_tsv.MetroDataset(train)
  got = list(tfds_metro.read_split(tfds_dir, 'train').as_numpy_iterator())
  assert [g['key'].decode() for g in got] == [f'ex{r}' for r in TRAIN_ROWS]
  for g, r in zip(got, TRAIN_ROWS):
    assert g['index'] == r
    ex = dataset.read(r)
    assert g['image'] == ex['jpeg']  # the original bytes, not re-encoded
    for name, value in ex['label'].items():
      np.testing.assert_array_equal(g[name], value, err_msg=name)
      assert g[name].dtype == value.dtype, name
  part = tfds_metro.read_split(tfds_dir, 'train', start=4, end=7)
  assert [g['key'].decode() for g in part.as_numpy_iterator()] == ['ex5', 'ex6', 'ex7']


def test_array_record_reads_by_index(sources):
  source = tfds_metro.data_source(sources[2]['array_record'], 'train')
  assert len(source) == 10
  assert [source[i]['key'].decode() for i in (6, 0, 3)] == ['ex7', 'ex0', 'ex4']
  with pytest.raises(NotImplementedError, match='array_record'):
    tfds_metro.data_source(sources[2]['tfrecord'], 'train')


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_are_identical(sources, file_format, process_count):
  tsv, tfds = _config('tsv', sources), _config('tfds', sources, file_format)
  for process_index in range(process_count):
    a = input_pipeline.create_eval_dataset(
        tsv, process_index=process_index, process_count=process_count
    )
    b = input_pipeline.create_eval_dataset(
        tfds, process_index=process_index, process_count=process_count
    )
    assert len(a) == len(b)
    _assert_batches_equal(list(a.as_numpy_iterator()), list(b.as_numpy_iterator()))


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_train_batches_hold_the_same_examples(sources, file_format):
  """Same rows in the same order -> same augmentation, same examples.

  The TSV stream keeps the corrupt row 3 as a mask-0 slot; the build left it
  out. Its good examples are the TFDS stream's, epoch for epoch.
  """
  tsv, tfds = _config('tsv', sources), _config('tfds', sources, file_format)
  kwargs = {'seed': 5, 'process_index': 0, 'process_count': 1, 'shuffle': False}
  a = _batches(tsv, 6, **kwargs)
  b = _batches(tfds, 5, **kwargs)
  a = {k: np.concatenate([x[k] for x in a]) for k in a[0]}
  b = {k: np.concatenate([x[k] for x in b]) for k in b[0]}
  # 24 TSV slots = rows 0-10, 0-10, 0, 1: bad at 3, 14; then 21 good examples,
  # of which the first 20 are the TFDS stream's (10 good rows per epoch).
  np.testing.assert_array_equal(np.flatnonzero(a['mask'] == 0), [3, 14])
  good = a['mask'] > 0
  for name in a:
    np.testing.assert_array_equal(a[name][good][:20], b[name], err_msg=name)


def test_shuffled_tsv_and_array_record_batches_are_identical(sources):
  """A split built without bad rows: the same order and augmentation keys as its TSVs.

  The clean 7-row validation split as training data, shuffled and augmented,
  over 3 epochs (batches of 4 cross the epoch boundaries at 7 and 14).
  """
  tsv, tfds = _config('tsv', sources), _config('tfds', sources)
  tsv.train_yaml = tsv.eval_yaml
  tfds.tfds_train_split = 'validation'
  kwargs = {'seed': 3, 'process_index': 0, 'process_count': 1}
  a, b = _batches(tsv, 5, **kwargs), _batches(tfds, 5, **kwargs)
  _assert_batches_equal(a, b)
  ids = np.concatenate([x['betas'][:, 0] for x in a]).astype(int)
  np.testing.assert_array_equal(
      ids, np.concatenate([ordering.global_batch_rows(7, 4, t, seed=3) for t in range(5)])
  )
  assert all(x['mask'].all() for x in a)


def _assemble(local_batches, local_rows, global_batch_size):
  """Process-local batches -> the global batch, each process's rows in its slots."""
  out = {}
  for name, first in local_batches[0].items():
    out[name] = np.zeros((global_batch_size,) + first.shape[1:], first.dtype)
    for batch, rows in zip(local_batches, local_rows):
      out[name][rows] = batch[name]
  return out


@pytest.mark.parametrize('process_count', [2, 4])
def test_array_record_batches_do_not_depend_on_the_process_count(sources, process_count):
  """P processes' batches make the 1-process batches: same examples, same augmentation.

  Shuffled and augmented (r50's factors), 10 examples in batches of 4 (batch 2
  straddles epochs 0 and 1, batch 5 starts epoch 2), also resumed mid-epoch.
  """
  data = _config('tfds', sources)
  assert data.shuffle and data.scale_factor > 0 and data.rot_factor > 0
  seed = 5
  one = _batches(data, 6, seed=seed, process_index=0, process_count=1)
  # Global batch t holds the records of the documented global order.
  for t, batch in enumerate(one):
    records = ordering.global_batch_rows(10, 4, t, seed=seed)
    np.testing.assert_array_equal(batch['betas'][:, 0].astype(int), TRAIN_ROWS[records])
    np.testing.assert_array_equal(batch['mask'], 1)
  # Augmentation is on: a record's two epochs differ (keyed on the epoch).
  record = ordering.epoch_order(10, seed, 0)[0]  # at position 0
  t, k = divmod(10 + int(np.flatnonzero(ordering.epoch_order(10, seed, 1) == record)[0]), 4)
  assert np.abs(one[t]['image'][k] - one[0]['image'][0]).mean() > 0.05
  _assert_batches_equal(
      _batches(data, 3, seed=seed, process_index=0, process_count=1, start_step=3),
      one[3:],
      'resumed at step 3',
  )

  splits = [[ordering.contiguous_rows(4, p, process_count) for p in range(process_count)]]
  if process_count == 2:  # a mesh whose processes' devices interleave
    splits.append([np.array([0, 2]), np.array([1, 3])])
  for local_rows in splits:
    for start_step in (0, 3):
      hosts = [
          _batches(
              data,
              6 - start_step,
              seed=seed,
              process_index=p,
              process_count=process_count,
              start_step=start_step,
              local_rows=rows,
          )
          for p, rows in enumerate(local_rows)
      ]
      glob = [_assemble(local, local_rows, 4) for local in zip(*hosts)]
      _assert_batches_equal(glob, one[start_step:], f'start_step {start_step}, {local_rows}')


class _FailingSource:
  """A data source whose record `bad` cannot be read."""

  def __init__(self, source, bad):
    self._source, self._bad = source, bad

  def __getitem__(self, record):
    if record == self._bad:
      raise OSError('read failed')
    return self._source[record]

  def __getitems__(self, records):
    return [self[r] for r in records]


def test_unreadable_array_record_keeps_its_slot(sources):
  data = _config('tfds', sources)
  source = tfds_metro.data_source(data.tfds_data_dir, 'train')
  bad = bad_rows.BadRows(10, 0.5)
  params_fn = examples.params_fn(data, 0, train=False)
  load = examples.tfds_index_loader(_FailingSource(source, 2), bad, params_fn, S, 'train', 10)
  chunk = load(tf.range(4, dtype=tf.int64), tf.constant([1, 2, 0, 5], tf.int64))
  np.testing.assert_array_equal(chunk['mask'], [1, 0, 1, 1])
  np.testing.assert_array_equal(chunk['betas'][:, 0], [1, 0, 0, 6])
  assert not chunk['image'][1].numpy().any()
  assert bad.rows == {('train', 'record 2')}
  assert 'train record 2: read failed' in bad.messages[0]


def test_tfrecord_build_trains_host_local_and_warns_on_several_hosts(sources, caplog):
  """A TFRecord build is read in sequence: each host shuffles its own slice."""
  tfds = _config('tfds', sources, 'tfrecord')
  caplog.set_level(logging.WARNING)
  one = _batches(tfds, 3, seed=1, process_index=0, process_count=1)
  assert all(b['mask'].all() for b in one)
  assert 'TFRecord build' not in caplog.text
  ds = input_pipeline.create_train_dataset(tfds, seed=1, process_index=1, process_count=2)
  [warning] = [r for r in caplog.records if 'TFRecord build' in r.getMessage()]
  assert 'copy_from=' in warning.getMessage() and tfds.tfds_data_dir in warning.getMessage()
  ids = np.concatenate([b['betas'][:, 0] for b in ds.take(5).as_numpy_iterator()])
  # Host 1 reads examples [5, 10) = rows 6..10; every epoch yields each once.
  assert sorted(ids[:5].astype(int)) == [6, 7, 8, 9, 10]


def test_copy_from_a_tfrecord_build_gives_the_array_record_build(sources, tmp_path):
  _, _, builds = sources
  copy = str(tmp_path / 'copy')
  tfds_metro.Metro(data_dir=copy, copy_from=builds['tfrecord']).download_and_prepare()
  assert tfds_metro.file_format(copy) == 'array_record'
  for split in ('train', 'validation'):
    a = list(tfds_metro.read_split(copy, split).as_numpy_iterator())
    b = list(tfds_metro.read_split(builds['array_record'], split).as_numpy_iterator())
    _assert_batches_equal(a, b, split)


def test_building_over_the_other_format_fails(sources):
  train, _, builds = sources
  builder = tfds_metro.Metro(data_dir=builds['tfrecord'], yamls={'train': train})
  with pytest.raises(ValueError, match='already holds a tfrecord build.*copy_from='):
    builder.download_and_prepare()
  with pytest.raises(ValueError, match='ArrayRecord build, read in order'):
    tfds_metro.read_split(builds['array_record'], 'train', shuffle_files=True)


def test_build_without_yamls_fails(tmp_path):
  with pytest.raises(ValueError, match='yamls'):
    tfds_metro.Metro(data_dir=str(tmp_path)).download_and_prepare()
