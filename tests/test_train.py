"""train_and_evaluate end to end on a tiny METRO TSV dataset (configs/tiny.py).

Runs share one dataset and one persistent compilation cache (every run
compiles the same programs), so only the first run pays for XLA compiles.
"""

import base64
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import cv2
import jax
from jax.experimental.compilation_cache import compilation_cache
import multihost_main  # tests/: main.py that saves the global batches
import numpy as np
import orbax.checkpoint as ocp
import pytest

from coarsemetro_jax import checkpoints
from coarsemetro_jax import huge_pages
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import metrics
from coarsemetro_jax import train
from coarsemetro_jax.convert import orbax_variables
from configs import tiny
from data_pipelines import datasets
from data_pipelines import metro_tsv
from data_pipelines import ordering

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN = 24  # 3 steps per epoch at batch 8: resume crosses an epoch boundary
NUM_TEST = 11  # eval batches of 8: one full batch and one with 5 padding rows
NUM_STEPS = 4


def _examples(n, seed):
  """Random crops and labels; has_* flags vary so the metric masks matter."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = rng.integers(60, 90, 2)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), np.uint8), (0, 0), 2)
    label = {
        'center': [w / 2, h / 2],
        'scale': float(rng.uniform(0.25, 0.35)),
        '2d_joints': np.c_[rng.uniform(10, 50, (24, 2)), rng.integers(0, 2, 24)],
        'has_2d_joints': 1,
        '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)],
        'has_3d_joints': int(i % 3 != 1),
        'pose': rng.normal(0, 0.2, 72),
        'betas': rng.normal(0, 0.5, 10),
        'has_smpl': int(i % 4 != 2),
    }
    yield {
        'key': f'ex{i:02d}',
        'jpeg': cv2.imencode('.jpg', img)[1].tobytes(),
        'height': int(h),
        'width': int(w),
        'label': label,
    }


@pytest.fixture(scope='module', autouse=True)
def _compilation_cache(tmp_path_factory):
  """Every run compiles the same programs: compile once, load afterwards."""
  names = (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_min_entry_size_bytes',
  )
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield
  for n, v in previous.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('metro'))
  metro_tsv.write_split(out, 'train', _examples(NUM_TRAIN, 0))
  metro_tsv.write_split(out, 'test', _examples(NUM_TEST, 1))
  return out


# Test-sized run settings on top of configs/tiny.py (also passed to main.py as
# --config.<key>=<value> by the multi-host test).
RUN_SETTINGS = {
    'data.num_parallel_calls': 2,
    'num_train_steps': NUM_STEPS,
    'checkpoint_every_steps': 2,
    'log_every_steps': 1,
    'eval_every_steps': 1000,
    'num_eval_images': 2,
    # Larger AdamW eps (see tests/test_steps.py): keeps tiny gradients' float
    # noise from other device layouts out of the updates.
    'optim.eps': 1e-3,
}


def make_config(data_dir, **overrides):
  """configs/tiny.py on the test data with RUN_SETTINGS and `overrides` ('a.b' keys)."""
  config = tiny.get_config()
  settings = {
      'data.source': 'tsv',
      'data.train_yaml': os.path.join(data_dir, 'train.yaml'),
      'data.eval_yaml': os.path.join(data_dir, 'test.yaml'),
      **RUN_SETTINGS,
      **overrides,
  }
  for key, value in settings.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def saved_variables(workdir, step):
  """{'params', 'batch_stats'} (numpy) of a training checkpoint of any layout."""
  path = os.path.join(workdir, 'checkpoints', str(step), checkpoints.STATE_ITEM)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    # fallback_sharding: the 2-process test's checkpoints name devices this
    # process does not have.
    tree = ckptr.restore(
        path,
        args=ocp.args.StandardRestore(
            fallback_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
    )
  return jax.tree.map(np.asarray, {c: tree[c] for c in ('params', 'batch_stats')})


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  paths_a = [p for p, _ in jax.tree_util.tree_leaves_with_path(a)]
  assert paths_a == [p for p, _ in jax.tree_util.tree_leaves_with_path(b)]
  for path, x, y in zip(paths_a, jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def labels(yaml_path):
  dataset = metro_tsv.MetroDataset(yaml_path)
  return [dataset.read(i)['label'] for i in range(len(dataset))]


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """4 uninterrupted steps (the reference of the resume and init_from tests)."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  summary = train.train_and_evaluate(make_config(data_dir), workdir)
  return workdir, summary


