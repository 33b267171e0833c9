"""tf.data pipelines: batch contract, NumPy reference, hosts, bad rows."""

import base64
import json
import re
import threading
import time

import cv2
import jax
import numpy as np
import pytest
import tensorflow as tf

from coarsemetro_jax import steps
from configs import r50
from data_pipelines import augment
from data_pipelines import bad_rows
from data_pipelines import datasets
from data_pipelines import input_pipeline
from data_pipelines import metro_crop
from data_pipelines import metro_labels
from data_pipelines import metro_tsv
from data_pipelines import ordering
from data_pipelines import prefetch

S = 32
BATCH_KEYS = {
    'image',
    'joints_2d',
    'joints_3d',
    'pose',
    'betas',
    'has_2d_joints',
    'has_3d_joints',
    'has_smpl',
    'mask',
}


def _examples(n, seed=0):
  """Examples whose betas[0] is their row: the id survives augmentation."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = rng.integers(40, 60, 2)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), np.uint8), (0, 0), 1.5)
    center = [w / 2 + rng.uniform(-3, 3), h / 2 + rng.uniform(-3, 3)]
    label = {
        'center': center,
        'scale': float(rng.uniform(0.15, 0.25)),
        '2d_joints': np.c_[rng.uniform(5, 35, (24, 2)), np.ones(24)],
        'has_2d_joints': 1,
        '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)],
        'has_3d_joints': int(i % 3 != 0),
        'pose': rng.normal(0, 0.3, 72),
        'betas': np.r_[i, rng.normal(size=9)],
        'has_smpl': int(i % 2 == 0),
    }
    yield {
        'key': f'ex{i:02d}',
        'jpeg': cv2.imencode('.jpg', img)[1].tobytes(),
        'height': int(h),
        'width': int(w),
        'label': label,
    }


def _config(yaml_path, batch_size=4, eval_batch_size=8):
  data = r50.get_config().data
  data.train_yaml = data.eval_yaml = yaml_path
  data.image_size = S
  data.batch_size = batch_size
  data.eval_batch_size = eval_batch_size
  data.num_parallel_calls = 2
  data.crop = 'continuous'  # r50 evaluates with 'metro' (tested at the end)
  return data


@pytest.fixture(name='yaml_path', scope='module')
def fixture_yaml_path(tmp_path_factory):
  out = tmp_path_factory.mktemp('metro')
  return metro_tsv.write_split(str(out), 'train', _examples(13))


def _reference(dataset, index, params):
  """NumPy reference of one batch row (decode, augment, noise, normalise)."""
  ex = dataset.read(index)
  image = cv2.cvtColor(
      cv2.imdecode(np.frombuffer(ex['jpeg'], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
  )
  out = augment.process_example(image, ex['label'], params, S)
  img = np.clip(out['image'] * np.float32(params.pn), 0, 255) / 255.0
  out['image'] = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  return out


def _ids(batch):
  return np.round(batch['betas'][:, 0]).astype(int)


def _permutation(seed, epoch, n):
  """The documented global order of one epoch (data_pipelines/ordering.py)."""
  return np.random.default_rng((seed, epoch)).permutation(n)


def test_train_batches_match_numpy_reference(yaml_path):
  data = _config(yaml_path)
  seed = 7
  ds = input_pipeline.create_train_dataset(data, seed=seed, process_index=1, process_count=2)
  dataset = metro_tsv.MetroDataset(yaml_path)
  batches = list(ds.take(4).as_numpy_iterator())
  for batch in batches:
    assert set(batch) == BATCH_KEYS
    assert batch['image'].shape == (2, S, S, 3)
    assert batch['image'].dtype == np.float32
    assert batch['joints_2d'].shape == (2, 24, 3)
    assert batch['joints_3d'].shape == (2, 24, 4)
    assert batch['pose'].shape == (2, 72) and batch['betas'].shape == (2, 10)
    for name in ('has_2d_joints', 'has_3d_joints', 'has_smpl', 'mask'):
      assert batch[name].shape == (2,) and batch[name].dtype == np.float32
    np.testing.assert_array_equal(batch['mask'], 1)
  ids = np.concatenate([_ids(b) for b in batches])
  # Host 1 of 2 holds slots 2, 3 of each global batch of 4: global positions
  # 2, 3, 6, 7, 10, 11 (epoch 0 of 13 rows), 14, 15 (epoch 1, its rows 1, 2).
  positions = np.array([2, 3, 6, 7, 10, 11, 14, 15])
  orders = [_permutation(seed, e, 13) for e in (0, 1)]
  np.testing.assert_array_equal(ids, [orders[g // 13][g % 13] for g in positions])
  # Row r at position g used rng((seed, g // 13, r)).
  flat = {k: np.concatenate([b[k] for b in batches]) for k in BATCH_KEYS}
  for n in (0, 3, 7):
    params = augment.sample_params(np.random.default_rng((seed, positions[n] // 13, ids[n])))
    ref = _reference(dataset, ids[n], params)
    np.testing.assert_allclose(flat['image'][n], ref['image'], atol=1e-5)
    for name in (
        'joints_2d',
        'joints_3d',
        'pose',
        'betas',
        'has_2d_joints',
        'has_3d_joints',
        'has_smpl',
    ):
      np.testing.assert_allclose(flat[name][n], ref[name], atol=1e-6, err_msg=name)


def test_train_is_reproducible_and_bfloat16(yaml_path):
  data = _config(yaml_path)
  a = next(
      input_pipeline.create_train_dataset(
          data, seed=3, process_index=0, process_count=1
      ).as_numpy_iterator()
  )
  data.image_dtype = 'bfloat16'
  b = next(
      input_pipeline.create_train_dataset(
          data, seed=3, process_index=0, process_count=1
      ).as_numpy_iterator()
  )
  assert b['image'].dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(b['image'].astype(np.float32), a['image'], atol=0.02)
  np.testing.assert_array_equal(a['joints_2d'], b['joints_2d'])


def test_train_resume_skips_to_the_same_batches(yaml_path):
  data = _config(yaml_path)
  kwargs = {'seed': 3, 'process_index': 0, 'process_count': 1}
  full = list(input_pipeline.create_train_dataset(data, **kwargs).take(6).as_numpy_iterator())
  resumed = list(
      input_pipeline.create_train_dataset(data, start_step=4, **kwargs).take(2).as_numpy_iterator()
  )
  for x, y in zip(full[4:], resumed):  # 4 batches of 4 > one 13-row epoch
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _assemble(local_batches, local_rows, global_batch_size):
  """Process-local batches -> the global batch, each process's rows in its slots."""
  out = {}
  for name, first in local_batches[0].items():
    out[name] = np.zeros((global_batch_size,) + first.shape[1:], first.dtype)
    for batch, rows in zip(local_batches, local_rows):
      out[name][rows] = batch[name]
  return out


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, process_count):
  """P processes' batches make the 1-process batches: same rows, augmentation, bad slots.

  Also resumed at a mid-epoch step, and across epoch boundaries (10 rows,
  batches of 4: batches 2 and 4 straddle two epochs).
  """
  yaml_path = _write_with_bad_rows(tmp_path)  # rows 1, 4, 6, 8 are bad
  data = _config(yaml_path, batch_size=4)
  seed = 5

  def batches(num, **kwargs):
    ds = input_pipeline.create_train_dataset(data, seed=seed, **kwargs)
    return list(ds.take(num).as_numpy_iterator())

  one = batches(6, process_index=0, process_count=1)
  order = np.concatenate([_permutation(seed, e, 10) for e in range(3)])
  for t, batch in enumerate(one):
    rows = order[4 * t : 4 * t + 4]
    good = ~np.isin(rows, [1, 4, 6, 8])  # a bad row keeps its slot, mask 0
    np.testing.assert_array_equal(batch['mask'], good)
    np.testing.assert_array_equal(_ids(batch)[good], rows[good])
    assert not batch['image'][~good].any() and not batch['has_smpl'][~good].any()
  assert not all(b['mask'].all() for b in one)  # some slots are bad ones

  splits = [[ordering.contiguous_rows(4, p, process_count) for p in range(process_count)]]
  if process_count == 2:  # a mesh whose processes' devices interleave
    splits.append([np.array([0, 2]), np.array([1, 3])])
  for local_rows in splits:
    for start_step in (0, 3):
      hosts = [
          batches(
              6 - start_step,
              process_index=p,
              process_count=process_count,
              start_step=start_step,
              local_rows=rows,
          )
          for p, rows in enumerate(local_rows)
      ]
      for t, local in enumerate(zip(*hosts), start_step):
        glob = _assemble(local, local_rows, 4)
        for name in BATCH_KEYS:
          np.testing.assert_array_equal(
              glob[name],
              one[t][name],
              err_msg=f'{name}, batch {t}, start_step {start_step}, {local_rows}',
          )


