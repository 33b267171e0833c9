"""Every recipe in configs/ builds its model (shapes via jax.eval_shape) and names its data."""

import os

import jax
import jax.numpy as jnp
import pytest

from coarsemetro_jax import config_files
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax import optimizer
from configs import embedded
from configs import fastmetro
from configs import h64
from configs import r50
from configs import tiny
from data_pipelines import datasets

RECIPES = {
    'r50': r50.get_config,
    'h64': h64.get_config,
    'fastmetro-S-r50': lambda: fastmetro.get_config('S-r50'),
    'tiny': tiny.get_config,
    'embedded': embedded.get_config,
}


# The same recipes as command lines name them (config_files.load).
RECIPE_FILES = {
    'r50': 'r50.py',
    'h64': 'h64.py',
    'fastmetro-S-r50': 'fastmetro.py:S-r50',
    'tiny': 'tiny.py',
    'embedded': 'embedded.py',
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_file_loads_as_on_the_command_line(name):
  spec = os.path.join(os.path.dirname(os.path.abspath(r50.__file__)), RECIPE_FILES[name])
  config = config_files.load(spec)
  assert config.is_locked
  assert config.to_dict() == RECIPES[name]().to_dict()


@pytest.fixture(scope='module')
def topology():
  return mesh_topology.load_topology()


def output_shapes(module, image_size, **kwargs):
  """Shapes of module(images, **kwargs) for 2 images, without computing anything."""
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: module.init({'params': jax.random.key(0)}, x, **kwargs), images
  )
  return jax.eval_shape(lambda v, x: module.apply(v, x, **kwargs), variables, images)


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_builds_full_mesh_outputs(name, topology):
  config = RECIPES[name]()
  model = models.build_model(config.model, topology)
  out = output_shapes(model, config.data.image_size, train=False)
  assert out['pred_3d_vertices_fine'].shape == (2, 6890, 3)
  assert out['pred_3d_joints'].shape == (2, 14, 3)
  assert out['pred_cam'].shape == (2, 3)


def test_embedded_recipe_token_grid_and_schedule():
  config = embedded.get_config()
  # Output stride 32: a 3 x 3 token grid of 512 channels at 96 px.
  features = output_shapes(models.build_backbone(config.model), config.data.image_size)
  assert features.shape == (2, 3, 3, 512)
  # Warm-up to lr, then a straight line to 0 at the last step.
  assert config.optim.schedule == 'linear'
  _, lr_fn = optimizer.make_optimizer(config.optim, total_steps=optimizer.total_train_steps(config))
  warmup, total = config.optim.warmup_steps, config.num_train_steps
  assert float(lr_fn(0)) == 0.0
  assert float(lr_fn(warmup)) == pytest.approx(config.optim.lr)
  assert float(lr_fn((3 * warmup + total) // 4)) == pytest.approx(0.75 * config.optim.lr)
  assert float(lr_fn(total)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('name', ['r50', 'h64', 'fastmetro-S-r50'])
def test_real_data_recipes_need_their_data(name):
  """Recipes for real data fail on unset yamls; synthetic data is an explicit choice."""
  config = RECIPES[name]()
  assert config.data.source == 'tsv'
  with pytest.raises(datasets.DataConfigError) as e:
    datasets.check_config(config.data)
  message = str(e.value)
  assert message.startswith('config.data.train_yaml and config.data.eval_yaml are unset')
  for hint in (
      '--config.data.train_yaml=',
      '--config.data.eval_yaml=',
      '--config.data.source=synthetic',
  ):
    assert hint in message
  config.data.source = 'synthetic'
  datasets.check_config(config.data)


def test_synthetic_recipes_render_into_their_own_directories():
  configs = [tiny.get_config(), embedded.get_config()]
  for config in configs:
    assert config.data.source == 'synthetic' and not config.data.train_yaml
    datasets.check_config(config.data)
  dirs = [datasets.synthetic_dir(c.data.synthetic) for c in configs]
  assert len(set(dirs)) == 2
  assert {os.path.dirname(d) for d in dirs} == {os.path.abspath('data/synthetic')}
  # Yamls with a synthetic source are ambiguous: refused, naming the fix.
  configs[0].data.eval_yaml = 'valid.yaml'
  with pytest.raises(datasets.DataConfigError, match='eval_yaml set.*--config.data.source=tsv'):
    datasets.check_config(configs[0].data)