def test_train_and_evaluate_writes_checkpoints_results_and_picture(straight_run):
  workdir, summary = straight_run
  assert saved_steps(workdir) == [2, 4]
  with open(os.path.join(workdir, 'checkpoints', '4', checkpoints.META_ITEM, 'metadata')) as f:
    meta = json.load(f)
  assert meta['step'] == 4 and meta['epoch'] == pytest.approx(4 / 3)
  assert meta['model']['name'] == 'coarsemetro'
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    assert json.load(f) == summary
  assert summary['step'] == NUM_STEPS
  # Real data: no mean-pose baseline; the run ends with the rows it skipped.
  assert summary['mean_pose_baseline'] is None
  assert summary['skipped_rows'] == {'train': {}, 'eval': {}}
  for name in ('mpjpe', 'pa_mpjpe', 'mpve'):
    assert np.isfinite(summary['eval'][name]) and summary['eval'][name] > 0
  # PA-MPJPE aligns with the best similarity: never worse than MPJPE.
  assert summary['eval']['pa_mpjpe'] <= summary['eval']['mpjpe']
  assert np.isfinite(summary['train']['loss']) and summary['train']['loss'] > 0
  with open(os.path.join(workdir, 'eval_results.md')) as f:
    table = f.read().splitlines()
  assert table[0] == '| model | MPJPE (mm) | PA-MPJPE (mm) | MPVE (mm) | examples |'
  row = [c.strip() for c in table[2].strip('|').split('|')]
  assert row[0] == f'coarsemetro step {NUM_STEPS}'
  np.testing.assert_allclose(
      [float(c) for c in row[1:4]],
      [summary['eval'][k] for k in ('mpjpe', 'pa_mpjpe', 'mpve')],
      atol=0.051,
  )
  with open(summary['picture'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  assert gc.get_freeze_count() == 0  # the loop's gc.freeze() is undone


def test_odd_sized_eval_counts_each_example_once(straight_run, data_dir):
  _, summary = straight_run
  test_labels = labels(os.path.join(data_dir, 'test.yaml'))
  assert len(test_labels) == NUM_TEST and NUM_TEST % 8
  # 2 batches of 8 = 16 rows, 5 of them padding: only real, labelled rows count.
  assert summary['eval']['mpjpe_count'] == sum(l['has_3d_joints'] for l in test_labels) == 7
  assert summary['eval']['mpve_count'] == sum(l['has_smpl'] for l in test_labels) == 8


def test_resume_after_preemption_matches_uninterrupted_run(
    straight_run, data_dir, tmp_path, monkeypatch
):
  workdir = str(tmp_path)
  config = make_config(data_dir)
  original = datasets.Datasets.train_batches
  starts = []

  def sigterm_after_two(self, sharding, start_step=0):
    starts.append(start_step)
    for i, batch in enumerate(original(self, sharding, start_step), start_step + 1):
      if i == 2:  # as a cluster does: SIGTERM while step 2 runs
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(datasets.Datasets, 'train_batches', sigterm_after_two)
  assert train.train_and_evaluate(config, workdir) is None
  assert saved_steps(workdir) == [2]
  assert not os.path.exists(os.path.join(workdir, 'eval_results.json'))

  monkeypatch.setattr(
      datasets.Datasets,
      'train_batches',
      lambda self, sharding, start_step=0: (
          starts.append(start_step) or original(self, sharding, start_step)
      ),
  )
  summary = train.train_and_evaluate(config, workdir)
  assert starts == [0, 2]  # the restart continued after step 2
  assert summary['step'] == NUM_STEPS and saved_steps(workdir) == [2, 4]
  straight_dir, straight_summary = straight_run
  # Same batches, rng keys and optimiser state: the same numbers.
  assert_trees_equal(saved_variables(workdir, 4), saved_variables(straight_dir, 4), atol=1e-6)
  assert summary['train']['loss'] == pytest.approx(straight_summary['train']['loss'], rel=1e-6)


def test_nan_batch_trips_the_guard_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
  workdir = str(tmp_path)
  original = datasets.Datasets.train_batches

  def nan_at_step_3(self, sharding, start_step=0):
    for step, batch in enumerate(original(self, sharding, start_step), start_step + 1):
      if step == 3:
        image = np.full(batch['image'].shape, np.nan, np.float32)
        batch = {**batch, 'image': jax.device_put(image, batch['image'].sharding)}
      yield batch

  monkeypatch.setattr(datasets.Datasets, 'train_batches', nan_at_step_3)
  with pytest.raises(train.NonFiniteLossError, match=r'at step 3: .*loss'):
    train.train_and_evaluate(make_config(data_dir), workdir)
  assert saved_steps(workdir) == [2]
  good = saved_variables(workdir, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))


def _corrupt_images(path, rows):
  lines = [line.split('\t') for line in open(path).read().splitlines()]
  for row in rows:
    lines[row][1] = base64.b64encode(b'not a jpeg').decode()
  metro_tsv.write_tsv(path, [tuple(line) for line in lines])


def test_run_ends_with_the_rows_it_skipped_in_each_file(tmp_path, capsys):
  data = str(tmp_path / 'data')
  metro_tsv.write_split(data, 'train', _examples(NUM_TRAIN, 0))
  metro_tsv.write_split(data, 'test', _examples(NUM_TEST, 1))
  train_img, test_img = (os.path.join(data, f'{s}.img.tsv') for s in ('train', 'test'))
  _corrupt_images(train_img, [0, 1])  # in the first batch (file order)
  _corrupt_images(test_img, [3])
  config = make_config(data, **{'num_train_steps': 1, 'num_eval_images': 0, 'data.shuffle': False})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['skipped_rows'] == {'train': {train_img: 2}, 'eval': {test_img: 1}}
  with open(tmp_path / 'run' / 'eval_results.json') as f:
    assert json.load(f)['skipped_rows'] == summary['skipped_rows']
  assert (
      f'Skipped rows: 2 in {train_img} (train), 1 in {test_img} (eval)'
      in capsys.readouterr().out.splitlines()
  )


def test_init_from_loads_converted_weights(straight_run, data_dir, tmp_path):
  straight_dir, straight_summary = straight_run
  variables = saved_variables(straight_dir, 4)
  converted = str(tmp_path / 'converted')
  orbax_variables.save_converted(converted, variables, {'kind': 'test', 'scope': 'model'})
  # Eval only, one batch of 16 (5 padding rows) instead of two of 8: the same
  # weights give the same metrics, counted over the same examples.
  config = make_config(
      data_dir, **{'init_from': converted, 'data.eval_batch_size': 16, 'num_eval_images': 0}
  )
  summary = train.train_and_evaluate(config, str(tmp_path / 'eval'), mode='eval')
  assert summary['step'] == 0
  # num_eval_images 0: no picture, and the results are still written.
  assert 'picture' not in summary
  assert not [n for n in os.listdir(tmp_path / 'eval') if n.endswith('.png')]
  assert os.path.exists(tmp_path / 'eval' / 'eval_results.json')
  for k, v in straight_summary['eval'].items():
    assert summary['eval'][k] == pytest.approx(v, rel=1e-5), k
  # A checkpoint of another model fails, naming what does not fit.
  other = jax.tree.map(lambda x: x, variables)
  del other['params']['backbone']['conv1']
  other['params']['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
  orbax_variables.save_converted(str(tmp_path / 'other'), other, {'kind': 'test', 'scope': 'model'})
  with pytest.raises(
      checkpoints.CheckpointError,
      match=(
          r'(?s)missing in the checkpoint \(1\): '
          r'params/backbone/conv1/kernel.*'
          r'not in the model \(1\): params/extra/kernel'
      ),
  ):
    checkpoints.load_variables(str(tmp_path / 'other'), variables)


def test_eval_flip_reports_both_protocols(straight_run, data_dir, tmp_path):
  straight_dir, straight_summary = straight_run
  workdir = str(tmp_path / 'flip')
  shutil.copytree(os.path.join(straight_dir, 'checkpoints'), os.path.join(workdir, 'checkpoints'))
  config = make_config(data_dir, eval_flip=True, num_eval_images=0)
  summary = train.train_and_evaluate(config, workdir, mode='eval')
  # The single-view row is the plain evaluation of the same step ...
  for k, v in straight_summary['eval'].items():
    assert summary['eval_no_flip'][k] == pytest.approx(v, rel=1e-5), k
  # ... and the flip test changes the predictions, not the counted examples.
  assert summary['eval']['mpjpe_count'] == straight_summary['eval']['mpjpe_count']
  assert abs(summary['eval']['mpve'] - straight_summary['eval']['mpve']) > 1e-3
  with open(os.path.join(workdir, 'eval_results.md')) as f:
    names = [line.split('|')[1].strip() for line in f.read().splitlines()[2:]]
  assert names == [f'coarsemetro step {NUM_STEPS}', f'coarsemetro step {NUM_STEPS} + flip test']


def test_eval_mode_without_a_checkpoint_fails(data_dir, tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='needs a checkpoint'):
    train.train_and_evaluate(make_config(data_dir), str(tmp_path), mode='eval')


def test_resuming_another_models_checkpoint_fails_clearly(straight_run, data_dir, tmp_path):
  straight_dir, _ = straight_run
  shutil.copytree(
      os.path.join(straight_dir, 'checkpoints', '2'), os.path.join(tmp_path, 'checkpoints', '2')
  )
  config = make_config(data_dir, **{'model.stage_dims': (32, 16, 8)})
  with pytest.raises(checkpoints.CheckpointError, match=r'step 2 does not fit this config'):
    train.train_and_evaluate(config, str(tmp_path))


def test_misspelled_config_override_fails(tmp_path):
  """main.py's config is locked: a typo'd override stops before any work."""
  run = subprocess.run(
      [
          sys.executable,
          'main.py',
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}',
          '--config.data.batchsize=4',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert run.returncode == 2
  assert 'Did you mean "batch_size" instead of "batchsize"?' in run.stderr
  assert 'Traceback' not in run.stderr
  assert os.listdir(tmp_path) == []


def test_main_reexecutes_once_with_the_huge_pages_tunable():
  env = {'PATH': '/usr/bin'}
  executable, argv, new_env = huge_pages.exec_args(env, platform='linux')
  assert executable == sys.executable
  assert argv == [sys.executable] + sys.orig_argv[1:]
  assert new_env == {'PATH': '/usr/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert huge_pages.exec_args(new_env, platform='linux') is None  # no loop
  # A user's own tunables (even none) are kept; other systems are left alone.
  assert huge_pages.exec_args({'GLIBC_TUNABLES': ''}, platform='linux') is None
  assert huge_pages.exec_args(env, platform='darwin') is None


def test_reexecute_replaces_the_process_only_without_tunables(monkeypatch):
  calls = []
  monkeypatch.setattr(huge_pages.os, 'execve', lambda *args: calls.append(args))
  monkeypatch.setenv('GLIBC_TUNABLES', '')
  huge_pages.reexecute()
  assert calls == []
  monkeypatch.delenv('GLIBC_TUNABLES')
  huge_pages.reexecute()
  assert [env['GLIBC_TUNABLES'] for _, _, env in calls] == ['glibc.malloc.hugetlb=1']


def _free_port():
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(straight_run, data_dir, tmp_path, monkeypatch):
  """jax.distributed on loopback: 2 processes x 4 CPU devices == 1 x 8.

  Both continue the straight run's step-2 checkpoint (restored into their own
  device layout; no initialiser to compile) for 2 steps with shuffling and
  augmentation on, BatchNorm in groups of 4 (each process's rows make one
  group), then evaluate. Each process reads only its half of every global
  batch, yet the global batches (gathered and saved by tests/multihost_main.py)
  are the 1-process ones bit for bit, and so are the params up to the float
  noise of a different reduction order across processes.
  """
  straight_dir, _ = straight_run
  settings = {
      'data.source': 'tsv',
      'data.train_yaml': os.path.join(data_dir, 'train.yaml'),
      'data.eval_yaml': os.path.join(data_dir, 'test.yaml'),
      'data.shuffle': True,
      'bn_group_size': 4,
  }
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  for workdir in (one_dir, two_dir):
    shutil.copytree(
        os.path.join(straight_dir, 'checkpoints', '2'), os.path.join(workdir, 'checkpoints', '2')
    )
  monkeypatch.setattr(
      datasets.Datasets,
      'train_batches',
      multihost_main.recording(datasets.Datasets.train_batches, str(tmp_path / 'one_batches')),
  )
  config = make_config(data_dir, **settings)
  one = train.train_and_evaluate(config, one_dir)

  overrides = [f'--config.{k}={v}' for k, v in {**RUN_SETTINGS, **settings}.items()]
  port = _free_port()
  env = {
      **os.environ,
      'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
      'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
      'JAX_PLATFORMS': 'cpu',
  }
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              'tests/multihost_main.py',
              str(tmp_path / 'two_batches'),
              '--config=configs/tiny.py',
              f'--workdir={two_dir}',
              f'--coordinator_address=localhost:{port}',
              '--num_processes=2',
              f'--process_id={i}',
              *overrides,
          ],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i} failed:\n{out[-5000:]}'

  for step in (3, 4):
    a = np.load(tmp_path / 'one_batches' / f'batch_{step}.npz')
    b = np.load(tmp_path / 'two_batches' / f'batch_{step}.npz')
    assert sorted(a) == sorted(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f'{name}, step {step}')
    # The shuffled global order (the test rows' flags follow their index).
    rows = ordering.global_batch_rows(NUM_TRAIN, 8, step - 1, seed=config.seed)
    assert sorted(rows) != list(rows)
    np.testing.assert_array_equal(a['has_smpl'], rows % 4 != 2)
    np.testing.assert_array_equal(a['has_3d_joints'], rows % 3 != 1)
    np.testing.assert_array_equal(a['mask'], 1)

  with open(os.path.join(two_dir, 'eval_results.json')) as f:
    two = json.load(f)
  assert two['step'] == one['step'] == NUM_STEPS
  assert saved_steps(two_dir) == [2, 4]
  assert os.path.exists(two['picture'])  # process 0's rows of the first eval batch
  for k in ('mpjpe_count', 'mpve_count'):
    assert two['eval'][k] == one['eval'][k]
  for k in ('mpjpe', 'pa_mpjpe', 'mpve'):
    assert two['eval'][k] == pytest.approx(one['eval'][k], rel=1e-5), k
  for k, v in one['train'].items():
    assert two['train'][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
  assert_trees_equal(saved_variables(two_dir, 4), saved_variables(one_dir, 4), rtol=1e-5, atol=2e-7)


def _write_marker(directory, params):
  os.makedirs(directory)
  with open(os.path.join(directory, datasets.DONE_MARKER), 'w') as f:
    json.dump(params, f)
  with open(os.path.join(directory, 'sentinel'), 'w') as f:
    f.write('user data')


def test_synthetic_run_keeps_other_datasets_and_scores_the_mean_pose(data_dir, tmp_path, capsys):
  """A tiny run on synthetic data renders its own directory and deletes nothing."""
  root = tmp_path / 'synthetic'
  config = make_config(
      data_dir,
      **{
          'data.source': 'synthetic',
          'data.train_yaml': '',
          'data.eval_yaml': '',
          'data.synthetic.dir': str(root),
          'data.synthetic.num_train': 8,
          'data.synthetic.num_test': 3,
          'data.synthetic.image_size': 64,
          'data.synthetic.workers': 1,
          'num_train_steps': 1,
          'num_eval_images': 0,
      },
  )
  # The dataset of another config (r50's defaults, as a README run leaves it)
  # and an interrupted render of this one.
  other = str(root / os.path.basename(datasets.synthetic_dir(tiny.get_config().data.synthetic)))
  _write_marker(other, {k: tiny.get_config().data.synthetic[k] for k in datasets.SYNTHETIC_PARAMS})
  own = datasets.synthetic_dir(config.data.synthetic)
  assert os.path.dirname(own) == str(root) and own != other
  os.makedirs(own + '.partial')
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(os.path.join(other, 'sentinel')) as f:
    assert f.read() == 'user data'
  assert not os.path.exists(own + '.partial')
  assert len(metro_tsv.MetroDataset(os.path.join(own, 'test.yaml'))) == 3
  assert summary['step'] == 1

  # The mean-pose baseline: always predicting the training set's mean J14 pose,
  # scored on the test examples with 3D joints (NumPy reference below).
  def j14(yaml_path):
    j = np.stack([l['joints_3d'][:, :3] for l in labels(yaml_path) if l['has_3d_joints']])
    return j[:, list(joint_tables.J24_TO_J14)] - j[:, joint_tables.J24_PELVIS][:, None]

  train_j, test_j = (j14(os.path.join(own, f'{s}.yaml')) for s in ('train', 'test'))
  hip = lambda x: x - (x[..., 2:3, :] + x[..., 3:4, :]) / 2
  # (procrustes_mean itself: tests/test_mean_pose_baseline.py)
  mean_pose = metrics.procrustes_mean(train_j)
  mpjpe = np.linalg.norm(hip(mean_pose) - hip(test_j), axis=-1).mean()
  baseline = summary['mean_pose_baseline']
  assert baseline['count'] == len(test_j) == 3
  assert baseline['mpjpe'] == pytest.approx(1000 * mpjpe, rel=1e-5)
  assert 0 < baseline['pa_mpjpe'] <= baseline['mpjpe']
  assert summary['skipped_rows'] == {'train': {}, 'eval': {}}
  out = capsys.readouterr().out
  assert '| mean-pose baseline |' in out and 'Skipped rows: none' in out


def test_synthetic_dataset_is_cached_by_parameters_and_never_replaced(tmp_path):
  config = tiny.get_config()
  synthetic = config.data.synthetic
  synthetic.dir = str(tmp_path)
  synthetic.num_train, synthetic.num_test = 8, 2
  synthetic.image_size, synthetic.workers = 64, 1
  first = datasets.prepare_synthetic(config.data)
  tsv = os.path.join(first, 'train.img.tsv')
  stamp = os.stat(tsv).st_mtime_ns
  assert datasets.prepare_synthetic(config.data) == first  # cached: not rendered again
  assert os.stat(tsv).st_mtime_ns == stamp
  synthetic.seed = 1  # other parameters: another directory
  second = datasets.prepare_synthetic(config.data)
  assert second != first and os.stat(tsv).st_mtime_ns == stamp
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(d) for d in (first, second))
  data = datasets.Datasets.create(config, second)
  assert data.synthetic and data.num_train == 8 and data.steps_per_epoch == 1
  assert data.data_config.source == 'tsv'
  assert data.data_config.eval_yaml == os.path.join(second, 'test.yaml')
  # A directory of that name that is not this dataset is refused, not replaced.
  synthetic.seed = 2
  foreign = datasets.synthetic_dir(synthetic)
  os.makedirs(foreign)
  with pytest.raises(datasets.InputError, match='not a finished synthetic dataset'):
    datasets.prepare_synthetic(config.data)
  assert os.listdir(foreign) == []
  with open(os.path.join(foreign, datasets.DONE_MARKER), 'w') as f:
    json.dump({'num_train': 5}, f)
  with pytest.raises(datasets.InputError, match='made with .* left as it is'):
    datasets.prepare_synthetic(config.data)
  # Building the datasets renders nothing.
  with pytest.raises(ValueError, match='prepare_synthetic'):
    datasets.Datasets.create(config)