def test_process_rows_follow_the_mesh_device_order():
  devices = jax.devices()
  # The project's mesh: each process's devices are a contiguous block.
  sharding = steps.batch_sharding(steps.make_device_mesh())
  for p in range(2):
    np.testing.assert_array_equal(
        ordering.process_rows(sharding, 16, devices[4 * p : 4 * p + 4]),
        ordering.contiguous_rows(16, p, 2),
    )
  np.testing.assert_array_equal(ordering.process_rows(sharding, 16), np.arange(16))
  # A mesh that interleaves two processes' devices: 2 rows per device.
  mesh = jax.sharding.Mesh(np.array(devices)[[0, 4, 1, 5, 2, 6, 3, 7]], ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.P('data'))
  np.testing.assert_array_equal(
      ordering.process_rows(sharding, 16, devices[:4]), [0, 1, 4, 5, 8, 9, 12, 13]
  )


def test_eval_sees_every_example_once_across_hosts(yaml_path):
  data = _config(yaml_path, eval_batch_size=8)
  dataset = metro_tsv.MetroDataset(yaml_path)
  hosts = []
  for process_index in range(2):
    ds = input_pipeline.create_eval_dataset(data, process_index=process_index, process_count=2)
    hosts.append(list(ds.as_numpy_iterator()))
    assert len(ds) == 2  # ceil(7 rows / 4 per host batch) on both hosts
  assert [len(h) for h in hosts] == [2, 2]
  seen = []
  for host in hosts:
    for batch in host:
      assert batch['image'].shape == (4, S, S, 3)
      real = batch['mask'] == 1
      # Padding only at the end of the host's stream, and fully zeroed.
      assert np.all(np.diff(batch['mask']) <= 0)
      for name in ('joints_2d', 'pose', 'betas', 'has_smpl', 'has_3d_joints'):
        assert not batch[name][~real].any()
      seen.extend(_ids(batch)[real])
  assert sorted(seen) == list(range(13))  # each exactly once
  # Eval rows are the un-augmented test-time crops.
  batch = hosts[1][1]
  for i, row in enumerate(_ids(batch)[batch['mask'] == 1]):
    ref = _reference(dataset, row, augment.AugParams())
    np.testing.assert_allclose(batch['image'][i], ref['image'], atol=1e-5)
    np.testing.assert_allclose(batch['joints_2d'][i], ref['joints_2d'], atol=1e-6)

  # The two hosts' batches form the global batch on 8 devices.
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.P('data'))
  local = {k: np.concatenate([hosts[0][0][k], hosts[1][0][k]]) for k in hosts[0][0]}
  glob = input_pipeline.to_global_batch(local, sharding)
  assert glob['image'].shape == (8, S, S, 3)
  assert glob['image'].sharding == sharding
  assert len(glob['mask'].addressable_shards) == 8
  for shard in glob['betas'].addressable_shards:
    np.testing.assert_array_equal(shard.data, local['betas'][shard.index])


