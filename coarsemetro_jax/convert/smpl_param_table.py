"""Conversion table of FastMETRO's SMPL-parameter regressor (both directions).

  torch key (under `torch_prefix`)                 Flax (under `flax_prefix`)
  regressor.0.fc_block.0.{weight,bias}             params regressor_0/fc_block_0 kernel (= W.T), bias
  regressor.0.fc_block.1.{weight,bias,             params regressor_0/fc_block_1 scale, bias;
    running_mean,running_var}                      batch_stats .../mean, var
  regressor.{1,2}.fc_block.{0,3}.*                 linear rows as above
  regressor.{1,2}.fc_block.{1,4}.*                 batch_norm rows as above
  regressor.3.{weight,bias}                        params regressor_3 kernel, bias

37 state-dict keys (4 of them BatchNorm `num_batches_tracked`, read and
ignored, written back as a counter) and 9,734,370 parameters for the released
5169 -> 1024 -> 226 regressor. The Flax module is
models/smpl_param_regressor.py; `state_dict.to_flax` / `to_torch` convert with
this table alone or added to a model's (`tables.Table.__add__`).
"""

from coarsemetro_jax.convert import tables

TORCH_PREFIX = 'smpl_parameter_regressor.'
FLAX_PREFIX = 'smpl_parameter_regressor/'


def smpl_param_table(torch_prefix=TORCH_PREFIX, flax_prefix=FLAX_PREFIX):
  """Rows of the regressor, in the PyTorch registration order.

  Args:
    torch_prefix: prefix of the regressor's keys ('' for its own state dict).
    flax_prefix: Flax path of the `SMPLParamRegressor` module ('' when it is
      the top-level module).
  """
  if torch_prefix and not torch_prefix.endswith('.'):
    torch_prefix += '.'
  if flax_prefix and not flax_prefix.endswith('/'):
    flax_prefix += '/'

  def r(kind, name):
    return tables.row(kind, f'{torch_prefix}{name}', flax_prefix + tables.flax_name(name))

  rows = [r('linear', 'regressor.0.fc_block.0'), r('batch_norm', 'regressor.0.fc_block.1')]
  for k in (1, 2):
    rows += [r('linear', f'regressor.{k}.fc_block.0'),
             r('batch_norm', f'regressor.{k}.fc_block.1'),
             r('linear', f'regressor.{k}.fc_block.3'),
             r('batch_norm', f'regressor.{k}.fc_block.4')]
  rows.append(r('linear', 'regressor.3'))
  return tables.Table(rows)
