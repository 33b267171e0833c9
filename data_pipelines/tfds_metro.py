"""TFDS builder: METRO yaml datasets as sharded TFRecords (e.g. on GCS).

METRO's TSVs are read by random seeks, which is fine on a local disk but slow
on object storage; TPU pods read TFRecord shards instead. The builder stores
each usable row once: the original JPEG bytes (not re-encoded) and the parsed
label (`metro_labels.parse_label`), in linelist order. The input pipeline reads
either source (config.data.source = 'tsv' | 'tfds') and produces identical
batches, because both decode the same bytes with the same code.

Build (any machine with the TSVs; the output dir may be gs://...):

  from data_pipelines import tfds_metro
  builder = tfds_metro.Metro(
      data_dir='/data/tfds',
      yamls={'train': '/data/Tax-H36m-coco40k-Muco-UP-Mpii/train.yaml',
             'h36m_valid': '/data/human3.6m/valid.protocol2.yaml'})
  builder.download_and_prepare()

Read: `tfds_metro.Metro(data_dir='/data/tfds').as_dataset(split='train')`, or
set config.data.source='tfds', config.data.tfds_data_dir, and the split names.
Bad rows (see metro_tsv) are logged and left out while building. Version
1.1.0 stores the crop's label inputs in float64; a 1.0.0 build (float32) is not
read by this code and must be built again.
"""

import os

from absl import logging
from etils import epath
import numpy as np
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

  def __init__(self, *, yamls=None, **kwargs):
    """`yamls`: {split name: METRO dataset yaml}, needed only to build."""
    self._yamls = dict(yamls or {})
    super().__init__(**kwargs)

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
    if not self._yamls:
      raise ValueError('Metro: pass yamls={split: METRO yaml path} to build ' 'the dataset')
    return {split: self._generate_examples(path) for split, path in self._yamls.items()}

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


def read_split(data_dir, split, *, start=None, end=None, shuffle_files=False, seed=None):
  """Raw examples [start, end) of a built split, with undecoded JPEG bytes.

  Returns:
    tf.data.Dataset of dicts: key, index, image (JPEG bytes) and
    LABEL_FEATURES.
  """
  builder = Metro(data_dir=data_dir)
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
