"""The datasets a training run uses: real METRO/TFDS data, or the embedded set.

With `config.data.train_yaml` set (or `source = 'tfds'`) the configured data
is used. Otherwise the embedded synthetic dataset (rendered from the CC0 body,
same METRO TSV format) is read from `config.data.synthetic.dir`, generated
there first if absent; a `synthetic_done.json` marker records the generation
parameters, so a change of them regenerates instead of silently reusing.
"""

import dataclasses
import json
import os
import shutil

from absl import logging
import ml_collections
import numpy as np

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import metrics
from data_pipelines import input_pipeline
from data_pipelines import metro_labels
from data_pipelines import metro_tsv

DONE_MARKER = 'synthetic_done.json'


def ensure_synthetic(synthetic_config):
  """Generates the embedded dataset unless an identical one is cached; returns its dir."""
  out = os.path.abspath(synthetic_config.dir)
  params = {k: synthetic_config[k] for k in ('num_train', 'num_test', 'seed', 'image_size')}
  marker = os.path.join(out, DONE_MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == params:
        return out
    logging.warning('%s was generated with other parameters; regenerating', out)
  # Imported here: rendering is only needed when the data is not cached.
  from data_pipelines.synthetic import generate  # pylint: disable=g-import-not-at-top
  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  print(f'Generating the embedded synthetic dataset in {out} '
        f"({params['num_train']} train / {params['num_test']} test images) ...", flush=True)
  assets = generate.load_assets()
  workers = synthetic_config.workers or os.cpu_count() or 1
  for split, num in (('train', params['num_train']), ('test', params['num_test'])):
    generate.generate_split(assets, tmp, split, num, params['seed'], params['image_size'],
                            workers)
  with open(os.path.join(tmp, DONE_MARKER), 'w') as f:
    json.dump(params, f)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def _best_rotation(src, dst):
  """[N, 3, 3] rotations R minimising |src @ R - dst| (Kabsch; src [N, J, 3], dst [J, 3])."""
  u, _, vt = np.linalg.svd(np.einsum('nja,jb->nab', src, dst))
  u[:, :, -1] *= np.sign(np.linalg.det(u @ vt))[:, None]          # no reflections
  return u @ vt


def procrustes_mean(poses, iterations=5):
  """The mean body pose [J, 3] of root-free J14 poses [N, J, 3].

  A plain average of camera-frame poses seen from many directions collapses
  towards a point (a "baseline" no model could lose to). Each pose is instead
  rotated onto the running mean before averaging (generalised Procrustes,
  rotation only), and the result is given the orientation that best fits the
  plain average and is centred at the hip midpoint (where MPJPE centres poses).
  """
  poses = np.asarray(poses, np.float64)
  centred = poses - poses.mean(1, keepdims=True)                   # [N, J, 3]
  mean = centred[0]
  for _ in range(iterations):
    rot = _best_rotation(centred, mean)                            # [N, 3, 3]
    mean = np.einsum('nja,nab->jb', centred, rot) / len(centred)
  mean = mean @ _best_rotation(mean[None], centred.mean(0))[0]
  hips = 0.5 * (mean[joint_tables.J14_R_HIP] + mean[joint_tables.J14_L_HIP])
  return mean - hips


def _j14_joints(dataset):
  """Root-free J14 3D joints [N, 14, 3] and has_3d_joints [N] of a METRO dataset's labels."""
  out, has = [], []
  for source, row in dataset.rows:
    fields = dataset.label_files[source].read_row(int(row))
    label = metro_labels.parse_label_text(fields[1])
    j = label['joints_3d'][:, :3]
    out.append(j[list(joint_tables.J24_TO_J14)] - j[joint_tables.J24_PELVIS])
    has.append(label['has_3d_joints'])
  return np.stack(out), np.asarray(has)


@dataclasses.dataclass
class Datasets:
  """Resolved data config, sizes and iterators for one training run."""
  config: ml_collections.ConfigDict     # the full config
  data_config: ml_collections.ConfigDict
  is_embedded: bool
  num_train: int

  @classmethod
  def create(cls, config):
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    embedded = data_config.source == 'tsv' and not data_config.train_yaml
    if embedded:
      directory = ensure_synthetic(config.data.synthetic)
      data_config.train_yaml = os.path.join(directory, 'train.yaml')
      data_config.eval_yaml = data_config.eval_yaml or os.path.join(directory, 'test.yaml')
    if data_config.source == 'tsv':
      if not data_config.eval_yaml:
        raise ValueError('config.data.eval_yaml is required with config.data.train_yaml')
      num_train = len(metro_tsv.MetroDataset(data_config.train_yaml))
    else:
      from data_pipelines import tfds_metro  # pylint: disable=g-import-not-at-top
      num_train = tfds_metro.num_examples(data_config.tfds_data_dir,
                                          data_config.tfds_train_split)
    if num_train < data_config.batch_size:
      raise ValueError(f'the training set has {num_train} examples, fewer than one '
                       f'global batch (config.data.batch_size={data_config.batch_size})')
    return cls(config, data_config, embedded, num_train)

  @property
  def steps_per_epoch(self):
    return self.num_train // self.data_config.batch_size

  def train_batches(self, sharding, start_step=0):
    """Endless global batches; batch k is the same whether or not the run resumed.

    The order and augmentation are functions of the example index, so starting
    at `start_step` (skipped as row indices, before any decoding) reproduces
    the uninterrupted run's batches exactly.
    """
    ds = input_pipeline.create_train_dataset(
        self.data_config, seed=self.config.seed,
        shuffle=self.data_config.shuffle, start_step=start_step)
    return input_pipeline.global_batches(ds, sharding, self.data_config.device_prefetch)

  def eval_batches(self, sharding):
    return input_pipeline.global_batches(
        input_pipeline.create_eval_dataset(self.data_config), sharding)

  def mean_pose_baseline(self):
    """MPJPE / PA-MPJPE (mm) of always predicting the training set's mean J14 pose."""
    train, has_train = _j14_joints(metro_tsv.MetroDataset(self.data_config.train_yaml))
    test, has_test = _j14_joints(metro_tsv.MetroDataset(self.data_config.eval_yaml))
    mean_pose = procrustes_mean(train[has_train > 0])
    test = test[has_test > 0]
    pred = np.broadcast_to(mean_pose, test.shape).astype(np.float32)
    test = test.astype(np.float32)
    mm = lambda fn: metrics.MM_PER_M * float(np.asarray(fn(pred, test)).mean())
    return {'mpjpe': mm(metrics.mpjpe), 'pa_mpjpe': mm(metrics.pa_mpjpe),
            'count': int(len(test))}
