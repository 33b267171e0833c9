"""The datasets of a training run, resolved from `config.data`.

`config.data.source` names them:
  'tsv'        METRO yamls: `train_yaml` and `eval_yaml`, both required;
  'tfds'       a build of data_pipelines/tfds_metro.py in `tfds_data_dir`;
  'synthetic'  the embedded synthetic dataset (rendered from the CC0 body, same
               METRO TSV format), which the run prepares first with
               `prepare_synthetic`.

`config.data.hand` (the same value as config.model.hand) makes them hand
datasets: FreiHAND-format rows (21 joints, MANO), and 'synthetic' renders the
embedded CC0 hand (data_pipelines/synthetic/hand_render.py). Hands are read
from TSVs only (the TFDS build stores body labels).

A synthetic dataset lives in a directory of its own under
`config.data.synthetic.dir`, named after its generation parameters (hands:
`hand3_train<N>_test<N>_seed<S>_<P>px`), so that datasets made with other
parameters, or of the other kind, never replace each other. A finished one (it
has a `synthetic_done.json` marker) is reused; the only thing ever removed is
this dataset's own unfinished render (`<name>.partial`).
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil

from absl import logging
import ml_collections
import numpy as np

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import metrics
from data_pipelines import bad_rows as bad_rows_lib
from data_pipelines import examples
from data_pipelines import input_pipeline
from data_pipelines import metro_labels
from data_pipelines import metro_tsv
from data_pipelines import ordering

DONE_MARKER = 'synthetic_done.json'
SOURCES = ('tsv', 'tfds', 'synthetic')
SYNTHETIC_PARAMS = ('num_train', 'num_test', 'seed', 'image_size')
# Synthetic hands, version 3: palm or back towards the camera
# (hand_pose_sampler.MAX_PALM_TILT_DEG), the fingers up within
# hand_pose_sampler.MAX_ROLL_DEG. Version 2 (`hand2_*`) had any roll; version 1
# (`hand_*`, marker 'hand': true) drew every orientation.
HAND_VERSION = 3
HAND_PREFIX = 'hand3_'


class DataConfigError(ValueError):
  """config.data does not name usable data (a setting to fix, not a file)."""


class InputError(ValueError):
  """An input of the run (a yaml or a file it names) is missing or unusable."""


# ------------------------------------------------------------ start-up checks


def check_config(data_config):
  """Raises DataConfigError unless `data_config` names one source completely."""
  source = data_config.source
  if source not in SOURCES:
    raise DataConfigError(f'config.data.source must be one of {list(SOURCES)}, ' f'got {source!r}')
  hand = data_config.get('hand', False)
  if not isinstance(hand, bool):
    raise DataConfigError(f'config.data.hand must be True or False, got {hand!r}')
  if hand and source == 'tfds':
    raise DataConfigError(
        "config.data.hand with config.data.source='tfds': the TFDS build stores body labels; "
        "read hand data from METRO TSVs (source='tsv') or use source='synthetic'"
    )
  for key in ('crop', 'train_crop'):
    if data_config.get(key) not in examples.CROPS:
      raise DataConfigError(
          f'config.data.{key} must be one of {list(examples.CROPS)}, '
          f'got {data_config.get(key)!r}'
      )
  yamls = ('train_yaml', 'eval_yaml')
  if source == 'tsv':
    unset = [f'config.data.{k}' for k in yamls if not data_config[k]]
    if unset:
      raise DataConfigError(
          f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} unset "
          "(config.data.source='tsv'): point at METRO dataset yamls with "
          '--config.data.train_yaml=/path/train.yaml '
          '--config.data.eval_yaml=/path/valid.yaml, or run this recipe on the '
          'embedded synthetic data with --config.data.source=synthetic'
      )
  elif source == 'tfds':
    if not data_config.tfds_data_dir:
      raise DataConfigError(
          "config.data.tfds_data_dir is unset (config.data.source='tfds'): "
          'point it at a build of data_pipelines/tfds_metro.py'
      )
  else:
    given = [f'config.data.{k}' for k in yamls if data_config[k]]
    if given:
      raise DataConfigError(
          f"{' and '.join(given)} set while config.data.source='synthetic': "
          'add --config.data.source=tsv to train on those yamls'
      )
    synthetic = data_config.synthetic
    if synthetic.num_train < data_config.batch_size or synthetic.num_test < 1:
      raise DataConfigError(
          f'config.data.synthetic needs num_train >= config.data.batch_size '
          f'({data_config.batch_size}) and num_test >= 1, got '
          f'{synthetic.num_train} and {synthetic.num_test}'
      )
    if synthetic.image_size < 32:
      raise DataConfigError(
          f'config.data.synthetic.image_size must be >= 32, got ' f'{synthetic.image_size}'
      )


def _yaml_rows(key, path):
  """Rows of the dataset `config.data.<key>` names, after checking its files."""
  try:
    # Resolves every file the yaml names and checks each .lineidx against its tsv.
    return len(metro_tsv.MetroDataset(path))
  except (OSError, ValueError) as e:
    raise InputError(f'config.data.{key}: {e}') from e


def _check_hand_labels(key, path):
  """Raises InputError unless the first label of the dataset parses as a hand label."""
  dataset = metro_tsv.MetroDataset(path, hand=True)
  source, row = (int(v) for v in dataset.rows[0])
  label_file = dataset.label_files[source]
  try:
    fields = label_file.read_row(row)
    metro_labels.parse_label_text(fields[1] if len(fields) > 1 else b'', hand=True)
  except ValueError as e:
    raise InputError(
        f'config.data.{key}: {label_file.path} row {row}: {e}; config.data.hand expects '
        "FreiHAND's hand labels (21 joints, MANO pose [48])"
    ) from e


def _tfds_rows(data_config, key):
  """Examples of the TFDS split `config.data.<key>` names."""
  # Imported here: TFDS is needed only for this source.
  from data_pipelines import tfds_metro

  split = data_config[key]
  try:
    return tfds_metro.num_examples(data_config.tfds_data_dir, split)
  except Exception as e:
    # TFDS reports a missing build or split with several exception types.
    raise InputError(
        f'config.data.{key}={split!r} in {data_config.tfds_data_dir}: ' f'{type(e).__name__}: {e}'
    ) from e


def check_inputs(data_config):
  """Checks the data a run will read; returns one line per input for the log.

  Raises:
    DataConfigError: the settings name no complete source.
    InputError: a yaml, a file it names or its .lineidx is missing or unusable,
      or a TFDS split is not built.
  """
  check_config(data_config)
  if data_config.source == 'tsv':
    lines = [
        f'config.data.{k}: {data_config[k]} ({_yaml_rows(k, data_config[k])} rows)'
        for k in ('train_yaml', 'eval_yaml')
    ]
    if data_config.get('hand', False):
      for k in ('train_yaml', 'eval_yaml'):
        _check_hand_labels(k, data_config[k])
    return lines
  if data_config.source == 'tfds':
    return [
        f'config.data.{k}: {data_config[k]} in {data_config.tfds_data_dir} '
        f'({_tfds_rows(data_config, k)} examples)'
        for k in ('tfds_train_split', 'tfds_eval_split')
    ]
  hand = data_config.get('hand', False)
  out = synthetic_dir(data_config.synthetic, hand)
  state = 'cached' if os.path.exists(os.path.join(out, DONE_MARKER)) else 'to render'
  kind = 'synthetic hands' if hand else 'synthetic'
  return [f'config.data.source: {kind}, {out} ({state})']


# ---------------------------------------------------------- synthetic dataset


def synthetic_dir(synthetic_config, hand=False):
  """The directory of the synthetic dataset (of hands) with these generation parameters."""
  p = {k: synthetic_config[k] for k in SYNTHETIC_PARAMS}
  name = f"train{p['num_train']}_test{p['num_test']}_seed{p['seed']}_" f"{p['image_size']}px"
  return os.path.join(os.path.abspath(synthetic_config.dir), HAND_PREFIX + name if hand else name)


def _synthetic_params(data_config):
  """The generation parameters recorded in the marker (hands: also 'hand': HAND_VERSION)."""
  params = {k: data_config.synthetic[k] for k in SYNTHETIC_PARAMS}
  return {**params, 'hand': HAND_VERSION} if data_config.get('hand', False) else params


@contextlib.contextmanager
def _exclusive(directory):
  """Holds an exclusive lock on `directory`: one render in it at a time."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the OS if the process dies
    yield
  finally:
    os.close(fd)


