"""Corrupt checkpoints: detected, reported once, and the newest intact step is used.

One module-scoped workdir holds steps 2 and 4 of configs/tiny.py's TrainState,
saved by the training loop's CheckpointManager and `save_args`; their arrays
are random (as a trained state's are) and differ between the steps. Each test
corrupts a copy. No train step is compiled except in the one end-to-end test.
"""

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import traceback
import types

import cv2
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from coarsemetro_jax import build
from coarsemetro_jax import checkpoints
from coarsemetro_jax import checksums
from coarsemetro_jax import infer
from coarsemetro_jax import steps
from coarsemetro_jax import train
from coarsemetro_jax.convert import __main__ as convert_cli
from coarsemetro_jax.convert import orbax_variables
from configs import tiny
from data_pipelines import metro_tsv

NUM_TRAIN, NUM_TEST = 16, 3  # 2 steps per epoch at batch 8
STEPS = (2, 4)


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  for i in range(n):
    img = rng.integers(0, 255, (64, 64, 3), np.uint8)
    label = {
        'center': [32, 32],
        'scale': 0.3,
        '2d_joints': np.c_[rng.uniform(10, 50, (24, 2)), np.ones(24)],
        'has_2d_joints': 1,
        '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)],
        'has_3d_joints': 1,
        'pose': rng.normal(0, 0.2, 72),
        'betas': rng.normal(0, 0.5, 10),
        'has_smpl': 1,
    }
    yield {
        'key': f'ex{i:02d}',
        'jpeg': cv2.imencode('.jpg', img)[1].tobytes(),
        'height': 64,
        'width': 64,
        'label': label,
    }


