"""User mistakes and bad inputs through main.py: one line, an exit code, no lost data.

Exit code 2: a mistake in the flags or the config; 1: a missing or unusable
input. Every case but the bad-row one fails before the model is built.
"""

import base64
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from configs import r50
from data_pipelines import datasets
from data_pipelines import metro_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'main.py')
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _examples(n, seed):
  """Valid METRO examples: random crops and labels."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    img = cv2.GaussianBlur(rng.integers(0, 255, (70, 60, 3), np.uint8), (0, 0), 2)
    label = {
        'center': [30, 35],
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
        'height': 70,
        'width': 60,
        'label': label,
    }


def run_main(args, cwd, timeout=120):
  env = {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'GLIBC_TUNABLES': '',
      'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
      'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
  }
  return subprocess.run(
      [sys.executable, MAIN, *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def error_line(run, code):
  """The one `error:` line of a run that failed with `code`, without a traceback."""
  assert run.returncode == code, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr and 'FATAL' not in run.stderr, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  assert [l for l in lines if l.startswith('error:')] == lines[-1:], run.stderr[-3000:]
  return lines[-1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('metro'))
  metro_tsv.write_split(out, 'train', _examples(16, 0))
  metro_tsv.write_split(out, 'test', _examples(4, 1))
  return out


def tsv_flags(data_dir, train=None, test=None):
  return [
      '--config.data.source=tsv',
      f"--config.data.train_yaml={train or f'{data_dir}/train.yaml'}",
      f"--config.data.eval_yaml={test or f'{data_dir}/test.yaml'}",
  ]


def test_paper_recipe_without_data_fails_at_start_up_and_keeps_the_cache(tmp_path):
  """The README's first run left a synthetic dataset; r50 without data keeps it."""
  cached = datasets.synthetic_dir(r50.get_config().data.synthetic)  # under the cwd
  cached = tmp_path / os.path.relpath(cached, os.getcwd())
  os.makedirs(cached)
  (cached / 'sentinel').write_text('rendered before')
  run = run_main([f'--config={REPO}/configs/r50.py', '--workdir=runs/r50'], cwd=tmp_path)
  line = error_line(run, 2)
  assert line.startswith('error: config.data.train_yaml and config.data.eval_yaml are unset')
  assert '--config.data.train_yaml=' in line and '--config.data.source=synthetic' in line
  assert (cached / 'sentinel').read_text() == 'rendered before'
  assert sorted(os.listdir(tmp_path)) == ['data']  # no workdir, nothing rendered
  assert os.listdir(cached.parent) == [cached.name]


@pytest.mark.parametrize(
    'args, message',
    [
        (
            ['--config=configs/nope.py'],
            f"error: config file 'configs/nope.py' (from {REPO}) not found",
        ),
        (
            [f'--config={TINY}', '--config.data.batchsize=4'],
            f"error: config '{TINY}' has no field 'data.batchsize'. "
            'Did you mean "batch_size" instead of "batchsize"?',
        ),
        (
            [f'--config={TINY}:bogus'],
            f"error: config '{TINY}:bogus': ValueError: "
            "configs/tiny.py argument must be 'coarsemetro' or 'fastmetro', got 'bogus'",
        ),
        (
            [f'--config={TINY}', '--config.data.batch_size=x'],
            "error: flag --config.data.batch_size=x: invalid literal for int() with base 10: 'x'",
        ),
        (
            [f'--config={TINY}', '--config.data.source=gcs'],
            "error: config.data.source must be one of ['tsv', 'tfds', 'synthetic'], got 'gcs'",
        ),
        (
            [f'--config={TINY}', '--config.data.train_yaml=train.yaml'],
            "error: config.data.train_yaml set while config.data.source='synthetic': "
            'add --config.data.source=tsv to train on those yamls',
        ),
    ],
)
def test_config_mistakes_exit_2_with_one_line(tmp_path, args, message):
  run = run_main([*args, '--workdir=w'], cwd=REPO if 'nope' in args[0] else tmp_path)
  assert error_line(run, 2) == message
  assert not os.path.exists(tmp_path / 'w')


