"""TFDS builder: METRO yaml datasets as sharded ArrayRecord files (e.g. on GCS).

METRO's TSVs are read by random seeks, which is fine on a local disk but slow
on object storage; TPU pods read large record files instead. The builder stores
each usable row once: the original JPEG bytes (not re-encoded) and the parsed
label (`metro_labels.parse_label`), in linelist order. The input pipeline reads
either source (config.data.source = 'tsv' | 'tfds') and produces identical
batches, because both decode the same bytes with the same code and key the
augmentation on the same yaml row (shuffled training: when the build left no
bad row out, as the order permutes the build's examples).

File format. The default is ArrayRecord, which TFDS reads by index
(`data_source`): training then takes the global order of
data_pipelines/ordering.py, each host reading only the examples of its own
slots of every global batch, so 1 and N hosts train on the same batches (as
with the TSVs). `file_format='tfrecord'` still builds TFRecord shards, which
are read in sequence only: each host then shuffles its own contiguous slice
(config.data.shuffle_buffer), and the input pipeline warns on several hosts
that the batches depend on the host count. `copy_from` turns such a build into
an ArrayRecord one without the TSVs.

Build (any machine with the TSVs; the output dir may be gs://...):

  from data_pipelines import tfds_metro
  builder = tfds_metro.Metro(
      data_dir='/data/tfds',
      yamls={'train': '/data/Tax-H36m-coco40k-Muco-UP-Mpii/train.yaml',
             'h36m_valid': '/data/human3.6m/valid.protocol2.yaml'})
  builder.download_and_prepare()

  # An existing TFRecord build in /data/tfds_old -> ArrayRecord, same examples:
  tfds_metro.Metro(data_dir='/data/tfds', copy_from='/data/tfds_old').download_and_prepare()

Read: set config.data.source='tfds', config.data.tfds_data_dir, and the split
names; `read_split` and `data_source` below read a split directly.
Bad rows (see metro_tsv) are logged and left out while building. Version
1.1.0 stores the crop's label inputs in float64; a 1.0.0 build (float32) is not
read by this code and must be built again.
"""

import os

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import augment
from data_pipelines import metro_labels
from data_pipelines import metro_tsv

# Label arrays stored per example, with their shapes; float32 except the
# crop's inputs, stored as float64 like `parse_label` gives them, so that the
# 'metro' crop (config.data.crop) truncates the same values as from the TSVs.
LABEL_FEATURES = {
    'center': (2,),
    'scale': (),
    'joints_2d': (metro_labels.NUM_J24, 3),
    'joints_3d': (metro_labels.NUM_J24, 4),
    'pose': (metro_labels.NUM_POSE,),
    'betas': (metro_labels.NUM_BETAS,),
    'has_2d_joints': (),
    'has_3d_joints': (),
    'has_smpl': (),
}

