"""Per-row example preparation: one METRO row -> one prepared example.

The NumPy/OpenCV layer under the tf.data pipelines (input_pipeline.py), which
calls it through one `tf.numpy_function` per chunk of `ROWS_PER_CALL` rows.
For each row: read it, cv2 JPEG decode, the crop of `config.data.crop`
(evaluation) or `train_crop` (training) with the §4.3 augmentation parameters
(`params_fn`), then the label transforms; a row that fails is recorded in the
`bad_rows.BadRows` object and becomes an `empty_example` (mask 0). It is kept
apart from the dataset construction (sources, global order, batching) because
it is plain per-row work on NumPy arrays outside TensorFlow's graph; only the
chunk spec and the numpy_function bridge touch TensorFlow.

What an example holds is its `Layout`: the crop side and whether the rows are
bodies (J24 joints, SMPL) or hands (`config.data.hand`: FreiHAND's 21 joints,
MANO, is_left; data_pipelines/__init__.py documents both batches).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from data_pipelines import augment
from data_pipelines import metro_crop
from data_pipelines import metro_labels

# Rows prepared per tf.numpy_function call. For small crops tf.data's
# per-call and per-element overhead costs more CPU than decoding and warping a
# row, so each call prepares several rows.
ROWS_PER_CALL = 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one example holds: a `size` x `size` crop, and a body's or a hand's labels."""

  size: int
  hand: bool = False

  @classmethod
  def of(cls, data_config):
    """The layout of config.data: image_size, and `hand` (False when the field is absent)."""
    return cls(int(data_config.image_size), bool(data_config.get('hand', False)))


def as_layout(layout):
  """A Layout; a bare crop size (the functions below take either) is a body's."""
  return layout if isinstance(layout, Layout) else Layout(int(layout))


def example_spec(layout):
  """Per-example fields before batching: name -> (shape, dtype)."""
  layout = as_layout(layout)
  size = layout.size
  joints = metro_labels.NUM_HAND_JOINTS if layout.hand else metro_labels.NUM_J24
  spec = {
      'image': ((size, size, 3), tf.float32),
      'joints_2d': ((joints, 3), tf.float32),
      'joints_3d': ((joints, 4), tf.float32),
      'pose': ((metro_labels.NUM_HAND_POSE if layout.hand else metro_labels.NUM_POSE,), tf.float32),
      'betas': ((metro_labels.NUM_BETAS,), tf.float32),
      'has_2d_joints': ((), tf.float32),
      'has_3d_joints': ((), tf.float32),
      'has_smpl': ((), tf.float32),
  }
  if layout.hand:
    spec['is_left'] = ((), tf.float32)  # 1: a left hand (its pose drives the mirrored model)
  spec['mask'] = ((), tf.float32)  # 0: bad row or eval padding
  return spec


def empty_example(layout):
  """All-zero example with mask 0 (bad rows and eval padding)."""
  return {
      name: np.zeros(shape, dtype.as_numpy_dtype)
      for name, (shape, dtype) in example_spec(layout).items()
  }


# config.data.crop (evaluation) and train_crop (training): how the image and
# its 2D joints are cropped. 'continuous': one exact affine for both
# (augment.process_example); 'metro': the released METRO/FastMETRO arithmetic,
# integer box and truncated keypoints (metro_crop).
CROPS = ('continuous', 'metro')


def _crop(data_config, train):
  key = 'train_crop' if train else 'crop'
  value = data_config.get(key)
  if value not in CROPS:
    raise ValueError(f'config.data.{key} must be one of {list(CROPS)}, got {value!r}')
  return value


def _process(jpeg, label, params, layout, where):
  """Decodes, crops and augments one example; raises BadRowError naming `where`."""
  layout = as_layout(layout)
  image = augment.decode_jpeg(jpeg)
  if image is None:
    raise metro_labels.BadRowError(f'{where}: JPEG does not decode')
  size = layout.size
  if params.crop == 'metro':
    # Already noised, clipped and ImageNet-normalised, as the released code.
    out = augment.label_targets(label, params, layout.hand)
    out['image'], out['joints_2d'] = metro_crop.image_and_joints_2d(
        image,
        label['center'],
        params.sc * label['scale'],
        label['joints_2d'],
        size,
        params.rot,
        params.flip,
        params.pn,
    )
  else:
    out = augment.process_example(image, label, params, size, layout.hand)
    out['image'] = augment.color_normalize(out['image'], out.pop('pn'))
  out['mask'] = np.float32(1)
  return out


def params_fn(data_config, seed, train):
  """(epoch, row) -> AugParams: METRO sampling (train) or identity (eval).

  Hands (config.data.hand) are sampled as METRO's hand training does
  (`augment.sample_hand_params`: no flip).
  """
  crop = _crop(data_config, train)
  if not train:
    return lambda epoch, row: augment.AugParams(crop=crop)
  sample = augment.sample_hand_params if Layout.of(data_config).hand else augment.sample_params
  return lambda epoch, row: dataclasses.replace(
      sample(
          np.random.default_rng((seed, int(epoch), int(row))),
          scale_factor=data_config.scale_factor,
          rot_factor=data_config.rot_factor,
          noise_factor=data_config.noise_factor,
      ),
      crop=crop,
  )


def _stacked(examples, spec):
  """Per-example tuples -> one tuple of [rows, ...] arrays in `spec` order."""
  return tuple(np.stack([ex[name] for ex in examples]) for name in spec)


def _chunk_spec(spec):
  return [dtype for _, dtype in spec.values()] + [tf.bool]