def _write_with_bad_rows(out_dir, n=10):
  """A dataset whose rows 1, 4, 6, 8 are damaged in different ways."""
  yaml_path = metro_tsv.write_split(str(out_dir), 'train', _examples(n))
  img_path = out_dir / 'train.img.tsv'
  img_rows = [line.split('\t') for line in img_path.read_text().splitlines()]
  img_rows[1][1] = img_rows[1][1][:10] + '!!' + img_rows[1][1][12:]  # base64
  img_rows[4][1] = base64.b64encode(b'\xff\xd8 not a jpeg').decode()
  metro_tsv.write_tsv(str(img_path), [tuple(r) for r in img_rows])
  lab_path = out_dir / 'train.label.tsv'
  lab_rows = [line.split('\t') for line in lab_path.read_text().splitlines()]
  lab_rows[6][1] = re.sub(r'"3d_joints": \[\[[^,]+', '"3d_joints": [[NaN', lab_rows[6][1])
  lab_rows[6][1] = lab_rows[6][1].replace('"has_3d_joints": 0', '"has_3d_joints": 1')
  lab_rows[8][1] = lab_rows[8][1].replace('"center"', '"centre"')
  metro_tsv.write_tsv(str(lab_path), [tuple(r) for r in lab_rows])
  return yaml_path