# The default format of a new build: read by index (`data_source`), so
# training takes the host-independent global order.
ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class Metro(tfds.core.GeneratorBasedBuilder):
  """METRO-format human mesh datasets (images + J24/SMPL labels)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'METRO TSV rows: JPEG bytes + parsed label.',
      '1.1.0': 'center, scale and joints_2d in float64 (the JSON values).',
  }

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default probes package resources through `importlib_resources`,
    # which tensorflow-datasets 4.9.10 uses without declaring it; the answer
    # is this file either way.
    return epath.Path(__file__)

  def __init__(self, *, yamls=None, copy_from=None, **kwargs):
    """Needed only to build: either source.

    Args:
      yamls: {split name: METRO dataset yaml}.
      copy_from: the data_dir of another build (either format) whose splits
        are copied example for example, without the TSVs.
      **kwargs: as `tfds.core.GeneratorBasedBuilder` (data_dir, ...); an
        existing build is read in the format it was written in.
    """
    if yamls and copy_from:
      raise ValueError('Metro: pass yamls= or copy_from=, not both')
    self._yamls = dict(yamls or {})
    self._copy_from = copy_from
    super().__init__(**kwargs)

  def download_and_prepare(self, *, file_format=ARRAY_RECORD, **kwargs):
    """Builds every split in `file_format` ('array_record' or 'tfrecord').

    An existing build of this version in the same format is reused, as TFDS
    does; one in the other format is an error (TFDS would silently reuse it).
    """
    file_format = tfds.core.FileFormat.from_value(file_format or ARRAY_RECORD)
    if self.data_path.exists() and self.info.file_format != file_format:
      raise ValueError(
          f'Metro: {self.data_path} already holds a {self.info.file_format.value} build; '
          f'build the {file_format.value} one into another data_dir (copy_from='
          f'{os.fspath(self.data_dir)!r} copies its examples) or delete this one'
      )
    super().download_and_prepare(file_format=file_format, **kwargs)

  def _info(self):
    features = {
        'key': tfds.features.Text(),
        # Position in the source yaml dataset (linelist order); the pipeline
        # keys its augmentation on it, as it does for the TSV source.
        'index': tfds.features.Scalar(dtype=np.int64),
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
    }
    for name, shape in LABEL_FEATURES.items():
      if name in metro_labels.FLOAT64_FIELDS:
        # As raw bytes: a tf.train.Example float list would round to float32.
        features[name] = tfds.features.Tensor(
            shape=shape, dtype=np.float64, encoding=tfds.features.Encoding.BYTES
        )
      else:
        features[name] = tfds.features.Tensor(shape=shape, dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict(features),
        # Keep the linelist order, so reading it back yields the same batches
        # as the TSV source; the pipeline shuffles at read time.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if self._copy_from:
      splits = Metro(data_dir=self._copy_from).info.splits
      return {split: self._copied_examples(split) for split in splits}
    if not self._yamls:
      raise ValueError(
          'Metro: pass yamls={split: METRO yaml path} (or copy_from=another build) '
          'to build the dataset'
      )
    return {split: self._generate_examples(path) for split, path in self._yamls.items()}

  def _copied_examples(self, split):
    for example in read_split(self._copy_from, split).as_numpy_iterator():
      example['key'] = example['key'].decode('utf-8')
      # The source's keys: its examples stay in their order.
      yield int(example['index']), example

  def _generate_examples(self, yaml_path):
    dataset = metro_tsv.MetroDataset(yaml_path)
    num_bad = 0
    for index in range(len(dataset)):
      try:
        example = dataset.read(index)
        if augment.decode_jpeg(example['jpeg']) is None:
          path, row = dataset.location(index)
          raise metro_labels.BadRowError(f'{path} row {row}: JPEG does not ' 'decode')
      except metro_labels.BadRowError as e:
        num_bad += 1
        logging.warning('tfds_metro: skipping bad row %d of %s: %s', num_bad, yaml_path, e)
        continue
      features = {'key': example['key'], 'index': index, 'image': example['jpeg']}
      features.update(example['label'])
      # Integer keys keep the linelist order (disable_shuffling sorts by key).
      yield index, features
    if num_bad:
      logging.warning(
          'tfds_metro: %d of %d rows of %s were skipped',
          num_bad,
          len(dataset),
          os.fspath(yaml_path),
      )


def file_format(data_dir):
  """The format a build is read in: 'array_record' (by index) or 'tfrecord' (in sequence)."""
  info = Metro(data_dir=data_dir).info
  return (
      ARRAY_RECORD.value
      if ARRAY_RECORD in info.available_file_formats()
      else info.file_format.value
  )


def data_source(data_dir, split):
  """Random access to a split of an ArrayRecord build.

  Returns:
    A sequence: source[i] (or source.__getitems__(list of i)) is example i of
    the split as a dict of NumPy values and bytes, the JPEG undecoded
    ('image'); scalar labels come back as Python floats.
  """
  return Metro(data_dir=data_dir).as_data_source(
      split, decoders={'image': tfds.decode.SkipDecoding()}, file_format=ARRAY_RECORD
  )


def _example_signature():
  """tf.TensorSpecs of a raw example (`read_split`)."""
  spec = {
      'key': tf.TensorSpec((), tf.string),
      'index': tf.TensorSpec((), tf.int64),
      'image': tf.TensorSpec((), tf.string),
  }
  for name, shape in LABEL_FEATURES.items():
    dtype = tf.float64 if name in metro_labels.FLOAT64_FIELDS else tf.float32
    spec[name] = tf.TensorSpec(shape, dtype)
  return spec


def _read_array_record(data_dir, split, start, end):
  source = data_source(data_dir, split)
  signature = _example_signature()

  def generate():
    for i in range(start or 0, len(source) if end is None else end):
      example = source[i]
      yield {
          name: np.asarray(example[name], spec.dtype.as_numpy_dtype)
          for name, spec in signature.items()
      }

  return tf.data.Dataset.from_generator(generate, output_signature=signature)


def read_split(data_dir, split, *, start=None, end=None, shuffle_files=False, seed=None):
  """Raw examples [start, end) of a built split, with undecoded JPEG bytes.

  Either format, in order; `shuffle_files` (TFRecord builds only) reads the
  shards in an order drawn from `seed`.

  Returns:
    tf.data.Dataset of dicts: key, index, image (JPEG bytes) and
    LABEL_FEATURES.
  """
  builder = Metro(data_dir=data_dir)
  if ARRAY_RECORD in builder.info.available_file_formats():
    if shuffle_files:
      raise ValueError(
          f'tfds_metro.read_split: {data_dir} is an ArrayRecord build, read in order '
          '(training shuffles it by index: data_pipelines/ordering.py)'
      )
    return _read_array_record(data_dir, split, start, end)
  if start is not None or end is not None:
    split = f'{split}[{start or 0}:{"" if end is None else end}]'
  # The split is stored in order; shuffled reading is deliberate for training.
  read_config = tfds.ReadConfig(shuffle_seed=seed, enable_ordering_guard=not shuffle_files)
  return builder.as_dataset(
      split=split,
      shuffle_files=shuffle_files,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
  )


def num_examples(data_dir, split):
  """Number of examples in a built split."""
  return Metro(data_dir=data_dir).info.splits[split].num_examples
