"""FastMETRO's SMPL-parameter regressor: its modules in state-dict order.

  torch key (under `smpl_parameter_regressor.`)    Flax (under `smpl_parameter_regressor/`)
  regressor.0.fc_block.0.{weight,bias}             params regressor_0/fc_block_0 kernel (= W.T), bias
  regressor.0.fc_block.1.{weight,bias,             params regressor_0/fc_block_1 scale, bias;
    running_mean,running_var}                      batch_stats .../mean, var
  regressor.{1,2}.fc_block.{0,3}.*                 linear rows as above
  regressor.{1,2}.fc_block.{1,4}.*                 batch_norm rows as above
  regressor.3.{weight,bias}                        params regressor_3 kernel, bias

37 state-dict keys (4 of them BatchNorm `num_batches_tracked`, carried
unchanged) and 9,734,370 parameters for the released 5169 -> 1024 -> 226
regressor. The Flax module is models/smpl_param_regressor.py, whose
submodules follow `tables.flax_name`; `tables.smpl_param_table` turns this
listing into a conversion table (as hrnet_table.py's listing for HRNet), and
`tables.fastmetro_table` / `coarsemetro_table` add it when
`config.model.smpl_param_regressor` is on.
"""

TORCH_PREFIX = 'smpl_parameter_regressor.'
FLAX_PREFIX = 'smpl_parameter_regressor/'


def module_rows():
  """(torch module path under the regressor, row kind) in PyTorch registration order."""
  rows = [('regressor.0.fc_block.0', 'linear'), ('regressor.0.fc_block.1', 'batch_norm')]
  for k in (1, 2):
    rows += [
        (f'regressor.{k}.fc_block.0', 'linear'),
        (f'regressor.{k}.fc_block.1', 'batch_norm'),
        (f'regressor.{k}.fc_block.3', 'linear'),
        (f'regressor.{k}.fc_block.4', 'batch_norm'),
    ]
  rows.append(('regressor.3', 'linear'))
  return rows