def _guarded(load, bad_rows, spec, layout):
  """`load` whose outputs end with the `stop` flag; nothing is decoded past the limit."""

  def fn(*args):
    if bad_rows.exceeded:
      return _stacked([empty_example(layout)] * len(args[0]), spec) + (np.True_,)
    return load(*args) + (np.bool_(bad_rows.exceeded),)

  return fn


def _as_chunk(values, layout):
  """numpy_function outputs -> dict of [rows, ...] tensors (static trailing shapes)."""
  *values, stop = values
  out = {}
  for value, (name, (shape, _)) in zip(values, example_spec(layout).items()):
    value.set_shape((None,) + shape)  # the last eval chunk may be short
    out[name] = value
  stop.set_shape(())
  out['stop'] = stop
  return out


def tsv_loader(dataset, bad_rows, params_fn, layout, epoch_length):
  """[rows] (counter, row index) -> dict of [rows, ...] through one numpy_function."""
  spec = example_spec(layout)

  def load_one(counter, index):
    index = int(index)
    path, row = dataset.location(index)
    try:
      ex = dataset.read(index)
      return _process(
          ex['jpeg'],
          ex['label'],
          params_fn(counter // epoch_length, index),
          layout,
          f'{path} row {row}',
      )
    except Exception as e:
      # One bad row must not end a long run; BadRows bounds systematic errors.
      message = (
          str(e)
          if isinstance(e, metro_labels.BadRowError)
          else (f'{path} row {row}: {type(e).__name__}: {e}')
      )
      bad_rows.record((path, row), message)
      return empty_example(layout)

  def load(counters, indices):
    return _stacked([load_one(c, i) for c, i in zip(counters, indices)], spec)

  def fn(counters, indices):
    values = tf.numpy_function(
        _guarded(load, bad_rows, spec, layout), [counters, indices], _chunk_spec(spec)
    )
    return _as_chunk(values, layout)

  return fn


# The label fields of a TFDS example (data_pipelines/tfds_metro.LABEL_FEATURES).
_TFDS_LABELS = (
    'center',
    'scale',
    'joints_2d',
    'joints_3d',
    'pose',
    'betas',
    'has_2d_joints',
    'has_3d_joints',
    'has_smpl',
)


def _tfds_example(jpeg, label, params, layout, split, key, bad_rows):
  """One TFDS example, prepared; a failure is recorded and gives an `empty_example`."""
  try:
    return _process(jpeg, label, params, layout, f'{split} key {key}')
  except Exception as e:
    bad_rows.record((split, key), f'{split} key {key}: {e}')
    return empty_example(layout)


def tfds_loader(bad_rows, params_fn, layout, split, epoch_length):
  """[rows] (counter, TFDS example) -> dict of [rows, ...] through one numpy_function.

  For examples streamed from a TFRecord build (`tfds_metro.read_split`).
  """
  spec = example_spec(layout)

  def load_one(counter, index, key, jpeg, label_values):
    key = key.decode('utf-8', 'replace')
    label = dict(zip(_TFDS_LABELS, label_values))
    params = params_fn(counter // epoch_length, index)
    return _tfds_example(jpeg, label, params, layout, split, key, bad_rows)

  def load(counters, indices, keys, jpegs, *labels):
    return _stacked(
        [
            load_one(counters[k], indices[k], keys[k], jpegs[k], [values[k] for values in labels])
            for k in range(len(counters))
        ],
        spec,
    )

  def fn(counters, ex):
    inputs = [counters, ex['index'], ex['key'], ex['image']]
    inputs += [ex[n] for n in _TFDS_LABELS]
    values = tf.numpy_function(_guarded(load, bad_rows, spec, layout), inputs, _chunk_spec(spec))
    return _as_chunk(values, layout)

  return fn


def _tfds_records(source, split, records, bad_rows):
  """source[records], one per record; an unreadable one is recorded and gives None."""
  try:
    # One call per chunk: the reader fetches a shard's records in parallel.
    return source.__getitems__(records)
  except Exception:
    pass  # one of them fails: read each, to record that one and keep the others
  out = []
  for record in records:
    try:
      out.append(source[record])
    except Exception as e:
      bad_rows.record((split, f'record {record}'), f'{split} record {record}: {e}')
      out.append(None)
  return out


def tfds_index_loader(source, bad_rows, params_fn, layout, split, epoch_length):
  """[rows] (counter, record) -> dict of [rows, ...] through one numpy_function.

  For an ArrayRecord build read by index: `source` is `tfds_metro.data_source`
  of the split, record i its example i. As for the TSVs, the augmentation is
  keyed on (counter // epoch_length, the example's row in its yaml: 'index').
  """
  spec = example_spec(layout)

  def load(counters, records):
    out = []
    for counter, example in zip(counters, _tfds_records(source, split, records.tolist(), bad_rows)):
      if example is None:
        out.append(empty_example(layout))
        continue
      # As the TFRecord stream gives them (the data source gives Python floats for scalars).
      label = {
          name: np.asarray(
              example[name], np.float64 if name in metro_labels.FLOAT64_FIELDS else np.float32
          )
          for name in _TFDS_LABELS
      }
      key = example['key'].decode('utf-8', 'replace')
      params = params_fn(counter // epoch_length, example['index'])
      out.append(_tfds_example(example['image'], label, params, layout, split, key, bad_rows))
    return _stacked(out, spec)

  def fn(counters, records):
    values = tf.numpy_function(
        _guarded(load, bad_rows, spec, layout), [counters, records], _chunk_spec(spec)
    )
    return _as_chunk(values, layout)

  return fn