def _write_bad_yaml(data_dir, tmp_path):
  (tmp_path / 'malformed.yaml').write_text('img: [unclosed\n')
  (tmp_path / 'missing_file.yaml').write_text(
      json.dumps({'img': f'{data_dir}/train.img.tsv', 'label': 'nowhere.label.tsv'})
  )


@pytest.mark.parametrize(
    'extra, message',
    [
        (
            lambda d, t: tsv_flags(d, test=f'{d}/valid.yaml'),
            'error: config.data.eval_yaml: dataset yaml not found: {d}/valid.yaml',
        ),
        (
            lambda d, t: tsv_flags(d, test=f'{t}/malformed.yaml'),
            'error: config.data.eval_yaml: {t}/malformed.yaml: malformed yaml',
        ),
        (
            lambda d, t: tsv_flags(d, train=f'{t}/missing_file.yaml'),
            "error: config.data.train_yaml: {t}/missing_file.yaml: 'label' points to a missing "
            'file: {t}/nowhere.label.tsv',
        ),
        (
            lambda d, t: tsv_flags(d) + [f'--config.init_from={t}/converted'],
            'error: config.init_from: not found or not readable: {t}/converted',
        ),
        (
            lambda d, t: tsv_flags(d) + [f'--config.body_model.path={t}/smpl.pkl'],
            'error: config.body_model.path: body model not found or not readable: {t}/smpl.pkl',
        ),
        (
            lambda d, t: tsv_flags(d) + [f'--config.topology.hierarchy={t}/mesh.npz'],
            'error: config.topology.hierarchy: mesh hierarchy not found or not readable: '
            '{t}/mesh.npz',
        ),
    ],
)
def test_missing_or_bad_inputs_exit_1_before_any_work(data_dir, tmp_path, extra, message):
  _write_bad_yaml(data_dir, tmp_path)
  args = extra(data_dir, str(tmp_path))
  run = run_main([f'--config={TINY}', f'--workdir={tmp_path}/w', *args], cwd=tmp_path)
  line = error_line(run, 1)
  assert line.startswith(message.format(d=data_dir, t=tmp_path)), line
  assert not os.path.exists(tmp_path / 'w')  # failed before the run's first step


def test_verbose_shows_the_traceback(tmp_path):
  run = run_main(
      [f'--config={TINY}', '--workdir=w', '--config.data.source=tsv', '--verbose'], cwd=tmp_path
  )
  assert run.returncode == 1
  assert 'Traceback' in run.stderr and 'DataConfigError: config.data.train_yaml' in run.stderr


def test_bad_row_limit_exits_within_seconds_with_one_line(data_dir, tmp_path):
  """Every training image corrupt: the run stops at its first batch (no hang, no abort)."""
  bad = tmp_path / 'bad'
  metro_tsv.write_split(str(bad), 'train', _examples(40, 0))
  img = bad / 'train.img.tsv'
  rows = [
      (line.split('\t')[0], base64.b64encode(b'junk').decode())
      for line in img.read_text().splitlines()
  ]
  metro_tsv.write_tsv(str(img), rows)
  args = [
      '--config.data.source=tsv',
      f'--config.data.train_yaml={bad}/train.yaml',
      f'--config.data.eval_yaml={data_dir}/test.yaml',
      '--config.data.num_parallel_calls=2',
  ]
  run = run_main([f'--config={TINY}', f'--workdir={tmp_path}/w', *args], cwd=tmp_path, timeout=60)
  line = error_line(run, 1)
  assert line.startswith('error: input pipeline: ')
  assert (
      'distinct bad rows exceed the limit of 10 (config.data.max_bad_fraction=0.01); '
      f'last: {img} row '
  ) in line
  assert line.count('JPEG does not decode') == 3  # the last rows