def test_bad_rows_keep_their_slot_and_are_counted_and_logged(tmp_path, caplog):
  yaml_path = _write_with_bad_rows(tmp_path)
  data = _config(yaml_path, batch_size=3, eval_batch_size=4)
  bad = bad_rows.BadRows(10, 0.01)
  ds = input_pipeline.create_train_dataset(
      data, process_index=0, process_count=1, shuffle=False, bad_rows=bad
  )
  batches = list(ds.take(4).as_numpy_iterator())
  flat = {k: np.concatenate([b[k] for b in batches]) for k in BATCH_KEYS}
  # Rows 0-9 then 0, 1 in order; the bad ones stay as all-zero mask-0 examples.
  np.testing.assert_array_equal(flat['mask'], [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0])
  good = flat['mask'] > 0
  np.testing.assert_array_equal(_ids(flat)[good], [0, 2, 3, 5, 7, 9, 0])
  for name in BATCH_KEYS:
    assert not flat[name][~good].any(), name
  img, lab = str(tmp_path / 'train.img.tsv'), str(tmp_path / 'train.label.tsv')
  assert bad.rows == {(img, 1), (img, 4), (img, 6), (img, 8)}
  assert bad.count >= 5  # each skipped once per epoch (and on read-ahead)
  text = caplog.text
  assert f'{img} row 1: bad base64' in text
  assert f'{img} row 4: JPEG does not decode' in text
  assert f'{lab} row 6: 3d_joints has non-finite values' in text
  assert f"{lab} row 8: label has no 'center'" in text

  bad = bad_rows.BadRows(10, 0.01)
  ds = input_pipeline.create_eval_dataset(data, process_index=1, process_count=2, bad_rows=bad)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == len(ds) == 3  # ceil(5 rows / 2 per batch)
  mask = np.concatenate([b['mask'] for b in batches])
  ids = np.concatenate([_ids(b) for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(ids[:3], [5, 7, 9])  # rows 6 and 8 skipped
  assert bad.count == 2


def test_too_many_bad_rows_fail_in_the_callers_thread(tmp_path):
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', _examples(12))
  img_path = tmp_path / 'train.img.tsv'
  rows = [
      (line.split('\t')[0], base64.b64encode(b'junk').decode())
      for line in img_path.read_text().splitlines()
  ]
  metro_tsv.write_tsv(str(img_path), rows)
  data = _config(yaml_path)
  message = (
      r'1\d distinct bad rows exceed the limit of 10 \(config.data.max_bad_fraction=0.01\); '
      rf'last: {img_path} row \d+: JPEG does not decode; '
  )
  existing = _prefetch_threads()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for ahead in (0, 2):  # in this thread, and from the prefetch thread
    bad = bad_rows.BadRows(max_fraction=0.01)
    ds = input_pipeline.create_train_dataset(data, process_index=0, process_count=1, bad_rows=bad)
    batches = input_pipeline.global_batches(ds, sharding, ahead, bad_rows=bad)
    # All-bad batches keep their slots, so a few may come before the limit
    # (10) is crossed; no batch prepared after it is ever returned.
    with pytest.raises(bad_rows.TooManyBadRowsError, match=message):
      for _ in range(3):  # the 12 rows' batches
        next(batches)
    assert bad.limit == 10 and bad.exceeded
  assert not _prefetch_threads(existing)
  # Read without the host check, the stream still fails (a TensorFlow error,
  # not a Python one raised inside tf.data).
  ds = input_pipeline.create_train_dataset(data, process_index=0, process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match='too many bad rows') as e:
    list(ds.take(3).as_numpy_iterator())
  assert 'PyFunc' not in str(e.value)


def test_eval_over_the_bad_row_limit_fails_instead_of_padding(tmp_path):
  yaml_path = _write_with_bad_rows(tmp_path)
  data = _config(yaml_path, eval_batch_size=2)
  bad = bad_rows.BadRows(10, 0.01)
  bad.limit = 3  # below the floor of 10, so that 4 bad rows of 10 exceed it
  ds = input_pipeline.create_eval_dataset(data, process_index=0, process_count=1, bad_rows=bad)
  with pytest.raises(bad_rows.TooManyBadRowsError, match='4 distinct bad rows exceed'):
    list(input_pipeline.numpy_batches(ds, bad))


def test_bad_files_fail_when_the_dataset_is_created(tmp_path, yaml_path):
  data = _config(str(tmp_path / 'missing.yaml'))
  with pytest.raises(FileNotFoundError, match='missing.yaml'):
    input_pipeline.create_train_dataset(data, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='missing.yaml'):
    input_pipeline.create_eval_dataset(data, process_index=0, process_count=1)
  data = _config(yaml_path, batch_size=6)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible'):
    input_pipeline.create_train_dataset(data, process_index=0, process_count=4)
  data.source = 'gcs'
  with pytest.raises(ValueError, match="'tsv' or 'tfds'"):
    input_pipeline.create_train_dataset(data, process_index=0, process_count=1)


def _prefetch_threads(existing=()):
  """Live prefetch threads, but for `existing` (ones other tests may not have collected)."""
  return [t for t in threading.enumerate() if t.name == 'batch_prefetch' and t not in existing]


def test_background_iterator_keeps_order_reraises_and_stops():
  existing = _prefetch_threads()
  assert list(prefetch.BackgroundIterator(iter(range(7)), 2)) == list(range(7))

  def failing():
    yield 'a'
    raise metro_labels.BadRowError('row 3 of train.img.tsv: not a JPEG')

  batches = prefetch.BackgroundIterator(failing(), 2)
  assert next(batches) == 'a'
  with pytest.raises(metro_labels.BadRowError, match='row 3 of train.img.tsv'):
    next(batches)

  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1

  batches = prefetch.BackgroundIterator(endless(), 3)
  assert [next(batches) for _ in range(5)] == list(range(5))
  time.sleep(0.2)
  assert len(produced) <= 5 + 3 + 1  # at most `size` ahead (+1 waiting to be put)
  batches.close()
  assert not _prefetch_threads(existing)  # closing joined the thread
  with pytest.raises(StopIteration):
    next(batches)
  # Closed before its first item was taken: the thread stops too.
  prefetch.BackgroundIterator(endless(), 1).close()
  assert not _prefetch_threads(existing)


# ---------------------------------------------------------------------------
# config.data.crop / train_crop = 'metro': the official crop, to the last bit.


def _metro_examples():
  """`_examples` plus two rows whose float32-rounded labels cross integers.

  At S = 32 and scale 0.2 (h = 40 px) the box starts at int(cx - 20) and a
  keypoint lands at int(0.8 (x - cx) + 16) + 1: cx = 25 - 1e-9 starts the box
  at 4 (at 5 from float32's 25.0), x = 26.25 - 1e-8 lands at 17 (18 in float32).
  """
  examples = list(_examples(6, seed=1))
  for ex, dx in zip(examples[:2], (0.0, -3.5)):
    label = ex['label']
    label['center'] = [25 - 1e-9 + dx, 24 - 1e-9]
    label['scale'] = 0.2
    label['2d_joints'][:4, :2] = [[26.25 - 1e-8 + dx, 23.75 - 1e-8]] * 4
  return examples


@pytest.fixture(name='metro_yaml', scope='module')
def fixture_metro_yaml(tmp_path_factory):
  out = tmp_path_factory.mktemp('metro_crop')
  return metro_tsv.write_split(str(out), 'train', _metro_examples())


def _json_label(dataset, index):
  """The row's label dict as the JSON holds it (float64), like the official reader."""
  source, row = dataset.rows[index]
  return json.loads(dataset.label_files[source].read_row(int(row))[1])[0]


def _metro_reference(dataset, index, params):
  """metro_crop applied to the row's JPEG and JSON label; the 3D targets from augment."""
  ex, label = dataset.read(index), _json_label(dataset, index)
  image, joints_2d = metro_crop.image_and_joints_2d(
      metro_crop.decode_image(ex['jpeg']),
      label['center'],
      params.sc * label['scale'],
      np.asarray(label['2d_joints']),
      S,
      params.rot,
      params.flip,
      params.pn,
  )
  out = augment.process_example(augment.decode_jpeg(ex['jpeg']), ex['label'], params, S)
  return {**out, 'image': image, 'joints_2d': joints_2d}


_TARGETS = (
    'image',
    'joints_2d',
    'joints_3d',
    'pose',
    'betas',
    'has_2d_joints',
    'has_3d_joints',
    'has_smpl',
)


def test_metro_eval_batches_equal_the_official_crop(metro_yaml):
  data = _config(metro_yaml, eval_batch_size=8)
  data.crop = 'metro'
  dataset = metro_tsv.MetroDataset(metro_yaml)
  [batch] = input_pipeline.create_eval_dataset(
      data, process_index=0, process_count=1
  ).as_numpy_iterator()
  np.testing.assert_array_equal(batch['mask'], [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(_ids(batch)[:6], range(6))
  for i in range(6):
    ref = _metro_reference(dataset, i, augment.AugParams())
    for name in _TARGETS:
      assert batch[name][i].dtype == np.float32
      np.testing.assert_array_equal(batch[name][i], ref[name], err_msg=f'row {i} {name}')
  # 'continuous' is another crop: its keypoint T(p) (crop px) becomes
  # int(T(p)) + 1 here, 0 to 1 px more (up to 2 px left of or above the crop,
  # where int() rounds up).
  data.crop = 'continuous'
  [cont] = input_pipeline.create_eval_dataset(
      data, process_index=0, process_count=1
  ).as_numpy_iterator()
  assert np.any(cont['image'][:6] != batch['image'][:6])
  shift = (batch['joints_2d'][:6, :, :2] - cont['joints_2d'][:6, :, :2]) * S / 2  # crop px
  assert shift.min() >= -1e-4 and 0.3 < shift.mean() < 0.7 and shift.max() < 2


def test_metro_train_batches_use_the_sampled_parameters(metro_yaml):
  data = _config(metro_yaml, batch_size=6)
  data.train_crop = 'metro'
  seed = 4
  dataset = metro_tsv.MetroDataset(metro_yaml)
  ds = input_pipeline.create_train_dataset(
      data, seed=seed, process_index=0, process_count=1, shuffle=False
  )
  batch = next(ds.as_numpy_iterator())
  flips = []
  for i in range(6):
    params = augment.sample_params(np.random.default_rng((seed, 0, i)))
    flips.append(params.flip)
    ref = _metro_reference(dataset, i, params)
    for name in _TARGETS:
      np.testing.assert_array_equal(batch[name][i], ref[name], err_msg=f'row {i} {name}')
  assert any(flips) and not all(flips)


def test_metro_crop_from_tfds_equals_tsv(metro_yaml, tmp_path):
  # Imported here: the other tests of this file do not need TFDS.
  from data_pipelines import tfds_metro

  tfds_metro.Metro(data_dir=str(tmp_path), yamls={'validation': metro_yaml}).download_and_prepare()
  data = _config(metro_yaml, eval_batch_size=8)
  data.crop = 'metro'
  [tsv] = input_pipeline.create_eval_dataset(
      data, process_index=0, process_count=1
  ).as_numpy_iterator()
  data.source, data.tfds_data_dir = 'tfds', str(tmp_path)
  [tfds] = input_pipeline.create_eval_dataset(
      data, process_index=0, process_count=1
  ).as_numpy_iterator()
  for name in tsv:
    np.testing.assert_array_equal(tfds[name], tsv[name], err_msg=name)


@pytest.mark.parametrize('key', ['crop', 'train_crop'])
def test_unknown_crop_is_one_error_naming_the_key(yaml_path, key):
  data = _config(yaml_path)
  data[key] = 'metr'
  message = rf"config.data.{key} must be one of \['continuous', 'metro'\], got 'metr'"
  with pytest.raises(datasets.DataConfigError, match=message):
    datasets.check_config(data)
  create = (
      input_pipeline.create_train_dataset
      if key == 'train_crop'
      else input_pipeline.create_eval_dataset
  )
  with pytest.raises(ValueError, match=message):
    create(data, process_index=0, process_count=1)