def _config(data_dir):
  config = tiny.get_config()
  config.data.source = 'tsv'
  config.data.train_yaml = os.path.join(data_dir, 'train.yaml')
  config.data.eval_yaml = os.path.join(data_dir, 'test.yaml')
  config.data.num_parallel_calls = 2
  config.num_train_steps = STEPS[-1]
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.eval_every_steps = 1000
  config.num_eval_images = 0
  return config


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _perturb(x, rng, positive):
  y = np.asarray(x) + 0.01 * rng.normal(size=x.shape).astype(x.dtype)
  return jax.device_put(np.abs(y) if positive else y, x.sharding)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(data_dir, workdir, {step: TrainState as numpy}) with checkpoints at steps 2 and 4."""
  data_dir = str(tmp_path_factory.mktemp('data'))
  metro_tsv.write_split(data_dir, 'train', _examples(NUM_TRAIN, 0))
  metro_tsv.write_split(data_dir, 'test', _examples(NUM_TEST, 1))
  workdir = str(tmp_path_factory.mktemp('workdir'))
  config = _config(data_dir)
  model = build.build(config).model
  mesh = steps.make_device_mesh()
  state, _ = steps.create_train_state(
      config, model, jax.random.key(0), mesh, (64, 64, 3), steps_per_epoch=2
  )
  manager = checkpoints.make_manager(
      workdir, config.checkpoint_every_steps, config.keep_checkpoints
  )
  states = {}
  rng = np.random.default_rng(0)
  for step in STEPS:
    # Noise in every float array (AdamW moments too): incompressible, like a
    # trained state's, so each data file is mostly array bytes; nu stays >= 0.
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            _perturb(x, rng, '/nu/' in checksums.path_name(path))
            if np.issubdtype(x.dtype, np.floating)
            else x
        ),
        state,
    )
    state = state.replace(step=jax.device_put(np.int32(step), state.step.sharding))
    manager.save(step, args=checkpoints.save_args(state, {'step': step}))
    states[step] = _numpy(state)
  manager.wait_until_finished()
  manager.close()
  return data_dir, workdir, states


@pytest.fixture
def workdir(saved, tmp_path):
  """A fresh copy of the saved workdir."""
  _, source, _ = saved
  target = str(tmp_path / 'run')
  shutil.copytree(source, target)
  return target


def _largest_data_file(directory, step=None):
  """The largest array data file (OCDBT's d/ folders) of a step's state item or a directory."""
  if step is not None:
    directory = os.path.join(directory, 'checkpoints', str(step), checkpoints.STATE_ITEM)
  files = [
      os.path.join(root, f)
      for root, _, names in os.walk(directory)
      for f in names
      if os.path.basename(root) == 'd'
  ]
  return max(files, key=os.path.getsize)


def _overwrite_middle(path, seed=0):
  """4 KiB of random bytes into the middle of `path` (size kept); returns its new digest."""
  size = os.path.getsize(path)
  assert size > 3 * 4096
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    f.write(np.random.default_rng(seed).bytes(4096))
  assert os.path.getsize(path) == size
  return _digest(path)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)
  return _digest(path)


def _digest(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _resume(data_dir, workdir, mode='train'):
  """train.initial_state as train_and_evaluate calls it."""
  config = _config(data_dir)
  model = build.build(config).model
  manager = checkpoints.make_manager(
      workdir, config.checkpoint_every_steps, config.keep_checkpoints
  )
  try:
    state, _, origin = train.initial_state(
        config, model, 2, steps.make_device_mesh(), manager, mode
    )
  finally:
    manager.close()
  return _numpy(state), origin


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize('corrupt', [_overwrite_middle, _truncate])
def test_resume_skips_a_corrupt_step_and_keeps_it(saved, workdir, caplog, corrupt):
  data_dir, _, states = saved
  bad_file = _largest_data_file(workdir, 4)
  digest = corrupt(bad_file)
  with caplog.at_level(logging.WARNING):
    state, origin = _resume(data_dir, workdir)
  assert origin == 'resumed' and int(state.step) == 2
  # Exactly step 2's state, AdamW moments included.
  _assert_trees_equal(state.params, states[2].params)
  _assert_trees_equal(state.batch_stats, states[2].batch_stats)
  _assert_trees_equal(state.opt_state, states[2].opt_state)
  step_dir = os.path.join(workdir, 'checkpoints', '4')
  moved = step_dir + checkpoints.CORRUPT_SUFFIX
  [warning] = _warnings(caplog)
  assert re.search(re.escape(step_dir) + '[: ]', warning) and f'(moved to {moved})' in warning
  assert 'using step 2 instead' in warning
  # A truncated file fails to read; overwritten bytes fail zstd's decoding or,
  # where the frame still decodes, the checksums.
  reasons = (
      ('cannot be read', 'do not match their saved checksums')
      if corrupt is _overwrite_middle
      else ('cannot be read',)
  )
  assert any(r in warning for r in reasons), warning
  # Kept byte for byte, out of orbax's way.
  assert not os.path.exists(step_dir)
  assert _digest(bad_file.replace(step_dir, moved)) == digest
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4.corrupt']


def test_eval_mode_uses_the_newest_intact_step_and_moves_nothing(saved, workdir, caplog):
  data_dir, _, states = saved
  _truncate(_largest_data_file(workdir, 4))
  with caplog.at_level(logging.WARNING):
    state, _ = _resume(data_dir, workdir, mode='eval')
  _assert_trees_equal(state.params, states[2].params)
  [warning] = _warnings(caplog)
  assert '(left in place); using step 2 instead' in warning
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_resumed_run_saves_the_step_again_and_keeps_the_corrupt_one(saved, workdir, caplog):
  data_dir, _, states = saved
  bad_file = _largest_data_file(workdir, 4)
  digest = _overwrite_middle(bad_file)
  moved = bad_file.replace(os.sep + '4' + os.sep, os.sep + '4.corrupt' + os.sep)
  config = _config(data_dir)
  config.num_train_steps = 6  # saves 4 and 6; keep_checkpoints=2 then deletes 2
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == 6
  assert sum('Corrupt checkpoint' in w for w in _warnings(caplog)) == 1
  names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert names == ['4', '4.corrupt', '6']
  assert _digest(moved) == digest
  # The new step 4 continued from step 2's state, not from the corrupt one.
  new4, _ = checkpoints.read_variables(os.path.join(workdir, 'checkpoints', '4'))
  assert not np.array_equal(
      new4['params']['xyz_regressor']['kernel'], states[4].params['xyz_regressor']['kernel']
  )


def test_no_intact_step_is_one_clear_error(saved, workdir):
  data_dir, _, _ = saved
  _overwrite_middle(_largest_data_file(workdir, 4))
  _truncate(_largest_data_file(workdir, 2))
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r'(?s)no intact checkpoint \(nothing was moved.*'
      r'/checkpoints/4[: ].*/checkpoints/2 cannot be read',
  ):
    _resume(data_dir, workdir)
  # Nothing moved: a rerun fails the same way instead of starting from scratch.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_another_configs_checkpoint_is_not_taken_for_corruption(saved, workdir):
  data_dir, _, _ = saved
  config = _config(data_dir)
  config.model.stage_dims = (32, 16, 8)
  model = build.build(config).model
  manager = checkpoints.make_manager(workdir, 2, 2)
  with pytest.raises(
      checkpoints.CheckpointError, match=r'(?s)step 4 does not fit this config.*mis-shaped'
  ) as e:
    train.initial_state(config, model, 2, steps.make_device_mesh(), manager)
  manager.close()
  assert not isinstance(e.value, checkpoints.CorruptCheckpointError)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_load_variables_verifies_and_falls_back_in_a_workdir(saved, workdir, caplog):
  data_dir, _, states = saved
  step4 = os.path.join(workdir, 'checkpoints', '4')
  # A silently changed array: the file's bytes no longer match the checksum
  # saved with them (here the saved checksum of one kernel is changed instead).
  meta_file = os.path.join(step4, checkpoints.META_ITEM, checkpoints.META_FILE)
  with open(meta_file) as f:
    meta = json.load(f)
  meta['checksums']['params/xyz_regressor/kernel'] ^= 1
  with open(meta_file, 'w') as f:
    json.dump(meta, f)
  variables = {'params': states[4].params, 'batch_stats': states[4].batch_stats}
  with pytest.raises(
      checkpoints.CorruptCheckpointError,
      match=re.escape(step4) + r'/state: 1 of \d+ arrays do not match their '
      r'saved checksums \(params/xyz_regressor/kernel\)',
  ):
    checkpoints.load_variables(step4, variables)
  # A workdir gives its newest intact step, with a warning; nothing is moved.
  with caplog.at_level(logging.WARNING):
    loaded = checkpoints.load_variables(workdir, variables)
  _assert_trees_equal(_numpy(loaded['params']), states[2].params)
  [warning] = _warnings(caplog)
  assert step4 in warning and 'using the previous step' in warning
  assert os.path.isdir(step4)
  # Unreadable files: the same error kind, naming the step.
  for root, _, names in os.walk(os.path.join(step4, checkpoints.STATE_ITEM, 'ocdbt.process_0')):
    for name in names:
      os.truncate(os.path.join(root, name), 0)
  with pytest.raises(
      checkpoints.CorruptCheckpointError, match=re.escape(step4) + '/state cannot be read'
  ):
    checkpoints.load_variables(step4, variables)
  # infer says the same, without a hint at another config.
  config = _config(data_dir)
  model = build.build(config, body=False).model
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    infer.load_variables(config, model, step4)
  assert 'cannot be read' in str(e.value) and 'another config' not in str(e.value)


def test_converted_checkpoints_carry_and_verify_checksums(saved, tmp_path):
  _, _, states = saved
  variables = {'params': states[2].params, 'batch_stats': states[2].batch_stats}
  out = str(tmp_path / 'converted')
  orbax_variables.save_converted(out, variables, {'kind': 'test', 'scope': 'model'})
  loaded, metadata = checkpoints.read_variables(out)
  assert metadata['checksums'] == checksums.tree_checksums(variables)
  _assert_trees_equal(loaded, variables)
  _overwrite_middle(_largest_data_file(out))
  with pytest.raises(checkpoints.CorruptCheckpointError, match=re.escape(out)):
    checkpoints.load_variables(out, variables)


def test_reading_a_training_checkpoint_logs_no_metadata_warning(saved, caplog):
  _, workdir, states = saved
  with caplog.at_level(logging.INFO):
    loaded, _ = checkpoints.read_variables(workdir)
  _assert_trees_equal(loaded['params'], states[4].params)
  assert not [r for r in caplog.records if 'Metadata file does not exist' in r.getMessage()]
  assert not _warnings(caplog)


def test_step_saved_before_checksums_restores_with_one_warning(saved, workdir, caplog):
  data_dir, _, states = saved
  for step in STEPS:
    meta_file = os.path.join(
        workdir, 'checkpoints', str(step), checkpoints.META_ITEM, checkpoints.META_FILE
    )
    with open(meta_file) as f:
      meta = json.load(f)
    del meta['checksums']
    with open(meta_file, 'w') as f:
      json.dump(meta, f)
  with caplog.at_level(logging.WARNING):
    state, _ = _resume(data_dir, workdir)
  _assert_trees_equal(state.params, states[4].params)
  [warning] = _warnings(caplog)
  assert 'checkpoints/4 has no checksums' in warning


# ----------------------------------------------------------------------------
# The checksum.


def _fmix(h):
  """MurmurHash3's 32-bit finaliser on Python ints."""
  h ^= h >> 16
  h = h * 0x85EBCA6B % 2**32
  h ^= h >> 13
  h = h * 0xC2B2AE35 % 2**32
  return h ^ (h >> 16)


def _reference(x):
  """sum_i fmix(w_i) * (2 i + 1) mod 2**32 over the words of x, in Python ints."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  words = x.view(np.uint32) if x.dtype.itemsize in (4, 8) else x.view(f'uint{8 * x.dtype.itemsize}')
  return sum(_fmix(int(w)) * (2 * i + 1) for i, w in enumerate(words.ravel())) % 2**32


def test_checksum_hand_computed():
  assert _fmix(1) == 0x514E28B7  # MurmurHash3's published fmix32(1)
  # Word 0 mixes to 0; word 1 at index 1 has weight 3: 3 * 0x514E28B7.
  assert checksums.tree_checksums({'a': np.array([0, 1], np.uint32)}) == {'a': 0xF3EA7A25}
  assert checksums.tree_checksums(np.uint32(1)) == {'': 0x514E28B7}


def test_checksum_matches_reference_for_each_dtype():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7)).astype(np.float32)
  tree = {
      'f32': x,
      'bf16': x.astype(ml_dtypes.bfloat16),
      'f16': x.astype(np.float16),
      'i8': (x * 20).astype(np.int8),
      'bool': x > 0,
      'i32': (x * 1e6).astype(np.int32),
      'scalar': np.float32(3.5),
  }
  got = checksums.tree_checksums(tree)
  assert got == {k: _reference(v) for k, v in tree.items()}


def test_checksum_detects_any_one_change_and_cancelling_pairs():
  x = np.random.default_rng(1).normal(size=300).astype(np.float32)
  base = checksums.tree_checksums(x)['']
  for i in range(x.size):
    y = x.copy()
    y[i] = np.nextafter(y[i], np.float32(np.inf))  # the smallest possible change
    assert checksums.tree_checksums(y)[''] != base, i
  # Two flipped sign bits add 2 * 2**31 = 0 (mod 2**32) to an unmixed weighted sum.
  y = x.copy()
  y[[10, 20]] = -y[[10, 20]]
  assert checksums.tree_checksums(y)[''] != base
  # Swapped elements.
  y = x.copy()
  y[[3, 4]] = y[[4, 3]]
  assert checksums.tree_checksums(y)[''] != base


def test_checksum_is_the_same_sharded_and_unsharded():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',))
  x = np.random.default_rng(2).normal(size=(16, 24)).astype(np.float32)
  rows = jax.device_put(x, NamedSharding(mesh, P('data')))
  cols = jax.device_put(x, NamedSharding(mesh, P(None, 'data')))
  assert len(rows.addressable_shards) == 8 and not rows.is_fully_replicated
  got = checksums.tree_checksums({'one': x, 'rows': rows, 'cols': cols})
  assert got['one'] == got['rows'] == got['cols'] == _reference(x)


# ----------------------------------------------------------------------------
# Output on a failed restore, and the converter's argument checks.


def _abandoned_read():
  """What a failed orbax restore leaves behind, deterministically.

  A read of a TensorStore future starts on a loop; the restore fails and the
  loop is closed (as orbax's run_sync does); the read then completes on
  another thread, whose callback into the closed loop raises.
  """
  promise, future = ts.Promise.new()

  async def restore():
    next(future.__await__())  # the read is waiting (on an asyncio future)
    raise ValueError('one read failed')

  loop = asyncio.new_event_loop()
  with pytest.raises(ValueError):
    loop.run_until_complete(restore())
  loop.close()
  thread = threading.Thread(target=lambda: promise.set_result(1))
  thread.start()
  thread.join()


def test_reports_of_abandoned_reads_are_dropped(monkeypatch, tmp_path):
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  _abandoned_read()  # without the filter: reported
  assert [str(u.exc_value) for u in reported] == ['Event loop is closed']
  orbax_variables.quiet_abandoned_reads()
  orbax_variables.quiet_abandoned_reads()  # idempotent: one filter
  _abandoned_read()
  assert len(reported) == 1
  # Other unraisable errors still reach the previous hook.
  sys.unraisablehook(
      types.SimpleNamespace(
          exc_value=RuntimeError('Event loop is closed'), exc_traceback=None, object=None
      )
  )
  assert len(reported) == 2
  # asyncio's report of an orbax task's error is dropped, others are kept.
  with ocp.StandardCheckpointer() as ckptr, pytest.raises(FileNotFoundError) as orbax_error:
    ckptr.restore(tmp_path / 'missing')
  assert any(orbax_variables.ORBAX_CODE in f.filename for f in traceback.extract_tb(orbax_error.tb))
  keep = logging.getLogger('asyncio').filter
  for error, kept in ((orbax_error.value, False), (ValueError('elsewhere'), True)):
    record = logging.LogRecord(
        'asyncio',
        logging.ERROR,
        __file__,
        1,
        'Task exception was never retrieved',
        None,
        (type(error), error, error.__traceback__),
    )
    assert bool(keep(record)) == kept


def test_convert_checks_out_and_src_before_reading(tmp_path, capsys, monkeypatch):
  reads = []
  original = orbax_variables.read_state_dict
  monkeypatch.setattr(
      orbax_variables, 'read_state_dict', lambda *a, **k: reads.append(a) or original(*a, **k)
  )
  src = tmp_path / 'not_a_torch_file.pth'
  src.write_bytes(b'\0' * 4096)
  (tmp_path / 'out').mkdir()
  assert convert_cli.main(['--src', str(src), '--out', str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err
  assert err == f"error: {tmp_path / 'out'} already exists; choose a new --out directory\n"
  assert not reads
  # A missing source: named, and no --out written.
  missing = tmp_path / 'missing.pth'
  assert convert_cli.main(['--src', str(missing), '--out', str(tmp_path / 'new')]) == 1
  assert capsys.readouterr().err == f'error: --src {missing} does not exist\n'
  assert not reads and not os.path.exists(tmp_path / 'new')
  assert (
      convert_cli.main(['--to-torch', '--src', str(missing), '--out', str(tmp_path / 'new.pth')])
      == 1
  )
  assert capsys.readouterr().err == f'error: --src {missing} does not exist\n'