def _is_finished(out, params):
  """True if `out` holds this finished dataset; raises if it holds anything else."""
  marker = os.path.join(out, DONE_MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      found = json.load(f)
    if found == params:
      return True
    raise InputError(
        f'{out} holds a synthetic dataset made with {found}, not {params}; '
        'it is left as it is: move it away or set config.data.synthetic.dir'
    )
  if os.path.exists(out):
    raise InputError(
        f'{out} exists but is not a finished synthetic dataset (no '
        f'{DONE_MARKER}); it is left as it is: move it away or set '
        'config.data.synthetic.dir'
    )
  return False


def prepare_synthetic(data_config):
  """Renders the synthetic dataset of `data_config.synthetic` unless it is there.

  Returns:
    Its directory (train.yaml and test.yaml in METRO TSV format).
  Raises:
    InputError: the directory holds something other than this dataset.
  """
  synthetic = data_config.synthetic
  params = _synthetic_params(data_config)
  hand = params.get('hand', False)
  out = synthetic_dir(synthetic, hand)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with _exclusive(os.path.dirname(out)):  # a second run waits here, then reuses it
    if _is_finished(out, params):
      logging.info('Using the synthetic dataset in %s', out)
      return out
    tmp = out + '.partial'
    if os.path.exists(tmp):
      # Ours (same name) and unfinished: the lock shows no render is running.
      logging.warning('Removing %s, left by an interrupted render', tmp)
      shutil.rmtree(tmp)
    # Imported here: rendering is only needed when the data is not there.
    from data_pipelines.synthetic import generate

    os.makedirs(tmp)
    print(
        f"Rendering the synthetic {'hand ' if hand else ''}dataset into {out} "
        f"({params['num_train']} train / {params['num_test']} test images) ...",
        flush=True,
    )
    assets = generate.load_assets(hand=hand)
    workers = synthetic.workers or os.cpu_count() or 1
    for split, num in (('train', params['num_train']), ('test', params['num_test'])):
      generate.generate_split(
          assets, tmp, split, num, params['seed'], params['image_size'], workers
      )
    with open(os.path.join(tmp, DONE_MARKER), 'w') as f:
      json.dump(params, f)
    os.replace(tmp, out)
  return out


# ------------------------------------------------------------------ labels


def j14_joints(yaml_path):
  """Root-relative J14 3D joints [N, 14, 3] of the examples with 3D joints."""
  dataset = metro_tsv.MetroDataset(yaml_path)
  out = []
  for source, row in dataset.rows:
    label_file = dataset.label_files[source]
    fields = label_file.read_row(int(row))
    try:
      label = metro_labels.parse_label_text(fields[1])
    except ValueError as e:
      raise metro_labels.BadRowError(f'{label_file.path} row {row}: {e}') from e
    if label['has_3d_joints']:
      j = label['joints_3d'][:, :3]
      out.append(j[list(joint_tables.J24_TO_J14)] - j[joint_tables.J24_PELVIS])
  return np.stack(out).reshape(-1, len(joint_tables.J24_TO_J14), 3)


def hand_targets(yaml_path, hand_model_path=''):
  """Ground truth of the hand examples with 3D joints and MANO parameters.

  Returns:
    joints [N, 21, 3] (the labels' 3D joints) and vertices [N, V, 3] (the hand
    model of the label's pose and betas: the mirrored model for a left hand),
    both centred at the wrist, in metres; is_left [N] bool.
  """
  # Imported here: only the baseline needs the hand model (skinned in NumPy:
  # no compilation for a one-off pass over the labels).
  from coarsemetro_jax import hand_model
  from data_pipelines.synthetic import hand_np

  right = hand_model.load_hand_model(hand_model_path)
  models = {
      False: hand_np.from_hand_model(right),
      True: hand_np.from_hand_model(hand_model.mirror(right)),
  }
  dataset = metro_tsv.MetroDataset(yaml_path, hand=True)
  joints, verts, left = [], [], []
  for source, row in dataset.rows:
    label_file = dataset.label_files[source]
    try:
      label = metro_labels.parse_label_text(label_file.read_row(int(row))[1], hand=True)
    except (ValueError, IndexError) as e:
      raise metro_labels.BadRowError(f'{label_file.path} row {row}: {e}') from e
    if label['has_3d_joints'] and label['has_smpl']:
      is_left = bool(label['is_left'])
      v, j = hand_np.lbs(models[is_left], label['pose'], label['betas'])
      joints.append(label['joints_3d'][:, :3] - label['joints_3d'][0, :3])
      verts.append(v - j[0])
      left.append(is_left)
  num_joints, num_v = metro_labels.NUM_HAND_JOINTS, right.num_vertices
  return (
      np.asarray(joints, np.float32).reshape(-1, num_joints, 3),
      np.asarray(verts, np.float32).reshape(-1, num_v, 3),
      np.asarray(left, bool),
  )


def hand_baseline(train_yaml, eval_yaml, hand_model_path=''):
  """`metrics.hand_mean_pose_baseline` of a hand dataset's train and eval yamls."""
  return metrics.hand_mean_pose_baseline(
      hand_targets(train_yaml, hand_model_path), hand_targets(eval_yaml, hand_model_path)
  )


# ---------------------------------------------------------------- datasets


@dataclasses.dataclass
class Datasets:
  """Resolved data config, sizes and iterators for one training run."""

  config: ml_collections.ConfigDict  # the full config
  data_config: ml_collections.ConfigDict  # source 'tsv' or 'tfds', paths filled in
  synthetic: bool
  num_train: int
  train_bad_rows: bad_rows_lib.BadRows
  eval_bad_rows: bad_rows_lib.BadRows  # one for every evaluation of the run

  @classmethod
  def create(cls, config, rendered_dir=None):
    """The datasets of `config`; `rendered_dir`: from `prepare_synthetic`."""
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    check_config(data_config)
    if data_config.get('hand', False) != config.model.get('hand', False):
      raise DataConfigError(
          f'config.data.hand={data_config.get("hand", False)} but '
          f'config.model.hand={config.model.get("hand", False)}: hand data needs the hand model'
      )
    synthetic = data_config.source == 'synthetic'
    if synthetic:
      if rendered_dir is None:
        raise ValueError(
            "config.data.source='synthetic': pass the directory of "
            'prepare_synthetic(config.data)'
        )
      data_config.source = 'tsv'
      data_config.train_yaml = os.path.join(rendered_dir, 'train.yaml')
      data_config.eval_yaml = os.path.join(rendered_dir, 'test.yaml')
    if data_config.source == 'tsv':
      num_train = _yaml_rows('train_yaml', data_config.train_yaml)
    else:
      num_train = _tfds_rows(data_config, 'tfds_train_split')
    if num_train < data_config.batch_size:
      raise DataConfigError(
          f'the training set has {num_train} examples, fewer than one '
          f'global batch (config.data.batch_size={data_config.batch_size})'
      )
    bad_rows = lambda: bad_rows_lib.BadRows(max_fraction=data_config.max_bad_fraction)
    return cls(config, data_config, synthetic, num_train, bad_rows(), bad_rows())

  @property
  def steps_per_epoch(self):
    return self.num_train // self.data_config.batch_size

  def train_batches(self, sharding, start_step=0):
    """Endless global batches; batch k is the same whether or not the run resumed.

    The order and augmentation are functions of the example's global position
    (`data_pipelines.ordering`), so starting at `start_step` (computed, with
    nothing before it decoded) reproduces the uninterrupted run's batches
    exactly, and with the TSV source they are the same for any number of
    processes: each reads the rows that its devices of `sharding` hold. Past
    the bad-row limit the iterator raises bad_rows.TooManyBadRowsError.
    """
    local_rows = ordering.process_rows(sharding, self.data_config.batch_size)
    ds = input_pipeline.create_train_dataset(
        self.data_config,
        seed=self.config.seed,
        shuffle=self.data_config.shuffle,
        bad_rows=self.train_bad_rows,
        start_step=start_step,
        local_rows=local_rows,
    )
    return input_pipeline.global_batches(
        ds, sharding, self.data_config.device_prefetch, bad_rows=self.train_bad_rows
    )

  def eval_batches(self, sharding):
    ds = input_pipeline.create_eval_dataset(self.data_config, bad_rows=self.eval_bad_rows)
    return input_pipeline.global_batches(ds, sharding, bad_rows=self.eval_bad_rows)

  def skipped_rows(self):
    """{'train' | 'eval': {file: distinct rows skipped}} on this host so far."""
    return {'train': self.train_bad_rows.per_file(), 'eval': self.eval_bad_rows.per_file()}
